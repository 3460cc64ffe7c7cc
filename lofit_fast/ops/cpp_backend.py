"""The extension's CPU kernels (csrc/cpu), called as the torch ops `lofit_fast::head_affine_fwd/bwd`.

Loading `lofit_fast._C` registers the ops (csrc/bindings.cpp); this module adds their fake (meta)
implementations, so that torch.compile traces them as single graph nodes without running them.
"""
from __future__ import annotations

import torch

from ._cache import DerivedCache, build_detached, cacheable
from .torch_backend import offset_rows, selected_columns

_OPS = None


def native_ops():
    """`torch.ops.lofit_fast`, after loading the extension and registering the fake implementations once."""
    global _OPS
    if _OPS is None:
        from lofit_fast import _C  # noqa: F401  (its static initializers register the ops)

        _register_fakes()
        _OPS = torch.ops.lofit_fast
    return _OPS


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    # The trailing optional arguments (slots, weight_sel, bias_fold, bias_fold_acc; weight_sel for the backward)
    # are operands the CUDA kernels can take precomputed (csrc/lofit.h); they do not change the outputs' metadata.
    @torch.library.register_fake("lofit_fast::head_affine_fwd")
    def _fwd_fake(x, weight, bias, heads, A, v, head_dim, slots=None, weight_sel=None, bias_fold=None,
                  bias_fold_acc=None):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
        torch._check(x.shape[1] == weight.shape[1], lambda: f"weight must be [D_out, {x.shape[1]}]")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("lofit_fast::head_affine_bwd")
    def _bwd_fake(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv, weight_sel=None):
        acc = _acc_dtype(dy.dtype)
        K = heads.shape[0]
        dx = dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,))
        dA = dy.new_empty((K, head_dim) if need_dA else (0,), dtype=acc)
        dv = dy.new_empty((K, head_dim) if need_dv else (0,), dtype=acc)
        return dx, dA, dv

    @torch.library.register_fake("lofit_fast::head_affine_rows_fwd")
    def _rows_fwd_fake(x, weight, bias, heads, A, v, row_ids, head_dim, weight_sel=None, offset_table=None):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
        torch._check(x.shape[1] == weight.shape[1], lambda: f"weight must be [D_out, {x.shape[1]}]")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("lofit_fast::head_affine_rows_bwd")
    def _rows_bwd_fake(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv,
                       weight_sel=None):
        acc = _acc_dtype(dy.dtype)
        K = heads.shape[0]
        dx = dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,))
        dA = dy.new_empty((n_adapters, K, head_dim) if need_dA else (0,), dtype=acc)
        dv = dy.new_empty((n_adapters, K, head_dim) if need_dv else (0,), dtype=acc)
        return dx, dA, dv


def call_forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim, weight_sel=None, offset_table=None):
    """The per-row forward op (lofit_fast/ops/rows.py) with optional prepared W_S and offset rows v W_Sᵀ."""
    return native_ops().head_affine_rows_fwd(x, weight, bias, heads, A, v, row_ids, head_dim, weight_sel,
                                             offset_table)


def call_backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv,
                       weight_sel=None):
    dx, dA, dv = native_ops().head_affine_rows_bwd(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters,
                                                   need_dx, need_dA, need_dv, weight_sel)
    return (dx if need_dx else None), (dA if need_dA else None), (dv if need_dv else None)


def call_forward(x, weight, bias, heads, A, v, head_dim, slots=None, weight_sel=None, bias_fold=None,
                 bias_fold_acc=None):
    """The forward op; the optional prepared operands are the CUDA backend's (cuda_backend.py)."""
    if slots is None and weight_sel is None and bias_fold is None:
        return native_ops().head_affine_fwd(x, weight, bias, heads, A, v, head_dim)
    return native_ops().head_affine_fwd(x, weight, bias, heads, A, v, head_dim, slots, weight_sel, bias_fold,
                                        bias_fold_acc)


def call_backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv, weight_sel=None):
    """The op returns empty tensors for gradients not asked for; the backend contract wants None."""
    if weight_sel is None:
        dx, dA, dv = native_ops().head_affine_bwd(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv)
    else:
        dx, dA, dv = native_ops().head_affine_bwd(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv,
                                                  weight_sel)
    return (dx if need_dx else None), (dA if need_dA else None), (dv if need_dv else None)


class NativeRows:
    """forward_rows / backward_rows through the native per-row ops, with the W_S and offset rows the backend's
    `_rows_prepared(weight, heads, v, head_dim)` caches (the cpp and cuda backends)."""

    def forward_rows(self, x, weight, bias, heads, A, v, row_ids, head_dim):
        w_sel, off = self._rows_prepared(weight, heads, v, head_dim)
        return call_forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim, w_sel, off)

    def backward_rows(self, dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv):
        w_sel, _ = self._rows_prepared(weight, heads, None, head_dim)
        return call_backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA,
                                  need_dv, w_sel)


class CppBackend(NativeRows):
    name = "cpp"
    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})

    def is_available(self) -> bool:
        native_ops()
        return True

    def auto_priority(self, x, weight, K) -> float:
        return 1.0

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        return call_forward(x, weight, bias, heads, A, v, head_dim)

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        return call_backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv)

    # Per-row tables: W_S and the offset rows v W_Sᵀ [n_adapters, D_out] are built once per parameter version
    # (every decode step reuses them), except under tracing, where the op builds them itself.
    def _rows_prepared(self, weight, heads, v, head_dim):
        if not cacheable((weight, heads, v)):
            return None, None
        w_sel = _CACHE.get((weight, heads), ("w_sel", head_dim),
                           lambda: build_detached(lambda: weight.index_select(1, selected_columns(heads, head_dim))))
        off = None
        if v is not None:
            off = _CACHE.get((weight, heads, v), ("offset_rows", head_dim),
                             lambda: build_detached(lambda: offset_rows(w_sel, v).contiguous()))
        return w_sel, off



_CACHE = DerivedCache("cpp")
BACKEND = CppBackend()
