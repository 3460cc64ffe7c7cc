"""Parameter-efficient comparators for LoFiT, trained with the same loop, data and loss (`lofit_fast.train`).

- LoRA (Hu et al., 2022) through `peft`: rank-r updates of q_proj and v_proj (r = 8 by default).
- RED (Wu et al., 2024, "Advancing parameter efficiency in fine-tuning via representation editing"): a learned
  scale and bias on each decoder layer's MLP output, h ← h ⊙ (1 + s) + b, with s = b = 0 at the start (the
  identity). The MLP output is `down_proj`'s output in every supported family (Gemma 2/3 normalize it
  afterwards, which does not matter here), so the edit folds exactly into down_proj: W ← diag(1 + s)·W,
  bias ← (1 + s) ⊙ bias + b.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..steer import decoder_layers

_RED_ATTR = "lofit_red"


# ----------------------------------------------------------------------------------------------------- LoRA
def lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: Optional[int] = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters on `target_modules` (alpha defaults to 2r). Only the LoRA
    matrices require grad. Undo with `unlora(peft_model)`, which returns the base model unchanged."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # peft is an optional dependency
        raise ImportError("LoRA needs peft: pip install peft (or lofit_fast[peft])") from exc
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    config = LoraConfig(
        r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
        target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    return peft_model


def lora_parameters(peft_model: nn.Module) -> List[nn.Parameter]:
    return [p for name, p in peft_model.named_parameters() if "lora_" in name and p.requires_grad]


def unlora(peft_model: nn.Module, *, merge: bool = False) -> nn.Module:
    """The base model back: with merge=True the LoRA updates folded into its weights, else dropped."""
    return peft_model.merge_and_unload() if merge else peft_model.unload()


# ------------------------------------------------------------------------------------------------------ RED
class REDEdit(nn.Module):
    """h ⊙ (1 + scale) + bias on the output of the MLP it is attached to (float32 parameters)."""

    def __init__(self, hidden: int, layer_idx: int, device, param_dtype: torch.dtype, init_std: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(hidden, device=device, dtype=param_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, device=device, dtype=param_dtype))
        if init_std > 0:
            with torch.no_grad():
                self.scale.normal_(0.0, init_std)
                self.bias.normal_(0.0, init_std)
        self.layer_idx = layer_idx
        self.enabled = True
        self.handle = None

    def hook(self, module, args, output):
        if not self.enabled:
            return None
        h = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
        return (h * (1 + self.scale.to(h.dtype)) + self.bias.to(h.dtype)).to(output.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, hidden={self.scale.numel()}"


def _mlp(layer_module: nn.Module, idx: int) -> nn.Module:
    mlp = getattr(layer_module, "mlp", None)
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        raise TypeError(f"decoder layer {idx} ({type(layer_module).__name__}) has no mlp.down_proj Linear for RED")
    return mlp


def red(
    model: nn.Module,
    layers: Union[str, Sequence[int]] = "all",
    *,
    init_std: float = 0.0,
    param_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Attach a RED edit (scale and bias, [hidden] each) to the MLP of each chosen decoder layer ("all" by
    default). Checks everything before attaching; returns the model."""
    blocks = decoder_layers(model)
    if red_modules(model):
        raise RuntimeError("model already has RED edits; call unred(model) first")
    chosen = list(range(len(blocks))) if layers == "all" else [int(layer) for layer in layers]
    if not chosen:
        raise ValueError("no layers chosen for RED")
    bad = [layer for layer in chosen if not 0 <= layer < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} decoder layers")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"duplicate layers in {chosen}")
    hidden = int(model.get_input_embeddings().weight.shape[1])
    made = []
    for layer in chosen:
        mlp = _mlp(blocks[layer], layer)
        made.append((mlp, REDEdit(hidden, layer, mlp.down_proj.weight.device, param_dtype, init_std)))
    for mlp, edit in made:
        mlp.add_module(_RED_ATTR, edit)
        edit.handle = mlp.register_forward_hook(edit.hook)
    return model


def red_modules(model: nn.Module) -> Dict[int, REDEdit]:
    out = {}
    for i, block in enumerate(decoder_layers(model)):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and hasattr(mlp, _RED_ATTR):
            out[i] = getattr(mlp, _RED_ATTR)
    return out


def red_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for edit in red_modules(model).values() for p in (edit.scale, edit.bias)]


def red_state(model: nn.Module) -> Dict[int, Dict[str, torch.Tensor]]:
    return {layer: {"scale": e.scale.detach().cpu().clone(), "bias": e.bias.detach().cpu().clone()}
            for layer, e in red_modules(model).items()}


def unred(model: nn.Module) -> nn.Module:
    mods = red_modules(model)
    if not mods:
        raise RuntimeError("model has no RED edits")
    blocks = decoder_layers(model)
    for layer, edit in mods.items():
        edit.handle.remove()
        delattr(blocks[layer].mlp, _RED_ATTR)
    return model


@torch.no_grad()
def merge_red(model: nn.Module) -> nn.Module:
    """Fold every RED edit into its layer's down_proj (new weight/bias tensors) and remove the edits."""
    mods = red_modules(model)
    if not mods:
        raise RuntimeError("model has no RED edits")
    off = [layer for layer, e in mods.items() if not e.enabled]
    if off:
        raise RuntimeError(f"RED edits of layers {off} are disabled; enable them before merging")
    blocks = decoder_layers(model)
    for layer, edit in mods.items():
        down = blocks[layer].mlp.down_proj
        s = 1 + edit.scale.detach().to(torch.float64 if down.weight.dtype == torch.float64 else torch.float32)
        b = edit.bias.detach().to(s.dtype)
        weight = (down.weight.detach().to(s.dtype) * s[:, None]).to(down.weight.dtype)
        bias = b if down.bias is None else down.bias.detach().to(s.dtype) * s + b
        down.weight = nn.Parameter(weight, requires_grad=down.weight.requires_grad)
        down.bias = nn.Parameter(bias.to(down.weight.dtype), requires_grad=down.weight.requires_grad)
    return unred(model)


def trainable_count(params) -> int:
    return sum(p.numel() for p in params)
