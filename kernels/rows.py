"""Per-row tables (many adapters in one batch): y[n] = x[n] Wᵀ + (x_S[n] ⊙ A[a]) W_Sᵀ + off[a] + b, a = rid[n].

The same GEMM as forward.py's, whose epilogue reads each row's slot in the tables through the per-row slot table
`rid` (int32 or int64 [N], -1 = no adapter):

- the main loop is the plain, pipelined x · Wᵀ;
- A: t = x_S ⊙ A[rid] [N, K·d] (`rows_scaled_columns`, one elementwise pass that reads each row's slot), then a
  thin loop over the K·d selected columns, t against W_S (W's own columns: no per-adapter copy of W). Neither
  loop changes a loaded tile, so both stay pipelined (sm_90: >= 2 shared-memory buffers per operand);
- the offset: `off = v W_Sᵀ` [n_adapters, D_out] float32, built once per parameter version (`offset_rows`), and
  gathered per row as the accumulator's initial value (no second register tile in the epilogue).

Few rows (decode) run the transposed variant (yᵀ = W x′ᵀ, W's rows on wgmma's 64-row side), as forward.py does.
The backward: g = dy W through backward.py's kernel, then `_rows_grad_kernel` scales each row's selected columns
by its 1 + A[rid] in place and writes g_S and g_S ⊙ x_S per row, which a segmented sum turns into dv and dA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (DECODE_MAX_ROWS, GPU_CONFIGS, INTERPRETED, INTERPRETER_CONFIG, gemm_config, grouped_tile,
                      kernel_args, on_device, regime)
from .forward import _dot, _thin_columns, thin_block


# The rule's tiles are forward.py's (the first candidate of each regime); the large-regime alternative 128 x 256
# would spill on sm_90 with the per-row offset tile (bench/sm90_report.py), so the rows kernels' alternative there
# is 128 x 64.
ROWS_GPU_CONFIGS = {
    "fwd": {"mid": GPU_CONFIGS["fwd"]["mid"],
            "large": [GPU_CONFIGS["fwd"]["large"][0], gemm_config(128, 64, 64, 4, 4)]},
    "decode": GPU_CONFIGS["decode"],
}


def pick_rows_config(kind: str, n_rows: int) -> dict:
    """The deterministic tile rule of the per-row kernels (forward.py's rule, see ROWS_GPU_CONFIGS)."""
    if INTERPRETED:
        return dict(INTERPRETER_CONFIG)
    return dict(ROWS_GPU_CONFIGS[kind][regime(kind, n_rows)][0])


@triton.jit
def _rows_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, heads_ptr, t_ptr, off_ptr, rid_ptr,
    N, C, D_OUT, KD,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_A: tl.constexpr, HAS_OFF: tl.constexpr,
    THIN_BK: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), N, D_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < D_OUT
    # The accumulator starts as each row's offset row (no second tile of registers in the epilogue).
    if HAS_OFF:
        rid = tl.load(rid_ptr + rm, mask=row_ok, other=-1).to(tl.int64)
        acc = tl.load(off_ptr + rid[:, None] * D_OUT + rn[None, :],
                      mask=(row_ok & (rid >= 0))[:, None] & col_ok[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    x_ptrs = x_rows + rk[None, :] * stride_xk
    w_ptrs = w_cols + rk[:, None] * stride_wk
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
    if HAS_A:  # t = x_S ⊙ A[rid] [N, K·d] (rows_scaled_columns), against W's own selected columns
        rt = tl.arange(0, THIN_BK)
        t_rows = t_ptr + rm.to(tl.int64)[:, None] * KD
        for j0 in range(0, KD, THIN_BK):
            cols, j_ok = _thin_columns(heads_ptr, j0, KD, rt, HEAD_DIM, THIN_BK)
            xt = tl.load(t_rows + (j0 + rt)[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
            wt = tl.load(w_cols + cols[:, None] * stride_wk, mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(xt, wt, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _rows_decode_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, heads_ptr, t_ptr, off_ptr, rid_ptr,
    N, C, D_OUT, KD,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_A: tl.constexpr, HAS_OFF: tl.constexpr,
    THIN_BK: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """yᵀ tile [BLOCK_N rows of W, BLOCK_M rows of x] = W x′ᵀ, each x row with its own adapter's slot."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < N
    col_ok = rn < D_OUT
    if HAS_OFF:
        rid = tl.load(rid_ptr + rm, mask=row_ok, other=-1).to(tl.int64)
        acc = tl.load(off_ptr + rid[None, :] * D_OUT + rn[:, None],
                      mask=col_ok[:, None] & (row_ok & (rid >= 0))[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm
    w_ptrs = w_rows + rk[None, :] * stride_wk
    x_ptrs = x_cols + rk[:, None] * stride_xk
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
    if HAS_A:
        rt = tl.arange(0, THIN_BK)
        t_cols = t_ptr + rm.to(tl.int64)[None, :] * KD
        for j0 in range(0, KD, THIN_BK):
            cols, j_ok = _thin_columns(heads_ptr, j0, KD, rt, HEAD_DIM, THIN_BK)
            wt = tl.load(w_rows + cols[None, :] * stride_wk, mask=col_ok[:, None] & j_ok[None, :], other=0.0)
            xt = tl.load(t_cols + (j0 + rt)[:, None], mask=j_ok[:, None] & row_ok[None, :], other=0.0)
            acc = _dot(wt, xt, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _rows_scale_kernel(
    x_ptr, heads_ptr, a_ptr, rid_ptr, t_ptr, N, KD, stride_xm, stride_xk,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """t[n, j] = x[n, col(j)] * A[rid[n], j] in x's dtype (0 for rid[n] = -1): the thin loop's per-row operand."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    r_ok = r < N
    j_ok = j < KD
    rid = tl.load(rid_ptr + r, mask=r_ok, other=-1).to(tl.int64)
    head = tl.load(heads_ptr + j // HEAD_DIM, mask=j_ok, other=0)
    col = head * HEAD_DIM + j % HEAD_DIM
    m = r_ok[:, None] & j_ok[None, :]
    use = m & (rid >= 0)[:, None]
    xv = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_xm + col[None, :] * stride_xk, mask=use, other=0.0)
    a = tl.load(a_ptr + rid[:, None] * KD + j[None, :], mask=use, other=0.0).to(tl.float32)
    tl.store(t_ptr + r.to(tl.int64)[:, None] * KD + j[None, :], (xv.to(tl.float32) * a).to(t_ptr.dtype.element_ty),
             mask=m)


def rows_scaled_columns(x: torch.Tensor, heads: torch.Tensor, A: torch.Tensor, row_ids: torch.Tensor, head_dim: int,
                        block_r: int = 16, block_j: int = 128) -> torch.Tensor:
    """t = x_S ⊙ A[rid] [N, K·d] in x's dtype, contiguous (zero rows where rid = -1)."""
    N = x.shape[0]
    KD = heads.numel() * head_dim
    t = torch.empty((N, KD), device=x.device, dtype=x.dtype)
    if N == 0 or KD == 0:
        return t
    with on_device(x):
        _rows_scale_kernel[(triton.cdiv(N, block_r), triton.cdiv(KD, block_j))](
            x, heads, A.contiguous(), row_ids.contiguous(), t, N, KD, x.stride(0), x.stride(1),
            HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_J=block_j,
        )
    return t


@triton.jit
def _offset_rows_kernel(
    w_ptr, heads_ptr, v_ptr, out_ptr, D_OUT, KD, stride_wn, stride_wk,
    HEAD_DIM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """out[a, o] = Σ_j W[o, col(j)] v[a, j] in float32: adapter a's offset row (program axis 1 = a)."""
    ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    a = tl.program_id(1).to(tl.int64)
    o_ok = ro < D_OUT
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for j0 in range(0, KD, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < KD
        head = tl.load(heads_ptr + j // HEAD_DIM, mask=j_ok, other=0)
        col = head * HEAD_DIM + j % HEAD_DIM
        w = tl.load(w_ptr + ro.to(tl.int64)[:, None] * stride_wn + col[None, :] * stride_wk,
                    mask=o_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + a * KD + j, mask=j_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * vv[None, :], axis=1)
    tl.store(out_ptr + a * D_OUT + ro, acc, mask=o_ok)


def offset_rows(weight: torch.Tensor, heads: torch.Tensor, v: torch.Tensor, head_dim: int,
                block_o: int = 32, block_j: int = 128) -> torch.Tensor:
    """float32 [n_adapters, D_out]: v[a] W_Sᵀ for every adapter a (v [n_adapters, K, d]), reading only W_S."""
    D_out = weight.shape[0]
    n = v.shape[0]
    v = v.contiguous()
    out = torch.empty((n, D_out), device=weight.device, dtype=torch.float32)
    if n == 0:
        return out
    with on_device(weight):
        _offset_rows_kernel[(triton.cdiv(D_out, block_o), n)](
            weight, heads, v, out, D_out, v[0].numel(), weight.stride(0), weight.stride(1),
            HEAD_DIM=head_dim, BLOCK_O=block_o, BLOCK_J=block_j,
        )
    return out


def rows_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads: torch.Tensor,
                 A: Optional[torch.Tensor], offsets: Optional[torch.Tensor], row_ids: torch.Tensor, head_dim: int,
                 config: Optional[dict] = None) -> torch.Tensor:
    """y [N, D_out] in x's dtype. x [N, H*d] any strides; heads int64 [K] sorted; A [n_adapters, K, d] or None;
    offsets float32 [n_adapters, D_out] (`offset_rows`) or None; row_ids int64 [N] (-1 = none)."""
    N, C = x.shape
    D_out = weight.shape[0]
    KD = heads.numel() * head_dim
    y = torch.empty((N, D_out), device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    decode = N <= DECODE_MAX_ROWS
    kernel = _rows_decode_kernel if decode else _rows_fwd_kernel
    config = config if config is not None else pick_rows_config("decode" if decode else "fwd", N)
    meta, launch = kernel_args(config)
    dummy = heads
    t = rows_scaled_columns(x, heads, A, row_ids, head_dim) if A is not None and KD > 0 else None
    flags = dict(
        HEAD_DIM=head_dim, HAS_BIAS=bias is not None, HAS_A=A is not None and KD > 0,
        HAS_OFF=offsets is not None and KD > 0, THIN_BK=thin_block(head_dim, meta["BLOCK_K"]),
        EVEN_K=C % meta["BLOCK_K"] == 0, DOT_FP32=INTERPRETED, IEEE=x.dtype == torch.float32,
    )
    if decode:
        grid = (triton.cdiv(D_out, meta["BLOCK_N"]), triton.cdiv(N, meta["BLOCK_M"]))
    else:
        grid = (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(D_out, meta["BLOCK_N"]),)
    with on_device(x):
        kernel[grid](
            x, weight, bias if bias is not None else dummy, y, heads,
            t if t is not None else dummy, offsets if offsets is not None else dummy, row_ids.contiguous(),
            N, C, D_out, KD,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
            **flags, **meta, **launch,
        )
    return y


@triton.jit
def _rows_grad_kernel(
    g_ptr, xs_ptr, a_ptr, rid_ptr, heads_ptr, gs_ptr, gx_ptr,
    N, KD, stride_gm, stride_xm,
    HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, WANT_GS: tl.constexpr, WANT_GX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Per row n and selected position j (column col(j) of g): gs[n, j] = g[n, col(j)], gx[n, j] = g ⊙ x_S (float32,
    before scaling), then g[n, col(j)] *= 1 + A[rid[n], j] when SCALE (g becomes dx)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    r_ok = r < N
    j_ok = j < KD
    head = tl.load(heads_ptr + j // HEAD_DIM, mask=j_ok, other=0)
    col = head * HEAD_DIM + j % HEAD_DIM
    m = r_ok[:, None] & j_ok[None, :]
    g_ptrs = g_ptr + r.to(tl.int64)[:, None] * stride_gm + col[None, :]
    g = tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32)
    out = r.to(tl.int64)[:, None] * KD + j[None, :]
    if WANT_GS:
        tl.store(gs_ptr + out, g, mask=m)
    if WANT_GX:
        xs = tl.load(xs_ptr + r.to(tl.int64)[:, None] * stride_xm + j[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(gx_ptr + out, g * xs, mask=m)
    if SCALE:
        rid = tl.load(rid_ptr + r, mask=r_ok, other=-1).to(tl.int64)
        ok = m & (rid >= 0)[:, None]
        a = tl.load(a_ptr + rid[:, None] * KD + j[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(g_ptrs, (g * (1.0 + a)).to(g_ptr.dtype.element_ty), mask=ok)


def rows_head_grads(g: torch.Tensor, x_sel: Optional[torch.Tensor], A: Optional[torch.Tensor], row_ids: torch.Tensor,
                    heads: torch.Tensor, head_dim: int, scale: bool, want_gs: bool, want_gx: bool,
                    block_r: int = 16, block_j: int = 64):
    """(g_S float32 [N, K·d] or None, g_S ⊙ x_S float32 or None); scales g's selected columns in place by each row's
    1 + A[rid] when `scale` (g [N, H*d] with unit column stride, x_sel [N, K·d] with unit column stride)."""
    N = g.shape[0]
    KD = heads.numel() * head_dim
    gs = torch.empty((N, KD), device=g.device, dtype=torch.float32) if want_gs else None
    gx = torch.empty((N, KD), device=g.device, dtype=torch.float32) if want_gx else None
    if N == 0 or KD == 0:
        return gs, gx
    if x_sel is not None and x_sel.stride(1) != 1:
        x_sel = x_sel.contiguous()
    if g.stride(1) != 1:
        raise ValueError("g must have unit column stride (it is scaled in place)")
    dummy = g
    with on_device(g):
        _rows_grad_kernel[(triton.cdiv(N, block_r), triton.cdiv(KD, block_j))](
            g, x_sel if x_sel is not None else dummy, A.contiguous() if A is not None else dummy,
            row_ids.contiguous(), heads, gs if gs is not None else dummy, gx if gx is not None else dummy,
            N, KD, g.stride(0), x_sel.stride(0) if x_sel is not None else 0,
            HEAD_DIM=head_dim, SCALE=scale and A is not None, WANT_GS=want_gs, WANT_GX=want_gx,
            BLOCK_R=block_r, BLOCK_J=block_j,
        )
    return gs, gx
