"""lm-evaluation-harness beside lofit_fast for a finished `lofit-fast run`: base, LoFiT and random heads scored
by lm-eval on the run's own evaluation items (`lofit_fast.experiments.judge`), with the run's numbers and the
gains side by side; writes RUN/lm_eval.json and prints a markdown table.

    lofit-fast run --task truthfulqa --data ../shared/data --out runs/truthfulqa
    python bench/lm_eval_compare.py --run runs/truthfulqa --data ../shared/data
    # or every seed of a `lofit-fast run --seeds` folder (the base model scored once), mean ± std over seeds
    python bench/lm_eval_compare.py --seeds-run runs/tqa_plain --data ../shared/data
    # or the adapters of a recipe factorial (bench/recipe_factorial.py), against the factorial's own gains
    python bench/lm_eval_compare.py --factorial runs/factorial --data ../shared/data --cells official,plain
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofit_fast.experiments.judge import (  # noqa: E402
    lm_eval_comparison, lm_eval_factorial, lm_eval_seeds, markdown, markdown_factorial)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="the --out folder of a finished `lofit-fast run`")
    what.add_argument("--seeds-run", help="the --out folder of a finished `lofit-fast run --seeds ...`")
    what.add_argument("--factorial", help="the --out folder of bench/recipe_factorial.py")
    p.add_argument("--cells", help="with --factorial: comma-separated cells (default: every finished one)")
    p.add_argument("--data", required=True, help="the data folder the run used")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rescore", action="store_true",
                   help="with --seeds-run: score every seed again, even those with an up-to-date lm_eval.json")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    if args.factorial:
        cells = args.cells.split(",") if args.cells else None
        report = lm_eval_factorial(args.factorial, args.data, cells=cells, batch_size=args.batch_size,
                                   backend=args.backend)
        print(markdown_factorial(report))
        return 0
    if args.seeds_run:
        summary = lm_eval_seeds(args.seeds_run, args.data, batch_size=args.batch_size, backend=args.backend,
                                reuse=not args.rescore)
        print(markdown(summary))
        return 0
    report = lm_eval_comparison(args.run, args.data, batch_size=args.batch_size, backend=args.backend)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
