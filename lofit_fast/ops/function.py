"""`head_affine_linear`: y = x' Wᵀ (+ b) with x'_S = (1 + A) ⊙ x_S + v on the selected heads' columns."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._autocast import AUTOCAST_DEVICE_TYPES
from ._autocast import autocast_off as _autocast_off
from .registry import get_backend
from .rows import check_row_tables, head_affine_rows
from .torch_backend import acc, selected_columns

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in effect for x's device type, or None when autocast is off there (or x is float64,
    which autocast leaves alone)."""
    dev = x.device.type
    if dev not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(dev) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def is_quantized_weight(t) -> bool:
    """Whether `t` is a quantized weight tensor: a tensor subclass that overrides `dequantize()` (torchao's
    Int8Tensor and relatives), which the backends cannot read directly. Plain tensors, parameters and other
    subclasses (DTensor, fake tensors) are not."""
    return (isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter)
            and getattr(type(t), "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize)


def dequantized_columns(weight: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """W_S: the selected heads' input columns of a (quantized) weight, dequantized: [D_out, K*head_dim], in the
    weight's float dtype. What the thin GEMM of a quantized base uses (cache it per weight)."""
    full = weight.dequantize() if is_quantized_weight(weight) else weight
    return full.detach().index_select(1, selected_columns(heads.to(full.device), head_dim)).to(weight.dtype).contiguous()


class _FrozenQuantizedLinearFn(torch.autograd.Function):
    """F.linear on a frozen quantized weight that keeps only the quantized weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy.matmul(weight.dequantize().to(dy.dtype)).to(ctx.x_dtype)  # W in float for this layer only
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, db


def frozen_quantized_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) on a frozen quantized (torchao) weight, with a backward that dequantizes the
    weight when it runs: torchao's weight-only GEMM is plain autograd over `x @ W_int8.to(x.dtype)`, so it
    keeps a float copy of every such weight alive from forward to backward (more memory than a float base).
    dx = dy · W; the weight gets no gradient (it is an error for it to require one)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    if weight.requires_grad:
        raise ValueError(f"a quantized weight ({type(weight).__name__}) cannot be trained; freeze it (requires_grad=False)")
    return _FrozenQuantizedLinearFn.apply(x, weight, bias)


def quantized_head_affine_linear(x, weight, bias, heads, A, v, head_dim, w_sel=None):
    """The op on a quantized frozen base (the QLoRA analogue):

        y = F.linear(x, W_q, b)  +  (x_S ⊙ A) W_Sᵀ  +  v W_Sᵀ

    the base GEMM runs on the quantized weight (its own kernel; dx flows back through it without a float copy
    of W kept, `frozen_quantized_linear`), the thin GEMM and the offset row use W_S = the dequantized selected
    columns (`w_sel`, computed here when not given). Plain autograd otherwise: dx, dA, dv as for the float op."""
    y = frozen_quantized_linear(x, weight, bias)
    if heads.numel() == 0 or (A is None and v is None):
        return y
    if w_sel is None:
        w_sel = dequantized_columns(weight, heads, head_dim)
    if A is not None:
        xs = x.index_select(-1, selected_columns(heads, head_dim))
        t = (acc(xs) * acc(A).reshape(-1)).to(w_sel.dtype)
        y = y + F.linear(t, w_sel).to(y.dtype)
    if v is not None:
        y = y + (acc(w_sel) @ acc(v).reshape(-1)).to(y.dtype)
    return y


def _autocast_inputs(dtype, x, weight, bias, A, v):
    """What autocast does to a linear layer's inputs (floating, non-float64 tensors → the autocast dtype),
    except A and v: they keep float32 (or the autocast dtype when they already have it), so their gradients
    are float32 and small updates like 1 + 1e-3 survive. Casts are differentiable."""

    def low(t):
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        return t.to(dtype)

    def param(t):
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float32):
            return t
        return t.float()

    return low(x), low(weight), low(bias), param(A), param(v)


def _check_param(p: Optional[torch.Tensor], name: str, x: torch.Tensor, K: int, head_dim: int) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != (K, head_dim):
        raise ValueError(f"{name} must have shape [K, head_dim] = [{K}, {head_dim}], got {list(p.shape)}")
    if p.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}), got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def check_op_inputs(x, weight, bias, heads, A, v, head_dim) -> None:
    """Shape, dtype and device checks; head values are checked too when `heads` lives on the CPU (no sync)."""
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., H*head_dim], got shape {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported (float32, bfloat16, float16, float64)")
    if head_dim <= 0 or x.shape[-1] % head_dim:
        raise ValueError(f"x has {x.shape[-1]} features, not a positive multiple of head_dim {head_dim}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [D_out, {x.shape[-1]}], got {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if not isinstance(heads, torch.Tensor) or heads.dim() != 1 or heads.dtype != torch.int64:
        raise TypeError("heads must be a 1-D int64 tensor")
    if heads.device != x.device:
        raise ValueError(f"heads is on {heads.device} but x is on {x.device}")
    H = x.shape[-1] // head_dim
    K = heads.numel()
    if K > H:
        raise ValueError(f"heads has {K} entries but there are only {H} heads")
    if heads.device.type == "cpu" and K and not torch.compiler.is_compiling():
        hl = heads.tolist()
        for i, h in enumerate(hl):
            if not 0 <= h < H:
                raise ValueError(f"head {h} out of range: there are {H} heads")
            if i and h <= hl[i - 1]:
                raise ValueError(f"heads must be sorted and unique, got {hl[i - 1]} before {h}")
    _check_param(A, "A", x, K, head_dim)
    _check_param(v, "v", x, K, head_dim)


class HeadAffineLinearFn(torch.autograd.Function):
    """Frozen weight and bias; gradients for x, A and v. Saves only x's selected columns (for dA)."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads, A, v, head_dim, backend):
        y = backend.forward(x, weight, bias, heads, A, v, head_dim)
        ctx.backend, ctx.head_dim = backend, head_dim
        ctx.has_A, ctx.has_v = A is not None, v is not None
        ctx.v_dtype = v.dtype if v is not None else None
        x_sel = None
        if A is not None and A.requires_grad:
            K, H = heads.numel(), x.shape[1] // head_dim
            # With every head selected x_S is x itself: keep a reference, never a copy.
            x_sel = x if K == H else x.index_select(1, selected_columns(heads, head_dim))
        ctx.save_for_backward(x_sel, weight, heads, A)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_sel, weight, heads, A = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dA = ctx.has_A and ctx.needs_input_grad[4]
        need_dv = ctx.has_v and ctx.needs_input_grad[5]
        if not (need_dx or need_dA or need_dv):
            return (None,) * 8
        # A backward called inside an autocast region must not recast the backend's GEMMs.
        with _autocast_off(dy):
            dx, dA, dv = ctx.backend.backward(
                dy.contiguous(), x_sel, weight, heads, A, ctx.head_dim, need_dx, need_dA, need_dv
            )
        if dA is not None:
            dA = dA.to(A.dtype)
        if dv is not None:
            dv = dv.to(ctx.v_dtype)
        return dx, None, None, None, dA, dv, None, None


def _differentiable_reference(x, weight, bias, heads, A, v, head_dim):
    """Plain autograd path for a trainable weight or bias, and for empty inputs (slower, always correct)."""
    N, C = x.shape
    xh = x.reshape(N, C // head_dim, head_dim)
    xs = acc(xh.index_select(1, heads))
    if A is not None:
        xs = xs * (1.0 + acc(A))
    if v is not None:
        xs = xs + acc(v)
    xp = xh.index_copy(1, heads, xs.to(x.dtype)).reshape(N, C)
    return F.linear(xp, weight, bias)


def head_affine_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    heads: torch.Tensor,
    A: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    head_dim: int,
    backend: str = "auto",
    *,
    validate: bool = True,
    row_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x' @ weight.T (+ bias), where x' equals x except on the selected heads' columns:
    x'[..., h_k*d:(h_k+1)*d] = (1 + A[k]) * x[..., h_k*d:(h_k+1)*d] + v[k].

    x: [..., H*d]; weight: [D_out, H*d]; bias: [D_out] or None; heads: sorted unique int64 [K];
    A, v: [K, d] or None (None means "not used"). Gradients flow to x, A, v (and weight/bias if they
    require grad, through a slower path). float32, bfloat16 and float16, accumulating in float32.
    `validate=False` skips the input checks (for callers that validated once, like the patched modules).

    Under `torch.autocast` (CPU or CUDA, bf16 or fp16) the op does what autocast does to a linear layer: x,
    weight and bias are cast to the autocast dtype and the GEMMs run in it, on any backend; A and v are not
    cast (float32 stays float32, and their gradients are float32).
    A quantized `weight` (torchao) runs `quantized_head_affine_linear` (the backends need plain tensors).

    Many adapters in one batch (lofit_fast/ops/rows.py): with `row_ids` (int64, one entry per row of x: shape
    x.shape[:-1] or flat [N]), A and v are tables [n_adapters, K, d] and row n uses adapter row_ids[n] (-1: no
    intervention): y[n] = x[n] Wᵀ + (x_S[n] ⊙ A[a]) W_Sᵀ + v[a] W_Sᵀ + b. Gradients of A and v land in each
    row's adapter slice.
    """
    if row_ids is not None:
        if is_quantized_weight(weight):
            raise NotImplementedError("row_ids (several adapters in one batch) with a quantized base weight is not "
                                      "supported; dequantize the base or run one adapter at a time")
        if validate:
            check_op_inputs(x, weight, bias, heads, None, None, head_dim)
            check_row_tables(x, heads, A, v, head_dim, row_ids)
        low = autocast_dtype(x)
        if low is not None:
            x, weight, bias, A, v = _autocast_inputs(low, x, weight, bias, A, v)
        with _autocast_off(x):
            return head_affine_rows(x, weight, bias, heads, A, v, head_dim, row_ids, backend)
    if is_quantized_weight(weight):
        if validate:
            check_op_inputs(x, weight, bias, heads, A, v, head_dim)
        return quantized_head_affine_linear(x, weight, bias, heads, A, v, head_dim)
    low = autocast_dtype(x)
    if low is not None:
        x, weight, bias, A, v = _autocast_inputs(low, x, weight, bias, A, v)
    with _autocast_off(x):
        return _head_affine_linear(x, weight, bias, heads, A, v, head_dim, backend, validate)


def _head_affine_linear(x, weight, bias, heads, A, v, head_dim, backend, validate):
    if validate:
        check_op_inputs(x, weight, bias, heads, A, v, head_dim)
    if heads.numel() == 0 or (A is None and v is None):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if weight.requires_grad or (bias is not None and bias.requires_grad) or x2.shape[0] == 0:
        y2 = _differentiable_reference(x2, weight, bias, heads, A, v, head_dim)
    else:
        be = get_backend(backend, x2, weight, heads.numel())
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2, A, v)
        )
        if needs_grad:
            y2 = HeadAffineLinearFn.apply(x2, weight, bias, heads, A, v, head_dim, be)
        else:  # inference (e.g. decode): skip the autograd.Function's overhead
            y2 = be.forward(x2, weight, bias, heads, A, v, head_dim)
    return y2.reshape(*lead, weight.shape[0])
