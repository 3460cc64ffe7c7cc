"""The README's comparison table: base, ITI, RepE, LoFiT, LoRA and RED on TruthfulQA (MC1/MC2, fold 0 test),
CLUTRR and MQuAKE (accuracy, val), with trainable parameter counts and wall time; plus the honesty table for
representation tuning (untuned, online steering, token-only tuning, representation tuning).

    python bench/methods_table.py --data /work/shared/data --out runs/methods            # everything
    python bench/methods_table.py --max-train 48 --max-eval 60 --epochs 2                 # a reduced run
    python bench/methods_table.py --seeds 42,43,44 --no-honesty --out runs/methods_seeds   # over seeds
    python bench/methods_table.py --out runs/methods_seeds --report                        # the seeds table
    python bench/methods_table.py --honesty-only --seeds 42 --out runs/honesty_seeds        # honesty, one seed
    python bench/methods_table.py --honesty-only --seeds 43 --honesty-rows token-only rep-heads rep-layers \
        --out runs/honesty_seeds                     # the tuned conditions of another seed (the rest is deterministic)

Every trained method follows one training recipe (`--recipe`, default the pipelines' default "plain": constant
learning rate, no EOS, the `Q: {q}\nA:` prompt, no clipping; "official" for the authors' choices), and every
method (base included) is evaluated with that recipe's prompt.

Every method goes through `lofit_fast.experiments.run_method`, which trains with the shared loop
(`lofit_fast.train.train`; TruthfulQA by DPO, CLUTRR/MQuAKE by completion cross-entropy), evaluates with
`lofit_fast.eval.evaluate` and hands the model back unchanged, so one loaded model serves every row.
Results are written after each row to OUT/results.json (a re-run skips rows already there; --fresh starts
over) and the tables to OUT/table.md. With --seeds each seed runs into OUT/seed_<seed>/ (so seeds can run in
separate processes at once), and OUT/summary.json and OUT/table.md give every row's mean ± sample standard
deviation over the seed folders present; a method left out of some seeds (the deterministic base model) is
reported over the seeds that have it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofit_fast._files import atomic_write  # noqa: E402
from lofit_fast.experiments import METHODS, run_method  # noqa: E402
from lofit_fast.experiments.recipes import DEFAULT_RECIPE, RECIPES  # noqa: E402
from lofit_fast.experiments.seeds import beyond_spread, mean_std, seed_folder_results  # noqa: E402

TASKS = ("truthfulqa", "clutrr", "mquake")
DEFAULT_METHODS = ("base", "iti", "repe", "lofit", "lora", "red")
HONESTY_ROWS = ("untuned", "steering", "token-only tuning", "rep. tuning (heads)", "rep. tuning (layers)")
HONESTY_KEYS = dict(zip(("untuned", "steering", "token-only", "rep-heads", "rep-layers"), HONESTY_ROWS))
CLUTRR_TRAIN = 300  # LoFiT trains CLUTRR on 300 examples


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=os.environ.get("LOFIT_FAST_DATA", "/work/shared/data"))
    p.add_argument("--honesty-dir", default=None, help="default: DATA/honesty")
    p.add_argument("--out", default=str(ROOT / "runs" / "methods"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--extra", action="append", default=[], metavar="NAME=METHOD:key=value,...",
                   help="an extra row: a method with other options, e.g. 'lofit lr 5e-2=lofit:lr=0.05'")
    p.add_argument("--max-train", type=int, default=None, help="training examples per task (default: all; CLUTRR 300)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluation examples per task (default: all)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", default=None, help="comma-separated seeds, each into OUT/seed_<seed>/ (e.g. 42,43,44)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                   help=f"training recipe of every trained method and the evaluation prompt (default {DEFAULT_RECIPE})")
    p.add_argument("--report", action="store_true", help="only write OUT/summary.json and OUT/table.md from OUT/seed_*/")
    p.add_argument("--repe-coeff", default="auto", help='"auto" (grid on training items) or a number')
    p.add_argument("--no-honesty", action="store_true", help="skip the honesty table")
    p.add_argument("--honesty-only", action="store_true", help="only the honesty table (no task rows)")
    p.add_argument("--honesty-rows", nargs="+", default=list(HONESTY_KEYS), choices=list(HONESTY_KEYS),
                   help="the honesty conditions to run (untuned and steering are deterministic: one seed is enough)")
    p.add_argument("--honesty-max-train", type=int, default=None, help="statements for the honesty tuning")
    p.add_argument("--honesty-max-eval", type=int, default=None, help="gpt4 facts scored in the honesty table")
    p.add_argument("--honesty-pairs", type=int, default=256, help="contrast pairs for the honesty direction")
    p.add_argument("--steer-coeff", type=float, default=2.0, help="coefficient of the honesty steering row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in OUT/results.json")
    args = p.parse_args(argv)
    if args.honesty_only and args.no_honesty:
        p.error("--honesty-only and --no-honesty exclude each other")
    if args.honesty_only:
        args.tasks = []
    if args.seeds is not None:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        if not args.seeds or len(set(args.seeds)) != len(args.seeds):
            p.error(f"--seeds must name distinct seeds, got {args.seeds}")
    return args


def recipe_kw(name: str) -> dict:
    """run_method's keywords for a training recipe (its clipping 0 means none)."""
    return {**RECIPES[name], "max_grad_norm": RECIPES[name]["max_grad_norm"] or None}


def load_results(path: Path, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    return {"rows": {}, "honesty": {}}


def save(path: Path, results: dict) -> None:
    atomic_write(path, json.dumps(results, indent=2) + "\n")


def task_items(args, task):
    from lofit_fast.data import load_split

    eval_split = "test" if task == "truthfulqa" else "val"
    limit = args.max_train if args.max_train is not None else (CLUTRR_TRAIN if task == "clutrr" else None)
    if task == "clutrr" and args.max_train is not None:
        limit = min(args.max_train, CLUTRR_TRAIN)
    train = load_split(task, args.data, "train", fold=0, limit=limit)
    evaluation = load_split(task, args.data, eval_split, fold=0, limit=args.max_eval)
    return train, evaluation, eval_split


def parse_extra(text: str):
    """`NAME=METHOD:key=value,key=value` → (NAME, METHOD, {key: value}) (numbers parsed)."""
    try:
        name, rest = text.split("=", 1)
        method, _, options = rest.partition(":")
        kw = {}
        for item in filter(None, options.split(",")):
            key, value = item.split("=", 1)
            try:
                kw[key] = float(value) if any(c in value for c in ".e") else int(value)
            except ValueError:
                kw[key] = value
    except ValueError:
        raise SystemExit(f"--extra must look like 'NAME=METHOD:key=value,...', got {text!r}") from None
    if method not in METHODS:
        raise SystemExit(f"--extra {text!r}: unknown method {method!r}")
    return name.strip(), method, kw


def run_tasks(args, model, tok, results, path):
    coeff = args.repe_coeff if args.repe_coeff == "auto" else float(args.repe_coeff)
    rows = [(m, m, {}) for m in args.methods] + [parse_extra(e) for e in args.extra]
    for task in args.tasks:
        train, evaluation, split = task_items(args, task)
        for name, method, extra in rows:
            key = f"{task}/{name}"
            if key in results["rows"]:
                print(f"[skip] {key} (already in {path})", flush=True)
                continue
            print(f"[run] {key}: {len(train)} train, {len(evaluation)} {split} ...", flush=True)
            torch.manual_seed(args.seed)
            kw = dict(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                      seed=args.seed, coeff=coeff, honesty_dir=args.honesty_dir, progress=False,
                      **recipe_kw(args.recipe))
            kw.update(extra)
            row = run_method(method, model, tok, task, train, evaluation, **kw)
            row["split"] = split
            row["name"] = name
            row["options"] = extra
            row["seed"] = args.seed
            row["recipe"] = args.recipe
            results["rows"][key] = row
            save(path, results)
            print(f"      {row['metrics']}  trainable {row['trainable_params']}  fit {row['seconds']:.0f}s  "
                  f"eval {row['eval_seconds']:.0f}s", flush=True)


def run_honesty(args, model, tok, results, path):
    """Untuned / steering / token-only / representation tuning on the A/B honesty prompts and TruthfulQA MC."""
    from lofit_fast.data import load_split
    from lofit_fast.eval import truthfulqa_mc
    from lofit_fast.experiments.recipes import with_prompt_style
    from lofit_fast.methods import rep_tuning as rt
    from lofit_fast.methods import repe
    from lofit_fast.patch import patched_modules, unpatch
    from lofit_fast.steer import decoder_layers, steer, unsteer

    layers = repe.middle_layers(model)
    rows = rt.load_fact_rows(args.honesty_dir)
    if args.honesty_max_train:
        rows = rows[: args.honesty_max_train]
    examples = rt.fact_ab_examples(rows)
    facts = rt.fact_ab_items(rt.load_fact_rows(args.honesty_dir, "gpt4_facts.csv"))
    if args.honesty_max_eval:
        facts = facts[: args.honesty_max_eval]
    choices = rt.honesty_choices(args.honesty_dir)
    recipe = recipe_kw(args.recipe)
    tqa = with_prompt_style(load_split("truthfulqa", args.data, "test", fold=0, limit=args.max_eval),
                            recipe["prompt_style"])
    directions = None

    def evaluate():
        scores = rt.honesty_eval(model, tok, facts, choices, batch_size=args.eval_batch_size)
        scores.update(truthfulqa_mc(model, tok, tqa, batch_size=args.eval_batch_size, progress=False))
        return scores

    for name in [HONESTY_KEYS[key] for key in args.honesty_rows]:
        if name in results["honesty"]:
            print(f"[skip] honesty/{name}", flush=True)
            continue
        print(f"[run] honesty/{name} ...", flush=True)
        if directions is None:
            t = time.perf_counter()
            directions = repe.honesty_vectors(model, tok, layers=layers, data_dir=args.honesty_dir, max_pairs=args.honesty_pairs,
                                              normalize=False, batch_size=args.batch_size)
            direction_seconds = time.perf_counter() - t
        t = time.perf_counter()
        trainable, snapshot = 0, None
        flags = [(p, p.requires_grad) for p in model.parameters()]
        if name == "steering":
            steer(model, {layer: v / len(layers) for layer, v in directions.items()}, coeff=args.steer_coeff)
        elif name != "untuned":
            kind = "layers" if "layers" in name else "heads"
            if kind == "layers":
                blocks = decoder_layers(model)
                snapshot = {layer: {k: v.detach().clone() for k, v in blocks[layer].state_dict().items()}
                            for layer in layers}
            torch.manual_seed(args.seed)
            record = rt.train(model, tok, examples, directions, layers=layers, w=0.0 if "token" in name else 1.0,
                              mode="in", trainable=kind, lr=5e-3 if kind == "heads" else 5e-5, epochs=args.epochs,
                              batch_size=args.batch_size, seed=args.seed, progress=False,
                              max_grad_norm=recipe["max_grad_norm"], schedule=recipe["schedule"],
                              add_eos=recipe["add_eos"])
            trainable = record["trainable_params"]
        fit_seconds = time.perf_counter() - t + (direction_seconds if name != "untuned" else 0.0)
        try:
            t = time.perf_counter()
            scores = evaluate()
            scores["alignment"] = float(sum(rt.alignment(model, tok, [f.prompt for f in facts[:32]], directions).values())
                                        / len(layers))
            eval_seconds = time.perf_counter() - t
        finally:
            if name == "steering":
                unsteer(model)
            if patched_modules(model):
                unpatch(model)
            if snapshot is not None:
                for layer, state in snapshot.items():
                    blocks[layer].load_state_dict(state)
            for p, flag in flags:
                p.requires_grad_(flag)
        results["honesty"][name] = {"metrics": scores, "trainable_params": trainable,
                                    "seconds": round(fit_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                                    "layers": layers, "train_statements": len(rows), "facts": len(facts),
                                    "choices": len(choices), "tqa_questions": len(tqa), "seed": args.seed,
                                    "recipe": args.recipe}
        save(path, results)
        print(f"      {scores}", flush=True)


def fmt_params(row) -> str:
    if row["trainable_params"]:
        return f"{row['trainable_params']:,}"
    if row.get("fitted_params"):
        return f"0 ({row['fitted_params']:,} fitted)"
    return "0"


def markdown(results: dict, command: str) -> str:
    rows = results["rows"]
    meta = results.get("meta", {})
    commands = meta.get("commands", [command])
    lines = [f"Model: {meta.get('model', '?')} ({meta.get('dtype', 'float32')}, {meta.get('device', 'cpu')}). "
             "Commands (in order; a re-run skips rows already done): "
             + "; ".join(f"`{c}`" for c in commands), ""]
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in rows))
    methods = [m for m in METHODS if m in names] + [n for n in names if n not in METHODS]
    if methods:
        lines += ["| method | TruthfulQA MC1 | TruthfulQA MC2 | CLUTRR acc | MQuAKE acc | trainable params | "
                  "fit time (s) |", "|---|---|---|---|---|---|---|"]
        for m in methods:
            get = lambda t, key: rows.get(f"{t}/{m}", {}).get("metrics", {}).get(key)  # noqa: E731
            cells = [get("truthfulqa", "mc1"), get("truthfulqa", "mc2"), get("clutrr", "accuracy"), get("mquake", "accuracy")]
            present = [rows[f"{t}/{m}"] for t in TASKS if f"{t}/{m}" in rows]
            params = " / ".join(dict.fromkeys(fmt_params(r) for r in present))
            seconds = " / ".join(f"{r['seconds']:.0f}" for r in present)
            lines.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                         + f" | {params} | {seconds} |")
        sizes = {t: (r["train_examples"], r["eval_examples"], r.get("split")) for k, r in rows.items()
                 for t in [k.split("/")[0]]}
        lines += ["", "Examples (train / eval, split): " + ", ".join(f"{t} {a} / {b} {s}" for t, (a, b, s) in sizes.items())
                  + ". Parameter counts and fit times per task, in the column order TruthfulQA / CLUTRR / MQuAKE "
                  "where they differ. ITI and RepE learn nothing by gradient descent; their fitted values (offsets, "
                  "steering vectors) are shown in brackets.", ""]
    honesty = results.get("honesty", {})
    if honesty:
        first = next(iter(honesty.values()))
        lines += [f"Honesty (layers {first['layers'][0]}..{first['layers'][-1]}; tuning on {first['train_statements']} "
                  f"true/false statements, A/B questions): facts = {first['facts']} GPT-4 facts (A) True / (B) False, "
                  f"choices = {first['choices']} hand-labelled honest choices; p = mean probability of the honest "
                  f"letter; TruthfulQA on {first['tqa_questions']} fold-0 test questions; alignment = mean cosine of "
                  "the last-token residual with the honesty direction.", "",
                  "| condition | facts acc | facts p | choices acc | choices p | TruthfulQA MC1 | TruthfulQA MC2 | "
                  "alignment | trainable params | fit time (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in HONESTY_ROWS:
            if name not in honesty:
                continue
            r = honesty[name]
            m = r["metrics"]
            lines.append(f"| {name} | {m['facts_acc']:.3f} | {m['facts_p']:.3f} | {m['choices_acc']:.3f} | "
                         f"{m['choices_p']:.3f} | {m['mc1']:.3f} | {m['mc2']:.3f} | {m['alignment']:.3f} | "
                         f"{r['trainable_params']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def rows_by_key(by_seed: dict, section: str) -> dict:
    """{key: {seed: row}} of one section ("rows" or "honesty") of every seed's results."""
    entries: dict = {}
    for seed, results in by_seed.items():
        for key, row in results.get(section, {}).items():
            entries.setdefault(key, {})[seed] = row
    return entries


def seed_stats(per_seed: dict) -> dict:
    """{"seeds", "metrics": {metric: mean_std}, "seconds": mean_std} of one row over the seeds that ran it."""
    first = next(iter(per_seed.values()))
    return {"seeds": list(per_seed),
            "metrics": {m: mean_std([float(r["metrics"][m]) for r in per_seed.values()]) for m in first["metrics"]},
            "seconds": mean_std([float(r["seconds"]) for r in per_seed.values()])}


def minus_over_seeds(ours: dict, per_seed: dict) -> dict:
    """{metric: mean_std of ours − that row per seed, "beyond_spread"} over the seeds both have; a deterministic
    row run once (base, untuned, steering) is compared with every seed of ours."""
    first = next(iter(per_seed.values()))
    theirs = {s: first for s in ours} if len(per_seed) == 1 else per_seed
    gaps = {}
    for metric in first["metrics"]:
        diffs = [float(ours[s]["metrics"][metric]) - float(theirs[s]["metrics"][metric]) for s in ours if s in theirs]
        if diffs:
            gap = mean_std(diffs)
            gap["beyond_spread"] = beyond_spread(gap, two_sided=True)
            gaps[metric] = gap
    return gaps


def summarize_seeds(by_seed: dict) -> dict:
    """{"seeds", "rows": {task/name: {"seeds", "metrics": {metric: mean_std}, "seconds": mean_std, params}},
    "lofit_minus": {task/name: {metric: mean_std of LoFiT − that row over the seeds both have, "beyond_spread"}}},
    plus summarize_honesty's keys when the seeds ran the honesty table."""
    entries = rows_by_key(by_seed, "rows")
    rows = {}
    for key, per_seed in entries.items():
        first = next(iter(per_seed.values()))
        rows[key] = {**seed_stats(per_seed), "trainable_params": first["trainable_params"],
                     "fitted_params": first.get("fitted_params", 0), "recipe": first.get("recipe")}
    gaps = {}
    for key, per_seed in entries.items():
        task, name = key.split("/", 1)
        ours = entries.get(f"{task}/lofit", {})
        if name != "lofit" and ours:
            gaps[key] = minus_over_seeds(ours, per_seed)
    return {"seeds": list(by_seed), "rows": rows, "lofit_minus": gaps, **summarize_honesty(by_seed)}


HONESTY_REFERENCE = "rep. tuning (heads)"  # representation tuning of LoFiT's head parameters


def summarize_honesty(by_seed: dict) -> dict:
    """The honesty table over seeds: {"honesty": {condition: {"seeds", "metrics": {metric: mean_std}, "seconds",
    "trainable_params", "recipe"}}, "honesty_minus": {condition: minus_over_seeds of HONESTY_REFERENCE}}; empty
    when no seed ran it."""
    entries = rows_by_key(by_seed, "honesty")
    if not entries:
        return {}
    honesty = {}
    for name, per_seed in entries.items():
        first = next(iter(per_seed.values()))
        honesty[name] = {**seed_stats(per_seed), "trainable_params": first["trainable_params"],
                         "recipe": first.get("recipe")}
    ours = entries.get(HONESTY_REFERENCE, {})
    minus = {name: minus_over_seeds(ours, per_seed) for name, per_seed in entries.items()
             if name != HONESTY_REFERENCE and ours}
    return {"honesty": honesty, "honesty_minus": minus}


def _pm(stat: dict, signed: bool = False) -> str:
    text = ("{:+.3f}" if signed else "{:.3f}").format(stat["mean"])
    return text + (f" ± {stat['std']:.3f}" if len(stat["values"]) > 1 else "")


COLUMNS = (("truthfulqa", "mc1", "TruthfulQA MC1"), ("truthfulqa", "mc2", "TruthfulQA MC2"),
           ("clutrr", "accuracy", "CLUTRR acc"), ("mquake", "accuracy", "MQuAKE acc"))


def seeds_markdown(summary: dict, commands: list) -> str:
    rows, gaps = summary["rows"], summary["lofit_minus"]
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in rows))
    names = [m for m in METHODS if m in names] + [n for n in names if n not in METHODS]
    recipes = sorted({r["recipe"] for r in [*rows.values(), *summary.get("honesty", {}).values()] if r.get("recipe")})
    header = "| method | " + " | ".join(c[2] for c in COLUMNS)
    lines = [f"Seeds {', '.join(map(str, summary['seeds']))}; mean ± sample standard deviation over the seeds that ran "
             f"the row (no ± : one seed, e.g. the deterministic base model); recipe {', '.join(recipes) or '?'}. "
             "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    if names:
        lines += task_seeds_markdown(rows, gaps, names, header)
    if summary.get("honesty"):
        lines += honesty_seeds_markdown(summary["honesty"], summary["honesty_minus"])
    return "\n".join(lines) + "\n"


def task_seeds_markdown(rows: dict, gaps: dict, names: list, header: str) -> list:
    lines = ["", header + " | trainable params | seeds | fit time (s, mean per task) |",
             "|---|" + "---|" * (len(COLUMNS) + 3)]
    for name in names:
        present = [rows[f"{t}/{name}"] for t in TASKS if f"{t}/{name}" in rows]
        cells = [_pm(rows[f"{t}/{name}"]["metrics"][m]) if f"{t}/{name}" in rows else "-" for t, m, _ in COLUMNS]
        params = " / ".join(dict.fromkeys(fmt_params(r) for r in present))
        seeds = " / ".join(dict.fromkeys(str(len(r["seeds"])) for r in present))
        seconds = " / ".join(f"{r['seconds']['mean']:.0f}" for r in present)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {params} | {seeds} | {seconds} |")
    if gaps:
        lines += ["", "LoFiT minus each row, per seed then mean ± standard deviation over seeds (* : beyond the spread):",
                  "", header + " |", "|---|" + "---|" * len(COLUMNS)]
        for name in names:
            if name == "lofit" or not any(f"{t}/{name}" in gaps for t in TASKS):
                continue
            cells = []
            for t, m, _ in COLUMNS:
                gap = gaps.get(f"{t}/{name}", {}).get(m)
                cells.append("-" if gap is None else _pm(gap, signed=True) + (" *" if gap["beyond_spread"] else ""))
            lines.append(f"| LoFiT − {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (in seed order):", "", header + " |", "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        cells = []
        for t, m, _ in COLUMNS:
            row = rows.get(f"{t}/{name}")
            cells.append("-" if row is None else " / ".join(f"{v:.3f}" for v in row["metrics"][m]["values"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


HONESTY_COLUMNS = (("facts_acc", "facts acc"), ("choices_acc", "choices acc"), ("mc1", "TruthfulQA MC1"),
                   ("mc2", "TruthfulQA MC2"), ("alignment", "alignment"))


def honesty_seeds_markdown(honesty: dict, minus: dict) -> list:
    header = "| condition | " + " | ".join(c[1] for c in HONESTY_COLUMNS)
    rule = "|---|" + "---|" * len(HONESTY_COLUMNS)
    names = [n for n in HONESTY_ROWS if n in honesty] + [n for n in honesty if n not in HONESTY_ROWS]
    lines = ["", "Honesty (representation tuning), mean ± sample standard deviation over the seeds that ran the row:",
             "", header + " | trainable params | seeds | fit time (s) |", rule + "---|---|---|"]
    for name in names:
        row = honesty[name]
        cells = [_pm(row["metrics"][m]) if m in row["metrics"] else "-" for m, _ in HONESTY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {row['trainable_params']:,} | {len(row['seeds'])} | {row['seconds']['mean']:.0f} |")
    if minus:
        lines += ["", f"{HONESTY_REFERENCE} minus each condition, per seed then mean ± standard deviation over seeds "
                  "(* : beyond the spread):", "", header + " |", rule]
        for name in names:
            if name not in minus:
                continue
            cells = [_pm(minus[name][m], signed=True) + (" *" if minus[name][m]["beyond_spread"] else "")
                     if m in minus[name] else "-" for m, _ in HONESTY_COLUMNS]
            lines.append(f"| {HONESTY_REFERENCE} − {name} | " + " | ".join(cells) + " |")
    return lines


def write_seed_report(out: Path) -> str:
    by_seed = seed_folder_results(str(out))
    if not by_seed:
        raise SystemExit(f"no seed_<seed>/results.json under {out}")
    summary = summarize_seeds(by_seed)
    commands = list(dict.fromkeys(c for r in by_seed.values() for c in r.get("meta", {}).get("commands", [])))
    table = seeds_markdown(summary, commands)
    atomic_write(out / "summary.json", json.dumps({**summary, "commands": commands}, indent=2) + "\n")
    atomic_write(out / "table.md", table)
    return table


def run_one(args, model, tok, folder: Path, command: str) -> None:
    """Every row (and the honesty table) for args.seed into folder/results.json."""
    path = folder / "results.json"
    results = load_results(path, args.fresh)
    commands = results.get("meta", {}).get("commands", [])
    if results.get("meta", {}).get("command") and not commands:
        commands = [results["meta"]["command"]]
    results["meta"] = {"model": args.model, "dtype": "float32", "device": "cpu", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                       "seed": args.seed, "recipe": args.recipe, "commands": commands + [command]}
    start = time.perf_counter()
    run_tasks(args, model, tok, results, path)
    if not args.no_honesty:
        run_honesty(args, model, tok, results, path)
    results["meta"]["last_run_seconds"] = round(time.perf_counter() - start, 1)
    save(path, results)
    if args.seeds is None:
        table = markdown(results, command)
        atomic_write(folder / "table.md", table)
        print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        print(write_seed_report(out))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.honesty_dir = args.honesty_dir or os.path.join(args.data, "honesty")
    from lofit_fast.models import load_model

    command = "python bench/methods_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    model, tok = load_model(args.model)
    for seed in args.seeds or [args.seed]:
        args.seed = seed
        folder = out / f"seed_{seed}" if args.seeds else out
        folder.mkdir(parents=True, exist_ok=True)
        if args.seeds:
            print(f"[seed {seed}] into {folder}", flush=True)
        run_one(args, model, tok, folder, command)
    if args.seeds:
        print(write_seed_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
