"""merge: fold each HeadInterventionLinear into a plain nn.Linear with the same outputs."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.torch_backend import selected_columns
from ..patch import HeadInterventionLinear, find_attention_sites
from .saving import require_patched


@torch.no_grad()
def fold_intervention(W: torch.Tensor, b: Optional[torch.Tensor], heads: torch.Tensor, head_dim: int,
                      A: Optional[torch.Tensor], v: Optional[torch.Tensor]):
    """(new weight with the columns of head h_k scaled by 1 + A[k], or None without A; b + W_S · v, or None
    without v), the math in float32 and each result cast once to W's dtype. W and b are not modified."""
    cols = selected_columns(heads, head_dim)
    W_S = W.detach().index_select(1, cols).float()
    weight = bias = None
    if A is not None:
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
    (shared with the original o_proj) is not modified.
    """
    W, b = module.weight, module.bias
    weight, bias = fold_intervention(W, b, module.heads, module.head_dim, module.A, module.v)
    if weight is None:
        weight = W.detach().clone()
    if bias is None and b is not None:
        bias = b.detach().clone()
    out = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=W.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=(b if b is not None else W).requires_grad)
    return out


def merge(model: nn.Module) -> nn.Module:
    """Replace every patched `o_proj` by a plain nn.Linear with the intervention folded in; returns the model.

    Afterwards the model holds no lofit_fast modules and gives the same logits as the patched model (up to
    rounding in the model's dtype). New weight tensors are made for the merged layers: the original base
    weights are not changed in place, so anything else sharing them (e.g. the `base_layer` kept for unpatch)
    keeps the base values. The model's config is not touched; `export` sets `attention_bias` on its copy.
    A layer whose intervention is disabled (inside `lofit_fast.disabled`) is an error rather than silently
    merged or dropped.
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
    replacements = [(site.attn, merged_linear(mods[site.layer])) for site in find_attention_sites(model) if site.layer in mods]
    for attn, linear in replacements:
        attn.o_proj = linear
    return model


merge_and_unload = merge
