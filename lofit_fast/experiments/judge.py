"""lm-evaluation-harness as the judge of a finished LoFiT run: the run's base model, LoFiT adapter and
random-heads adapter scored by lm-eval (its own prompts and scoring, `lofit_fast.harness`) beside the run's own
numbers. The two use different prompts, so what must agree is the ordering of the arms and the sign and size of
the gains, not the values.

Not imported by `lofit_fast.experiments` itself: lm-eval is heavy to import.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Optional, Sequence

from .._files import atomic_write
from ..harness import evaluate as lm_eval_scores
from .seeds import mean_std

ARMS = ("base", "lofit", "random")
TASK_METRICS = {
    "truthfulqa": {"mc1": "lofit_truthfulqa_mc1", "mc2": "lofit_truthfulqa_mc2"},
    "clutrr": {"accuracy": "lofit_clutrr"},
    "mquake": {"accuracy": "lofit_mquake"},
}


def _ordering(scores: Dict[str, float]):
    return sorted(scores, key=lambda arm: -scores[arm])


def _finished_run(run: str):
    """(results.json, {arm: adapter folder or None}) of a finished `lofit-fast run` folder."""
    with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    task = results.get("task")
    if task not in TASK_METRICS:
        raise ValueError(f"{run}: task {task!r} has no lm-eval task (expected one of {', '.join(TASK_METRICS)})")
    adapters: Dict[str, Optional[str]] = {"base": None, "lofit": os.path.join(run, "adapter"),
                                          "random": os.path.join(run, "random_adapter")}
    missing = [p for p in adapters.values() if p is not None and not os.path.isdir(p)]
    if missing or any(arm not in results for arm in ARMS):
        raise ValueError(f"{run}: not a finished run with its adapters ({', '.join(missing) or 'results.json'} "
                         f"missing); rerun it with this version of lofit-fast run")
    return results, adapters


def _own_numbers(results: dict, metric: str) -> Dict[str, float]:
    """The run's own value of `metric` for every arm (lofit_fast's judgment)."""
    return {arm: float(results[arm][metric]) for arm in ARMS}


def _lm_eval(data: str, adapters: Dict[str, Optional[str]], results: dict, **kw) -> Dict[str, Dict[str, float]]:
    """lm-eval's scores of `adapters` on the items `results` (a run's results.json) was evaluated on."""
    hyper = results.get("hyperparameters", {})
    return lm_eval_scores(data, adapters, tasks=list(TASK_METRICS[results["task"]].values()), model=results["model"],
                          fold=hyper.get("fold", 0), limit=hyper.get("max_eval"), **kw)


def _report(run: str, results: dict, scores: Dict[str, Dict[str, float]]) -> dict:
    """The comparison of one run from lm-eval's `scores` {arm: {lm-eval task: value}}; written to run/lm_eval.json."""
    task = results["task"]
    report = {"run": str(run), "task": task, "model": results["model"], "eval_examples": results["eval_examples"],
              "metrics": {}}
    for metric, lm_task in TASK_METRICS[task].items():
        ours = _own_numbers(results, metric)
        theirs = {arm: scores[arm][lm_task] for arm in ARMS}
        report["metrics"][metric] = {
            "lm_eval_task": lm_task,
            "lofit_fast": ours,
            "lm_eval": theirs,
            "gains": {f"lofit - {other}": {"lofit_fast": ours["lofit"] - ours[other],
                                           "lm_eval": theirs["lofit"] - theirs[other]}
                      for other in ("base", "random")},
            "same_ordering": _ordering(ours) == _ordering(theirs),
        }
    atomic_write(os.path.join(run, "lm_eval.json"), json.dumps(report, indent=2) + "\n")
    return report


def _items(results: dict) -> tuple:
    hyper = results.get("hyperparameters", {})
    keys = ("task", "model", "eval_examples", "eval_split")
    return tuple(results.get(k) for k in keys) + (hyper.get("fold", 0), hyper.get("max_eval"))


def lm_eval_comparison(run: str, data: str, *, batch_size: int = 8, backend: str = "auto",
                       device: str = "cpu") -> dict:
    """{"metrics": {metric: {"lofit_fast": {arm: value}, "lm_eval": {arm: value}, "gains": {...},
    "same_ordering": bool}}, ...} for the run folder `run` (a finished `lofit-fast run`, with adapter/ and
    random_adapter/) on the data it used, on the same items (fold and --max-eval of the run); also written to
    run/lm_eval.json."""
    results, adapters = _finished_run(run)
    table = _lm_eval(data, adapters, results, batch_size=batch_size, backend=backend, device=device)
    return _report(run, results, table)


def lm_eval_seeds(run_dir: str, data: str, *, batch_size: int = 8, backend: str = "auto", device: str = "cpu",
                  reuse: bool = True) -> dict:
    """lm_eval_comparison for every seed of a `lofit-fast run --seeds` folder, in one lm-eval pass with the
    (deterministic) base model scored once, then the mean ± sample standard deviation over seeds of every arm
    and gain by both judges, and each seed's ordering check. With `reuse`, a seed whose seed_S/lm_eval.json
    judged the same numbers (its lofit_fast values equal results.json) is not scored again, and its base
    score serves the others. Writes seed_S/lm_eval.json and run_dir/lm_eval_summary.json."""
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        seeds = [int(s) for s in json.load(f)["seeds"]]
    runs = {s: os.path.join(run_dir, f"seed_{s}") for s in seeds}
    finished = {s: _finished_run(path) for s, path in runs.items()}
    first = finished[seeds[0]][0]
    for s, (results, _) in finished.items():
        if _items(results) != _items(first):
            raise ValueError(f"{runs[s]}: evaluated on other items than {runs[seeds[0]]}")
    metrics = TASK_METRICS[first["task"]]
    reports: Dict[int, dict] = {}
    base_scores: Optional[Dict[str, float]] = None
    for s, (results, _) in finished.items():
        path = os.path.join(runs[s], "lm_eval.json")
        if not (reuse and os.path.isfile(path)):
            continue
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        same = set(old.get("metrics", {})) == set(metrics) and all(
            old["metrics"][m]["lofit_fast"] == _own_numbers(results, m) for m in metrics)
        if same:
            reports[s] = old
            base_scores = {lm_task: old["metrics"][m]["lm_eval"]["base"] for m, lm_task in metrics.items()}
    todo = [s for s in seeds if s not in reports]
    if todo:
        adapters: Dict[str, Optional[str]] = {} if base_scores is not None else {"base": None}
        for s in todo:
            adapters[f"lofit_{s}"] = finished[s][1]["lofit"]
            adapters[f"random_{s}"] = finished[s][1]["random"]
        table = _lm_eval(data, adapters, first, batch_size=batch_size, backend=backend, device=device)
        base = base_scores if base_scores is not None else table["base"]
        for s in todo:
            scores = {"base": base, "lofit": table[f"lofit_{s}"], "random": table[f"random_{s}"]}
            reports[s] = _report(runs[s], finished[s][0], scores)
    summary = {"run": str(run_dir), "task": first["task"], "model": first["model"],
               "eval_examples": first["eval_examples"], "seeds": seeds, "scored": todo, "metrics": {}}
    for m in metrics:
        rows = [reports[s]["metrics"][m] for s in seeds]
        entry = {judge: {arm: mean_std([r[judge][arm] for r in rows]) for arm in ARMS}
                 for judge in ("lofit_fast", "lm_eval")}
        entry["gains"] = {name: {judge: mean_std([r["gains"][name][judge] for r in rows])
                                 for judge in ("lofit_fast", "lm_eval")} for name in rows[0]["gains"]}
        entry["same_ordering"] = {str(s): r["same_ordering"] for s, r in zip(seeds, rows)}
        summary["metrics"][m] = entry
    atomic_write(os.path.join(run_dir, "lm_eval_summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _value(value, signed: bool = False) -> str:
    """A judge's number: a value (4 decimals) or, over seeds, {"mean", "std"} as mean ± std (3 decimals)."""
    if isinstance(value, dict):
        return (f"{value['mean']:+.3f}" if signed else f"{value['mean']:.3f}") + f" ± {value['std']:.3f}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown(report: dict) -> str:
    """lm_eval_comparison's report, or lm_eval_seeds' summary (mean ± std over seeds), as a markdown table: one
    row per metric and arm, then the gains and whether the two judges order the arms the same way."""
    title = f"{report['task']} ({report['eval_examples']} items), model {report['model']}"
    if "seeds" in report:
        title += f", seeds {', '.join(map(str, report['seeds']))} (mean ± sample standard deviation over seeds)"
    lines = [title, "", "| metric | arm | lofit_fast | lm-eval |", "|---|---|---|---|"]
    for metric, row in report["metrics"].items():
        for arm in ARMS:
            lines.append(f"| {metric} | {arm} | {_value(row['lofit_fast'][arm])} | {_value(row['lm_eval'][arm])} |")
        for name, gain in row["gains"].items():
            ours, theirs = _value(gain["lofit_fast"], True), _value(gain["lm_eval"], True)
            lines.append(f"| {metric} | {name} | {ours} | {theirs} |")
        same = row["same_ordering"]
        same = f"{sum(same.values())} of {len(same)} seeds" if isinstance(same, dict) else same
        lines.append(f"| {metric} | same ordering | {same} | |")
    return "\n".join(lines) + "\n"


def lm_eval_factorial(out: str, data: str, *, cells: Optional[Sequence[str]] = None, fold: int = 0,
                      limit: Optional[int] = None, model: Optional[str] = None, batch_size: int = 8,
                      backend: str = "auto", device: str = "cpu") -> dict:
    """lm-eval's TruthfulQA MC1 / MC2 for the base model and each finished cell adapter of a recipe factorial
    (`lofit_fast.experiments.factorial`, folder `out`; `cells`: cell names, default every finished one), beside
    the factorial's own numbers: each cell's gain over the base model by both judges and whether they rank the
    cells the same way. Written to out/lm_eval.json."""
    records = {}
    for path in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        name = f"{record['cell']}_seed{record['seed']}"
        if cells is None or record["cell"] in cells or name in cells:
            records[name] = record
    if not records:
        raise ValueError(f"{out}: no finished factorial cells" + (f" among {list(cells)}" if cells else ""))
    adapters: Dict[str, Optional[str]] = {"base": None}
    for name in records:
        adapters[name] = os.path.join(out, "adapters", name)
        if not os.path.isdir(adapters[name]):
            raise ValueError(f"{adapters[name]}: the adapter of cell {name} is missing")
    bases = {}
    for style in ("official", "newline"):
        path = os.path.join(out, f"base_{style}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                bases[style] = json.load(f)["metrics"]
    tasks = TASK_METRICS["truthfulqa"]
    first = next(iter(records.values()))
    hyper = first["hyperparameters"]
    model = model or first.get("model", "smollm2")
    table = lm_eval_scores(data, adapters, tasks=list(tasks.values()), model=model, fold=hyper.get("fold", fold),
                           limit=limit if limit is not None else hyper.get("max_eval"),
                           batch_size=batch_size, backend=backend, device=device)
    report = {"factorial": str(out), "model": model, "eval_examples": first["eval_examples"], "metrics": {}}
    for metric, lm_task in tasks.items():
        ours = {name: r["metrics"][metric] - bases[r["prompt_style"]][metric] for name, r in records.items()
                if r["prompt_style"] in bases}
        theirs = {name: table[name][lm_task] - table["base"][lm_task] for name in records}
        report["metrics"][metric] = {
            "lm_eval_task": lm_task, "lm_eval_base": table["base"][lm_task],
            "cells": {name: {"lofit_fast": records[name]["metrics"][metric], "lofit_fast_gain": ours.get(name),
                             "lm_eval": table[name][lm_task], "lm_eval_gain": theirs[name]} for name in records},
            "same_ordering": _ordering(ours) == _ordering({n: theirs[n] for n in ours}),
        }
    atomic_write(os.path.join(out, "lm_eval.json"), json.dumps(report, indent=2) + "\n")
    return report


def markdown_factorial(report: dict) -> str:
    """lm_eval_factorial's report as a markdown table (one row per metric and cell)."""
    lines = [f"TruthfulQA ({report['eval_examples']} items), model {report['model']}", "",
             "| metric | cell | lofit_fast | gain over base | lm-eval | gain over base |", "|---|---|---|---|---|---|"]
    for metric, row in report["metrics"].items():
        lines.append(f"| {metric} | base | | | {row['lm_eval_base']:.4f} | |")
        for name, c in row["cells"].items():
            gain = "–" if c["lofit_fast_gain"] is None else f"{c['lofit_fast_gain']:+.4f}"
            lines.append(f"| {metric} | {name} | {c['lofit_fast']:.4f} | {gain} | {c['lm_eval']:.4f} | "
                         f"{c['lm_eval_gain']:+.4f} |")
        lines.append(f"| {metric} | same ordering of the cells | {row['same_ordering']} | | | |")
    return "\n".join(lines) + "\n"
