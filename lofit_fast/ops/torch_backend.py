"""Pure-PyTorch backend: the base GEMM plus small work on the K selected heads. Always available."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# At or above this fraction of selected columns, one materialized x' and one GEMM beat the base GEMM plus a
# thin GEMM over the selected columns.
DENSE_FRACTION = 0.5


def acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 stays float64, everything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()


def selected_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def extended_table(t: torch.Tensor, width: int) -> torch.Tensor:
    """A per-adapter table as [n, width] in the accumulation dtype with a zero row in front: indexed by
    row_ids + 1, so that the id -1 (no adapter) picks zeros."""
    t = acc(t).reshape(-1, width)
    return torch.cat([t.new_zeros(1, width), t], 0)


def offset_rows(w_sel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v W_Sᵀ: [n_adapters, D_out] in the accumulation dtype, one row per adapter (v: [n_adapters, K, d])."""
    return acc(v).reshape(v.shape[0], -1) @ acc(w_sel).t()


def segment_sum(t: torch.Tensor, row_ids: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """[n_adapters, width]: the sum of t's rows per adapter (rows with id -1 dropped), in the accumulation dtype."""
    t = acc(t)
    out = t.new_zeros((n_adapters + 1, t.shape[1]))
    out.index_add_(0, row_ids + 1, t)
    return out[1:]


def forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim, w_sel=None, offset_table=None):
    """The per-row forward (lofit_fast/ops/rows.py) in ATen ops: the gathered scale feeds one thin GEMM, the
    offset rows v W_Sᵀ (`offset_table` when prepared) are gathered per row."""
    N, C = x.shape
    K = heads.numel()
    KD = K * head_dim
    idx = row_ids + 1
    if KD >= DENSE_FRACTION * C:
        xp = x.clone(memory_format=torch.contiguous_format)
        view = xp.view(N, C // head_dim, head_dim)
        xs = acc(view[:, heads])
        if A is not None:
            xs = xs * (1.0 + extended_table(A, KD)[idx].view(N, K, head_dim))
        if v is not None:
            xs = xs + extended_table(v, KD)[idx].view(N, K, head_dim)
        view[:, heads] = xs.to(x.dtype)
        return F.linear(xp, weight, bias)
    y = F.linear(x, weight, bias)
    cols = selected_columns(heads, head_dim)
    if w_sel is None:
        w_sel = weight.index_select(1, cols)
    if A is not None:
        t = (acc(x.index_select(1, cols)) * extended_table(A, KD)[idx]).to(x.dtype)
        y = y.addmm(t, w_sel.t())
    if v is not None:
        off = offset_table if offset_table is not None else offset_rows(w_sel, v)
        y = y + extended_table(off, weight.shape[0])[idx].to(y.dtype)
    return y


def backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv, w_sel=None):
    """The per-row backward in ATen ops: each row's gradient lands in its adapter's slice of dA / dv."""
    K = heads.numel()
    KD = K * head_dim
    cols = selected_columns(heads, head_dim)
    dx = dA = dv = None
    g_sel = None
    if need_dx:
        g = dy @ weight
        g_sel = g.index_select(1, cols)
        if A is not None:
            g[:, cols] = (acc(g_sel) * (1.0 + extended_table(A, KD)[row_ids + 1])).to(g.dtype)
        dx = g
    elif need_dA:
        g_sel = dy @ (w_sel if w_sel is not None else weight.index_select(1, cols))
    if need_dA:
        dA = segment_sum(acc(g_sel) * acc(x_sel), row_ids, n_adapters).view(n_adapters, K, head_dim)
    if need_dv:
        if g_sel is not None:
            dv = segment_sum(g_sel, row_ids, n_adapters).view(n_adapters, K, head_dim)
        else:
            ws = w_sel if w_sel is not None else weight.index_select(1, cols)
            dv = (segment_sum(dy, row_ids, n_adapters) @ acc(ws)).view(n_adapters, K, head_dim)
    return dx, dA, dv


class TorchBackend:
    name = "torch"
    device_types = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})

    def is_available(self) -> bool:
        return True

    def auto_priority(self, x, weight, K) -> float:
        return 0.0

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        N, C = x.shape
        K = heads.numel()
        if K * head_dim >= DENSE_FRACTION * C:
            xp = x.clone(memory_format=torch.contiguous_format)
            xs = acc(xp.view(N, C // head_dim, head_dim)[:, heads])
            if A is not None:
                xs = xs * (1.0 + acc(A))
            if v is not None:
                xs = xs + acc(v)
            xp.view(N, C // head_dim, head_dim)[:, heads] = xs.to(x.dtype)
            return F.linear(xp, weight, bias)
        y = F.linear(x, weight, bias)
        cols = selected_columns(heads, head_dim)
        w_sel = weight.index_select(1, cols)
        if A is not None:
            t = (acc(x.index_select(1, cols)).view(N, K, head_dim) * acc(A)).to(x.dtype)
            y.addmm_(t.view(N, K * head_dim), w_sel.t())
        if v is not None:
            y.add_((acc(w_sel) @ acc(v).reshape(-1)).to(y.dtype))
        return y

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        K = heads.numel()
        cols = selected_columns(heads, head_dim)
        dx = dA = dv = None
        if need_dx:
            g = dy @ weight
            g_sel = g.index_select(1, cols)
            if A is not None:
                g[:, cols] = (acc(g_sel) * (1.0 + acc(A)).reshape(-1)).to(g.dtype)
            dx = g
        elif need_dA:
            g_sel = dy @ weight.index_select(1, cols)
        if need_dA:
            dA = torch.einsum("nc,nc->c", acc(g_sel), acc(x_sel)).view(K, head_dim)
        if need_dv:
            if need_dx or need_dA:
                dv = acc(g_sel).sum(0).view(K, head_dim)
            else:
                dv = (acc(dy).sum(0) @ acc(weight.index_select(1, cols))).view(K, head_dim)
        return dx, dA, dv

    def forward_rows(self, x, weight, bias, heads, A, v, row_ids, head_dim):
        return forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim)

    def backward_rows(self, dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv):
        return backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv)


BACKEND = TorchBackend()
