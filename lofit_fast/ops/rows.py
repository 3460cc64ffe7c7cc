"""Per-row tables: many adapters in one batch through the same op.

Row n of x uses adapter a = row_ids[n] of the tables A, v [n_adapters, K, d] (-1: no intervention):

    y[n] = x[n] Wᵀ + (x_S[n] ⊙ A[a]) W_Sᵀ + (v[a] W_Sᵀ) + b

The offset term is a table `off = v W_Sᵀ` [n_adapters, D_out] computed once per call (or once per parameter
version where a backend caches it) and gathered per row; the scale term is a gathered elementwise product that
feeds one thin GEMM over all rows. The backward puts each row's gradient into its own adapter's slice:

    dx[n]   = g[n], except dx_S[n] = g_S[n] ⊙ (1 + A[a])          g = dy W
    dA[a]   = Σ_{n: row_ids[n] = a} g_S[n] ⊙ x_S[n]
    dv[a]   = Σ_{n: row_ids[n] = a} g_S[n]

Backends implement

    forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim) -> y [N, D_out]
    backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv)
        -> (dx [N, H*d] | None, dA [n_adapters, K, d] | None, dv [n_adapters, K, d] | None)

with x [N, H*d] 2-D, row_ids int64 [N] on x's device with values in [-1, n_adapters), K >= 1, and at least one
of A, v given (float32 or x's dtype); dA, dv in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._autocast import autocast_off
from .registry import get_backend
from .torch_backend import acc, extended_table, selected_columns


def n_adapters_of(A: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> int:
    t = A if A is not None else v
    return 0 if t is None else int(t.shape[0])


def _check_table(p, name: str, x: torch.Tensor, n: int, K: int, head_dim: int) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != (n, K, head_dim):
        raise ValueError(f"with row_ids, {name} must have shape [n_adapters, K, head_dim] = [{n}, {K}, {head_dim}], "
                         f"got {list(p.shape)}")
    if p.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}), got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def check_row_tables(x, heads, A, v, head_dim, row_ids) -> None:
    """The per-row checks (the rest of the inputs are checked by `check_op_inputs` with A = v = None).
    row_ids' values are checked when it lives on the CPU and no compiler is tracing (no sync, no graph break);
    the backends check them again where they read them."""
    if not isinstance(row_ids, torch.Tensor) or row_ids.dtype != torch.int64:
        raise TypeError(f"row_ids must be an int64 tensor, got {getattr(row_ids, 'dtype', type(row_ids).__name__)}")
    if row_ids.device != x.device:
        raise ValueError(f"row_ids is on {row_ids.device} but x is on {x.device}")
    lead = tuple(x.shape[:-1])
    if tuple(row_ids.shape) != lead and not (row_ids.dim() == 1 and row_ids.numel() == x[..., 0].numel()):
        raise ValueError(f"row_ids must have one entry per row of x: shape {list(lead)} (or flat "
                         f"[{x[..., 0].numel()}]), got {list(row_ids.shape)}")
    if A is None and v is None:
        raise ValueError("row_ids given but neither A nor v: there are no per-adapter tables to select from")
    n = n_adapters_of(A, v)
    K = heads.numel()
    _check_table(A, "A", x, n, K, head_dim)
    _check_table(v, "v", x, n, K, head_dim)
    if row_ids.device.type == "cpu" and row_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(row_ids.min()), int(row_ids.max())
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"row_ids has the value {bad}, out of range: there are {n} adapters (ids 0..{n - 1}, "
                             "-1 = none)")


class HeadAffineRowsFn(torch.autograd.Function):
    """Frozen weight and bias; gradients for x and the tables A and v. Saves x's selected columns (for dA)."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads, A, v, row_ids, head_dim, backend):
        y = backend.forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim)
        ctx.backend, ctx.head_dim = backend, head_dim
        ctx.has_A, ctx.has_v = A is not None, v is not None
        ctx.v_dtype = v.dtype if v is not None else None
        ctx.n_adapters = n_adapters_of(A, v)
        x_sel = None
        if A is not None and A.requires_grad:
            x_sel = x if heads.numel() == x.shape[1] // head_dim else x.index_select(1, selected_columns(heads, head_dim))
        ctx.save_for_backward(x_sel, weight, heads, A, row_ids)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_sel, weight, heads, A, row_ids = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dA = ctx.has_A and ctx.needs_input_grad[4]
        need_dv = ctx.has_v and ctx.needs_input_grad[5]
        if not (need_dx or need_dA or need_dv):
            return (None,) * 9
        with autocast_off(dy):
            dx, dA, dv = ctx.backend.backward_rows(dy.contiguous(), x_sel, weight, heads, A, row_ids, ctx.head_dim,
                                                   ctx.n_adapters, need_dx, need_dA, need_dv)
        if dA is not None:
            dA = dA.to(A.dtype)
        if dv is not None:
            dv = dv.to(ctx.v_dtype)
        return dx, None, None, None, dA, dv, None, None, None


def reference_rows(x, weight, bias, heads, A, v, row_ids, head_dim):
    """Plain autograd path (a trainable weight or bias, empty inputs): x' materialized per row, then one GEMM."""
    N, C = x.shape
    K = heads.numel()
    idx = row_ids + 1
    xh = x.reshape(N, C // head_dim, head_dim)
    xs = acc(xh.index_select(1, heads))
    if A is not None:
        xs = xs * (1.0 + extended_table(A, K * head_dim)[idx].view(N, K, head_dim))
    if v is not None:
        xs = xs + extended_table(v, K * head_dim)[idx].view(N, K, head_dim)
    xp = xh.index_copy(1, heads, xs.to(x.dtype)).reshape(N, C)
    return F.linear(xp, weight, bias)


def head_affine_rows(x, weight, bias, heads, A, v, head_dim, row_ids, backend: str = "auto"):
    """The per-row op on validated inputs (see `head_affine_linear(..., row_ids=...)`), autocast already applied."""
    if heads.numel() == 0:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ids = row_ids.reshape(-1)
    if weight.requires_grad or (bias is not None and bias.requires_grad) or x2.shape[0] == 0:
        y2 = reference_rows(x2, weight, bias, heads, A, v, ids, head_dim)
    else:
        be = get_backend(backend, x2, weight, heads.numel())
        if not hasattr(be, "forward_rows"):
            raise RuntimeError(f"backend {be.name!r} has no per-row (many adapters) kernels")
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, A, v))
        if needs_grad:
            y2 = HeadAffineRowsFn.apply(x2, weight, bias, heads, A, v, ids, head_dim, be)
        else:
            y2 = be.forward_rows(x2, weight, bias, heads, A, v, ids, head_dim)
    return y2.reshape(*lead, weight.shape[0])
