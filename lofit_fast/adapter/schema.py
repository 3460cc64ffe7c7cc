"""The adapter format: file names, tensor keys, and the checks of adapter_config.json (alone and against a model)."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn as nn

from ..ops.function import is_quantized_weight
from ..patch.families import AttentionSite

WEIGHTS_NAME = "adapter.safetensors"
# The weights a save is replacing, kept until the new config is in place (see save_adapter).
PREVIOUS_WEIGHTS_NAME = ".adapter.previous.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_NAME = "lofit_fast-adapter"
FORMAT_VERSION = 1

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_key(layer: int, name: str) -> str:
    return f"layers.{layer}.{name}"


def expected_tensor_keys(heads: Mapping[int, Sequence[int]], scale: bool, offset: bool) -> List[str]:
    keys = []
    for layer in heads:
        keys.append(tensor_key(layer, "heads"))
        if scale:
            keys.append(tensor_key(layer, "A"))
        if offset:
            keys.append(tensor_key(layer, "v"))
    return keys


class AdapterFormatError(ValueError):
    """adapter_config.json or adapter.safetensors is damaged, malformed, or does not fit the model."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_REQUIRED_FIELDS = {
    "format": str,
    "format_version": int,
    "lofit_fast_version": str,
    "method": str,
    "model_type": str,
    "architecture": str,
    "num_layers": int,
    "num_heads": list,
    "head_dim": (int, list),
    "hidden_size": int,
    "heads": dict,
    "scale": bool,
    "offset": bool,
    "param_dtype": str,
    "tensors_sha256": str,
}


def validate_config(config: Any, path: Path) -> Dict[int, List[int]]:
    """Check the config on its own; returns its heads as {layer: [heads]} with int keys."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for field, kind in _REQUIRED_FIELDS.items():
        if field not in config:
            raise AdapterFormatError(f"{path}: required field {field!r} is missing")
        value = config[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(_is_int(value) if k is int else isinstance(value, k) for k in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise AdapterFormatError(f"{path}: field {field!r} must be {names}, got {value!r}")
    if config["format"] != FORMAT_NAME:
        raise AdapterFormatError(f"{path}: format is {config['format']!r}, expected {FORMAT_NAME!r}")
    if config["format_version"] > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{path}: format_version {config['format_version']} is newer than this lofit_fast reads "
            f"({FORMAT_VERSION}); upgrade lofit_fast"
        )
    n = config["num_layers"]
    if n <= 0:
        raise AdapterFormatError(f"{path}: num_layers must be positive, got {n}")
    for field in ("num_heads",) + (("head_dim",) if isinstance(config["head_dim"], list) else ()):
        values = config[field]
        if len(values) != n or not all(_is_int(x) and x > 0 for x in values):
            raise AdapterFormatError(f"{path}: {field} must list {n} positive integers (one per layer), got {values!r}")
    if _is_int(config["head_dim"]) and config["head_dim"] <= 0:
        raise AdapterFormatError(f"{path}: head_dim must be positive, got {config['head_dim']}")
    if config["param_dtype"] not in PARAM_DTYPES:
        raise AdapterFormatError(f"{path}: param_dtype must be one of {sorted(PARAM_DTYPES)}, got {config['param_dtype']!r}")
    if not (config["scale"] or config["offset"]):
        raise AdapterFormatError(f"{path}: scale and offset are both false: the adapter holds nothing")

    heads: Dict[int, List[int]] = {}
    for key, hs in config["heads"].items():
        if not (isinstance(key, str) and key.isdigit()):
            raise AdapterFormatError(f"{path}: heads keys must be layer numbers, got {key!r}")
        layer = int(key)
        if not (isinstance(hs, list) and hs and all(_is_int(h) and h >= 0 for h in hs)):
            raise AdapterFormatError(f"{path}: heads for layer {layer} must be a non-empty list of head numbers, got {hs!r}")
        if any(b <= a for a, b in zip(hs, hs[1:])):
            raise AdapterFormatError(f"{path}: heads for layer {layer} must be sorted and unique, got {hs}")
        heads[layer] = hs
    if not heads:
        raise AdapterFormatError(f"{path}: heads is empty")
    return dict(sorted(heads.items()))


def head_dims(config: Mapping[str, Any]) -> List[int]:
    hd = config["head_dim"]
    return list(hd) if isinstance(hd, list) else [hd] * config["num_layers"]


def model_description(model: nn.Module, sites: List[AttentionSite]) -> Dict[str, Any]:
    """The fields of adapter_config.json that describe the model an adapter belongs to."""
    dims = [s.head_dim for s in sites]
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", "") or "",
        "architecture": type(model).__name__,
        "base_model_name_or_path": getattr(config, "_name_or_path", "") or "",
        "num_layers": len(sites),
        "num_heads": [s.num_heads for s in sites],
        "head_dim": dims[0] if len(set(dims)) == 1 else dims,
        "hidden_size": sites[0].attn.o_proj.out_features,
    }


def weights_fingerprint(sites: List[AttentionSite]) -> str:
    """sha256 of a fixed sample of every layer's base o_proj weight (16 rows x 64 columns, rounded to bfloat16,
    so a float32 and a bfloat16 copy of one model agree): which weights an adapter was trained on."""
    h = hashlib.sha256()
    for site in sites:
        o_proj = site.attn.o_proj
        w = getattr(o_proj, "base_layer", o_proj).weight.detach()
        if is_quantized_weight(w):
            w = w.dequantize()  # a quantized base (lofit_fast.models.quantize_base)
        rows = torch.linspace(0, w.shape[0] - 1, min(16, w.shape[0])).long().to(w.device)
        cols = torch.linspace(0, w.shape[1] - 1, min(64, w.shape[1])).long().to(w.device)
        sample = w.index_select(0, rows).index_select(1, cols).to("cpu", torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def warn_if_other_weights(config: Mapping[str, Any], sites: List[AttentionSite], path: Path) -> None:
    """An adapter fits any model with the same head layout; warn when its base weights were others."""
    saved = config.get("base_fingerprint")
    if isinstance(saved, str) and saved != weights_fingerprint(sites):
        name = config.get("base_model_name_or_path") or "another model"
        warnings.warn(f"{path} was trained on other o_proj weights ({name}, fingerprint {saved[:12]}…) than this "
                      f"model's ({weights_fingerprint(sites)[:12]}…): same layout, different weights", stacklevel=3)


def check_config_fits_model(
    config: Mapping[str, Any], heads: Mapping[int, Sequence[int]], model: nn.Module,
    sites: List[AttentionSite], path: Path,
) -> None:
    """Raise AdapterFormatError naming the first difference between the adapter's model and this model."""
    mine = model_description(model, sites)
    where = f"{path} does not fit this model"
    for field in ("architecture", "model_type", "num_layers"):
        if config[field] != mine[field]:
            raise AdapterFormatError(f"{where}: {field} is {config[field]!r} in the adapter but {mine[field]!r} in the model")
    for layer, (theirs, ours) in enumerate(zip(config["num_heads"], mine["num_heads"])):
        if theirs != ours:
            raise AdapterFormatError(f"{where}: layer {layer} has {theirs} heads in the adapter but {ours} in the model")
    for layer, (theirs, ours) in enumerate(zip(head_dims(config), [s.head_dim for s in sites])):
        if theirs != ours:
            raise AdapterFormatError(f"{where}: head_dim of layer {layer} is {theirs} in the adapter but {ours} in the model")
    if config["hidden_size"] != mine["hidden_size"]:
        raise AdapterFormatError(
            f"{where}: hidden_size is {config['hidden_size']} in the adapter but {mine['hidden_size']} in the model"
        )
    for layer, hs in heads.items():
        if layer >= len(sites):
            raise AdapterFormatError(f"{where}: heads lists layer {layer} but the model has {len(sites)} layers")
        bad = [h for h in hs if h >= sites[layer].num_heads]
        if bad:
            raise AdapterFormatError(
                f"{where}: heads {bad} of layer {layer} are out of range: the model's layer {layer} has "
                f"{sites[layer].num_heads} heads"
            )
