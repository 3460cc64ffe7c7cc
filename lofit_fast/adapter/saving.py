"""save_adapter: the A, v and heads of a patched model as safetensors, with a JSON description."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import safetensors.torch
import torch
import torch.nn as nn

from .._version import __version__
from ..hooks import hooked_modules
from ..patch import find_attention_sites, patched_modules
from .._files import atomic_write_files, remove_stale_temps
from .files import to_json_bytes
from .schema import (
    CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, PREVIOUS_WEIGHTS_NAME, WEIGHTS_NAME, dtype_name, model_description,
    tensor_key, weights_fingerprint,
)


def require_patched(model: nn.Module, action: str):
    """patched_modules(model), or a clear error (hook-based interventions are named as such)."""
    mods = patched_modules(model)
    if mods:
        return mods
    if hooked_modules(model):
        raise RuntimeError(
            f"cannot {action}: the model carries lofit_fast.hooks interventions, which are a benchmark baseline; "
            "move their A and v to lofit_fast.patch(model, heads, A=..., v=...) first"
        )
    raise RuntimeError(f"cannot {action}: the model is not patched by lofit_fast (call lofit_fast.patch first)")


def _selection_payload(selection: Any) -> Any:
    if selection is None or isinstance(selection, (dict, list, tuple)):
        return selection
    if hasattr(selection, "to_dict") and callable(selection.to_dict):
        return selection.to_dict()
    raise TypeError(f"selection must be None, a dict, a list, or have to_dict(), got {type(selection).__name__}")


def save_adapter(
    model: nn.Module,
    directory: Union[str, Path],
    *,
    selection: Any = None,
    method: str = "lofit",
    hyperparameters: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write `adapter.safetensors` (keys `layers.{l}.heads`, `layers.{l}.A`, `layers.{l}.v`) and
    `adapter_config.json` to `directory` (created if needed); returns the directory.

    selection: the head selection to keep with the adapter (e.g. a HeadSelection, via its `to_dict()`, or a
    dict/list of scores). hyperparameters: a JSON-able dict (dtypes and tensors are converted).
    A save killed at any instant leaves a folder that loads as the previous adapter or as the new one: both
    files are written to temporary files first; the previous weights are kept (a hard link, PREVIOUS_WEIGHTS_NAME)
    until the new config, which names its weights by sha256, has replaced the old one, and `load_adapter`
    takes them whenever the config names them rather than the current weights. What a killed save left
    behind is removed by the next save.
    """
    mods = require_patched(model, "save an adapter")
    sites = find_attention_sites(model)
    if hyperparameters is not None and not isinstance(hyperparameters, Mapping):
        raise TypeError(f"hyperparameters must be a dict or None, got {type(hyperparameters).__name__}")
    flags = {(m.A is not None, m.v is not None) for m in mods.values()}
    if len(flags) != 1:
        raise ValueError("patched layers disagree on which of A and v they have; an adapter needs one choice")
    scale, offset = flags.pop()

    tensors: Dict[str, torch.Tensor] = {}
    param_dtypes = set()
    for layer, m in mods.items():
        tensors[tensor_key(layer, "heads")] = m.heads.detach().to("cpu", torch.int64).contiguous()
        for name in ("A", "v"):
            p = getattr(m, name)
            if p is None:
                continue
            if not torch.isfinite(p).all():
                raise ValueError(f"{name} of layer {layer} contains NaN or inf; refusing to save a broken adapter")
            tensors[tensor_key(layer, name)] = p.detach().to("cpu").contiguous().clone()
            param_dtypes.add(p.dtype)
    if len(param_dtypes) != 1:
        raise ValueError(f"A and v must share one dtype across layers, found {sorted(map(dtype_name, param_dtypes))}")

    blob = safetensors.torch.save(tensors, metadata={"format": "pt", "lofit_fast_format": FORMAT_NAME})
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lofit_fast_version": __version__,
        "method": str(method),
        **model_description(model, sites),
        "base_fingerprint": weights_fingerprint(sites),
        "heads": {str(layer): m.head_list for layer, m in mods.items()},
        "scale": scale,
        "offset": offset,
        "param_dtype": dtype_name(param_dtypes.pop()),
        "num_parameters": sum(t.numel() for k, t in tensors.items() if not k.endswith(".heads")),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "selection": _selection_payload(selection),
        "hyperparameters": dict(hyperparameters) if hyperparameters is not None else None,
    }
    config_bytes = to_json_bytes(config)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory, (WEIGHTS_NAME, CONFIG_NAME))
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    previous.unlink(missing_ok=True)
    if weights.is_file():
        os.link(weights, previous)
    try:
        atomic_write_files({weights: blob, directory / CONFIG_NAME: config_bytes})  # weights first, config last
    except BaseException:
        if previous.is_file() and os.path.samefile(previous, weights):  # nothing was replaced yet
            previous.unlink()
        raise
    previous.unlink(missing_ok=True)
    return directory
