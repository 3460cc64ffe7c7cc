"""Paired significance for a finished LoFiT run: LoFiT against base and against random heads, item by item.

Re-evaluates the base model, the run's LoFiT adapter and the random-heads baseline (its random_adapter/, or
re-tuned with the run's own heads, seed and hyper-parameters for a run that did not keep it) on the same
evaluation items,
reports whether the aggregate metrics reproduce results.json, and writes `paired.json` next to it with a
percentile bootstrap interval of the per-item difference for every metric.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from .._files import atomic_write
from ..adapter import load_adapter
from ..eval import evaluate, paired_bootstrap
from ..patch import unpatch
from .lofit_run import tune_heads
from .settings import RunSettings, load_model_for, task_items

ARMS = ("base", "lofit", "random")


def per_item_scores(task: str, model, tokenizer, items, batch_size: int) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """({metric: [score per item]}, {metric: mean})."""
    if task == "truthfulqa":
        out = evaluate(task, model, tokenizer, items, batch_size=batch_size, return_items=True)
        scores = {m: [r[m] for r in out["items"]] for m in ("mc1", "mc2")}
    else:
        out = evaluate(task, model, tokenizer, items, batch_size=batch_size, return_predictions=True)
        scores = {"accuracy": [float(r["correct"]) for r in out["predictions"]]}
    return scores, {m: sum(v) / len(v) for m, v in scores.items()}


def paired_evaluation(run: str, data: str, *, threads: Optional[int] = None, samples: int = 10000,
                      eval_batch_size: int = 16, quiet: bool = False) -> dict:
    """The paired report of the run folder `run` (a finished `lofit-fast run`) on the data it used; also
    written to run/paired.json."""
    with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    missing = [arm for arm in ARMS if arm not in results]
    if missing:
        raise ValueError(f"{run}: results.json has no {', '.join(missing)} (the run did not finish)")
    hyper = results["hyperparameters"]
    fields = {**hyper, "task": results["task"], "model": results["model"], "device": "cpu", "threads": threads,
              "quiet": quiet, "eval_batch_size": eval_batch_size, "out": run}
    settings = RunSettings(**{k: v for k, v in fields.items() if k in RunSettings.__dataclass_fields__})
    model, tokenizer = load_model_for(settings)
    kw = dict(fold=settings.fold, max_train=settings.max_train, max_eval=settings.max_eval)
    eval_items = task_items(settings.task, data, "eval", **kw)
    train_items = task_items(settings.task, data, "train", **kw)
    if len(eval_items) != results["eval_examples"] or len(train_items) != results["train_examples"]:
        raise ValueError(f"{run}: the data gives {len(train_items)} / {len(eval_items)} examples, the run had "
                         f"{results['train_examples']} / {results['eval_examples']}")
    task, start = settings.task, time.perf_counter()
    scores, means = {}, {}
    scores["base"], means["base"] = per_item_scores(task, model, tokenizer, eval_items, eval_batch_size)
    load_adapter(model, os.path.join(run, "adapter"))
    scores["lofit"], means["lofit"] = per_item_scores(task, model, tokenizer, eval_items, eval_batch_size)
    unpatch(model)
    random_adapter = os.path.join(run, "random_adapter")
    if os.path.isdir(random_adapter):
        load_adapter(model, random_adapter)
    else:  # a run from before random_adapter/ was kept: re-tune it with the run's heads and settings
        heads = [tuple(h) for h in results["random_heads"]]
        model, _ = tune_heads(settings, model, tokenizer, train_items, heads, "random heads (re-tuned): tune v")
    scores["random"], means["random"] = per_item_scores(task, model, tokenizer, eval_items, eval_batch_size)
    unpatch(model)
    report = {"run": str(run), "task": task, "model": results["model"], "eval_examples": len(eval_items),
              "reproduced": {name: {"now": means[name], "results.json": results[name]} for name in means},
              "paired": {}, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    for other in ("base", "random"):
        for metric in scores["lofit"]:
            report["paired"][f"lofit - {other} ({metric})"] = paired_bootstrap(
                scores["lofit"][metric], scores[other][metric], samples=samples)
    atomic_write(os.path.join(run, "paired.json"), json.dumps(report, indent=2) + "\n")
    return report
