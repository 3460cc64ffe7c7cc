"""Paired significance for a finished `lofit-fast run`: LoFiT vs base and vs random heads, question by question.

Re-evaluates the base model, the run's LoFiT adapter and the random-heads baseline (re-tuned with the run's
own heads, seed and hyper-parameters; the run does not keep that adapter) on the same evaluation items,
checks that the aggregate metrics reproduce results.json, and writes `paired.json` next to it with a
percentile bootstrap interval of the per-question difference for every metric.

    python bench/paired_eval.py --run runs/truthfulqa --data ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofit_fast import cli  # noqa: E402
from lofit_fast._files import atomic_write  # noqa: E402
from lofit_fast.adapter import load_adapter  # noqa: E402
from lofit_fast.eval import evaluate, paired_bootstrap  # noqa: E402
from lofit_fast.patch import unpatch  # noqa: E402


def per_item_scores(task, model, tokenizer, items, batch_size):
    """{metric: [score per item]} and the aggregate {metric: mean}."""
    if task == "truthfulqa":
        out = evaluate(task, model, tokenizer, items, batch_size=batch_size, return_items=True)
        scores = {m: [r[m] for r in out["items"]] for m in ("mc1", "mc2")}
    else:
        out = evaluate(task, model, tokenizer, items, batch_size=batch_size, return_predictions=True)
        scores = {"accuracy": [float(r["correct"]) for r in out["predictions"]]}
    return scores, {m: sum(v) / len(v) for m, v in scores.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the --out folder of a finished `lofit-fast run`")
    p.add_argument("--data", required=True, help="the data folder the run used")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--samples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    args = p.parse_args(argv)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    hyper = results["hyperparameters"]
    ns = argparse.Namespace(**{**hyper, "task": results["task"], "model": results["model"], "data": args.data,
                               "device": "cpu", "threads": args.threads, "quiet": False, "eval_batch_size": 16})
    model, tokenizer = cli.load_model_from_args(ns)
    eval_items = cli.load_items(ns, "eval")
    train_items = cli.load_items(ns, "train")
    if len(eval_items) != results["eval_examples"] or len(train_items) != results["train_examples"]:
        raise SystemExit(f"{run}: the data gives {len(train_items)} / {len(eval_items)} examples, the run had "
                         f"{results['train_examples']} / {results['eval_examples']}")
    task, start = results["task"], time.perf_counter()
    scores, means = {}, {}
    scores["base"], means["base"] = per_item_scores(task, model, tokenizer, eval_items, 16)
    load_adapter(model, run / "adapter")
    scores["lofit"], means["lofit"] = per_item_scores(task, model, tokenizer, eval_items, 16)
    unpatch(model)
    heads = [tuple(h) for h in results["random_heads"]]
    model, _ = cli._tune(ns, model, tokenizer, train_items, heads, "random heads (re-tuned): tune v")
    scores["random"], means["random"] = per_item_scores(task, model, tokenizer, eval_items, 16)
    unpatch(model)

    report = {"run": str(run), "task": task, "model": results["model"], "eval_examples": len(eval_items),
              "reproduced": {name: {"now": means[name], "results.json": results[name]} for name in means},
              "paired": {}, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    print(f"\n{task}: {len(eval_items)} items; mean difference and 95% bootstrap interval, p = P(not better)")
    for other in ("base", "random"):
        for metric in scores["lofit"]:
            stats = paired_bootstrap(scores["lofit"][metric], scores[other][metric], samples=args.samples)
            report["paired"][f"lofit - {other} ({metric})"] = stats
            print(f"  lofit − {other:6s} {metric:8s} {stats['mean_diff']:+.4f}  "
                  f"[{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]  p = {stats['p_not_better']:.4f}")
    for name in means:
        print(f"  {name:6s} now {means[name]}  results.json {results[name]}")
    atomic_write(run / "paired.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {run / 'paired.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
