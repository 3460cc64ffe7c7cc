"""The extension's CUDA kernels (csrc/cuda), called as the torch ops `lofit_fast::head_affine_fwd/bwd`.

Built only when the installed torch has CUDA (setup.py). Under backend="auto" on a GPU, the choice between this
backend and `triton` is made per shape by lofit_fast.ops.dispatch from measured results.

Prepared operands. The op takes, as optional trailing arguments, three things that depend on the parameters
only: the head -> slot table (from heads), W_S = W[:, S] (from weight and heads: the thin GEMM's and the
no-dx backward's operand) and the folded bias b + v W_Sᵀ (from weight, bias, heads and v; in x's dtype for the
GEMM epilogue and in float32 for the decode GEMV, which adds it before y's one rounding). This backend builds
them with the extension's `*_cuda` helpers and keeps them in `lofit_fast.ops._cache.DerivedCache`s keyed on the
source tensors' identity and version, so a patched module pays for them once per parameter update (every step
for a trained v, never at inference) instead of on every call. Where caching is unsafe (torch.compile tracing,
CUDA-graph capture, inference tensors) nothing is passed and the op computes them on the spot.

W_S is built only for the calls that use it: the forward's thin-GEMM path ("gemm" with A and K < H, as the
extension's forward_path_cuda says) and the backward without dx. It costs K·d/C of the weight's memory per
patched layer (the thin path runs for few heads: with A on many heads the op materializes x' instead).
"""
from __future__ import annotations

import torch

from . import dispatch
from ._cache import DerivedCache, build_detached, cacheable
from .cpp_backend import NativeRows, call_backward, call_forward, native_ops
from .torch_backend import offset_rows

# The decode GEMV's row limit (csrc/cuda/head_affine_kernels.cuh kDecodeMaxRows): no W_S is needed up to it.
DECODE_MAX_ROWS = 16


class CudaBackend(NativeRows):
    name = "cuda"
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})

    def __init__(self):
        self.slots = DerivedCache("slots")  # (heads,), H -> int32 [H]
        self.weight_sel = DerivedCache("weight_sel")  # (weight, heads), d -> [D_out, K*d]
        self.bias_fold = DerivedCache("bias_fold")  # (weight, bias, heads, v), d -> (x dtype, float32) [D_out]
        self.offset_rows = DerivedCache("offset_rows")  # (weight, heads, v tables), d -> float32 [n_adapters, D_out]

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

    def clear_caches(self) -> None:
        for c in (self.slots, self.weight_sel, self.bias_fold, self.offset_rows):
            c.clear()

    # -- prepared operands ------------------------------------------------------------------------------------

    def _weight_sel(self, weight, heads, head_dim):
        from lofit_fast import _C

        return self.weight_sel.get(
            (weight, heads), head_dim, lambda: build_detached(_C.selected_weight_cuda, weight, heads, head_dim)
        )

    def _prepared_forward(self, x, weight, bias, heads, A, v, head_dim):
        """(slots, weight_sel, bias_fold, bias_fold_acc), each None where not needed or not cacheable."""
        from lofit_fast import _C

        if not cacheable((weight, bias, heads, v), (x, A)):
            return None, None, None, None
        H = x.shape[1] // head_dim
        K = heads.shape[0]
        slots = weight_sel = fold = fold_acc = None
        # The slot table serves the decode GEMV and the materialized path; an int32 [H] per heads tensor.
        if A is not None or x.shape[0] <= DECODE_MAX_ROWS:
            slots = self.slots.get((heads,), H, lambda: build_detached(_C.head_slots_cuda, heads, H))
        if v is not None:
            fold, fold_acc = self.bias_fold.get(
                (weight, bias, heads, v), head_dim,
                lambda: build_detached(_C.folded_bias_cuda, weight, bias, heads, v, head_dim),
            )
        if A is not None and K < H and x.shape[0] > DECODE_MAX_ROWS:
            if _C.forward_path_cuda(x, weight, K, head_dim, True, v is not None) == "gemm":
                weight_sel = self._weight_sel(weight, heads, head_dim)
        return slots, weight_sel, fold, fold_acc

    # -- the backend contract ---------------------------------------------------------------------------------

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        if x.shape[0] == 0 or heads.shape[0] == 0:
            return call_forward(x, weight, bias, heads, A, v, head_dim)
        return call_forward(x, weight, bias, heads, A, v, head_dim,
                            *self._prepared_forward(x, weight, bias, heads, A, v, head_dim))

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        weight_sel = None
        K, H = heads.shape[0], weight.shape[1] // head_dim
        if need_dA and not need_dx and 0 < K < H and dy.shape[0] > 0 and cacheable((weight, heads), (dy, x_sel, A)):
            weight_sel = self._weight_sel(weight, heads, head_dim)
        return call_backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv, weight_sel)

    # -- per-row tables (lofit_fast/ops/rows.py; csrc/cuda/head_affine_rows.cu) ---------------------------------

    def _rows_prepared(self, weight, heads, v, head_dim):
        """(W_S, offset rows v W_Sᵀ float32 [n_adapters, D_out]) once per parameter version, or Nones (tracing)."""
        if not cacheable((weight, heads, v)):
            return None, None
        w_sel = self._weight_sel(weight, heads, head_dim)
        off = None
        if v is not None:
            off = self.offset_rows.get((weight, heads, v), head_dim,
                                       lambda: build_detached(lambda: offset_rows(w_sel, v).contiguous()))
        return w_sel, off



BACKEND = CudaBackend()
