"""Task-specific heads against another task's heads, over seeds: the markdown table of two `lofit-fast run
--seeds ...` folders on the same task and evaluation items, one with step 1 on the task itself (OWN) and one
tuning heads selected on another task (CROSS, `--selection OTHER_SEEDS_RUN`). Per seed: both LoFiT arms, the
random-heads arm, the heads the two sets share, and the paired bootstrap interval of own − cross per item;
over seeds: mean ± sample standard deviation of each arm and of the differences.

    python bench/cross_task_table.py runs/mquake_plain runs/mquake_tqa_heads --out table.md
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from lofit_fast.eval import paired_bootstrap  # noqa: E402
from lofit_fast.experiments.seeds import beyond_spread, load_seeds_pair, mean_std  # noqa: E402
from table_cli import table_main  # noqa: E402


def compare(own_dir: str, cross_dir: str, samples: int = 10000) -> dict:
    """{"task", "seeds", "metrics", "source", "per_seed": {seed: {...}}, "over_seeds": {metric: {...}}}."""
    own, cross, seeds = load_seeds_pair(own_dir, cross_dir)
    task = own["summary"]["task"]
    metrics = list(own["summary"]["summary"]["lofit"])
    sources = {cross["runs"][s].get("selection_from", {}).get("task") for s in seeds}
    if None in sources:
        raise ValueError(f"{cross_dir} has a seed without heads from another task (no selection_from)")
    per_seed = {}
    for s in seeds:
        a, b = own["runs"][s], cross["runs"][s]
        if a["eval_examples"] != b["eval_examples"] or a["hyperparameters"] != b["hyperparameters"]:
            raise ValueError(f"seed {s}: the two runs differ in evaluation items or hyper-parameters")
        row = {"own": a["lofit"], "cross": b["lofit"], "random": a["random"],
               "shared_heads": len({tuple(h) for h in a["heads"]} & {tuple(h) for h in b["heads"]}),
               "own_heads": a["heads"], "cross_heads": b["heads"], "paired": {}}
        for m in metrics:
            ours, theirs = a["item_scores"]["lofit"][m], b["item_scores"]["lofit"][m]
            row["paired"][m] = paired_bootstrap(ours, theirs, samples=samples)
        per_seed[s] = row
    over = {}
    for m in metrics:
        cols = {name: [per_seed[s][name][m] for s in seeds] for name in ("own", "cross", "random")}
        own_minus_cross = [o - c for o, c in zip(cols["own"], cols["cross"])]
        cross_minus_random = [c - r for c, r in zip(cols["cross"], cols["random"])]
        over[m] = {name: mean_std(v) for name, v in cols.items()}
        over[m]["own - cross"] = mean_std(own_minus_cross)
        over[m]["cross - random"] = mean_std(cross_minus_random)
    return {"task": task, "seeds": seeds, "metrics": metrics, "source": sorted(sources),
            "eval_examples": own["runs"][seeds[0]]["eval_examples"], "per_seed": per_seed, "over_seeds": over}


def render(own_dir: str, cross_dir: str, samples: int = 10000) -> str:
    r = compare(own_dir, cross_dir, samples)
    ms, src = r["metrics"], "/".join(r["source"])
    lines = [f"{r['task']}, {r['eval_examples']} evaluation items, seeds {', '.join(map(str, r['seeds']))}: LoFiT "
             f"with heads selected on {r['task']} (own) against heads selected on {src} (cross), each seed paired "
             f"with the same seed's selection, initialization and data order (mean ± sample standard deviation "
             f"over seeds)", "", "| arm | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    names = {"own": f"LoFiT, {r['task']} heads", "cross": f"LoFiT, {src} heads", "random": "random heads",
             "own - cross": "own − cross", "cross - random": "cross − random"}
    for key, label in names.items():
        signed = "-" in key
        cells = []
        for m in ms:
            row = r["over_seeds"][m][key]
            mean, std = row["mean"], row["std"]
            beyond = " (beyond the spread)" if signed and beyond_spread(row, two_sided=True) else ""
            cells.append(f"{mean:+.3f} ± {std:.3f}{beyond}" if signed else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | " + " | ".join(f"own {m} | cross {m} | own − cross {m} (paired 95 %)" for m in ms)
              + " | shared heads | cross heads |", "|---|" + "---|" * (3 * len(ms) + 2)]
    for s, row in r["per_seed"].items():
        cells = []
        for m in ms:
            p = row["paired"][m]
            cells += [f"{row['own'][m]:.3f}", f"{row['cross'][m]:.3f}",
                      f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"]
        cells += [f"{row['shared_heads']} of {len(row['own_heads'])}",
                  " ".join(f"{l}:{h}" for l, h in row["cross_heads"])]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def make(args):
        return render(args.own, args.cross, args.samples), compare(args.own, args.cross, args.samples)
    return table_main(argv, prog="cross_task_table", description=__doc__.split("\n")[0], make=make, samples=True,
                      folders=[("own", "the seeds run with the task's own step 1"),
                               ("cross", "the seeds run with --selection from another task")])


if __name__ == "__main__":
    raise SystemExit(main())
