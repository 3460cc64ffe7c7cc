"""Paired significance for a finished `lofit-fast run`: LoFiT vs base and vs random heads, question by question
(`lofit_fast.experiments.paired_evaluation`).

Re-evaluates the base model, the run's LoFiT adapter and the random-heads baseline (re-tuned with the run's
own heads, seed and hyper-parameters; the run does not keep that adapter) on the same evaluation items,
shows whether the aggregate metrics reproduce results.json, and writes `paired.json` next to it with a
percentile bootstrap interval of the per-question difference for every metric.

    python bench/paired_eval.py --run runs/truthfulqa --data ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofit_fast.experiments import paired_evaluation  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the --out folder of a finished `lofit-fast run`")
    p.add_argument("--data", required=True, help="the data folder the run used")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--samples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    args = p.parse_args(argv)
    report = paired_evaluation(args.run, args.data, threads=args.threads, samples=args.samples)
    print(f"\n{report['task']}: {report['eval_examples']} items; mean difference and 95% bootstrap interval, "
          f"p = P(not better)")
    for name, stats in report["paired"].items():
        print(f"  {name:28s} {stats['mean_diff']:+.4f}  [{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]  "
              f"p = {stats['p_not_better']:.4f}")
    for name, row in report["reproduced"].items():
        print(f"  {name:6s} now {row['now']}  results.json {row['results.json']}")
    print(f"wrote {os.path.join(args.run, 'paired.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
