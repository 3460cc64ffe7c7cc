"""Builds lofit_fast._C: CPU sources always, CUDA sources only when the installed torch has CUDA.

Install with `pip install --no-build-isolation .` so the extension compiles against the torch that is
already installed (an isolated build would download a different torch and produce an ABI mismatch).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("LOFIT_FAST_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None


def _extension():
    cpu_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (it must match its headers)
    if os.environ.get("LOFIT_FAST_OPENMP", "1") == "1":
        cxx_flags.append("-fopenmp")
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "lofit_fast._C",
            cpu_sources + cuda_sources,
            define_macros=[("LOFIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    return CppExtension(
        "lofit_fast._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )


setup(
    packages=find_packages(include=["lofit_fast", "lofit_fast.*"]) + ["lofit_fast.kernels"],
    package_data={"lofit_fast.ops": ["dispatch.json"]},
    package_dir={"lofit_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
