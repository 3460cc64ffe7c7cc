"""Training recipes: the choices around the LoFiT update that the paper does not fix and implementations make
differently (issue 16's factorial, `lofit_fast.experiments.factorial`). Each is a full set; any single choice
can still be overridden.

- "plain" (the default): a constant learning rate, no EOS (the DPO margin then covers exactly the answer tokens
  that MC scoring sees), the prompt `Q: {q}\\nA:`, no clipping. Measured best on SmolLM2-135M: step 2 on fixed
  heads, TruthfulQA fold 0 test, MC1 0.350 / MC2 0.557 against 0.301 / 0.501 for "official" (paired
  difference +0.049 [+0.024, +0.073] / +0.057 [+0.041, +0.073]; bench/results/lofit_smollm2/README.md).
- "official": the authors' scripts (fc2869/lo-fit: HF Trainer / TRL 0.8.1 defaults) — a linear learning-rate
  decay to zero, EOS appended to every completion, the prompt `Q: {q} A:`, gradient clipping at 1.0.

The library's training functions (`lofit_fast.tune`, `select_heads`, `train`) keep the authors' values as
their keyword defaults; the recipes are what the pipelines (`RunSettings`, the CLI) choose among.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

from ..data import MCItem, truthfulqa_prompt

RECIPES: Dict[str, Dict[str, object]] = {
    "official": {"schedule": "linear", "add_eos": True, "prompt_style": "official", "max_grad_norm": 1.0},
    "plain": {"schedule": "constant", "add_eos": False, "prompt_style": "newline", "max_grad_norm": 0.0},
}
DEFAULT_RECIPE = "plain"


def fill_recipe(settings) -> None:
    """Set every recipe field of `settings` that is None (or missing) to its recipe's value."""
    name = getattr(settings, "recipe", None) or DEFAULT_RECIPE
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    settings.recipe = name
    for key, value in RECIPES[name].items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)


def with_prompt_style(items: Sequence, style: str) -> List:
    """TruthfulQA items with their prompt in `style` (other items as they are); idempotent."""
    return [dataclasses.replace(it, prompt=truthfulqa_prompt(it.question, style)) if isinstance(it, MCItem) else it
            for it in items]
