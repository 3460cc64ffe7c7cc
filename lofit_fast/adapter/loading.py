"""load_adapter: safetensors + JSON only (never pickle), every field and tensor checked before the model changes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import safetensors.torch
import torch
import torch.nn as nn

from ..hooks import hooked_modules
from ..ops import check_backend_name
from ..patch import find_attention_sites, get_router, patch, patched_modules
from .schema import (
    CONFIG_NAME,
    PARAM_DTYPES,
    PREVIOUS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    check_config_fits_model,
    dtype_name,
    expected_tensor_keys,
    head_dims,
    tensor_key,
    validate_config,
    warn_if_other_weights,
)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a lofit_fast adapter directory (see lofit_fast.save_adapter)")


def load_adapter_config(directory: Union[str, Path]) -> Dict[str, Any]:
    """The parsed and checked `adapter_config.json` of an adapter directory (selection and hyper-parameters
    included)."""
    path = Path(directory) / CONFIG_NAME
    _require_file(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON (damaged or truncated?): {exc}") from exc
    validate_config(config, path)
    return config


def _read_tensors(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    _require_file(path)
    blob = path.read_bytes()
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for bad headers/sizes
        raise AdapterFormatError(f"{path} is not a readable safetensors file (damaged or truncated?): {exc}") from exc
    return tensors, hashlib.sha256(blob).hexdigest()


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], heads: Mapping[int, List[int]], path: Path
) -> None:
    expected = set(expected_tensor_keys(heads, config["scale"], config["offset"]))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterFormatError(
            f"{path} does not match {CONFIG_NAME}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    param_dtype = PARAM_DTYPES[config["param_dtype"]]
    dims = head_dims(config)
    for layer, hs in heads.items():
        key = tensor_key(layer, "heads")
        t = tensors[key]
        if t.dtype != torch.int64 or t.dim() != 1 or t.tolist() != hs:
            raise AdapterFormatError(f"{path}: {key} is {t.tolist()} ({t.dtype}) but {CONFIG_NAME} lists heads {hs}")
        for name in ("A", "v"):
            key = tensor_key(layer, name)
            if key not in tensors:
                continue
            t = tensors[key]
            shape = [len(hs), dims[layer]]
            if list(t.shape) != shape:
                raise AdapterFormatError(f"{path}: {key} has shape {list(t.shape)}, expected {shape}")
            if t.dtype != param_dtype:
                raise AdapterFormatError(
                    f"{path}: {key} is {dtype_name(t.dtype)} but {CONFIG_NAME} says param_dtype {config['param_dtype']}"
                )
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"{path}: {key} contains NaN or inf")


def read_adapter(model: nn.Module, directory: Union[str, Path]):
    """(config, heads {layer: [heads]}, values {"A": {layer: tensor}, "v": {layer: tensor}} on each layer's
    device) of a saved adapter, with every check of `load_adapter` against `model`; the model is not changed."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = load_adapter_config(directory)
    heads = validate_config(config, config_path)
    sites = find_attention_sites(model)
    check_config_fits_model(config, heads, model, sites, config_path)
    warn_if_other_weights(config, sites, config_path)
    tensors, digest = _read_tensors(weights_path)
    previous = directory / PREVIOUS_WEIGHTS_NAME
    if digest != config["tensors_sha256"] and previous.is_file():
        # A save was stopped after replacing the weights but before the config: the config still describes
        # the previous weights, which the save kept.
        old_tensors, old_digest = _read_tensors(previous)
        if old_digest == config["tensors_sha256"]:
            tensors, digest, weights_path = old_tensors, old_digest, previous
    _check_tensors(tensors, config, heads, weights_path)
    if digest != config["tensors_sha256"]:
        raise AdapterFormatError(
            f"{weights_path} is not the file {CONFIG_NAME} was saved with (sha256 {digest[:12]}… vs "
            f"{config['tensors_sha256'][:12]}…): it was modified, damaged, or comes from another save"
        )
    if hooked_modules(model):
        raise RuntimeError("the model carries lofit_fast.hooks interventions; remove them with lofit_fast.hooks.unpatch first")

    values: Dict[str, Dict[int, torch.Tensor]] = {name: {} for name in ("A", "v")}
    for layer in heads:
        device = sites[layer].attn.o_proj.weight.device
        for name in values:
            key = tensor_key(layer, name)
            if key in tensors:
                values[name][layer] = tensors[key].to(device)
    return config, heads, values


def load_adapter(model: nn.Module, directory: Union[str, Path], *, backend: str = "auto") -> nn.Module:
    """Load an adapter written by `save_adapter` into `model`; returns the model.

    An unpatched model is patched with the adapter's heads and values (`backend` picks the op backend). A
    model that is already patched with exactly the adapter's heads (and A/v choice) gets the values copied
    in place (its backend is left as is); any other patched model is an error. Every check runs before the
    model changes, so on error the model is as it was. Several adapters in one model: `load_adapters`.
    """
    check_backend_name(backend)
    directory = Path(directory)
    config, heads, values = read_adapter(model, directory)

    mods = patched_modules(model)
    if not mods:
        return patch(
            model, heads, scale=config["scale"], offset=config["offset"], backend=backend,
            A=values["A"] or None, v=values["v"] or None, param_dtype=PARAM_DTYPES[config["param_dtype"]],
        )

    if get_router(model) is not None:
        raise RuntimeError(
            f"the model holds several adapters ({get_router(model).names}, lofit_fast.load_adapters); add this one "
            "with lofit_fast.add_adapter(model, name, path), or unpatch the model first"
        )
    have = {layer: m.head_list for layer, m in mods.items()}
    if have != heads:
        raise RuntimeError(
            f"the model is already patched with other heads ({have}) than the adapter in {directory} ({heads}); "
            "call lofit_fast.unpatch(model) first"
        )
    for layer, m in mods.items():
        for name, wanted in (("A", config["scale"]), ("v", config["offset"])):
            if (getattr(m, name) is not None) != wanted:
                raise RuntimeError(
                    f"layer {layer} is patched {'without' if wanted else 'with'} {name} but the adapter in "
                    f"{directory} has {'one' if wanted else 'none'}; call lofit_fast.unpatch(model) first"
                )
    with torch.no_grad():
        for layer, m in mods.items():
            for name in values:
                if layer in values[name]:
                    getattr(m, name).copy_(values[name][layer])
    return model
