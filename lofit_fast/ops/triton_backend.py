"""The Triton backend: fused head-affine GEMMs from `lofit_fast.kernels` (the top-level kernels/ folder).

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before the kernels were imported
(the interpreter: for tests, far too slow for real use, so `auto` never picks it on the CPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import weakref
from pathlib import Path
from typing import Callable, Dict

import torch

# An offsets-only forward over at least this many rows folds v·W_Sᵀ into the bias (a GEMV over the selected
# columns, then the plain GEMM with no per-tile work). Below it (decode), the shift is applied in the GEMM's
# x loads instead, so W is read once and there is one launch.
FOLD_MIN_ROWS = 64

_KERNELS = "lofit_fast.kernels"


def import_kernels():
    """`lofit_fast.kernels` when installed; in a source checkout, the kernels/ folder beside lofit_fast/."""
    try:
        return importlib.import_module(_KERNELS)
    except ModuleNotFoundError as exc:
        if exc.name != _KERNELS:
            raise
    import lofit_fast

    src = Path(lofit_fast.__file__).resolve().parent.parent / "kernels"
    if not (src / "__init__.py").is_file():
        raise ModuleNotFoundError(f"{_KERNELS} is not installed and there is no {src}/__init__.py", name=_KERNELS)
    spec = importlib.util.spec_from_file_location(_KERNELS, src / "__init__.py", submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_KERNELS, None)
        raise
    lofit_fast.kernels = module
    return module


class _SlotMaps:
    """The head -> slot map of each `heads` tensor, built once per tensor (a patched module's buffer) rather
    than once per call; rebuilt if the tensor is modified in place, dropped when it is freed."""

    def __init__(self):
        self._maps: Dict[int, tuple] = {}

    def get(self, heads: torch.Tensor, num_heads: int, build: Callable) -> torch.Tensor:
        try:
            version = heads._version
        except RuntimeError:  # inference tensors have no version counter: nothing safe to key on
            return build(heads, num_heads)
        key = id(heads)
        hit = self._maps.get(key)
        if hit is not None:
            ref, seen_version, seen_heads, slot = hit
            if ref() is heads and seen_version == version and seen_heads == num_heads:
                return slot
        slot = build(heads, num_heads)
        maps = self._maps
        self._maps[key] = (weakref.ref(heads, lambda _r, k=key: maps.pop(k, None)), version, num_heads, slot)
        return slot


class TritonBackend:
    name = "triton"
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    def __init__(self):
        self._kernels = None
        self._reason = ""
        self._slots = _SlotMaps()

    @property
    def kernels(self):
        if self._kernels is None:
            self._kernels = import_kernels()
        return self._kernels

    def is_available(self) -> bool:
        try:
            k = self.kernels
        except Exception as exc:  # triton missing or broken: this backend is simply absent
            self._reason = f"the Triton kernels could not be imported ({type(exc).__name__}: {exc})"
            return False
        if not k.INTERPRETED and not torch.cuda.is_available():
            self._reason = ("no CUDA GPU here; set TRITON_INTERPRET=1 before importing lofit_fast to run the "
                            "Triton kernels on CPU tensors in the interpreter")
            return False
        return True

    def unavailable_reason(self) -> str:
        return self._reason

    @property
    def device_types(self) -> frozenset:
        if not self.is_available():
            return frozenset()
        return frozenset({"cpu"}) if self.kernels.INTERPRETED else frozenset({"cuda"})

    def auto_priority(self, x, weight, K) -> float:
        if self.kernels.INTERPRETED:
            return -100.0  # never "auto" on the CPU: the interpreter is for tests
        from . import dispatch  # on a GPU: the measured per-shape choice between cuda and triton

        return dispatch.gpu_priority(self.name, x, weight, K)

    def _slot(self, heads: torch.Tensor, num_heads: int) -> torch.Tensor:
        return self._slots.get(heads, num_heads, self.kernels.head_slots)

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        k = self.kernels
        N, C = x.shape
        slot = self._slot(heads, C // head_dim)
        if A is None and N >= FOLD_MIN_ROWS:
            folded = k.offset_bias(weight, bias, heads, v, head_dim)
            return k.head_affine_forward(x, weight, folded, slot, None, None, head_dim)
        return k.head_affine_forward(x, weight, bias, slot, A, v, head_dim)

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        slot = self._slot(heads, weight.shape[1] // head_dim)
        return self.kernels.head_affine_backward(
            dy, weight, heads, slot, A, x_sel, head_dim, need_dx, need_dA, need_dv
        )


BACKEND = TritonBackend()
