"""Forward: y = x' Wᵀ (+ b) with x'_S = (1 + A) ⊙ x_S + v, as GEMMs whose main loop is a plain, pipelined
x · Wᵀ (no per-tile work, so the software pipeliner multi-buffers both operands):

- v: folded into a float32 bias b + W_S v (`offset_bias`, a GEMV over the selected columns; the backend
  caches it per parameter version), which the GEMM adds in its epilogue.
- A on a few heads: after the main loop the same program runs a thin loop over the K·d selected columns
  only, accumulating x_S (W_S ⊙ A)ᵀ, with W_S ⊙ A = `scaled_columns` [D_out, K·d] built once per version of
  A: y = x Wᵀ + x_S (W_S diag(A))ᵀ. Neither loop changes a loaded tile, so both are pipelined. In bf16,
  W_S ⊙ A is rounded relative to itself (2⁻⁹ of A's own contribution, however small A is), and both terms
  accumulate in float32 before y's one rounding to bf16.
- A on many heads (head selection): the plain GEMM on W′ = W · diag(1 + A) (`scaled_weight`, one pass over W).
  In bf16 W′ is rounded to 2⁻⁹ relative, so an A below that moves the forward only on average, exactly as a
  bf16 x′ = (1 + A) ⊙ x would; A's gradient does not depend on it (the backward uses W and x).

Few rows (decode) run `_decode_kernel`, the same loops with the operands swapped (yᵀ = W x′ᵀ), so that W's
rows fill the 64-row side that Hopper's wgmma needs and x's few rows the narrow side.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import DECODE_MAX_ROWS, INTERPRETED, grouped_tile, kernel_args, on_device, pick_config

# A on at least this share of the columns (and enough rows to amortize a pass over W) takes W′ instead of
# the thin loop: the thin loop adds K·d / C of the GEMM's work, W′ one read and one write of W.
SCALED_WEIGHT_MIN_SHARE = 0.25
SCALED_WEIGHT_MIN_ROWS = 256


def thin_block(head_dim: int, block_k: int) -> int:
    """Width of the thin loop's steps: the largest power of two dividing head_dim, at most block_k; 16 (with
    masks and per-column head lookups) when head_dim has no such divisor of at least 16."""
    b = head_dim & -head_dim
    return max(16, min(b, block_k))


@triton.jit
def _thin_columns(heads_ptr, j0, KD, rt, HEAD_DIM: tl.constexpr, THIN_BK: tl.constexpr):
    """Columns of x and W for selected positions j0 .. j0 + THIN_BK, and which of them exist."""
    jj = j0 + rt
    if HEAD_DIM % THIN_BK == 0:  # the step lies inside one head: contiguous, aligned columns
        head = tl.load(heads_ptr + j0 // HEAD_DIM)
        c0 = tl.multiple_of(head * HEAD_DIM + j0 % HEAD_DIM, THIN_BK)
        return c0 + rt, jj < KD
    j_ok = jj < KD
    head = tl.load(heads_ptr + jj // HEAD_DIM, mask=j_ok, other=0)
    return head * HEAD_DIM + jj % HEAD_DIM, j_ok


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:  # the interpreter: bf16 products through float32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, heads_ptr, wa_ptr,
    N, C, D_OUT, KD,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, THIN: tl.constexpr, THIN_BK: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), N, D_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < D_OUT
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    x_ptrs = x_rows + rk[None, :] * stride_xk
    w_ptrs = w_cols + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < C
            xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(xt, wt, acc, DOT_FP32, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if THIN:
        rt = tl.arange(0, THIN_BK)
        wa_cols = wa_ptr + rn.to(tl.int64)[None, :] * KD
        for j0 in range(0, KD, THIN_BK):
            cols, j_ok = _thin_columns(heads_ptr, j0, KD, rt, HEAD_DIM, THIN_BK)
            xt = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & j_ok[None, :], other=0.0)
            wt = tl.load(wa_cols + (j0 + rt)[:, None], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(xt, wt, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, heads_ptr, wa_ptr,
    N, C, D_OUT, KD,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, THIN: tl.constexpr, THIN_BK: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """yᵀ tile [BLOCK_N rows of W, BLOCK_M rows of x] = W x′ᵀ."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < D_OUT
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm
    w_ptrs = w_rows + rk[None, :] * stride_wk
    x_ptrs = x_cols + rk[:, None] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            wt = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
            xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < C
            wt = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        acc = _dot(wt, xt, acc, DOT_FP32, IEEE)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    if THIN:
        rt = tl.arange(0, THIN_BK)
        wa_rows = wa_ptr + rn.to(tl.int64)[:, None] * KD
        for j0 in range(0, KD, THIN_BK):
            cols, j_ok = _thin_columns(heads_ptr, j0, KD, rt, HEAD_DIM, THIN_BK)
            wt = tl.load(wa_rows + (j0 + rt)[None, :], mask=col_ok[:, None] & j_ok[None, :], other=0.0)
            xt = tl.load(x_cols + cols[:, None] * stride_xk, mask=j_ok[:, None] & row_ok[None, :], other=0.0)
            acc = _dot(wt, xt, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


def use_scaled_weight(n_rows: int, kd: int, c: int) -> bool:
    return n_rows >= SCALED_WEIGHT_MIN_ROWS and kd >= SCALED_WEIGHT_MIN_SHARE * c


def head_affine_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    heads: torch.Tensor,
    slot: torch.Tensor,
    A: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    head_dim: int,
    config: Optional[dict] = None,
    folded_bias: Optional[torch.Tensor] = None,
    scaled_cols: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [N, D_out] in x's dtype. x [N, H*d] with any strides; heads int64 [K] sorted; slot int32 [H] (head
    -> row of A/v or -1); A, v [K, d] or None; bias [D_out] of any float dtype or None. `folded_bias` is
    b + W_S v already computed (float32; v is then not read), `scaled_cols` W_S ⊙ A already computed. `config` pins the tiles
    ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}) instead of the rule's pick."""
    N, C = x.shape
    D_out = weight.shape[0]
    KD = heads.numel() * head_dim
    y = torch.empty((N, D_out), device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    if folded_bias is not None:
        bias = folded_bias
    elif v is not None and KD:
        bias = offset_bias(weight, bias, heads, v, head_dim)
    thin_w = None
    if A is not None and KD > 0:
        if use_scaled_weight(N, KD, C):
            weight = scaled_weight(weight, slot, A, head_dim)
        else:
            thin_w = scaled_cols if scaled_cols is not None else scaled_columns(weight, heads, A, head_dim)
    return matmul(x, weight, bias, y, heads, thin_w, head_dim, config)


def matmul(x, weight, bias, y, heads, thin_w, head_dim, config=None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) (+ x_S thin_wᵀ when thin_w [D_out, K·d] is given), into y."""
    N, C = x.shape
    D_out = weight.shape[0]
    decode = N <= DECODE_MAX_ROWS
    kernel = _decode_kernel if decode else _fwd_kernel
    config = config if config is not None else pick_config("decode" if decode else "fwd", N)
    meta, launch = kernel_args(config)
    dummy = heads
    flags = dict(
        HEAD_DIM=head_dim, HAS_BIAS=bias is not None, THIN=thin_w is not None,
        THIN_BK=thin_block(head_dim, meta["BLOCK_K"]), EVEN_K=C % meta["BLOCK_K"] == 0,
        DOT_FP32=INTERPRETED, IEEE=x.dtype == torch.float32,
    )
    if decode:
        grid = (triton.cdiv(D_out, meta["BLOCK_N"]), triton.cdiv(N, meta["BLOCK_M"]))
    else:
        grid = (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(D_out, meta["BLOCK_N"]),)
    with on_device(x):
        kernel[grid](
            x, weight, bias if bias is not None else dummy, y, heads,
            thin_w if thin_w is not None else dummy,
            N, C, D_out, heads.numel() * head_dim,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
            **flags, **meta, **launch,
        )
    return y


@triton.jit
def _scaled_weight_kernel(
    w_ptr, out_ptr, slot_ptr, a_ptr, D_OUT, C, stride_wn, stride_wk,
    HEAD_DIM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out [D_out, C] contiguous = W with column c scaled by 1 + A[slot, c % d] where its head is selected."""
    ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = ro < D_OUT
    c_ok = rc < C
    slot = tl.load(slot_ptr + rc // HEAD_DIM, mask=c_ok, other=-1)
    s = 1.0 + tl.load(a_ptr + slot * HEAD_DIM + rc % HEAD_DIM, mask=c_ok & (slot >= 0), other=0.0).to(tl.float32)
    mask = o_ok[:, None] & c_ok[None, :]
    w = tl.load(w_ptr + ro.to(tl.int64)[:, None] * stride_wn + rc[None, :] * stride_wk, mask=mask, other=0.0)
    out = (w.to(tl.float32) * s[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ro.to(tl.int64)[:, None] * C + rc[None, :], out, mask=mask)


def scaled_weight(weight: torch.Tensor, slot: torch.Tensor, A: torch.Tensor, head_dim: int,
                  block_o: int = 32, block_c: int = 128) -> torch.Tensor:
    """W · diag(1 + A) over the selected heads' columns, in W's dtype (contiguous)."""
    D_out, C = weight.shape
    out = torch.empty((D_out, C), device=weight.device, dtype=weight.dtype)
    with on_device(weight):
        _scaled_weight_kernel[(triton.cdiv(D_out, block_o), triton.cdiv(C, block_c))](
            weight, out, slot, A.contiguous(), D_out, C, weight.stride(0), weight.stride(1),
            HEAD_DIM=head_dim, BLOCK_O=block_o, BLOCK_C=block_c,
        )
    return out


@triton.jit
def _scaled_columns_kernel(
    w_ptr, out_ptr, heads_ptr, a_ptr, D_OUT, KD, stride_wn, stride_wk,
    HEAD_DIM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """out [D_out, K·d] contiguous: out[o, j] = W[o, heads[j // d] * d + j % d] * A[j]."""
    ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    o_ok = ro < D_OUT
    j_ok = j < KD
    head = tl.load(heads_ptr + j // HEAD_DIM, mask=j_ok, other=0)
    col = head * HEAD_DIM + j % HEAD_DIM
    mask = o_ok[:, None] & j_ok[None, :]
    w = tl.load(w_ptr + ro.to(tl.int64)[:, None] * stride_wn + col[None, :] * stride_wk, mask=mask, other=0.0)
    a = tl.load(a_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
    out = (w.to(tl.float32) * a[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ro.to(tl.int64)[:, None] * KD + j[None, :], out, mask=mask)


def scaled_columns(weight: torch.Tensor, heads: torch.Tensor, A: torch.Tensor, head_dim: int,
                   block_o: int = 32, block_j: int = 128) -> torch.Tensor:
    """W_S · diag(A) [D_out, K·d] in W's dtype: the thin loop's operand."""
    D_out = weight.shape[0]
    KD = heads.numel() * head_dim
    out = torch.empty((D_out, KD), device=weight.device, dtype=weight.dtype)
    with on_device(weight):
        _scaled_columns_kernel[(triton.cdiv(D_out, block_o), triton.cdiv(KD, block_j))](
            weight, out, heads, A.contiguous(), D_out, KD, weight.stride(0), weight.stride(1),
            HEAD_DIM=head_dim, BLOCK_O=block_o, BLOCK_J=block_j,
        )
    return out


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
