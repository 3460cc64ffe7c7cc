"""Residual-stream steering: add `coeff · vec` to the output of chosen decoder layers, at every position.

    steer(model, {layer: vec}, coeff)   attach (atomic: any bad input leaves the model untouched)
    set_coeff(model, c)                 change the strength afterwards (0 turns it off, < 0 steers away)
    steering_disabled(model)            context manager: steering off inside
    steering_vectors(model)             {layer: vec} currently attached, steered_layers(model)
    unsteer(model)                      detach everything
    merge_steering(model)               fold coeff · vec into `mlp.down_proj`'s bias (Llama-style layers)

A decoder layer's output is `h + attn(...) + mlp(...)` in Llama, Mistral, Qwen and Gemma 1, so a constant
added to it equals a bias on the MLP's last projection, `down_proj`. Gemma 2 and 3 normalize the MLP output
(`post_feedforward_layernorm`) before the residual add, so there no bias can express the shift and
`merge_steering` refuses.

The shift is applied by a forward hook owned by a small `SteeringVector` module attached to the decoder
layer as `lofit_steering`. Its vector is a non-persistent buffer: it follows `model.to(...)` and stays out of
the model's `state_dict` (save it with `steering_state`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Mapping

import torch
import torch.nn as nn

from ._switch import switched_off
from .patch.families import find_attention_sites

_ATTR = "lofit_steering"


class SteeringVector(nn.Module):
    """Adds `coeff · vector` to its decoder layer's hidden-state output (a tensor, or the first element of a
    tuple for layers that return one)."""

    def __init__(self, vector: torch.Tensor, coeff: float, layer_idx: int):
        super().__init__()
        self.register_buffer("vector", vector, persistent=False)
        self.coeff = float(coeff)
        self.layer_idx = layer_idx
        self.enabled = True
        self.handle = None

    def shift(self) -> torch.Tensor:
        """coeff · vector, in the vector's precision (float32 or float64)."""
        return self.coeff * self.vector

    def hook(self, module: nn.Module, args, output):
        if not self.enabled or self.coeff == 0.0:
            return None
        if isinstance(output, torch.Tensor):
            return output + self.shift().to(output.dtype)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0] + self.shift().to(output[0].dtype), *output[1:])
        raise TypeError(
            f"decoder layer {self.layer_idx} returned {type(output).__name__}; steering needs a hidden-state "
            "tensor or a tuple starting with one"
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, hidden={self.vector.numel()}, coeff={self.coeff}, enabled={self.enabled}"


def decoder_layers(model: nn.Module) -> list:
    """The model's decoder layer modules, in order (the families `lofit_fast.patch` supports)."""
    return [model.get_submodule(site.path) for site in find_attention_sites(model)]


def hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def _modules(model: nn.Module) -> Dict[int, SteeringVector]:
    return {i: getattr(layer, _ATTR) for i, layer in enumerate(decoder_layers(model)) if hasattr(layer, _ATTR)}


def steered_layers(model: nn.Module) -> list:
    return list(_modules(model))


def _check_coeff(coeff) -> float:
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
        raise ValueError(f"coeff must be a finite number, got {coeff!r}")
    return float(coeff)


def _check_vector(layer, vec, size: int, device: torch.device) -> torch.Tensor:
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"the vector for layer {layer} must be a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1 or vec.numel() != size:
        raise ValueError(f"the vector for layer {layer} must have shape [{size}] (the hidden size), got {list(vec.shape)}")
    if not vec.is_floating_point():
        raise TypeError(f"the vector for layer {layer} must be a floating tensor, got {vec.dtype}")
    if not torch.isfinite(vec).all():
        raise ValueError(f"the vector for layer {layer} contains NaN or inf")
    dtype = torch.float64 if vec.dtype == torch.float64 else torch.float32
    return vec.detach().to(device=device, dtype=dtype).clone()


def steer(model: nn.Module, vectors: Mapping[int, torch.Tensor], coeff: float = 1.0) -> nn.Module:
    """Add `coeff · vectors[layer]` to the output of each listed decoder layer, at every position of every
    sequence (prefill and each generation step). Layers are 0-based decoder-layer indices. Every input is
    checked before anything is attached, so on error the model is unchanged. Returns the model."""
    layers = decoder_layers(model)
    if _modules(model):
        raise RuntimeError(
            f"model is already steered at layers {steered_layers(model)}; call lofit_fast.steer.unsteer(model) first"
        )
    coeff = _check_coeff(coeff)
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty {layer: tensor} mapping")
    size = hidden_size(model)
    made = []
    for layer, vec in sorted(vectors.items(), key=lambda kv: int(kv[0])):
        if isinstance(layer, bool) or int(layer) != layer:
            raise ValueError(f"layer keys must be integers, got {layer!r}")
        layer = int(layer)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
        device = next(layers[layer].parameters()).device
        made.append((layers[layer], SteeringVector(_check_vector(layer, vec, size, device), coeff, layer)))
    for module, sv in made:
        module.add_module(_ATTR, sv)
        sv.handle = module.register_forward_hook(sv.hook)
    return model


def _require(model: nn.Module) -> Dict[int, SteeringVector]:
    mods = _modules(model)
    if not mods:
        raise RuntimeError("model is not steered by lofit_fast (call lofit_fast.steer.steer first)")
    return mods


def set_coeff(model: nn.Module, coeff: float) -> nn.Module:
    """Set the steering coefficient of every steered layer."""
    coeff = _check_coeff(coeff)
    for sv in _require(model).values():
        sv.coeff = coeff
    return model


def get_coeff(model: nn.Module) -> Dict[int, float]:
    return {layer: sv.coeff for layer, sv in _require(model).items()}


def steering_vectors(model: nn.Module) -> Dict[int, torch.Tensor]:
    return {layer: sv.vector.detach().clone() for layer, sv in _require(model).items()}


def steering_state(model: nn.Module) -> Dict[str, object]:
    """What reproduces the steering: {"vectors": {layer: float32 cpu tensor}, "coeff": {layer: float}}."""
    mods = _require(model)
    return {
        "vectors": {layer: sv.vector.detach().float().cpu() for layer, sv in mods.items()},
        "coeff": {layer: sv.coeff for layer, sv in mods.items()},
    }


def unsteer(model: nn.Module) -> nn.Module:
    mods = _require(model)
    layers = decoder_layers(model)
    for layer, sv in mods.items():
        sv.handle.remove()
        delattr(layers[layer], _ATTR)
    return model


@contextlib.contextmanager
def steering_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run with steering off inside the block (a no-op for an unsteered model); restores the state after."""
    with switched_off(_modules(model).values()):
        yield model


def _down_proj(layer_module: nn.Module, idx: int) -> nn.Linear:
    family = type(layer_module).__name__
    if hasattr(layer_module, "post_feedforward_layernorm"):
        raise ValueError(
            f"cannot merge steering at layer {idx}: {family} normalizes the MLP output "
            "(post_feedforward_layernorm) before the residual add, so no down_proj bias equals a residual "
            "shift; keep the steering hook (lofit_fast.steer) instead"
        )
    down = getattr(getattr(layer_module, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise TypeError(f"cannot merge steering at layer {idx}: {family} has no mlp.down_proj Linear")
    return down


def merge_steering(model: nn.Module) -> nn.Module:
    """Fold each steered layer's `coeff · vec` into `mlp.down_proj.bias` (creating the bias if the layer has
    none) and remove the hooks. The merged model computes the same function with plain modules.

    Raises (leaving the model unchanged) for Gemma 2/3 layers, which normalize the MLP output, and when the
    steering is disabled. Note: HF configs have no switch for a down_proj-only bias (`mlp_bias=True` also adds
    gate/up biases), so saving a merged model with `save_pretrained` needs the adapter's export.
    """
    mods = _require(model)
    layers = decoder_layers(model)
    off = [layer for layer, sv in mods.items() if not sv.enabled]
    if off:
        raise RuntimeError(f"steering is disabled at layers {off}; enable it (or unsteer) before merging")
    downs = {layer: _down_proj(layers[layer], layer) for layer in mods}
    for layer, sv in mods.items():
        down = downs[layer]
        shift = sv.shift().to(device=down.weight.device)
        with torch.no_grad():
            if down.bias is None:
                down.bias = nn.Parameter(shift.to(down.weight.dtype), requires_grad=down.weight.requires_grad)
            else:
                down.bias.copy_((down.bias.to(shift.dtype) + shift).to(down.bias.dtype))
    return unsteer(model)
