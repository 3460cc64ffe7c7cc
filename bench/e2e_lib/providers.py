"""The providers: the same model with LoFiT fused, by hooks, the official per-head loop, LoRA, merged, and the
floor every training ratio is taken against."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import lofit_fast
from lofit_fast import hooks as lofit_hooks
from lofit_fast.patch import find_attention_sites

from .common import (
    FORCED, INFER_PROVIDERS, INFER_V_STD, INIT_STD, LR_STEP1, LR_STEP2, TRAIN_PROVIDERS, step2_heads, tensor_bytes,
)


@dataclass
class Provider:
    """One way of running the model: module swaps and forward pre-hooks applied by attach(), undone by
    detach(), plus the trainable parameters and their optimizer (None for inference providers)."""

    name: str
    swaps: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attribute, module)
    pre_hooks: List[Tuple[nn.Module, Callable]] = field(default_factory=list)
    params: List[nn.Parameter] = field(default_factory=list)
    optimizer: Optional[torch.optim.Optimizer] = None
    l1_params: List[nn.Parameter] = field(default_factory=list)
    extra_bytes: int = 0  # persistent bytes besides params and optimizer state (e.g. a merged layer's new bias)
    _saved: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self) -> None:
        if self._saved or self._handles:
            raise RuntimeError(f"provider {self.name!r} is already attached")
        for parent, attr, module in self.swaps:
            self._saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, module)
        for module, fn in self.pre_hooks:
            self._handles.append(module.register_forward_pre_hook(fn))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for parent, attr, module in reversed(self._saved):
            setattr(parent, attr, module)
        self._saved, self._handles = [], []

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def persistent_bytes(self) -> int:
        state = []
        if self.optimizer is not None:
            for s in self.optimizer.state.values():
                state.extend(t for t in s.values() if isinstance(t, torch.Tensor))
        return tensor_bytes(self.params) + tensor_bytes(state) + self.extra_bytes


def _o_proj_swaps(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """(attention module, "o_proj", current o_proj) for every layer whose o_proj is not the plain Linear."""
    return [(s.attn, "o_proj", s.attn.o_proj) for s in find_attention_sites(model)
            if type(s.attn.o_proj) is not nn.Linear]


def _adamw(params: List[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class ScalarShift(nn.Module):
    """The floor's single trainable scalar, added to the input of one o_proj (starts at 0). Its gradient is the
    sum of the gradient reaching that input, so autograd must backpropagate down to that layer; an addition
    saves no tensor for the backward (a multiplication would keep the layer's input alive)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros((), device=device, dtype=torch.float32))

    def pre_hook(self, module, args):
        x, *rest = args
        return (x + self.shift.to(x.dtype), *rest)


def make_floor(model: nn.Module, layer: int, lr: float) -> Provider:
    site = find_attention_sites(model)[layer]
    gate = ScalarShift(site.attn.o_proj.weight.device)
    params = [gate.shift]
    return Provider("floor", pre_hooks=[(site.attn.o_proj, gate.pre_hook)], params=params, optimizer=_adamw(params, lr))


def _trainable(params: List[nn.Parameter], lr: Optional[float], l1: bool) -> Dict:
    """Provider keywords for parameters that train (lr given) or are fixed intervention values (lr None)."""
    if lr is None:
        return dict(extra_bytes=tensor_bytes(params))
    return dict(params=params, optimizer=_adamw(params, lr), l1_params=params if l1 else [])


def make_lofit(model: nn.Module, name: str, heads, *, scale: bool, offset: bool, backend: str, lr: Optional[float],
               init_std: float = 0.0, l1: bool = False, v: Optional[Dict[int, torch.Tensor]] = None) -> Provider:
    """lofit_fast.patch's HeadInterventionLinear modules, taken out of the model again after patching."""
    lofit_fast.patch(model, heads, scale=scale, offset=offset, init_std=init_std, backend=backend, v=v)
    try:
        swaps = _o_proj_swaps(model)
        params = lofit_fast.trainable_parameters(model)
    finally:
        lofit_fast.unpatch(model)
    return Provider(name, swaps=swaps, **_trainable(params, lr, l1))


def make_hooks(model: nn.Module, name: str, heads, *, scale: bool, offset: bool, loop: bool, lr: Optional[float],
               init_std: float = 0.0, l1: bool = False, v: Optional[Dict[int, torch.Tensor]] = None) -> Provider:
    """lofit_fast.hooks' pre-hooks (dense, or the official per-head loop), removed again after patching; the
    HookIntervention modules (A, v, heads) live on in the bound pre_hook methods that attach() registers."""
    attach = lofit_hooks.patch_loop if loop else lofit_hooks.patch
    attach(model, heads, scale=scale, offset=offset, init_std=init_std, v=v)
    try:
        sites = find_attention_sites(model)
        pre_hooks = [(sites[layer].attn.o_proj, m.pre_hook) for layer, m in lofit_hooks.hooked_modules(model).items()]
        params = lofit_hooks.trainable_parameters(model)
    finally:
        lofit_hooks.unpatch(model)
    return Provider(name, pre_hooks=pre_hooks, **_trainable(params, lr, l1))


def make_lora(model: nn.Module, lr: float) -> Provider:
    """peft LoRA r=8 on q_proj and v_proj (lofit_fast.methods.comparators.lora); attach() swaps the LoRA-wrapped
    modules in, and the model is run directly (the PeftModel wrapper only forwards to it)."""
    from lofit_fast.methods.comparators import lora, lora_parameters

    targets = [(s.attn, name) for s in find_attention_sites(model) for name in ("q_proj", "v_proj")]
    originals = [getattr(attn, name) for attn, name in targets]
    had_config = hasattr(model, "peft_config")
    peft_model = lora(model, r=8)
    params = lora_parameters(peft_model)
    swaps = [(attn, name, getattr(attn, name)) for attn, name in targets]
    for (attn, name), original in zip(targets, originals):
        setattr(attn, name, original)
    model.requires_grad_(False)
    if not had_config and "peft_config" in model.__dict__:  # peft's note on the model; the next lora() would warn
        del model.__dict__["peft_config"]
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover or not params:
        raise RuntimeError(f"taking the LoRA modules out of the model failed (left: {leftover[:3]}, "
                           f"params: {len(params)})")
    return Provider("lora", swaps=swaps, params=params, optimizer=_adamw(params, lr))


def make_merged(model: nn.Module, heads, v: Dict[int, torch.Tensor]) -> Provider:
    """lofit_fast.adapter.merge of the step-2 patch: new plain nn.Linear o_proj modules (with a bias)."""
    from lofit_fast.adapter import merge

    sites = find_attention_sites(model)
    originals = [s.attn.o_proj for s in sites]
    lofit_fast.patch(model, heads, scale=False, offset=True, v=v)
    merge(model)
    swaps, extra = [], 0
    for site, old in zip(sites, originals):
        new = site.attn.o_proj
        if new is not old:
            swaps.append((site.attn, "o_proj", new))
            extra += tensor_bytes(new.parameters()) - tensor_bytes(old.parameters())  # the weight replaces the old one
            site.attn.o_proj = old
    return Provider("merged", swaps=swaps, extra_bytes=extra)


def step2_values(model: nn.Module, heads, seed: int = 0) -> Dict[int, torch.Tensor]:
    """Fixed non-zero offsets v {layer: [K_l, head_dim]} for the decode / prefill providers."""
    sites = find_attention_sites(model)
    g = torch.Generator().manual_seed(seed)
    counts: Dict[int, int] = {}
    for layer, _ in heads:
        counts[layer] = counts.get(layer, 0) + 1
    device = sites[0].attn.o_proj.weight.device
    return {layer: (INFER_V_STD * torch.randn(k, sites[layer].head_dim, generator=g)).to(device)
            for layer, k in sorted(counts.items())}


def training_providers(model: nn.Module, workload: str, names: Sequence[str]) -> Dict[str, Provider]:
    if workload == "step1":  # A on every head, L1 on A
        heads, scale, offset, lr, l1, lowest = "all", True, False, LR_STEP1, True, 0
    else:  # v on K heads
        heads, scale, offset, lr, l1 = step2_heads(model), False, True, LR_STEP2, False
        lowest = min(layer for layer, _ in heads)
    out: Dict[str, Provider] = {}
    for name in names:
        if name == "floor":
            out[name] = make_floor(model, lowest, lr)
        elif name in ("fused", "torch") or name.startswith(FORCED):
            backend = {"fused": "auto", "torch": "torch"}.get(name, name[len(FORCED):])
            out[name] = make_lofit(model, name, heads, scale=scale, offset=offset, lr=lr, init_std=INIT_STD, l1=l1,
                                   backend=backend)
        elif name in ("hooks", "hooks_loop"):
            out[name] = make_hooks(model, name, heads, scale=scale, offset=offset, loop=name == "hooks_loop", lr=lr,
                                   init_std=INIT_STD, l1=l1)
        elif name == "lora":
            out[name] = make_lora(model, lr)
        else:
            raise ValueError(f"provider {name!r} does not train; the training providers are {TRAIN_PROVIDERS}")
    return out


def inference_providers(model: nn.Module, names: Sequence[str]) -> Dict[str, Provider]:
    heads = step2_heads(model)
    v = step2_values(model, heads)
    out: Dict[str, Provider] = {}
    for name in names:
        if name == "base":
            out[name] = Provider("base")
        elif name == "fused" or name.startswith(FORCED):
            backend = "auto" if name == "fused" else name[len(FORCED):]
            out[name] = make_lofit(model, name, heads, scale=False, offset=True, backend=backend, lr=None, v=v)
        elif name == "hooks":
            out[name] = make_hooks(model, name, heads, scale=False, offset=True, loop=False, lr=None, v=v)
        elif name == "merged":
            out[name] = make_merged(model, heads, v)
        else:
            raise ValueError(f"provider {name!r} does not run inference; the inference providers are {INFER_PROVIDERS}")
    return out
