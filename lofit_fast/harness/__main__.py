"""python -m lofit_fast.harness: lm-eval scores of the base model and one or more adapters on the local data."""
from __future__ import annotations

import argparse
import json
import sys

from .._files import atomic_write
from . import TASKS, evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lofit_fast.harness", description=__doc__)
    ap.add_argument("--data", required=True, help="the data folder (truthfulqa/, clutrr/, mquake/)")
    ap.add_argument("--tasks", default="lofit_truthfulqa_mc1,lofit_truthfulqa_mc2", help=f"comma list of {TASKS}")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="an adapter to score (repeatable); the base model is always scored as 'base'")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N items of each split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="score each (context, choice) request whole, as HFLM does, instead of running each shared "
                         "context once (the same numbers to float rounding, several times slower)")
    ap.add_argument("--out", help="write {adapter: {task: score}} as JSON here")
    args = ap.parse_args(argv)
    adapters = {"base": None}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in adapters:
            ap.error(f"--adapter {name!r} given twice (or named 'base')")
        adapters[name] = path
    table = evaluate(args.data, adapters, tasks=[t.strip() for t in args.tasks.split(",")], model=args.model,
                     fold=args.fold, limit=args.limit, batch_size=args.batch_size, backend=args.backend,
                     shared_prefix=not args.no_shared_prefix)
    for name, row in table.items():
        print(name, " ".join(f"{t}={v:.4f}" for t, v in row.items()))
    if args.out:
        atomic_write(args.out, json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
