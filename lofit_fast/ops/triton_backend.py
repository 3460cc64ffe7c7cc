"""The Triton backend: fused head-affine GEMMs from `lofit_fast.kernels` (the top-level kernels/ folder).

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before the kernels were imported
(the interpreter: for tests, far too slow for real use, so `auto` never picks it on the CPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from . import dispatch
from ._cache import DerivedCache, build_detached
from .torch_backend import segment_sum, selected_columns

_KERNELS = "lofit_fast.kernels"


def import_kernels():
    """`lofit_fast.kernels` when installed; in a source checkout, the kernels/ folder beside lofit_fast/."""
    try:
        return importlib.import_module(_KERNELS)
    except ModuleNotFoundError as exc:
        if exc.name != _KERNELS:
            raise
    src = Path(__file__).resolve().parents[2] / "kernels"  # lofit_fast/ops/ -> the checkout's root
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
    package = sys.modules.get("lofit_fast")
    if package is not None:
        package.kernels = module  # as an installed lofit_fast.kernels would be
    return module


class TritonBackend:
    name = "triton"
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    def __init__(self):
        self._kernels = None
        self._reason = ""
        self._cache = DerivedCache("triton")

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
        return dispatch.gpu_priority(self.name, x, weight, K)  # on a GPU: the measured cuda / triton choice

    def _slot(self, heads: torch.Tensor, num_heads: int) -> torch.Tensor:
        return self._cache.get((heads,), ("slot", num_heads),
                               lambda: build_detached(self.kernels.head_slots, heads, num_heads))

    def _folded_bias(self, weight, bias, heads, v, head_dim) -> torch.Tensor:
        """b + W_S v in float32, once per version of the parameters (every call in decode or evaluation reuses
        it; a training step's update makes the next forward rebuild it)."""
        return self._cache.get((weight, bias, heads, v), ("bias", head_dim),
                               lambda: build_detached(self.kernels.offset_bias, weight, bias, heads, v, head_dim))

    def _scaled_columns(self, weight, heads, A, head_dim) -> torch.Tensor:
        """W_S ⊙ A [D_out, K·d], the thin loop's operand, once per version of A. Cached only while K·d is a
        small share of the columns, so the cache never holds a second copy of a large part of W."""
        k = self.kernels
        if heads.numel() * head_dim >= k.forward.SCALED_WEIGHT_MIN_SHARE * weight.shape[1]:
            return k.scaled_columns(weight, heads, A, head_dim)
        return self._cache.get((weight, heads, A), ("cols", head_dim),
                               lambda: build_detached(k.scaled_columns, weight, heads, A, head_dim))

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        k = self.kernels
        N, C = x.shape
        K = heads.numel()
        slot = self._slot(heads, C // head_dim)
        folded = scaled = None
        if v is not None and K:
            folded = self._folded_bias(weight, bias, heads, v, head_dim)
        if A is not None and K and N and not k.forward.use_scaled_weight(N, K * head_dim, C):
            scaled = self._scaled_columns(weight, heads, A, head_dim)
        return k.head_affine_forward(x, weight, bias, heads, slot, A, v, head_dim, folded_bias=folded,
                                     scaled_cols=scaled)

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        slot = self._slot(heads, weight.shape[1] // head_dim)
        return self.kernels.head_affine_backward(
            dy, weight, heads, slot, A, x_sel, head_dim, need_dx, need_dA, need_dv
        )

    # Per-row tables (lofit_fast/ops/rows.py): the offset rows v W_Sᵀ [n_adapters, D_out] once per parameter
    # version, gathered per row in the GEMM's epilogue; A[rid] scales each x_S tile in the thin loop.
    def _offset_rows(self, weight, heads, v, head_dim) -> torch.Tensor:
        return self._cache.get((weight, heads, v), ("offset_rows", head_dim),
                               lambda: build_detached(self.kernels.offset_rows, weight, heads, v, head_dim))

    def forward_rows(self, x, weight, bias, heads, A, v, row_ids, head_dim):
        off = self._offset_rows(weight, heads, v, head_dim) if v is not None else None
        return self.kernels.rows_forward(x, weight, bias, heads, A, off, row_ids, head_dim)

    def backward_rows(self, dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv):
        k = self.kernels
        K = heads.numel()
        dx = dA = dv = None
        if need_dx:
            slot = self._slot(heads, weight.shape[1] // head_dim)
            g, _, _ = k.head_affine_backward(dy, weight, heads, slot, None, None, head_dim, True, False, False)
            gs, gx = k.rows_head_grads(g, x_sel, A, row_ids, heads, head_dim, True, need_dv, need_dA)
            dx = g
        else:  # g_S = dy W_S only
            g_sel = dy @ weight.index_select(1, selected_columns(heads, head_dim))
            local = torch.arange(K, device=heads.device)
            gs, gx = k.rows_head_grads(g_sel, x_sel, None, row_ids, local, head_dim, False, need_dv, need_dA)
        if need_dA:
            dA = segment_sum(gx, row_ids, n_adapters).view(n_adapters, K, head_dim)
        if need_dv:
            dv = segment_sum(gs, row_ids, n_adapters).view(n_adapters, K, head_dim)
        return dx, dA, dv


BACKEND = TritonBackend()
