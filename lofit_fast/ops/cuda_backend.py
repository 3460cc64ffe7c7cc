"""The extension's CUDA kernels (csrc/cuda), called as the torch ops `lofit_fast::head_affine_fwd/bwd`.

Built only when the installed torch has CUDA (setup.py). Under backend="auto" on a GPU, the choice between this
backend and `triton` is made per shape by lofit_fast.ops.dispatch from measured results.
"""
from __future__ import annotations

import torch

from . import dispatch
from .cpp_backend import call_backward, call_forward, native_ops


class CudaBackend:
    name = "cuda"
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})

    def unavailable_reason(self) -> str:
        from lofit_fast import _C

        if not getattr(_C, "with_cuda", False):
            return "lofit_fast._C was built without CUDA kernels (the installed torch has no CUDA, or LOFIT_FAST_NO_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return ""

    def is_available(self) -> bool:
        native_ops()
        return self.unavailable_reason() == ""

    def auto_priority(self, x, weight, K) -> float:
        return dispatch.gpu_priority(self.name, x, weight, K)

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        return call_forward(x, weight, bias, heads, A, v, head_dim)

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        return call_backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv)


BACKEND = CudaBackend()
