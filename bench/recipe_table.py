"""Two recipes over seeds: the markdown table of two `lofit-fast run --seeds ...` folders on the same task and
evaluation items that differ in their training settings (e.g. `--recipe plain` and `--recipe official`). Each
seed of one is paired with the same seed of the other (the same random heads, which the seed draws). Per arm
that both runs have (base, LoFiT, random heads) and metric: both runs' mean ± sample standard deviation over
seeds, and B − A per seed with its paired bootstrap interval over the items, then over seeds.

    python bench/recipe_table.py runs/clutrr_plain runs/clutrr_official --out table.md --json diff.json
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from lofit_fast.eval import paired_bootstrap  # noqa: E402
from lofit_fast.experiments.seeds import ARMS, beyond_spread, load_seeds_pair, mean_std  # noqa: E402
from table_cli import table_main  # noqa: E402

PER_SEED_KEYS = ("seed",)  # hyper-parameters that differ between the seeds of one run, not between the runs
LABELS = {"base": "base", "lofit": "LoFiT", "random": "random heads"}


def _label(run: dict, fallback: str) -> str:
    first = next(iter(run["runs"].values()))
    return str(first["hyperparameters"].get("recipe") or fallback)


def compare(a_dir: str, b_dir: str, samples: int = 10000) -> dict:
    """{"task", "seeds", "metrics", "labels": [A, B], "settings": {key: [A's, B's]} (those that differ),
    "per_seed": {seed: {arm: {metric: {"a", "b", "paired"}}}}, "over_seeds": {arm: {metric: {"a", "b",
    "b - a"}}}, "lofit_minus_random": {metric: {"a", "b"}}}."""
    a, b, seeds = load_seeds_pair(a_dir, b_dir)
    task = a["summary"]["task"]
    hp_a, hp_b = a["runs"][seeds[0]]["hyperparameters"], b["runs"][seeds[0]]["hyperparameters"]
    settings = {k: [hp_a.get(k), hp_b.get(k)] for k in sorted(set(hp_a) | set(hp_b))
                if k not in PER_SEED_KEYS and hp_a.get(k) != hp_b.get(k)}
    if not settings:
        raise ValueError(f"{a_dir} and {b_dir} have the same settings: nothing to compare")
    metrics = list(a["summary"]["summary"]["lofit"])
    # the arms both runs have for every seed (a run stopped after LoFiT's evaluation has no random heads)
    arms = [arm for arm in ARMS if all(arm in run["runs"][s] for run in (a, b) for s in seeds)]
    per_seed = {}
    for s in seeds:
        ra, rb = a["runs"][s], b["runs"][s]
        if ra["eval_examples"] != rb["eval_examples"]:
            raise ValueError(f"seed {s}: {ra['eval_examples']} evaluation items against {rb['eval_examples']}")
        if "random" in arms and ra.get("random_heads") != rb.get("random_heads"):
            raise ValueError(f"seed {s}: the two runs tuned different random heads, so they are not paired")
        per_seed[s] = {arm: {m: {"a": ra[arm][m], "b": rb[arm][m],
                                 "paired": paired_bootstrap(rb["item_scores"][arm][m], ra["item_scores"][arm][m],
                                                            samples=samples)}
                             for m in metrics} for arm in arms}
        per_seed[s]["shared_heads"] = len({tuple(h) for h in ra["heads"]} & {tuple(h) for h in rb["heads"]})
    over = {}
    for arm in arms:
        over[arm] = {}
        for m in metrics:
            col_a = [per_seed[s][arm][m]["a"] for s in seeds]
            col_b = [per_seed[s][arm][m]["b"] for s in seeds]
            diff = mean_std([y - x for x, y in zip(col_a, col_b)])
            diff["beyond_spread"] = beyond_spread(diff, two_sided=True)
            over[arm][m] = {"a": mean_std(col_a), "b": mean_std(col_b), "b - a": diff}
    gains = {}
    for m in metrics:
        gains[m] = {}
        for side, run in (("a", a), ("b", b)):
            if not all("random" in run["runs"][s] for s in seeds):
                continue
            row = mean_std([run["runs"][s]["lofit"][m] - run["runs"][s]["random"][m] for s in seeds])
            row["beyond_spread"] = beyond_spread(row)
            gains[m][side] = row
    return {"task": task, "seeds": seeds, "metrics": metrics, "arms": arms,
            "labels": [_label(a, a_dir), _label(b, b_dir)],
            "eval_examples": a["runs"][seeds[0]]["eval_examples"], "settings": settings, "per_seed": per_seed,
            "over_seeds": over, "lofit_minus_random": gains}


def _pm(row: dict, signed: bool = False) -> str:
    text = f"{row['mean']:+.3f}" if signed else f"{row['mean']:.3f}"
    return text + f" ± {row['std']:.3f}" + (" *" if signed and row.get("beyond_spread") else "")


def _interval(p: dict) -> str:
    return f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"


def render(report: dict) -> str:
    la, lb = report["labels"]
    seeds = report["seeds"]
    changed = ", ".join(f"{k} {va} / {vb}" for k, (va, vb) in report["settings"].items())
    lines = [f"{report['task']}, {report['eval_examples']} evaluation items, seeds {', '.join(map(str, seeds))}: "
             f"{la} (A) against {lb} (B), each seed paired with the same seed (mean ± sample standard deviation "
             f"over seeds; * : the difference is beyond its spread)", "", f"Settings that differ (A / B): {changed}",
             "", f"| arm | metric | {la} | {lb} | {lb} − {la} |", "|---|---|---|---|---|"]
    arms = report["arms"]
    for arm in arms:
        for m in report["metrics"]:
            row = report["over_seeds"][arm][m]
            lines.append(f"| {LABELS[arm]} | {m} | {_pm(row['a'])} | {_pm(row['b'])} | {_pm(row['b - a'], True)} |")
    for m in report["metrics"]:
        g = report["lofit_minus_random"][m]
        if g:
            cells = [_pm(g[side], True) if side in g else "—" for side in ("a", "b")]
            lines.append(f"| LoFiT − random heads | {m} | {cells[0]} | {cells[1]} | |")
    lines += ["", f"Per seed, {lb} − {la} paired over the items (95 % bootstrap):", "",
              "| seed | metric | " + " | ".join(f"{LABELS[arm]}: {la} → {lb}, difference" for arm in arms)
              + " | LoFiT heads shared |", "|---|---|" + "---|" * (len(arms) + 1)]
    for s in seeds:
        row = report["per_seed"][s]
        for m in report["metrics"]:
            cells = [f"{row[arm][m]['a']:.3f} → {row[arm][m]['b']:.3f}, {_interval(row[arm][m]['paired'])}"
                     for arm in arms]
            lines.append(f"| {s} | {m} | " + " | ".join(cells) + f" | {row['shared_heads']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def make(args):
        report = compare(args.a, args.b, args.samples)
        return render(report), report
    return table_main(argv, prog="recipe_table", description=__doc__.split("\n")[0], make=make, samples=True,
                      folders=[("a", "a `run --seeds` folder (A)"),
                               ("b", "a `run --seeds` folder on the same task and items with other settings (B)")])


if __name__ == "__main__":
    raise SystemExit(main())
