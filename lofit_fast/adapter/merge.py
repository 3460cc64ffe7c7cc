"""merge: fold each HeadInterventionLinear into a plain nn.Linear with the same outputs.

On a quantized frozen base (torchao, `lofit_fast.models.quantize_base`) the offset v still folds, into an
o_proj bias only, and the scale A is kept unmerged in an A-only module; see `merge` for the choice and its
error bounds.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..models import FrozenQuantizedLinear
from ..ops.function import dequantized_columns, is_quantized_weight
from ..ops.torch_backend import selected_columns
from ..patch import HeadInterventionLinear, find_attention_sites
from .saving import require_patched


@torch.no_grad()
def fold_intervention(W: torch.Tensor, b: Optional[torch.Tensor], heads: torch.Tensor, head_dim: int,
                      A: Optional[torch.Tensor], v: Optional[torch.Tensor], w_sel: Optional[torch.Tensor] = None):
    """(new weight with the columns of head h_k scaled by 1 + A[k], or None without A; b + W_S · v, or None
    without v), the math in float32 and each result cast once to W's dtype. W and b are not modified.

    A quantized W (torchao) folds v only: W_S is its dequantized selected columns (`w_sel` when the caller has
    them cached, as the patched module does), and scaling its columns is an error (the weight would have to be
    requantized; `merge` keeps A unmerged instead)."""
    quantized = is_quantized_weight(W)
    if quantized and A is not None:
        raise ValueError(
            f"cannot fold A into the columns of a quantized weight ({type(W).__name__}): that needs requantizing "
            "the selected columns, whose rounding error is as large as a typical A; merge keeps A unmerged on a "
            "quantized base, and export writes dequantized float weights"
        )
    if w_sel is not None:
        W_S = w_sel.detach().float()
    elif quantized:
        W_S = dequantized_columns(W, heads, head_dim).float()
    else:
        W_S = W.detach().index_select(1, selected_columns(heads, head_dim)).float()
    weight = bias = None
    if A is not None:
        cols = selected_columns(heads, head_dim)
        weight = W.detach().clone()
        weight.index_copy_(1, cols, (W_S * (1.0 + A.detach().float().reshape(1, -1))).to(W.dtype))
    if v is not None:
        shift = W_S @ v.detach().float().reshape(-1)
        bias = (shift if b is None else b.detach().float() + shift).to(W.dtype)
    return weight, bias


def merged_linear(module: HeadInterventionLinear) -> nn.Linear:
    """A new nn.Linear equal to `module`: weight columns of head h_k scaled by (1 + A[k]), and the bias plus
    W_S · v (a bias is created when the module had none and has an offset).

    The math runs in float32 and is cast once to the weight's dtype. The weight is a new tensor: `module`'s
    (shared with the original o_proj) is not modified. On a quantized weight only an offset-only module (or
    one whose A is all zeros) merges: into a `FrozenQuantizedLinear` (the nn.Linear subclass of the quantized
    base's layers) that shares the quantized weight (it is not changed) and gets the new bias; with a nonzero A
    it is an error (see `merged_module`, which keeps A unmerged).
    """
    W, b = module.weight, module.bias
    quantized = module.w_sel is not None or is_quantized_weight(W)
    A = module.A
    if quantized and A is not None and not torch.count_nonzero(A.detach()):
        A = None  # (1 + 0) ⊙ x_S is x_S: nothing to fold, nothing to keep
    weight, bias = fold_intervention(W, b, module.heads, module.head_dim, A, module.v,
                                     w_sel=module.w_sel if quantized else None)
    if bias is None and b is not None:
        bias = b.detach().clone()
    cls = FrozenQuantizedLinear if quantized else nn.Linear
    out = cls(module.in_features, module.out_features, bias=bias is not None, device="meta")
    if quantized:
        out.weight = W  # the quantized parameter itself, unchanged (no copy)
    else:
        out.weight = nn.Parameter(W.detach().clone() if weight is None else weight, requires_grad=W.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=(b if b is not None else W).requires_grad)
    return out


def merged_module(module: HeadInterventionLinear) -> Union[nn.Linear, HeadInterventionLinear]:
    """What `merge` puts in place of `module`: `merged_linear(module)`, except on a quantized weight with a
    nonzero A, where v is folded into the bias of a new FrozenQuantizedLinear on the same quantized weight and A
    stays in a HeadInterventionLinear around it (scale only, a copy of A, the same heads and backend)."""
    quantized = module.w_sel is not None or is_quantized_weight(module.weight)
    if not quantized or module.A is None or not torch.count_nonzero(module.A.detach()):
        return merged_linear(module)
    W, b = module.weight, module.bias
    _, bias = fold_intervention(W, b, module.heads, module.head_dim, None, module.v, w_sel=module.w_sel)
    if bias is None and b is not None:
        bias = b.detach().clone()
    base = FrozenQuantizedLinear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    base.weight = W
    if bias is not None:
        base.bias = nn.Parameter(bias, requires_grad=(b if b is not None else W).requires_grad)
    A = module.A.detach().clone()
    kept = HeadInterventionLinear(base, module.heads, module.head_dim, A=A, v=None, backend=module.backend,
                                  layer_idx=module.layer_idx)
    kept.A.requires_grad_(module.A.requires_grad)
    return kept


def merge(model: nn.Module) -> nn.Module:
    """Replace every patched `o_proj` by a plain nn.Linear with the intervention folded in; returns the model.

    Afterwards (on a float base) the model holds no lofit_fast modules and gives the same logits as the patched
    model (up to rounding in the model's dtype). New weight tensors are made for the merged layers: the original base
    weights are not changed in place, so anything else sharing them (e.g. the `base_layer` kept for unpatch)
    keeps the base values. The model's config is not touched; `export` sets `attention_bias` on its copy.
    A layer whose intervention is disabled (inside `lofit_fast.disabled`) is an error rather than silently
    merged or dropped. On an error nothing is replaced.

    A quantized frozen base (torchao weight-only, `lofit_fast.models.quantize_base`): **v is folded into an
    o_proj bias only, and A is kept unmerged**.

    - v: the new bias b + W_S v is computed in float32 from W_S = the dequantized selected columns, the very
      tensor the patched forward multiplies v with, then cast once to the weight's dtype. The quantized weight
      is shared, not copied or changed. Against the patched quantized model this is exact up to float
      rounding (float32: |Δy| ≲ K·d·ε·|W_S||v|, ε = 2⁻²⁴; a 16-bit dtype adds one rounding of the bias,
      ≤ 2⁻⁸ of |b + W_S v|), and the quantization error against the float model is the base's own.
    - A: an o_proj whose intervention has a nonzero A becomes a scale-only HeadInterventionLinear (a copy of
      A, same heads) around a FrozenQuantizedLinear (an nn.Linear subclass) holding the quantized weight and
      the new bias: the merged model then still applies A, exactly as the patched model did (the quantized
      base GEMM plus a thin GEMM over the cached dequantized W_S), and `unpatch` of it gives back the base
      with v folded in. An all-zero A is dropped (the o_proj is then a FrozenQuantizedLinear with the bias). Requantizing the S columns instead was rejected: per-channel symmetric
      int8 rounds each element to a step s = max_j |W'_rj| / 127 of its row, so the error of a requantized
      element is up to s/2, i.e. up to 1/254 ≈ 0.4% of the row's largest |W|. The change A makes to an
      element is A·W_rj; LoFiT's A starts at 1e-3 and stays small under its L1 penalty, so wherever
      |A·W_rj| < s/2 (nearly everywhere: most |W_rj| are far below the row max) the requantized weight can
      round the learned scale away entirely, on top of a fresh rounding error on the K·d columns, and a
      grown row max would move the step of the whole row. Keeping A costs one K·d-wide GEMM per o_proj.
      For a plain float model with A folded in, use `export` (dequantized float weights, A folded exactly).
    """
    mods = require_patched(model, "merge")
    off = [layer for layer, m in mods.items() if not m.enabled]
    if off:
        raise RuntimeError(f"interventions of layers {off} are disabled (inside lofit_fast.disabled?); enable them before merging")
    for layer, m in mods.items():
        for name in ("A", "v"):
            p = getattr(m, name)
            if p is not None and not torch.isfinite(p).all():
                raise ValueError(f"{name} of layer {layer} contains NaN or inf; refusing to fold it into the weights")
    at_sites = {id(m) for m in mods.values()}
    stray = [name for name, m in model.named_modules() if isinstance(m, HeadInterventionLinear) and id(m) not in at_sites]
    if stray:
        raise RuntimeError(f"HeadInterventionLinear modules outside the attention o_proj sites cannot be merged: {stray}")
    replacements = [(site.attn, merged_module(mods[site.layer])) for site in find_attention_sites(model) if site.layer in mods]
    for attn, linear in replacements:
        attn.o_proj = linear
    return model


merge_and_unload = merge
