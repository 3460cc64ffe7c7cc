"""lm-evaluation-harness as the independent judge: the `lofit` model (the project's model loading, packaged
GGUF names included, with a lofit_fast adapter) and tasks over the local LoFiT data.

    import lofit_fast.harness                      # registers the "lofit" model with lm-eval
    import lm_eval
    lm_eval.simple_evaluate(model="lofit", model_args="pretrained=smollm2,adapter=runs/tqa/adapter",
                            tasks=["lofit_truthfulqa_mc1"], task_manager=lofit_fast.harness.task_manager("../shared/data"))

or, for several adapters at once (one row each, the base model as "base"):

    python -m lofit_fast.harness --data ../shared/data --tasks lofit_truthfulqa_mc1,lofit_truthfulqa_mc2 \\
        --adapter lofit=runs/tqa/adapter --adapter random=runs/tqa/random_adapter --out runs/lm_eval.json
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..adapter import load_adapter
from ..models import load_model
from .tasks import TASKS, write_task_configs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("lofit")
class LofitLM(HFLM):
    """lm-eval's Hugging Face model on a model loaded by `lofit_fast.load_model` (a packaged name such as
    "smollm2", a .gguf file or an HF folder, never the hub), with `adapter` (a save_adapter folder, or none)
    loaded through the fused op (`backend`)."""

    def __init__(self, pretrained: str = "smollm2", adapter: Optional[str] = None, backend: str = "auto",
                 dtype: str = "float32", device: str = "cpu", batch_size=1, **kwargs):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        model, tokenizer = load_model(pretrained, dtype=_DTYPES[dtype], device=device)
        if adapter and str(adapter).lower() != "none":
            load_adapter(model, adapter, backend=backend)
        self.adapter_path = adapter
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def task_manager(data_dir, *, fold: int = 0, limit: Optional[int] = None, folder=None):
    """An lm-eval TaskManager that knows the lofit_* tasks over `data_dir` (configs written to `folder`, or a
    temporary one)."""
    from lm_eval.tasks import TaskManager

    folder = folder or tempfile.mkdtemp(prefix="lofit_lm_eval_tasks_")
    write_task_configs(data_dir, folder, fold=fold, limit=limit)
    return TaskManager(include_path=str(folder))


def evaluate(data_dir, adapters: Mapping[str, Optional[str]], *, tasks: Sequence[str] = TASKS[:2],
             model: str = "smollm2", fold: int = 0, limit: Optional[int] = None, batch_size=8,
             backend: str = "auto", dtype: str = "float32", device: str = "cpu") -> Dict[str, Dict[str, float]]:
    """{adapter name: {task: score}} from lm-eval's simple_evaluate, one model load per adapter (None: the base
    model)."""
    import lm_eval

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: choose from {list(TASKS)}")
    manager = task_manager(data_dir, fold=fold, limit=limit)
    table: Dict[str, Dict[str, float]] = {}
    for name, path in adapters.items():
        lm = LofitLM(pretrained=model, adapter=path, backend=backend, dtype=dtype, device=device,
                     batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
        row = {}
        for task in tasks:
            metrics = out["results"][task]
            key = next(k for k in metrics if k.split(",")[0] in ("acc", "exact_match"))
            row[task] = float(metrics[key])
        table[name] = row
    return table


__all__ = ["LofitLM", "TASKS", "evaluate", "task_manager", "write_task_configs"]
