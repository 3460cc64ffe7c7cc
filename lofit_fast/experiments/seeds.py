"""A LoFiT run repeated over seeds, reported as mean ± standard deviation: each seed draws its own step-1 and
step-2 initializations, data order and random heads (`run_experiment` with that seed, in out/seed_<seed>/);
the base model is deterministic and is evaluated once."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Sequence

from .lofit_run import run_experiment, selection_file
from .results import folder_seed, write_json
from .settings import RunSettings, load_model_for, log

ARMS = ("base", "lofit", "random")


def mean_std(values: List[float]) -> Dict[str, object]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def beyond_spread(row: Dict[str, object], *, two_sided: bool = False) -> bool:
    """Whether a mean_std row of differences over seeds clears its own spread: more than one seed, and the mean
    (its size, when two_sided) above the standard deviation and above float noise, so 0 ± 0 never counts."""
    mean = abs(row["mean"]) if two_sided else row["mean"]
    return bool(len(row["values"]) > 1 and mean > max(row["std"], 1e-12))


def load_seeds_run(run_dir: str) -> Dict[str, object]:
    """{"summary": run_dir/summary.json, "runs": {seed: seed_<seed>/results.json}} of a `run --seeds` folder."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no summary.json: not the --out folder of `lofit-fast run --seeds`")
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    runs = {}
    for seed in summary["seeds"]:
        with open(os.path.join(run_dir, f"seed_{seed}", "results.json"), encoding="utf-8") as f:
            runs[seed] = json.load(f)
    return {"summary": summary, "runs": runs}


def load_seeds_pair(a_dir: str, b_dir: str):
    """(a, b, seeds): two `run --seeds` folders (load_seeds_run) on the same task and the seeds they share, in
    a's order, for reports that pair each seed of one with the same seed of the other."""
    a, b = load_seeds_run(a_dir), load_seeds_run(b_dir)
    task = a["summary"]["task"]
    if b["summary"]["task"] != task:
        raise ValueError(f"{a_dir} is a {task} run and {b_dir} a {b['summary']['task']} run")
    seeds = [s for s in a["summary"]["seeds"] if s in b["runs"]]
    if not seeds:
        raise ValueError(f"{a_dir} and {b_dir} share no seed")
    return a, b, seeds


def summarize(runs: Sequence[dict]) -> Dict[str, Dict[str, Dict[str, object]]]:
    """{arm: {metric: {"mean", "std" (sample, n − 1), "values" per seed}}} over the runs' results, for the arms
    that every run has (a run stopped after LoFiT's evaluation has no random-heads arm)."""
    return {arm: {metric: mean_std([float(r[arm][metric]) for r in runs]) for metric in runs[0][arm]}
            for arm in ARMS if all(arm in r for r in runs)}


def seeds_report(runs: Sequence[dict], seeds: Sequence[int], seconds: float) -> dict:
    """summary.json of a seeds run: {"task", "model", "k", "seeds", "eval_examples", "summary": summarize(...),
    "lofit_minus_base" / "lofit_minus_random": per metric the mean gain, its standard deviation over seeds and
    whether it exceeds that spread, "heads" and "random_heads" per seed, "seconds"}."""
    summary = summarize(runs)
    gains = {}
    for other in ("base", "random"):
        if other not in summary:
            continue
        gains[f"lofit_minus_{other}"] = {}
        for metric in summary["lofit"]:
            row = mean_std([float(r["lofit"][metric]) - float(r[other][metric]) for r in runs])
            row["beyond_spread"] = beyond_spread(row)
            gains[f"lofit_minus_{other}"][metric] = row
    first = runs[0]
    return {"task": first["task"], "model": first["model"], "k": first["k"], "seeds": list(seeds),
            "eval_examples": first["eval_examples"], "summary": summary, **gains,
            "random_heads": {str(s): r["random_heads"] for s, r in zip(seeds, runs) if "random_heads" in r},
            "heads": {str(s): r["heads"] for s, r in zip(seeds, runs)}, "seconds": round(seconds, 1)}


def seed_folder_results(run_dir: str) -> Dict[int, dict]:
    """{seed: run_dir/seed_<seed>/results.json} for every seed folder that has one, by seed."""
    found = {}
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name, "results.json")
        if folder_seed(name) is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found[folder_seed(name)] = json.load(f)
    return dict(sorted(found.items()))


def report_seed_folders(run_dir: str) -> dict:
    """Rebuild run_dir/summary.json from every run_dir/seed_<seed>/results.json that has LoFiT's metrics: for
    seeds run as separate processes into one folder, each of which wrote a summary of its own seed only.
    `seconds` is the sum of the seeds' stage times."""
    runs = {seed: r for seed, r in seed_folder_results(run_dir).items() if "lofit" in r}
    if not runs:
        raise FileNotFoundError(f"{run_dir} has no seed_<seed>/results.json with LoFiT's metrics")
    seeds = sorted(runs)
    for seed in seeds[1:]:
        for key in ("task", "model", "k", "eval_examples"):
            if runs[seed][key] != runs[seeds[0]][key]:
                raise ValueError(f"seed {seed} has {key} {runs[seed][key]!r} and seed {seeds[0]} "
                                 f"{runs[seeds[0]][key]!r}: not one seeds run")
    seconds = sum(sum(runs[s].get("seconds_by_stage", {}).values()) for s in seeds)
    report = seeds_report([runs[s] for s in seeds], seeds, seconds)
    write_json(os.path.join(run_dir, "summary.json"), report)
    return report


def run_seeds(settings, train_items: Sequence, eval_items: Sequence, seeds: Sequence[int], *, model=None,
              tokenizer=None) -> dict:
    """run_experiment once per seed (in settings.out/seed_<seed>/), then summary.json in settings.out:
    {"seeds", "summary": summarize(...), "lofit_minus_random" / "lofit_minus_base": the mean gain, its standard
    deviation over seeds and whether it exceeds that spread, per metric}."""
    settings = RunSettings.of(settings)
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if settings.selection:  # every seed's heads found before the first seed trains
        for seed in seeds:
            selection_file(settings.selection, seed)
    start = time.perf_counter()
    if model is None:
        model, tokenizer = load_model_for(settings)
    runs, base = [], None
    for seed in seeds:
        log(settings, f"seed {seed} ({len(runs) + 1} of {len(seeds)})")
        one = dataclasses.replace(settings, seed=seed, out=os.path.join(settings.out, f"seed_{seed}"))
        result = run_experiment(one, train_items, eval_items, model=model, tokenizer=tokenizer, known_base=base)
        base = (result["base"], result.get("item_scores", {}).get("base"))
        runs.append(result)
    report = seeds_report(runs, seeds, time.perf_counter() - start)
    write_json(os.path.join(settings.out, "summary.json"), report)
    return report
