"""Float64 reference for the head-affine linear op, written independently of lofit_fast's code."""
from __future__ import annotations

import torch

# Relative error bounds ‖out − ref‖ / ‖ref‖ per input dtype (outputs, then gradients).
OUT_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 5e-5, torch.float16: 8e-3, torch.bfloat16: 4e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def reference_forward(x, W, b, heads, A, v, d):
    """x' by explicit per-head loops in float64, then x' Wᵀ + b."""
    xp = x.detach().double().clone()
    for k, h in enumerate(heads.tolist()):
        cols = slice(h * d, (h + 1) * d)
        scale = 1.0 + A[k].detach().double() if A is not None else 1.0
        shift = v[k].detach().double() if v is not None else 0.0
        xp[..., cols] = xp[..., cols] * scale + shift
    y = xp @ W.detach().double().T
    return y + b.detach().double() if b is not None else y


def reference_grads(x, W, heads, A, v, d, dy):
    """Closed-form float64 gradients of Σ dy ⊙ y with respect to x, A and v."""
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    g = dy.detach().double().reshape(-1, W.shape[0]) @ W.detach().double()
    dx = g.clone()
    K = heads.numel()
    dA = torch.zeros(K, d, dtype=torch.float64)
    dv = torch.zeros(K, d, dtype=torch.float64)
    for k, h in enumerate(heads.tolist()):
        cols = slice(h * d, (h + 1) * d)
        dv[k] = g[:, cols].sum(0)
        dA[k] = (g[:, cols] * x64[:, cols]).sum(0)
        if A is not None:
            dx[:, cols] = g[:, cols] * (1.0 + A[k].detach().double())
    return dx.reshape(x.shape), dA, dv


def poison_allocator(nbytes: int, device) -> None:
    """Fill freed memory with NaNs so an output element a kernel forgets to write shows up as NaN."""
    n = max(1, nbytes // 4)
    junk = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    del junk
