"""import_official: the LoFiT parameters of the authors' code (github.com/fc2869/lo-fit) as a lofit_fast adapter.

Their modeling files (`models/modeling_llama.py`, `models/modeling_gemma.py`) give every attention module two
`nn.ParameterList`s with one `nn.Parameter([head_dim])` per query head, created as zeros:

    self.attn_A = nn.ParameterList([nn.Parameter(torch.zeros(self.head_dim)) for _ in range(self.num_heads)])
    self.attn_v = nn.ParameterList([nn.Parameter(torch.zeros(self.head_dim)) for _ in range(self.num_heads)])

and apply them to the `o_proj` input (the heads' outputs concatenated, head i in columns i·d … (i+1)·d − 1):

    for i, (A, v) in enumerate(zip(self.attn_A, self.attn_v)):
        attn_output[:, :, i*d:(i+1)*d] = torch.mul(A + 1, attn_output[:, :, i*d:(i+1)*d].clone()) + v

so the state dict holds `model.layers.{l}.self_attn.attn_A.{i}` and `….attn_v.{i}`, and the convention is
lofit_fast's: scale `1 + A` (A = 0 is the identity), offset `v`, head i = ParameterList index i = the same
column block as lofit_fast's head i. Step 1 (`--lofit_component A`) trains A on every head (init N(0, 1e-3))
and leaves v at zero; step 2 (`--lofit_component v`) trains v on the selected heads only, so the other heads'
v (and every A) stay exactly zero. A head whose A and v are both zero (within `atol`) is the identity and is
not selected; the adapter's heads are the union over A and v, with zeros filled in where a selected head has
only one of them.

Only safetensors are read (a file, a folder with `model.safetensors` or a sharded
`model.safetensors.index.json`, or an in-memory state dict); pickle checkpoints (`.bin`, `.pt`) are refused.
Their released models (`fcyin/llama2_7B_base_lofit_*`) have the offsets already folded into `o_proj` biases
and no attn_A / attn_v: those are plain HF checkpoints, loaded with `from_pretrained`, not adapters.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..patch import find_attention_sites, patch

OFFICIAL_REPO = "fc2869/lo-fit"
KEY_PATTERN = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.self_attn\.attn_(?P<name>A|v)\.(?P<head>\d+)$")
EXAMPLE_KEY = "model.layers.0.self_attn.attn_A.0"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

StateSource = Union[str, Path, Mapping[str, torch.Tensor]]


class OfficialFormatError(ValueError):
    """The checkpoint is not an official LoFiT state dict, or it does not fit the model."""


@dataclass
class OfficialImport:
    """What import_official read: heads {layer: [heads]} (sorted), A / v {layer: [K, head_dim]} float32 in the
    order of the heads (None when the checkpoint has no non-zero A / v), and the key prefix found."""

    heads: Dict[int, List[int]]
    A: Optional[Dict[int, torch.Tensor]]
    v: Optional[Dict[int, torch.Tensor]]
    prefix: str
    num_keys: int
    skipped_identity: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def scale(self) -> bool:
        return self.A is not None

    @property
    def offset(self) -> bool:
        return self.v is not None


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise OfficialFormatError(
            f"{path}: pickle checkpoints are not read (loading them can run arbitrary code); save the state dict "
            "as safetensors (e.g. safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))"
        )


def _safetensors_files(path: Path) -> List[Path]:
    if path.is_file():
        _refuse_pickle(path)
        if path.name.endswith(".safetensors.index.json"):
            index = path
        elif path.suffix == ".safetensors":
            return [path]
        else:
            raise OfficialFormatError(f"{path}: expected a .safetensors file, a .safetensors.index.json or a folder")
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if not index.is_file():
            if (path / "model.safetensors").is_file():
                return [path / "model.safetensors"]
            found = sorted(path.glob("*.safetensors"))
            if found:
                return found
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = f" (found only pickle files {pickles[:3]}, which are not read)" if pickles else ""
            raise OfficialFormatError(f"{path}: no safetensors checkpoint in this folder{hint}")
    else:
        raise FileNotFoundError(f"{path} not found (expected an official LoFiT checkpoint: safetensors file or folder)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OfficialFormatError(f"{index}: not a safetensors index (no readable weight_map): {exc}") from exc
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        _refuse_pickle(shard)
        if not shard.is_file():
            raise OfficialFormatError(f"{index} lists {name}, which is missing")
        files.append(shard)
    return files


def read_official_state(source: StateSource) -> Dict[str, torch.Tensor]:
    """The attn_A / attn_v tensors of an official LoFiT checkpoint (only those keys are read from disk)."""
    if isinstance(source, Mapping):
        out = {}
        for key, t in source.items():
            if isinstance(key, str) and KEY_PATTERN.match(key):
                if not isinstance(t, torch.Tensor):
                    raise OfficialFormatError(f"{key} is a {type(t).__name__}, expected a tensor")
                out[key] = t.detach()
        return out
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    from safetensors import safe_open

    out = {}
    for file in _safetensors_files(Path(source)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if KEY_PATTERN.match(key):
                        out[key] = f.get_tensor(key)
        except OfficialFormatError:
            raise
        except Exception as exc:  # safetensors raises its own errors for damaged headers
            raise OfficialFormatError(f"{file} is not a readable safetensors file: {exc}") from exc
    return out


def convert_official(state: Mapping[str, torch.Tensor], model: nn.Module, *, atol: float = 0.0) -> OfficialImport:
    """Check the official attn_A / attn_v tensors against `model` and convert them (see the module doc)."""
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"atol must be a number >= 0, got {atol!r}")
    sites = find_attention_sites(model)
    params: Dict[Tuple[int, str], Dict[int, torch.Tensor]] = {}
    prefixes = set()
    for key, t in state.items():
        m = KEY_PATTERN.match(key)
        if m is None:
            continue
        prefixes.add(m["prefix"])
        params.setdefault((int(m["layer"]), m["name"]), {})[int(m["head"])] = t
    if not params:
        raise OfficialFormatError(
            f"no LoFiT parameters found: an official LoFiT state dict has keys like {EXAMPLE_KEY!r} and "
            f"'…attn_v.0' ({OFFICIAL_REPO}, models/modeling_llama.py); a merged release (o_proj biases) is a "
            "plain HF checkpoint, load it with from_pretrained"
        )
    if len(prefixes) > 1:
        raise OfficialFormatError(f"the checkpoint mixes key prefixes {sorted(prefixes)}: more than one model in it?")
    prefix = prefixes.pop()

    values: Dict[str, Dict[int, torch.Tensor]] = {"A": {}, "v": {}}
    for (layer, name), by_head in sorted(params.items()):
        if layer >= len(sites):
            raise OfficialFormatError(
                f"{prefix}layers.{layer}.self_attn.attn_{name}: the model has only {len(sites)} layers"
            )
        site = sites[layer]
        found = sorted(by_head)
        if found != list(range(site.num_heads)):
            missing = sorted(set(range(site.num_heads)) - set(found))
            extra = sorted(set(found) - set(range(site.num_heads)))
            raise OfficialFormatError(
                f"{prefix}layers.{layer}.self_attn.attn_{name} must hold one parameter per head 0…{site.num_heads - 1} "
                f"(the model's layer {layer} has {site.num_heads} heads): missing {missing}, unexpected {extra}"
            )
        rows = []
        for h in found:
            t = by_head[h]
            key = f"{prefix}layers.{layer}.self_attn.attn_{name}.{h}"
            if tuple(t.shape) != (site.head_dim,):
                raise OfficialFormatError(
                    f"{key} has shape {list(t.shape)}, expected [{site.head_dim}] (the model's head_dim): a checkpoint "
                    "of another model?"
                )
            if not t.is_floating_point():
                raise OfficialFormatError(f"{key} is {t.dtype}, expected a floating-point tensor")
            if not torch.isfinite(t).all():
                raise OfficialFormatError(f"{key} contains NaN or inf")
            rows.append(t.to(torch.float32))
        values[name][layer] = torch.stack(rows)  # [num_heads, head_dim]

    heads: Dict[int, List[int]] = {}
    total = 0
    for layer in sorted(set(values["A"]) | set(values["v"])):
        active = torch.zeros(sites[layer].num_heads, dtype=torch.bool)
        for name in ("A", "v"):
            if layer in values[name]:
                active |= values[name][layer].abs().amax(dim=1) > atol
        total += sites[layer].num_heads
        if active.any():
            heads[layer] = torch.nonzero(active).flatten().tolist()
    if not heads:
        raise OfficialFormatError(
            f"every attn_A and attn_v in the checkpoint is zero{f' (within atol={atol})' if atol else ''}: it holds "
            "no intervention (an untrained model, or one whose LoFiT parameters were folded into the weights)"
        )
    selected = sum(len(hs) for hs in heads.values())

    def pick(name: str) -> Optional[Dict[int, torch.Tensor]]:
        out, any_nonzero = {}, False
        for layer, hs in heads.items():
            full = values[name].get(layer)
            if full is None:
                full = torch.zeros(sites[layer].num_heads, sites[layer].head_dim)
            t = full[hs].clone()
            any_nonzero |= bool((t.abs() > atol).any())
            out[layer] = t
        return out if any_nonzero else None

    A, v = pick("A"), pick("v")
    return OfficialImport(heads=heads, A=A, v=v, prefix=prefix, num_keys=sum(len(p) for p in params.values()),
                          skipped_identity=total - selected)


def import_official(
    source: StateSource, model: nn.Module, *, backend: str = "auto", atol: float = 0.0,
    param_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Patch `model` with the LoFiT parameters of an official fc2869/lo-fit checkpoint; returns the model.

    source: a safetensors file, a checkpoint folder (`model.safetensors` or a sharded index), or a state dict.
    The heads are those with a non-zero A or v (|x| > atol); `save_adapter(model, dir)` then writes a
    lofit_fast adapter. Every check runs before the model changes. The conversion itself is
    `convert_official(read_official_state(source), model)`.
    """
    converted = convert_official(read_official_state(source), model, atol=atol)
    return patch(
        model, converted.heads, scale=converted.scale, offset=converted.offset, backend=backend,
        A=converted.A, v=converted.v, param_dtype=param_dtype,
    )
