"""PEFT-style names for lofit_fast operations, for code written against peft.PeftModel."""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from ..patch import disabled, unpatch


disable_adapter = disabled  # `with disable_adapter(model):` runs the base model, as in PEFT


def unload(model: nn.Module) -> nn.Module:
    """Remove the interventions without merging them (PEFT's `unload`; `lofit_fast.unpatch`)."""
    return unpatch(model)


def get_nb_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable parameters, all parameters), counting each shared tensor once, as PEFT does."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's one-line summary: trainable params, all params, and the trainable percentage."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
