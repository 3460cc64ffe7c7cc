"""Backward: g = dy · W over column tiles of x, with an epilogue that works only where heads are selected.

- dx = g, times (1 + A) on the selected heads' columns (full mode, every column tile of x).
- Σ_rows g (→ dv) and Σ_rows g ⊙ x_S (→ dA) for the selected columns, in float32. Each program writes its
  row tile's column sums into a partial buffer [row tiles, parts, K*d] (every slot written exactly once, so
  no zeroing and no atomics); the sum over row tiles is the tiny second pass, skipped with one row tile.
- Thin mode (dx not needed): programs cover only the K*d selected columns, so the GEMM is dy · W_S.

Column c of x belongs to head c // d with row slot[head] of A (-1 when unselected); its position in the
K*d selected-column space (x_sel, dA, dv) is slot * d + c % d. In thin mode a program's columns are
positions j, and W's column is heads[j // d] * d + j % d.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, grouped_tile, kernel_args, on_device, pick_config
from .forward import _dot


@triton.jit
def _head_affine_bwd_kernel(
    dy_ptr, w_ptr, dx_ptr, heads_ptr, slot_ptr, a_ptr, xs_ptr, part_ptr,
    N, D_OUT, NCOLS, KD, stride_part, offset_da,
    stride_dym, stride_dyk, stride_wn, stride_wk, stride_dxm, stride_xsm, stride_xsk,
    HEAD_DIM: tl.constexpr, THIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEED_DA: tl.constexpr, NEED_DV: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), N, NCOLS, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < NCOLS
    if THIN:
        pos = rn
        sel = col_ok
        if HEAD_DIM % BLOCK_N == 0:
            # The tile lies inside one head: contiguous columns of W (lets the loads vectorize).
            head = tl.load(heads_ptr + (pid_n * BLOCK_N) // HEAD_DIM)
            # `%` hides that the start is a multiple of BLOCK_N; without the hint W is read element by
            # element and the loads are not pipelined.
            start = tl.multiple_of(head * HEAD_DIM + (pid_n * BLOCK_N) % HEAD_DIM, BLOCK_N)
            wcol = start + tl.arange(0, BLOCK_N)
        else:
            head = tl.load(heads_ptr + rn // HEAD_DIM, mask=col_ok, other=0)
            wcol = head * HEAD_DIM + rn % HEAD_DIM
    else:
        slot = tl.load(slot_ptr + rn // HEAD_DIM, mask=col_ok, other=-1)
        sel = slot >= 0
        pos = slot * HEAD_DIM + rn % HEAD_DIM
        wcol = rn
    dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rk[None, :] * stride_dyk
    w_ptrs = w_ptr + rk.to(tl.int64)[:, None] * stride_wn + wcol[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_OUT, BLOCK_K):
        if EVEN_K:
            dyt = tl.load(dy_ptrs, mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < D_OUT
            dyt = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(dyt, wt, acc, DOT_FP32, IEEE)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wn
    # Rows past N loaded dy = 0, so they add nothing to the column sums below.
    if not THIN:
        dx = acc
        if HAS_SCALE:
            a = tl.load(a_ptr + pos, mask=sel, other=0.0).to(tl.float32)
            dx = acc * (1.0 + a)[None, :]
        dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DA or NEED_DV:
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            part_row = part_ptr + pid_m.to(tl.int64) * stride_part
            if NEED_DV:
                tl.store(part_row + pos, tl.sum(acc, axis=0), mask=sel)
            if NEED_DA:
                xs = tl.load(xs_ptr + rm.to(tl.int64)[:, None] * stride_xsm + pos[None, :] * stride_xsk,
                             mask=row_ok[:, None] & sel[None, :], other=0.0).to(tl.float32)
                tl.store(part_row + offset_da + pos, tl.sum(acc * xs, axis=0), mask=sel)


def head_affine_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    heads: torch.Tensor,
    slot: torch.Tensor,
    A: Optional[torch.Tensor],
    x_sel: Optional[torch.Tensor],
    head_dim: int,
    need_dx: bool,
    need_dA: bool,
    need_dv: bool,
    config: Optional[dict] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx [N, H*d] in dy's dtype, dA [K, d] float32, dv [K, d] float32), each None unless needed.

    dy [N, D_out]; weight [D_out, H*d]; heads int64 [K] sorted; slot int32 [H]; A [K, d] or None (scales
    dx); x_sel [N, K*d] (any strides; x itself when K = H) or None unless need_dA."""
    N, D_out = dy.shape
    C = weight.shape[1]
    K = heads.numel()
    KD = K * head_dim
    thin = not need_dx
    config = config if config is not None else pick_config("bwd", N)
    meta, launch = kernel_args(config)
    if thin and not (need_dA or need_dv):
        return None, None, None
    if need_dA and (x_sel is None or tuple(x_sel.shape) != (N, KD)):
        raise ValueError(f"dA needs x_sel of shape [{N}, {KD}], got {None if x_sel is None else list(x_sel.shape)}")
    dx = None if thin else torch.empty((N, C), device=dy.device, dtype=dy.dtype)
    if N == 0:
        if dx is not None:
            dx.zero_()
        zeros = lambda: torch.zeros(K, head_dim, device=dy.device, dtype=torch.float32)  # noqa: E731
        return dx, zeros() if need_dA else None, zeros() if need_dv else None
    n_parts = int(need_dA) + int(need_dv)
    row_tiles = triton.cdiv(N, meta["BLOCK_M"])
    part = torch.empty((row_tiles, max(n_parts, 1), KD), device=dy.device, dtype=torch.float32)
    A = A.contiguous() if (A is not None and not thin) else None
    ncols = KD if thin else C
    dummy = slot
    xs = x_sel if need_dA else dummy
    args = (
        dy, weight, dx if dx is not None else dummy, heads, slot, A if A is not None else dummy, xs, part,
        N, D_out, ncols, KD, max(n_parts, 1) * KD, KD if need_dv else 0,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
        dx.stride(0) if dx is not None else 0,
        xs.stride(0) if need_dA else 0, xs.stride(1) if need_dA else 0,
    )
    flags = dict(
        HEAD_DIM=head_dim, THIN=thin, HAS_SCALE=A is not None, NEED_DA=need_dA, NEED_DV=need_dv,
        EVEN_K=D_out % meta["BLOCK_K"] == 0, DOT_FP32=INTERPRETED, IEEE=dy.dtype == torch.float32,
    )
    grid = (row_tiles * triton.cdiv(ncols, meta["BLOCK_N"]),)
    with on_device(dy):
        _head_affine_bwd_kernel[grid](*args, **flags, **meta, **launch)
    dA = dv = None
    if n_parts:
        sums = part[0] if row_tiles == 1 else part[:row_tiles].sum(0)
        if need_dv:
            dv = sums[0].view(K, head_dim)
        if need_dA:
            dA = sums[n_parts - 1].view(K, head_dim)
    return dx, dA, dv
