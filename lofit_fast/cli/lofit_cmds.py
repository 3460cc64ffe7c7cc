"""The LoFiT commands: `select` (step 1), `tune` (step 2), `run` (base + LoFiT + random heads, or a relative
with --method) and `demo`."""
from __future__ import annotations

import os
import shutil
import tempfile

from ..adapter import save_adapter
from ..analysis import plot_head_scores
from ..data import builtin_fictional
from ..experiments import (
    hyperparameters,
    load_selection,
    run_experiment,
    run_method_experiment,
    run_seeds,
    select,
    tune_heads,
)
from ..experiments.lofit_run import trainable_count
from ..experiments.settings import launch
from ..methods import default_k, random_heads
from .common import (
    DATA_ENV,
    UserError,
    add_data_arguments,
    add_model_arguments,
    add_training_arguments,
    heads_arg,
    load_items,
    load_model_from_args,
    nonnegative_int,
    positive_int,
    seeds_arg,
    table,
)

RUN_METHODS = ("lofit", "iti", "repe", "lora", "red")
DEMO_TRAIN, DEMO_EVAL, DEMO_EPOCHS, DEMO_BATCH = 48, 48, 2, 8
# The built-in task: 16 of its 48 training questions in batches of 4 (152 CPU-seconds against 274 for all 48 in
# batches of 8; LoFiT − base MC1 +0.19 [+0.09, +0.28] against +0.36, both clear of zero), and the first 64 of its
# 160 test questions (evaluating three arms is now more than half of the demo's time).
BUILTIN_TRAIN, BUILTIN_EVAL, BUILTIN_BATCH = 16, 64, 4


def cmd_select(args) -> int:
    train_items = load_items(args, "train")
    model, tokenizer = load_model_from_args(args)
    selection = select(args, model, tokenizer, train_items)
    selection.meta["model"] = args.model
    out = args.out
    os.makedirs(out, exist_ok=True)
    selection.save(os.path.join(out, "selection.json"))
    plot_head_scores(selection, os.path.join(out, "heads.png"))
    print(f"top {selection.k} heads (layer, head, ‖A‖₂):")
    for layer, head, score in selection.ranked()[: selection.k]:
        print(f"  {layer:3d} {head:3d}  {score:.5f}")
    print(f"wrote {os.path.join(out, 'selection.json')} and {os.path.join(out, 'heads.png')}")
    return 0


def _heads_for_tune(args, model):
    if args.random:
        return random_heads(model, args.k or default_k(model), seed=args.seed), None
    if args.heads:
        return args.heads, None
    selection = load_selection(args.selection, model, seed=args.seed)
    return selection.top(args.k or selection.k or default_k(model)), selection


def cmd_tune(args) -> int:
    if sum(bool(x) for x in (args.selection, args.heads, args.random)) != 1:
        raise UserError("tune needs exactly one of --selection FILE, --heads L:H,... or --random")
    train_items = load_items(args, "train")
    model, tokenizer = load_model_from_args(args)
    heads, selection = _heads_for_tune(args, model)
    model, record = tune_heads(args, model, tokenizer, train_items, heads, "LoFiT: tune v")
    method = "lofit-random-heads" if args.random else "lofit"
    save_adapter(model, args.out, selection=selection, method=method,
                 hyperparameters={**hyperparameters(args), "task": args.task, "model": args.model})
    print(f"tuned {len(heads)} heads ({trainable_count(model)} trainable parameters), final loss "
          f"{record['epoch_loss'][-1]:.4f}; adapter written to {args.out}")
    return 0


def print_results(results: dict, out: str) -> None:
    k = results["k"]
    print(f"\n{results['task']} ({results['eval_split']}, {results['eval_examples']} examples), model "
          f"{results['model']}, K = {k} heads, {results['trainable_params']} trainable parameters, "
          f"{results['seconds']:.0f} s")
    source = results.get("selection_from", {}).get("task")
    label = f"lofit (top {k}" + (f", heads from {source})" if source else ")")
    print(table({"base": results["base"], label: results["lofit"], f"random {k} heads": results["random"]}))
    paired = results.get("paired") or {}
    if paired:
        confidence = next(iter(paired.values()))["confidence"]
        print(f"\ngains over {results['eval_examples']} items, paired bootstrap {confidence:.0%} interval "
              f"(P = share of resamples where LoFiT is not ahead):")
        for name, st in paired.items():
            print(f"  {name:24s} {st['mean_diff']:+.4f}  [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]  "
                  f"P = {st['p_not_better']:.3f}")
    names = {"results.json": "results.json", "selection.json": "selection.json", "heads.png": "heads.png (heat map)",
             "losses.png": "losses.png", "predictions.jsonl": "predictions.jsonl", "adapter": "adapter/",
             "random_adapter": "random_adapter/"}
    print(f"\noutputs in {out}: " + ", ".join(v for k, v in names.items() if os.path.exists(os.path.join(out, k))))


def print_seed_summary(report: dict, out: str) -> None:
    n = len(report["seeds"])
    print(f"\n{report['task']} ({report['eval_examples']} examples), model {report['model']}, K = {report['k']} heads, "
          f"mean ± standard deviation over {n} seeds {report['seeds']}, {report['seconds']:.0f} s")
    metrics = list(report["summary"]["lofit"])
    rows = {"base": "base", "lofit": f"lofit (top {report['k']})", "random": f"random {report['k']} heads"}
    cells = [["", *metrics]]
    for arm, label in rows.items():
        cells.append([label, *[f"{report['summary'][arm][m]['mean']:.4f} ± {report['summary'][arm][m]['std']:.4f}"
                               for m in metrics]])
    for other in ("base", "random"):
        gains = report[f"lofit_minus_{other}"]
        cells.append([f"lofit − {other}", *[f"{gains[m]['mean']:+.4f} ± {gains[m]['std']:.4f}"
                                             + (" *" if gains[m]["beyond_spread"] else "") for m in metrics]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells))
    print(f"(* the mean gain exceeds its standard deviation over seeds)\nsummary in {os.path.join(out, 'summary.json')}, "
          f"each seed's run in {os.path.join(out, 'seed_<seed>')}/")


def rank_outputs(args):
    """Under a multi-process launch, ranks other than 0 train with rank 0 but write into a throw-away folder
    and stay quiet: every file in --out comes from rank 0, and there is one progress bar. Returns that
    folder (None on rank 0 and for a plain run)."""
    rank, world = launch()
    if world == 1:
        return None
    if getattr(args, "method", "lofit") != "lofit":
        raise UserError(f"run --method {args.method} runs in one process; several processes run --method lofit")
    if getattr(args, "resume", False):
        raise UserError("--resume runs in one process (ranks would race on the files of --out)")
    if rank == 0:
        return None
    args.quiet = True
    args.out = tempfile.mkdtemp(prefix=f"lofit-fast-rank{rank}-")
    return args.out


def _run_on_other_rank(args, scratch: str, train_items, eval_items) -> int:
    """A rank other than 0 of a multi-process launch: train along, write nothing to --out."""
    try:
        run_experiment(args, train_items, eval_items)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def cmd_run(args) -> int:
    if args.out is None:
        args.out = os.path.join("runs", args.task if args.method == "lofit" else f"{args.task}_{args.method}")
    train_items = load_items(args, "train")
    eval_items = load_items(args, "eval")
    scratch = rank_outputs(args)
    if scratch is not None:
        return _run_on_other_rank(args, scratch, train_items, eval_items)
    if args.method != "lofit" and args.checkpoint_every:
        raise UserError(f"--checkpoint-every checkpoints LoFiT's training stages; run --method {args.method} has none")
    if args.seeds and args.method != "lofit":
        raise UserError(f"--seeds repeats the LoFiT run; run --method {args.method} takes --seed")
    if args.seeds:
        report = run_seeds(args, train_items, eval_items, args.seeds)
        print_seed_summary(report, args.out)
        return 0
    if args.method != "lofit":
        results = run_method_experiment(args, train_items, eval_items)
        print(f"\n{args.task} ({results['eval_split']}, {results['eval_examples']} examples), model {args.model}, "
              f"{args.method}: {results['trainable_params']:,} trainable parameters, {results['seconds']:.0f} s")
        print(table({"base": results["base"], args.method: results[args.method]}))
        print(f"\nresults in {os.path.join(args.out, 'results.json')}")
        return 0
    results = run_experiment(args, train_items, eval_items)
    print_results(results, args.out)
    return 0


def cmd_demo(args) -> int:
    """A short TruthfulQA-style run: the fold's data when --data is given, else the built-in task about made-up
    entities (`lofit_fast.data.builtin_fictional`), where LoFiT's effect is large and quick to learn."""
    args.task = "truthfulqa"
    args.fold = getattr(args, "fold", 0)
    if args.out is None:
        args.out = os.path.join("runs", "demo")
    if args.data:
        args.max_train = args.max_train or DEMO_TRAIN
        args.max_eval = args.max_eval or DEMO_EVAL
        args.batch_size = args.batch_size or DEMO_BATCH
        train_items = load_items(args, "train")
        eval_items = load_items(args, "eval")
        source = f"TruthfulQA fold {args.fold} from {args.data}"
    else:
        train_items, eval_items = builtin_fictional("train"), builtin_fictional("test")
        train_items = train_items[: args.max_train or BUILTIN_TRAIN]
        eval_items = eval_items[: args.max_eval or BUILTIN_EVAL]
        args.batch_size = args.batch_size or BUILTIN_BATCH
        source = ("built-in TruthfulQA-style questions about made-up entities (truthful: 'there is no such "
                  "thing'; pass --data DIR for the real TruthfulQA folds)")
    scratch = rank_outputs(args)
    if scratch is not None:
        return _run_on_other_rank(args, scratch, train_items, eval_items)
    print(f"lofit-fast demo: LoFiT on {args.model}, {source}: {len(train_items)} training and "
          f"{len(eval_items)} evaluation questions, {args.epochs} epoch{'s' if args.epochs != 1 else ''} per step",
          flush=True)
    results = run_experiment(args, train_items, eval_items)
    print_results(results, args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("select", help="LoFiT step 1: score every head, write selection.json and a heat map")
    add_model_arguments(p)
    add_data_arguments(p)
    add_training_arguments(p, tune=False)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("tune", help="LoFiT step 2: tune v on selected (or random) heads, write an adapter")
    add_model_arguments(p)
    add_data_arguments(p)
    add_training_arguments(p, select=False)
    heads = p.add_argument_group("heads (one of)")
    heads.add_argument("--selection", help="selection.json from `lofit-fast select` (its top --k heads)")
    heads.add_argument("--heads", type=heads_arg, help="explicit heads, e.g. 3:1,17:4")
    heads.add_argument("--random", action="store_true", help="--k random heads (the baseline)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="select + tune + evaluate: base, LoFiT and random heads with the same K")
    add_model_arguments(p)
    add_data_arguments(p)
    add_training_arguments(p)
    p.add_argument("--out", help="output folder (default runs/TASK)")
    p.add_argument("--resume", action="store_true",
                   help="reuse every stage (base metrics, head selection, LoFiT, random heads) that an earlier run "
                        "with the same settings and data finished in --out")
    p.add_argument("--seeds", type=seeds_arg, default=None, metavar="S1,S2,...",
                   help="repeat the run once per seed (each its own initializations, data order and random heads, in "
                        "--out/seed_S/) and report mean ± standard deviation in --out/summary.json")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                   help="checkpoint each training stage every N optimizer steps into --out/checkpoints (parameters, "
                        "optimizer, scheduler, RNG states, data position); --resume then continues a killed run from "
                        "there, ending with the adapter an uninterrupted run ends with (default 0: none)")
    p.add_argument("--method", choices=RUN_METHODS, default="lofit",
                   help="lofit (default: base, LoFiT and random heads) or a relative to compare: base and the method")
    p.add_argument("--selection", help="skip step 1 and tune the top --k heads of this selection.json, e.g. one "
                                       "selected on another task (cross-task head sets); a run folder gives its "
                                       "selection.json, and a --seeds run folder gives each seed its own "
                                       "seed_S/selection.json")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="a short LoFiT run: a built-in TruthfulQA-style task, or TruthfulQA with --data")
    add_model_arguments(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.environ.get(DATA_ENV), help="data folder with truthfulqa/ (optional)")
    g.add_argument("--fold", type=int, default=0, choices=(0, 1), help="TruthfulQA fold (default 0)")
    g.add_argument("--max-train", type=positive_int, default=None,
                   help=f"training questions (default {DEMO_TRAIN} with --data, {BUILTIN_TRAIN} of the built-in 48)")
    g.add_argument("--max-eval", type=positive_int, default=None,
                   help=f"evaluation questions (default {DEMO_EVAL} with --data, {BUILTIN_EVAL} of the built-in 160)")
    g.add_argument("--eval-batch-size", type=positive_int, default=16, help="evaluation batch size")
    add_training_arguments(p)
    p.set_defaults(epochs=DEMO_EPOCHS, batch_size=None)  # batch size: DEMO_BATCH with --data, else BUILTIN_BATCH
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)
