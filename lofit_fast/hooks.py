"""Hook-based versions of the same intervention: what users write today, and what we benchmark against.

- `patch`: a forward pre-hook on `o_proj` that applies a dense per-layer (1 + A) ⊙ x + v over all heads,
  with A and v scattered into [H, d] tensors that are zero on the unselected heads.
- `patch_loop`: the official LoFiT pattern, a Python loop over the selected heads with a `.clone()` and a
  slice write per head.
Both hold A and v as parameters of a small `HookIntervention` module attached to `o_proj` (so they show up
in `model.parameters()` and `state_dict()`), with the same layout as `lofit_fast.patch`: [K, head_dim].
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from .patch.families import find_attention_sites
from .patch.surgery import HeadSpec, _initial_value, normalize_heads

_ATTR = "lofit_hook"


class HookIntervention(nn.Module):
    def __init__(self, heads: List[int], num_heads: int, head_dim: int, A, v, loop: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.loop = num_heads, head_dim, loop
        self.register_buffer("heads", torch.tensor(heads, dtype=torch.int64), persistent=False)
        self.head_list = list(heads)
        self.A = None if A is None else nn.Parameter(A)
        self.v = None if v is None else nn.Parameter(v)
        self.enabled = True
        self.handle = None

    def dense(self, p: torch.Tensor) -> torch.Tensor:
        full = p.new_zeros(self.num_heads, self.head_dim)
        return full.index_copy(0, self.heads.to(p.device), p)

    def apply_dense(self, x: torch.Tensor) -> torch.Tensor:
        xh = x.view(*x.shape[:-1], self.num_heads, self.head_dim)
        out = xh
        if self.A is not None:
            out = out * (1 + self.dense(self.A))
        if self.v is not None:
            out = out + self.dense(self.v)
        return out.to(x.dtype).reshape(x.shape)

    def apply_loop(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        for k, h in enumerate(self.head_list):
            cols = slice(h * d, (h + 1) * d)
            new = x[..., cols]
            if self.A is not None:
                new = new * (1 + self.A[k])
            if self.v is not None:
                new = new + self.v[k]
            out = x.clone()
            out[..., cols] = new.to(x.dtype)
            x = out
        return x

    def pre_hook(self, module, args):
        if not self.enabled:
            return None
        (x, *rest) = args
        return (self.apply_loop(x) if self.loop else self.apply_dense(x), *rest)


def _attach(model: nn.Module, heads: HeadSpec, scale: bool, offset: bool, init_std: float,
            param_dtype: torch.dtype, loop: bool, A=None, v=None) -> nn.Module:
    sites = find_attention_sites(model)
    if any(hasattr(s.attn.o_proj, _ATTR) for s in sites):
        raise RuntimeError("model already has lofit_fast hooks; call lofit_fast.hooks.unpatch(model) first")
    if not (scale or offset):
        raise ValueError("nothing to train: scale and offset are both False")
    selection = normalize_heads(heads, sites)
    made = []
    for layer, hs in selection.items():
        site = sites[layer]
        w = site.attn.o_proj.weight
        a0 = _initial_value(A, "A", layer, len(hs), site.head_dim, w, param_dtype, init_std) if scale else None
        v0 = _initial_value(v, "v", layer, len(hs), site.head_dim, w, param_dtype, init_std) if offset else None
        made.append((site.attn.o_proj, HookIntervention(hs, site.num_heads, site.head_dim, a0, v0, loop)))
    for o_proj, hook in made:
        o_proj.add_module(_ATTR, hook)
        hook.handle = o_proj.register_forward_pre_hook(hook.pre_hook)
    return model


def patch(model: nn.Module, heads: HeadSpec = "all", *, scale: bool = True, offset: bool = True,
          init_std: float = 0.0, param_dtype: torch.dtype = torch.float32, A=None, v=None) -> nn.Module:
    """Dense pre-hook baseline: per layer, (1 + A) ⊙ x + v over all heads, zero A/v on unselected heads."""
    return _attach(model, heads, scale, offset, init_std, param_dtype, loop=False, A=A, v=v)


def patch_loop(model: nn.Module, heads: HeadSpec = "all", *, scale: bool = True, offset: bool = True,
               init_std: float = 0.0, param_dtype: torch.dtype = torch.float32, A=None, v=None) -> nn.Module:
    """The official LoFiT pattern: a Python loop over heads, clone + slice write per head."""
    return _attach(model, heads, scale, offset, init_std, param_dtype, loop=True, A=A, v=v)


def hooked_modules(model: nn.Module) -> Dict[int, HookIntervention]:
    return {s.layer: getattr(s.attn.o_proj, _ATTR) for s in find_attention_sites(model) if hasattr(s.attn.o_proj, _ATTR)}


def unpatch(model: nn.Module) -> nn.Module:
    mods = hooked_modules(model)
    if not mods:
        raise RuntimeError("model has no lofit_fast hooks")
    for s in find_attention_sites(model):
        if s.layer in mods:
            mods[s.layer].handle.remove()
            delattr(s.attn.o_proj, _ATTR)
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in hooked_modules(model).values() for p in (m.A, m.v) if p is not None and p.requires_grad]
