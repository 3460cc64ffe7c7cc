"""patch / unpatch / disabled: swapping `o_proj` for HeadInterventionLinear, atomically."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._switch import switched_off
from ..ops import check_backend_name
from .families import AttentionSite, find_attention_sites
from .module import HeadInterventionLinear
from .multi import MultiHeadInterventionLinear, remove_router

HeadSpec = Union[str, Mapping[int, Sequence[int]], Sequence[Sequence[int]], torch.Tensor]


def _as_pairs(heads) -> List[Tuple[int, int]]:
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    elif hasattr(heads, "tolist"):  # numpy arrays, e.g. the official LoFiT .npy files
        heads = heads.tolist()
    pairs = []
    for row in heads:
        if len(row) != 2:
            raise ValueError(f"each head must be a (layer, head) pair, got {row!r}")
        pairs.append((_index(row[0], "layer", row), _index(row[1], "head", row)))
    return pairs


def _index(value, what: str, where) -> int:
    """An integral layer or head index; True / False (which Python counts as 1 / 0) and fractions refused."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{what} index must be an integer, got the boolean {value!r} in {where!r}")
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} index must be an integer, got the string {value!r} in {where!r}")
    try:
        as_int = int(value)
        integral = float(value) == as_int
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise ValueError(f"{what} index must be an integer, got {value!r} in {where!r}")
    return as_int


def normalize_heads(heads: HeadSpec, sites: List[AttentionSite]) -> Dict[int, List[int]]:
    """{layer: sorted heads} from "all", (layer, head) pairs or {layer: [heads]}; errors name the culprit."""
    if isinstance(heads, str):
        if heads != "all":
            raise ValueError(f'heads must be "all", (layer, head) pairs or {{layer: [heads]}}, got {heads!r}')
        return {s.layer: list(range(s.num_heads)) for s in sites}
    if isinstance(heads, Mapping):
        # JSON object keys are strings: "3" names layer 3 there (and only there).
        pairs = [(int(layer) if isinstance(layer, str) and layer.isdigit() else _index(layer, "layer", {layer: hs}),
                  _index(h, "head", {layer: hs}))
                 for layer, hs in heads.items() for h in hs]
    else:
        pairs = _as_pairs(heads)
    out: Dict[int, List[int]] = {}
    seen = set()
    for layer, head in pairs:
        if not 0 <= layer < len(sites):
            raise ValueError(f"layer {layer} out of range: the model has {len(sites)} layers")
        if not 0 <= head < sites[layer].num_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has {sites[layer].num_heads} heads")
        if (layer, head) in seen:
            raise ValueError(f"duplicate head: (layer {layer}, head {head}) is listed twice")
        seen.add((layer, head))
        out.setdefault(layer, []).append(head)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def _initial_value(
    given: Optional[Mapping[int, torch.Tensor]], name: str, layer: int, K: int, head_dim: int,
    weight: torch.Tensor, dtype: torch.dtype, init_std: float,
) -> torch.Tensor:
    if given is not None and layer in given:
        t = torch.as_tensor(given[layer])
        if tuple(t.shape) != (K, head_dim):
            raise ValueError(f"{name} for layer {layer} must have shape [{K}, {head_dim}], got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} for layer {layer} must be a floating tensor, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} for layer {layer} is on {t.device} but the layer's weight is on {weight.device}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} for layer {layer} contains NaN or inf")
        return t.detach().to(dtype).clone()
    out = torch.zeros(K, head_dim, dtype=dtype, device=weight.device)
    if init_std > 0:
        out.normal_(0.0, init_std)
    return out


def patched_modules(model: nn.Module) -> Dict[int, HeadInterventionLinear]:
    """{layer index: HeadInterventionLinear} for every patched layer, in layer order."""
    out = {}
    for site in find_attention_sites(model):
        if isinstance(site.attn.o_proj, HeadInterventionLinear):
            out[site.layer] = site.attn.o_proj
    return out


def patch(
    model: nn.Module,
    heads: HeadSpec = "all",
    *,
    scale: bool = True,
    offset: bool = True,
    init_std: float = 0.0,
    backend: str = "auto",
    A: Optional[Mapping[int, torch.Tensor]] = None,
    v: Optional[Mapping[int, torch.Tensor]] = None,
    param_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Swap `self_attn.o_proj` of each affected decoder layer for a HeadInterventionLinear.

    heads: "all", (layer, head) pairs (the official LoFiT .npy rows), or {layer: [heads]}.
    scale / offset: create A (the per-head scale, applied as 1 + A) / v (the per-head offset).
    init_std: A and v start as N(0, init_std) (zeros when 0). A / v: optional {layer: [K_l, head_dim]} initial
    values in the order of the sorted heads. param_dtype: dtype of A and v (float32 keeps small updates exact
    even for bf16 models). On any error the model is left exactly as it was.
    """
    sites = find_attention_sites(model)
    already = [s.layer for s in sites if isinstance(s.attn.o_proj, HeadInterventionLinear)]
    if already:
        raise RuntimeError(f"model is already patched (layers {already}); call lofit_fast.unpatch(model) first")
    if not (scale or offset):
        raise ValueError("nothing to train: scale and offset are both False")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
        raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
    if param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"param_dtype must be float32, bfloat16 or float16, got {param_dtype}")
    check_backend_name(backend)
    selection = normalize_heads(heads, sites)
    if not selection:
        raise ValueError("no heads selected")
    for name, given, wanted in (("A", A, scale), ("v", v, offset)):
        if given is None:
            continue
        if not wanted:
            raise ValueError(f"{name} values given but {'scale' if name == 'A' else 'offset'}=False")
        extra = sorted(set(int(k) for k in given) - set(selection))
        if extra:
            raise ValueError(f"{name} given for layers {extra} that have no selected heads")

    replacements = []
    for layer, hs in selection.items():
        site = sites[layer]
        base = site.attn.o_proj
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{site.path}.self_attn.o_proj is {type(base).__name__}, expected nn.Linear")
        K = len(hs)
        a0 = _initial_value(A, "A", layer, K, site.head_dim, base.weight, param_dtype, init_std) if scale else None
        v0 = _initial_value(v, "v", layer, K, site.head_dim, base.weight, param_dtype, init_std) if offset else None
        heads_t = torch.tensor(hs, dtype=torch.int64)
        replacements.append((site.attn, HeadInterventionLinear(base, heads_t, site.head_dim, a0, v0, backend, layer)))

    done = []
    try:
        for attn, new in replacements:
            attn.o_proj = new
            done.append((attn, new.base_layer))
    except BaseException:
        for attn, old in done:
            attn.o_proj = old
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original `o_proj` modules back (A and v are dropped)."""
    mods = patched_modules(model)
    if not mods:
        raise RuntimeError("model is not patched by lofit_fast")
    for site in find_attention_sites(model):
        if site.layer in mods:
            site.attn.o_proj = mods[site.layer].base_layer
    remove_router(model)  # a multi-adapter model's hooks (lofit_fast.load_adapters)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model with every intervention off (e.g. the DPO reference), restoring the state afterwards."""
    with switched_off(patched_modules(model).values()):
        yield model


def intervention_parameters(model: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadInterventionLinear):  # the per-adapter tables
            for pname in ("A_table", "v_table"):
                p = getattr(module, pname)
                if p is not None:
                    yield f"{name}.{pname}", p
        elif isinstance(module, HeadInterventionLinear):
            for pname in ("A", "v"):
                p = getattr(module, pname)
                if p is not None:
                    yield f"{name}.{pname}", p


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The A and v parameters that require grad (what an optimizer for LoFiT takes)."""
    return [p for _, p in intervention_parameters(model) if p.requires_grad]


def freeze_base(model: nn.Module) -> nn.Module:
    """requires_grad=False on every parameter except the interventions' A and v."""
    keep = {id(p) for _, p in intervention_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model
