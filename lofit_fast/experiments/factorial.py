"""The recipe factorial (issue 16): LoFiT step 2 on fixed heads under every combination of the three choices
that implementations make differently — learning-rate schedule (linear decay / constant), EOS appended to the
training completions (yes / no) and the TruthfulQA prompt (`Q: {q} A:` / `Q: {q}\\nA:`) — so that each
choice's effect is measured with the heads held fixed. Clipping is one fixed value for every cell.

    records = run_factorial(settings, train_items, eval_items, heads, cells=all_cells(), seeds=[42], out=DIR)

Every (cell, seed) writes its adapter to DIR/adapters/<cell>_seed<seed>/ and its record to
DIR/cells/<cell>_seed<seed>.json when it finishes, and is skipped when that record is there, so parallel processes can split the cells and an interrupted factorial resumes. The base model is
evaluated once per prompt (DIR/base_<prompt>.json). `report(DIR)` reads whatever cells are there and gives the
table, the main effects (mean over the cells at one level minus the mean at the other) and the paired
interval of each cell against the base model.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import time
from typing import Dict, List, Optional, Sequence

from .._files import atomic_write
from ..adapter import save_adapter
from ..eval import paired_bootstrap
from ..patch import unpatch
from .lofit_run import evaluate_arm, tune_heads
from .recipes import RECIPES, with_prompt_style
from .results import write_json
from .seeds import mean_std
from .settings import RunSettings, hyperparameters, load_model_for, log

FACTORS = {"schedule": ("linear", "constant"), "add_eos": (True, False), "prompt_style": ("official", "newline")}
# the settings a finished cell must share with the factorial's to be reused
SAME = ("epochs", "batch_size", "lr", "init_std", "beta", "max_grad_norm", "max_length", "fold", "dtype",
        "quantize", "grad_accum", "mixed_precision")


@dataclasses.dataclass(frozen=True)
class Cell:
    schedule: str
    add_eos: bool
    prompt_style: str

    @property
    def name(self) -> str:
        return f"{self.schedule}-{'eos' if self.add_eos else 'noeos'}-{self.prompt_style}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        """A cell from its name (`linear-eos-official`) or a recipe's (`official`, `plain`)."""
        if name in RECIPES:
            recipe = RECIPES[name]
            return cls(recipe["schedule"], recipe["add_eos"], recipe["prompt_style"])
        parts = name.split("-")
        if (len(parts) != 3 or parts[0] not in FACTORS["schedule"] or parts[1] not in ("eos", "noeos")
                or parts[2] not in FACTORS["prompt_style"]):
            raise ValueError(f"unknown cell {name!r}: expected a recipe ({', '.join(RECIPES)}) or "
                             "<linear|constant>-<eos|noeos>-<official|newline>")
        return cls(parts[0], parts[1] == "eos", parts[2])


def all_cells() -> List[Cell]:
    """The 2 × 2 × 2 cells: the two recipes first, then each recipe with one choice flipped."""
    cells = [Cell.parse("official"), Cell.parse("plain")]
    for start in list(cells):
        for factor, levels in FACTORS.items():
            flipped = levels[1] if getattr(start, factor) == levels[0] else levels[0]
            cells.append(dataclasses.replace(start, **{factor: flipped}))
    every = {Cell(*combo) for combo in itertools.product(*FACTORS.values())}
    assert set(cells) == every and len(cells) == len(every)
    return cells


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _questions_digest(items) -> str:
    """sha256 of the evaluation items' questions and answers (what a base record was measured on)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([getattr(it, "question", None), it.prompt, getattr(it, "best", None),
                             list(getattr(it, "correct", [])), list(getattr(it, "incorrect", []))]).encode())
    return h.hexdigest()


def _base(settings, model, tokenizer, eval_items, prompt_style: str, out: str) -> dict:
    """The base model's record on `eval_items` with `prompt_style`, from out/base_<style>.json when that was
    measured with the same model on the same questions (records from before the model and the questions' digest
    were kept are matched on the number of questions), else evaluated and written there."""
    path = os.path.join(out, f"base_{prompt_style}.json")
    items = with_prompt_style(eval_items, prompt_style)
    digest = _questions_digest(items)
    known = _read(path)
    if known is not None and known.get("eval_examples") == len(items) \
            and known.get("questions_sha256", digest) == digest and known.get("model", settings.model) == settings.model:
        return known
    start = time.perf_counter()
    scores: Dict[str, List[float]] = {}
    metrics = evaluate_arm(settings, model, tokenizer, items, f"the base model ({prompt_style} prompt)",
                           item_scores=scores)
    record = {"prompt_style": prompt_style, "model": settings.model, "metrics": metrics, "item_scores": scores,
              "eval_examples": len(items), "questions_sha256": digest, "seconds": round(time.perf_counter() - start, 1)}
    write_json(path, record)
    return record


def run_cell(settings, model, tokenizer, train_items, eval_items, heads, cell: Cell, seed: int, out: str) -> dict:
    """Step 2 on `heads` with the cell's choices and `seed`, evaluated with the cell's prompt; the record is
    written to out/cells/<cell>_seed<seed>.json (and returned from there when it is already written)."""
    path = os.path.join(out, "cells", f"{cell.name}_seed{seed}.json")
    one = dataclasses.replace(settings, seed=seed, schedule=cell.schedule, add_eos=cell.add_eos,
                              prompt_style=cell.prompt_style)
    known = _read(path)
    if known is not None:
        wanted = {**{k: getattr(one, k) for k in SAME}, "heads": [list(h) for h in heads],
                  "train_examples": len(train_items), "eval_examples": len(eval_items)}
        had = {**{k: known.get("hyperparameters", {}).get(k) for k in SAME},
               **{k: known.get(k) for k in ("heads", "train_examples", "eval_examples")}}
        if "model" in known:  # records from before it was kept do not have it
            wanted["model"], had["model"] = settings.model, known["model"]
        differences = [f"{k}: {had[k]!r} there, {wanted[k]!r} now" for k in wanted if had[k] != wanted[k]]
        if differences:
            raise ValueError(f"{path} was trained with other settings ({'; '.join(differences)}); use another "
                             "--out for these settings")
        log(settings, f"cell {cell.name} seed {seed}: done before ({path})")
        return known
    train = with_prompt_style(train_items, cell.prompt_style)
    items = with_prompt_style(eval_items, cell.prompt_style)
    log(settings, f"cell {cell.name} seed {seed}: tuning v on {len(heads)} heads ...")
    start = time.perf_counter()
    tuned, history = tune_heads(one, model, tokenizer, train, heads, f"{cell.name} seed {seed}")
    train_seconds = time.perf_counter() - start
    try:
        save_adapter(tuned, os.path.join(out, "adapters", f"{cell.name}_seed{seed}"), method="lofit",
                     hyperparameters={**hyperparameters(one), "recipe": cell.name})
        start = time.perf_counter()
        scores: Dict[str, List[float]] = {}
        metrics = evaluate_arm(one, tuned, tokenizer, items, f"cell {cell.name}", item_scores=scores)
        eval_seconds = time.perf_counter() - start
    finally:
        unpatch(tuned)
    rows = history["history"]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    clip = settings.max_grad_norm or None
    record = {
        "cell": cell.name, **dataclasses.asdict(cell), "seed": seed, "model": settings.model, "metrics": metrics,
        "heads": [list(h) for h in heads], "eval_examples": len(items), "train_examples": len(train),
        "epoch_loss": history["epoch_loss"], "steps": len(rows),
        "grad_norm": {"first": norms[0], "max": max(norms), "median": sorted(norms)[len(norms) // 2]} if norms else None,
        "clipped_steps": sum(n > clip for n in norms) if clip and norms else 0,
        "seconds": {"train": round(train_seconds, 1), "eval": round(eval_seconds, 1)},
        "hyperparameters": {**hyperparameters(one), "recipe": cell.name}, "item_scores": scores,
    }
    write_json(path, record)
    return record


def run_factorial(settings, train_items: Sequence, eval_items: Sequence, heads, *, cells: Sequence[Cell],
                  seeds: Sequence[int], out: str, model=None, tokenizer=None) -> List[dict]:
    """Every cell × seed (skipping the ones already written under `out`), then the report in out/."""
    settings = RunSettings.of(settings)
    if model is None:
        model, tokenizer = load_model_for(settings)
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    records = []
    for style in sorted({c.prompt_style for c in cells}):
        _base(settings, model, tokenizer, eval_items, style, out)
    for cell in cells:
        for seed in seeds:
            records.append(run_cell(settings, model, tokenizer, train_items, eval_items, heads, cell, int(seed), out))
    write_report(out)
    return records


def report(out: str) -> dict:
    """The factorial so far: per cell the mean ± std over its seeds with the paired interval against the base
    model on the same prompt, and each factor's main effect over the cells that have both levels' partners."""
    records = [r for r in (_read(p) for p in sorted(glob.glob(os.path.join(out, "cells", "*.json")))) if r]
    bases = {s: _read(os.path.join(out, f"base_{s}.json")) for s in FACTORS["prompt_style"]}
    by_cell: Dict[str, List[dict]] = {}
    for r in records:
        by_cell.setdefault(r["cell"], []).append(r)
    cells = {}
    # per cell and metric, each item's score averaged over the cell's seeds
    items = {name: {m: [sum(r["item_scores"][m][i] for r in rows) / len(rows)
                        for i in range(len(rows[0]["item_scores"][m]))] for m in rows[0]["metrics"]}
             for name, rows in by_cell.items()}
    for name, rows in by_cell.items():
        cell = Cell.parse(name)
        metrics = rows[0]["metrics"].keys()
        entry = {**dataclasses.asdict(cell), "seeds": [r["seed"] for r in rows],
                 "metrics": {m: mean_std([r["metrics"][m] for r in rows]) for m in metrics},
                 "train_seconds": mean_std([r["seconds"]["train"] for r in rows])["mean"],
                 "eval_seconds": mean_std([r["seconds"]["eval"] for r in rows])["mean"],
                 "final_epoch_loss": mean_std([r["epoch_loss"][-1] for r in rows])["mean"],
                 "clipped_steps": sum(r.get("clipped_steps", 0) for r in rows),
                 "steps": sum(r.get("steps", 0) for r in rows)}
        base = bases.get(cell.prompt_style)
        if base is not None:
            entry["vs_base"] = {}
            for m in metrics:
                if len(items[name][m]) == len(base["item_scores"][m]):
                    entry["vs_base"][m] = paired_bootstrap(items[name][m], base["item_scores"][m], samples=5000)
        cells[name] = entry
    base_metrics = {s: b["metrics"] for s, b in bases.items() if b is not None}
    effects = {}
    for factor, (first, second) in FACTORS.items():
        names = []  # (cell at the first level, its partner at the second), both finished
        for name, entry in cells.items():
            partner = dataclasses.replace(Cell.parse(name), **{factor: second}).name
            if entry[factor] == first and partner in cells:
                names.append((name, partner))
        if not names:
            continue
        metrics = list(cells[names[0][0]]["metrics"])
        effect = {"levels": [first, second], "pairs": len(names), "paired": {}}
        for m in metrics:
            effect[m] = mean_std([cells[b]["metrics"][m]["mean"] - cells[a]["metrics"][m]["mean"] for a, b in names])
            # its paired interval over items: per item, the mean over the pairs of (second − first)
            n = len(items[names[0][0]][m])
            if all(len(items[x][m]) == n for pair in names for x in pair):
                effect["paired"][m] = paired_bootstrap(
                    [sum(items[b][m][i] for _, b in names) / len(names) for i in range(n)],
                    [sum(items[a][m][i] for a, _ in names) / len(names) for i in range(n)], samples=5000)
            if all(cells[x]["prompt_style"] in base_metrics for pair in names for x in pair):
                # the effect on the gain over the base model on the same prompt (the prompt moves the base too)
                effect[f"{m}_gain"] = mean_std([
                    (cells[b]["metrics"][m]["mean"] - base_metrics[cells[b]["prompt_style"]][m])
                    - (cells[a]["metrics"][m]["mean"] - base_metrics[cells[a]["prompt_style"]][m]) for a, b in names])
        effects[factor] = effect
    recipes = {}
    official, plain = (Cell.parse(r).name for r in ("official", "plain"))
    if official in items and plain in items:
        recipes["plain - official"] = {m: paired_bootstrap(items[plain][m], items[official][m], samples=5000)
                                       for m in items[official] if len(items[official][m]) == len(items[plain][m])}
    return {"cells": cells, "main_effects": effects, "recipes": recipes, "base": base_metrics}


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if len(stat["values"]) > 1 else "")


def markdown(rep: dict) -> str:
    """The report as a Markdown table (cells ranked by MC1) with the main effects under it."""
    lines = ["| schedule | EOS | prompt | seeds | MC1 | MC2 | MC1 − base [95% CI] | MC2 − base [95% CI] "
             "| last epoch loss | clipped steps | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rep["cells"].items(), key=lambda kv: -kv[1]["metrics"].get("mc1", {"mean": 0})["mean"])
    for name, c in order:
        ci = []
        for m in ("mc1", "mc2"):
            b = c.get("vs_base", {}).get(m)
            ci.append(f"{b['mean_diff']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]" if b else "–")
        lines.append(f"| {c['schedule']} | {'yes' if c['add_eos'] else 'no'} | {c['prompt_style']} | "
                     f"{len(c['seeds'])} | {_fmt(c['metrics']['mc1'])} | {_fmt(c['metrics']['mc2'])} | {ci[0]} | "
                     f"{ci[1]} | {c['final_epoch_loss']:.4f} | {c['clipped_steps']}/{c['steps']} | "
                     f"{c['train_seconds']:.0f} | {c['eval_seconds']:.0f} |")
    if rep["base"]:
        lines += ["", "| base, prompt | MC1 | MC2 |", "|---|---|---|"]
        lines += [f"| {s} | {m['mc1']:.3f} | {m['mc2']:.3f} |" for s, m in rep["base"].items()]
    for name, comparison in rep.get("recipes", {}).items():
        shown = [f"{m.upper()} {b['mean_diff']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]"
                 for m, b in comparison.items()]
        lines += ["", f"Recipes, {name} (paired over items, 95% CI): " + ", ".join(shown)]
    if rep["main_effects"]:
        lines += ["", "| main effect (second level − first) | cell pairs | MC1 [paired 95% CI] | MC2 [paired 95% CI] "
                  "| MC1 gain over base | MC2 gain over base |", "|---|---|---|---|---|---|"]
        for factor, e in rep["main_effects"].items():
            gains = [f"{e[m + '_gain']['mean']:+.3f}" if m + "_gain" in e else "–" for m in ("mc1", "mc2")]
            shown = []
            for m in ("mc1", "mc2"):
                b = e["paired"].get(m)
                shown.append(f"{e[m]['mean']:+.3f}" + (f" [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]" if b else ""))
            lines.append(f"| {factor}: {e['levels'][1]} − {e['levels'][0]} | {e['pairs']} | "
                         f"{shown[0]} | {shown[1]} | {gains[0]} | {gains[1]} |")
    return "\n".join(lines) + "\n"


def write_report(out: str) -> dict:
    """report(out) written as out/factorial.json and out/factorial.md."""
    rep = report(out)
    write_json(os.path.join(out, "factorial.json"), rep)
    atomic_write(os.path.join(out, "factorial.md"), markdown(rep))
    return rep
