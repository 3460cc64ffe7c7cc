"""The markdown table of a `lofit-fast run --seeds ...` folder: every arm's mean ± standard deviation over the
seeds, LoFiT's gains with their spread, each seed's values and paired intervals, the heads, and each stage's
wall time.

    python bench/seeds_table.py runs/tqa_plain            # reads runs/tqa_plain/summary.json and seed_*/results.json
    python bench/seeds_table.py runs/tqa_plain --out bench/results/lofit_smollm2/truthfulqa_plain_seeds.md
    python bench/seeds_table.py runs/tqa_plain --summarize  # seeds run as separate processes: summary.json first
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from lofit_fast.experiments.seeds import load_seeds_run, report_seed_folders  # noqa: E402
from table_cli import table_main  # noqa: E402

STAGES = ("eval_base", "select", "tune", "eval_lofit", "tune_random", "eval_random")


def _pm(row: dict, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(row['mean'])} ± {row['std']:.3f}"


def render(run_dir: str) -> str:
    loaded = load_seeds_run(run_dir)
    summary, runs = loaded["summary"], loaded["runs"]
    seeds = summary["seeds"]
    metrics = list(summary["summary"]["lofit"])
    k = summary["k"]
    lines = [f"{summary['task']}, {summary['eval_examples']} evaluation items, model {summary['model']}, K = {k}, "
             f"seeds {', '.join(map(str, seeds))} (mean ± sample standard deviation over seeds; base is deterministic)",
             "", "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    arms = summary["summary"]  # a run stopped after LoFiT's evaluation has no random-heads arm
    for arm, label in (("base", "base"), ("lofit", f"LoFiT (top {k})"), ("random", f"random {k} heads")):
        if arm in arms:
            lines.append(f"| {label} | " + " | ".join(_pm(arms[arm][m]) for m in metrics) + " |")
    for other in ("base", "random"):
        gains = summary.get(f"lofit_minus_{other}")
        if gains is None:
            continue
        lines.append(f"| LoFiT − {other} | " + " | ".join(
            _pm(gains[m], signed=True) + (" (beyond the spread)" if gains[m]["beyond_spread"] else "")
            for m in metrics) + " |")
    lines += ["", "| seed | " + " | ".join(f"LoFiT {m}" for m in metrics) + " | "
              + " | ".join(f"random {m}" for m in metrics) + " | "
              + " | ".join(f"LoFiT − random {m} (paired 95 %)" for m in metrics) + " | heads | seconds |",
              "|---|" + "---|" * (3 * len(metrics) + 2)]
    for s, r in runs.items():
        paired = r.get("paired", {})
        cells = [f"{r['lofit'][m]:.3f}" for m in metrics]
        cells += [f"{r['random'][m]:.3f}" if "random" in r else "—" for m in metrics]
        for m in metrics:
            p = paired.get(f"lofit - random ({m})")
            cells.append("—" if p is None else f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]")
        heads = " ".join(f"{l}:{h}" for l, h in r["heads"])
        stages = r.get("seconds_by_stage", {})
        cells += [heads, f"{sum(stages.get(x, 0) for x in STAGES):.0f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    stage_rows = [[f"{runs[s]['seconds_by_stage'][x]:.0f}" if x in runs[s].get("seconds_by_stage", {}) else "—"
                   for x in STAGES] for s in seeds]
    lines += ["", "| seed | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    lines += [f"| {s} | " + " | ".join(row) + " |" for s, row in zip(seeds, stage_rows)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def make(args):
        if args.summarize:
            report_seed_folders(args.run_dir)
        return render(args.run_dir), None
    return table_main(argv, prog="seeds_table", description=__doc__.split("\n")[0], with_json=False, make=make,
                      folders=[("run_dir", "the --out folder of `lofit-fast run --seeds ...`")],
                      flags=[("--summarize", "first rebuild RUN_DIR/summary.json from every seed_<seed>/results.json "
                                             "(seeds run as separate processes into one folder)")])


if __name__ == "__main__":
    raise SystemExit(main())
