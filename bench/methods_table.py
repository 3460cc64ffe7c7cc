"""The README's comparison table: base, ITI, RepE, LoFiT, LoRA and RED on TruthfulQA (MC1/MC2, fold 0 test),
CLUTRR and MQuAKE (accuracy, val), with trainable parameter counts and wall time; plus the honesty table for
representation tuning (untuned, online steering, token-only tuning, representation tuning).

    python bench/methods_table.py --data /work/shared/data --out runs/methods            # everything
    python bench/methods_table.py --max-train 48 --max-eval 60 --epochs 2                 # a reduced run

Every method goes through `lofit_fast.experiments.run_method`, which trains with the shared loop
(`lofit_fast.train.train`; TruthfulQA by DPO, CLUTRR/MQuAKE by completion cross-entropy), evaluates with
`lofit_fast.eval.evaluate` and hands the model back unchanged, so one loaded model serves every row.
Results are written after each row to OUT/results.json (a re-run skips rows already there; --fresh starts
over) and the tables to OUT/table.md.
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

TASKS = ("truthfulqa", "clutrr", "mquake")
DEFAULT_METHODS = ("base", "iti", "repe", "lofit", "lora", "red")
HONESTY_ROWS = ("untuned", "steering", "token-only tuning", "rep. tuning (heads)", "rep. tuning (layers)")
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
    p.add_argument("--repe-coeff", default="auto", help='"auto" (grid on training items) or a number')
    p.add_argument("--no-honesty", action="store_true", help="skip the honesty table")
    p.add_argument("--honesty-max-train", type=int, default=None, help="statements for the honesty tuning")
    p.add_argument("--honesty-max-eval", type=int, default=None, help="gpt4 facts scored in the honesty table")
    p.add_argument("--honesty-pairs", type=int, default=256, help="contrast pairs for the honesty direction")
    p.add_argument("--steer-coeff", type=float, default=2.0, help="coefficient of the honesty steering row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in OUT/results.json")
    return p.parse_args(argv)


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
                      seed=args.seed, coeff=coeff, honesty_dir=args.honesty_dir, progress=False)
            kw.update(extra)
            row = run_method(method, model, tok, task, train, evaluation, **kw)
            row["split"] = split
            row["name"] = name
            row["options"] = extra
            results["rows"][key] = row
            save(path, results)
            print(f"      {row['metrics']}  trainable {row['trainable_params']}  fit {row['seconds']:.0f}s  "
                  f"eval {row['eval_seconds']:.0f}s", flush=True)


def run_honesty(args, model, tok, results, path):
    """Untuned / steering / token-only / representation tuning on the A/B honesty prompts and TruthfulQA MC."""
    from lofit_fast.data import load_split
    from lofit_fast.eval import truthfulqa_mc
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
    tqa = load_split("truthfulqa", args.data, "test", fold=0, limit=args.max_eval)
    directions = None

    def evaluate():
        scores = rt.honesty_eval(model, tok, facts, choices, batch_size=args.eval_batch_size)
        scores.update(truthfulqa_mc(model, tok, tqa, batch_size=args.eval_batch_size, progress=False))
        return scores

    for name in HONESTY_ROWS:
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
                              batch_size=args.batch_size, seed=args.seed, progress=False)
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
                                    "choices": len(choices), "tqa_questions": len(tqa)}
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.honesty_dir = args.honesty_dir or os.path.join(args.data, "honesty")
    from lofit_fast.models import load_model

    out = Path(args.out)
    path = out / "results.json"
    results = load_results(path, args.fresh)
    command = "python bench/methods_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    model, tok = load_model(args.model)
    commands = results.get("meta", {}).get("commands", [])
    if results.get("meta", {}).get("command") and not commands:
        commands = [results["meta"]["command"]]
    results["meta"] = {"model": args.model, "dtype": "float32", "device": "cpu", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                       "commands": commands + [command]}
    start = time.perf_counter()
    run_tasks(args, model, tok, results, path)
    if not args.no_honesty:
        run_honesty(args, model, tok, results, path)
    results["meta"]["last_run_seconds"] = round(time.perf_counter() - start, 1)
    save(path, results)
    table = markdown(results, command)
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
