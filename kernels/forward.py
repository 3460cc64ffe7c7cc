"""Forward: y = x' Wᵀ (+ b), with x' built tile by tile while x is loaded (x' never exists in memory).

Column c of x belongs to head c // head_dim; `slot[head]` is that head's row in A and v, or -1 for an
unselected head. Each loaded x tile gets x * (1 + A[slot, c % d]) + v[slot, c % d] on selected columns
(scale 1, shift 0 elsewhere), in float32, rounded back to x's dtype for the tensor-core dot.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    GEMM_CONFIGS, INTERPRETED, grouped_tile, launch_config, on_device, prune_gemm_configs, row_bucket,
)


@triton.jit(do_not_specialize=["N_BUCKET"])  # only an autotuning key: one compile for every bucket
def _head_affine_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, slot_ptr, a_ptr, v_ptr,
    N, C, D_OUT, N_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), N, D_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < D_OUT
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < C
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_SCALE or HAS_SHIFT:
            if HEAD_DIM % BLOCK_K == 0:
                # The tile lies inside one head: one slot, contiguous rows of A and v.
                slot = tl.load(slot_ptr + k0 // HEAD_DIM)
                sel = k_ok & ((slot + tl.zeros_like(rk)) >= 0)
                p = slot * HEAD_DIM + k0 % HEAD_DIM + rk
            else:
                slot = tl.load(slot_ptr + kk // HEAD_DIM, mask=k_ok, other=-1)
                sel = slot >= 0
                p = slot * HEAD_DIM + kk % HEAD_DIM
            xf = xt.to(tl.float32)
            if HAS_SCALE:
                a = tl.load(a_ptr + p, mask=sel, other=0.0).to(tl.float32)
                xf = xf * (1.0 + a)[None, :]
            if HAS_SHIFT:
                s = tl.load(v_ptr + p, mask=sel, other=0.0).to(tl.float32)
                xf = xf + s[None, :]
            xt = xf.to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_head_affine_fwd_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["N_BUCKET", "C", "D_OUT", "HEAD_DIM", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)(_head_affine_fwd_kernel)


def head_affine_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    slot: torch.Tensor,
    A: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    head_dim: int,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """y [N, D_out] in x's dtype. x [N, H*d] with any strides; slot int32 [H] (head -> row of A/v or -1);
    A, v [K, d] or None; bias [D_out] of any float dtype (float32 for a folded offset) or None.
    `config` pins the tiles ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"})
    instead of autotuning."""
    N, C = x.shape
    config = launch_config(config, N, x)
    D_out = weight.shape[0]
    y = torch.empty((N, D_out), device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    A = A.contiguous() if A is not None else None
    v = v.contiguous() if v is not None else None
    dummy = slot
    args = (
        x, weight, bias if bias is not None else dummy, y, slot,
        A if A is not None else dummy, v if v is not None else dummy,
        N, C, D_out, row_bucket(N),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
    )
    flags = dict(
        HEAD_DIM=head_dim, HAS_BIAS=bias is not None, HAS_SCALE=A is not None, HAS_SHIFT=v is not None,
        DOT_FP32=INTERPRETED, IEEE=x.dtype == torch.float32,
    )
    with on_device(x):
        if config is None:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(D_out, meta["BLOCK_N"]),)  # noqa: E731
            _head_affine_fwd_tuned[grid](*args, **flags)
        else:
            grid = (triton.cdiv(N, config["BLOCK_M"]) * triton.cdiv(D_out, config["BLOCK_N"]),)
            _head_affine_fwd_kernel[grid](*args, **flags, **config)
    return y


@triton.jit
def _offset_bias_kernel(
    w_ptr, b_ptr, heads_ptr, v_ptr, out_ptr,
    D_OUT, KD, stride_wn, stride_wk,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """out = b + W_S · v in float32: the offset's whole contribution to y, a constant row."""
    ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = ro < D_OUT
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for j0 in range(0, KD, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < KD
        head = tl.load(heads_ptr + j // HEAD_DIM, mask=j_ok, other=0)
        col = head * HEAD_DIM + j % HEAD_DIM
        w = tl.load(w_ptr + ro.to(tl.int64)[:, None] * stride_wn + col[None, :] * stride_wk,
                    mask=o_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * vv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + ro, acc, mask=o_ok)


def offset_bias(
    weight: torch.Tensor, bias: Optional[torch.Tensor], heads: torch.Tensor, v: torch.Tensor, head_dim: int,
    block_o: int = 32, block_j: int = 128,
) -> torch.Tensor:
    """float32 [D_out]: bias + W_S v, reading only the selected heads' columns of W."""
    D_out = weight.shape[0]
    v = v.contiguous()
    out = torch.empty(D_out, device=weight.device, dtype=torch.float32)
    with on_device(weight):
        _offset_bias_kernel[(triton.cdiv(D_out, block_o),)](
            weight, bias if bias is not None else out, heads, v, out,
            D_out, v.numel(), weight.stride(0), weight.stride(1),
            HEAD_DIM=head_dim, HAS_BIAS=bias is not None, BLOCK_O=block_o, BLOCK_J=block_j,
        )
    return out
