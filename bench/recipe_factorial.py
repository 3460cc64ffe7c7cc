"""The recipe factorial of issue 16 (`lofit_fast.experiments.factorial`): LoFiT step 2 on fixed heads under
schedule × EOS × prompt, one folder per factorial, resumable and splittable over processes by --cells.
Writes OUT/cells/*.json, OUT/base_*.json and the report OUT/factorial.md / factorial.json.

    # the heads of an earlier run, the 8 cells in two processes of one thread each
    python bench/recipe_factorial.py --data ../shared/data --heads-from bench/results/lofit_smollm2/truthfulqa.json \\
        --out runs/factorial --cells official,linear-eos-newline,linear-noeos-official,constant-eos-official --threads 1 &
    python bench/recipe_factorial.py --data ../shared/data --heads-from bench/results/lofit_smollm2/truthfulqa.json \\
        --out runs/factorial --cells plain,constant-noeos-official,constant-eos-newline,linear-noeos-newline --threads 1
    python bench/recipe_factorial.py --out runs/factorial --report   # the table of what is there
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofit_fast.cli.common import heads_arg, seeds_arg  # noqa: E402
from lofit_fast.experiments import RunSettings, task_items  # noqa: E402
from lofit_fast.experiments.factorial import Cell, all_cells, markdown, run_factorial, write_report  # noqa: E402


def heads_from(path: str):
    """The heads of a results.json (`heads`) or a selection.json (its top K)."""
    with open(path) as f:
        payload = json.load(f)
    if "heads" in payload:
        return [tuple(h) for h in payload["heads"]]
    from lofit_fast.methods import HeadSelection

    return HeadSelection.load(path).top()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the factorial's folder (shared by the processes that split it)")
    p.add_argument("--report", action="store_true", help="only write and print the report of the cells there")
    p.add_argument("--data", help="data folder with truthfulqa/")
    p.add_argument("--heads", type=heads_arg, help="the fixed heads, layer:head,...")
    p.add_argument("--heads-from", help="a results.json or selection.json to take the heads from")
    p.add_argument("--cells", default="all", help="comma-separated cells (e.g. official,plain,"
                   "constant-eos-official) or all (default)")
    p.add_argument("--seeds", type=seeds_arg, default=[42])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping for every cell (0: none)")
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-eval", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--backend", default="auto")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(write_report(args.out)), end="")
        return 0
    if not args.data or bool(args.heads) == bool(args.heads_from):
        p.error("--data and exactly one of --heads / --heads-from are needed (or --report)")
    heads = args.heads or heads_from(args.heads_from)
    try:
        cells = all_cells() if args.cells == "all" else [Cell.parse(c.strip()) for c in args.cells.split(",")]
    except ValueError as e:
        p.error(str(e))
    settings = RunSettings(task="truthfulqa", out=args.out, model=args.model, fold=args.fold, epochs=args.epochs,
                           batch_size=args.batch_size,
                           lr=args.lr, max_grad_norm=args.max_grad_norm, threads=args.threads, backend=args.backend,
                           quiet=args.quiet, max_train=args.max_train, max_eval=args.max_eval)
    train = task_items("truthfulqa", args.data, "train", fold=args.fold, max_train=args.max_train)
    evaluation = task_items("truthfulqa", args.data, "eval", fold=args.fold, max_eval=args.max_eval)
    run_factorial(settings, train, evaluation, heads, cells=cells, seeds=args.seeds, out=args.out)
    print(markdown(write_report(args.out)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
