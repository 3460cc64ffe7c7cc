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
        N = dy.shape[0]
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


BACKEND = TorchBackend()
