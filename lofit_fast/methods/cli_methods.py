"""The comparison methods from the command line (`lofit-fast iti | steer | rep-tune`) and `run_method`, one
entry point that fits/trains a method on a task, evaluates it, and puts the model back as it was.

    run_method(method, model, tokenizer, task, train_items, eval_items, **kw)
        -> {"method", "metrics", "trainable_params", "fitted_params", "seconds", "eval_seconds", "info"}

methods: base, iti, repe, lofit, lora, red, rep_tuning. Training methods share `lofit_fast.train.train`
(LoFiT's loop: TruthfulQA by DPO, CLUTRR/MQuAKE by completion cross-entropy), the same data and the same
evaluation (`lofit_fast.eval.evaluate`). "trainable_params" counts parameters learned by gradient descent;
"fitted_params" counts the values ITI and RepE compute in closed form (their offsets / steering vectors).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .._files import atomic_write
from .repe import METHODS as REPE_METHODS

METHODS = ("base", "iti", "repe", "lofit", "lora", "red", "rep_tuning")
# Learning rates per method when none is given (LoFiT's are the official 7B values; LoRA / RED the usual
# ranges for models of this size).
DEFAULT_LR = {"lofit": 1e-2, "lora": 5e-4, "red": 5e-3, "rep_tuning": 5e-3}
REPE_COEFF_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)


# ------------------------------------------------------------------------------------------------ helpers
def _evaluate(task, model, tokenizer, items, kw) -> Dict[str, float]:
    from ..eval import evaluate

    extra = {"batch_size": kw.get("eval_batch_size", 16), "progress": kw.get("progress", False)}
    if task != "truthfulqa" and kw.get("max_new_tokens"):
        extra["max_new_tokens"] = kw["max_new_tokens"]
    return {k: float(v) for k, v in evaluate(task, model, tokenizer, items, **extra).items() if not isinstance(v, list)}


def _train_kw(kw, method: str) -> dict:
    return dict(
        lr=kw.get("lr") or DEFAULT_LR[method], epochs=kw.get("epochs", 5), batch_size=kw.get("batch_size", 8),
        seed=kw.get("seed", 0), max_grad_norm=kw.get("max_grad_norm", 1.0), max_length=kw.get("max_length"),
        progress=kw.get("progress", False),
    )


def _examples(task, items):
    from .lofit import as_training_examples

    return as_training_examples(task, items)


def _kind(task):
    from ..data import task_kind

    return task_kind(task)


@contextmanager
def _restoring(model: nn.Module):
    """Put back every parameter's requires_grad flag and the train/eval mode, whatever the method did."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    mode = model.training
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)


def _middle_layers(model, kw) -> List[int]:
    from .repe import middle_layers

    return list(kw["layers"]) if kw.get("layers") else middle_layers(model)


def _score(task: str, metrics: Dict[str, float]) -> float:
    return metrics["mc2"] if task == "truthfulqa" else metrics["accuracy"]


# ------------------------------------------------------------------------------------------------ methods
def _iti(model, tokenizer, task, train_items, eval_items, kw):
    from ..patch import unpatch
    from . import iti

    t = time.perf_counter()
    result = iti.fit(model, tokenizer, train_items, k=kw.get("k"), alpha=kw.get("alpha", 15.0),
                     seed=kw.get("seed", 0), batch_size=kw.get("batch_size", 8), task=task)
    iti.apply(model, result)
    seconds = time.perf_counter() - t
    try:
        if kw.get("out"):
            from ..adapter import save_adapter

            save_adapter(model, os.path.join(kw["out"], "iti"), method="iti",
                         hyperparameters={"task": task, "k": len(result.heads), "alpha": result.alpha})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unpatch(model)
    d = result.directions.shape[1]
    info = {"heads": [list(h) for h in result.heads], "alpha": result.alpha,
            "best_probe_accuracy": float(result.probe_accuracies.max())}
    return metrics, 0, len(result.heads) * d, seconds, eval_seconds, info


def _repe(model, tokenizer, task, train_items, eval_items, kw):
    from ..steer import set_coeff, steer, unsteer
    from . import repe

    t = time.perf_counter()
    layers = _middle_layers(model, kw)
    if kw.get("pairs", "task") == "honesty":
        vectors = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=kw.get("honesty_dir", repe.HONESTY_DIR),
                                       normalize=False, batch_size=kw.get("batch_size", 8))
    else:
        pos, neg = repe.task_pairs(task, train_items, seed=kw.get("seed", 0), max_pairs=kw.get("max_pairs", 256))
        vectors = repe.control_vector(model, tokenizer, pos, neg, layers=layers, method=kw.get("repe_method", "pca"),
                                      normalize=False, batch_size=kw.get("batch_size", 8))
    # per layer: one average pos − neg separation split over the steered layers (the shifts add up)
    vectors = {layer: v / len(layers) for layer, v in vectors.items()}
    coeff = kw.get("coeff", "auto")
    steer(model, vectors, coeff=1.0)
    tried = {}
    try:
        if coeff == "auto":
            tune_items = list(train_items)[: kw.get("coeff_items", 24)]
            for c in kw.get("coeff_grid", REPE_COEFF_GRID):
                set_coeff(model, c)
                tried[c] = _score(task, _evaluate(task, model, tokenizer, tune_items, kw))
            coeff = max(tried, key=lambda c: (tried[c], -abs(c)))
        set_coeff(model, float(coeff))
        seconds = time.perf_counter() - t
        if kw.get("out"):
            from safetensors.torch import save_file

            os.makedirs(kw["out"], exist_ok=True)
            save_file({f"layers.{layer}": v.contiguous() for layer, v in vectors.items()},
                      os.path.join(kw["out"], "repe_vectors.safetensors"), metadata={"coeff": str(coeff)})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unsteer(model)
    hidden = next(iter(vectors.values())).numel()
    return metrics, 0, len(layers) * hidden, seconds, eval_seconds, {"layers": layers, "coeff": coeff,
                                                                     "coeff_search": {str(c): s for c, s in tried.items()}}


def _lofit(model, tokenizer, task, train_items, eval_items, kw):
    from ..patch import trainable_parameters, unpatch
    from .lofit import select_defaults, select_heads, tune

    t = time.perf_counter()
    common = dict(epochs=kw.get("epochs", 5), batch_size=kw.get("batch_size", 8), seed=kw.get("seed", 0),
                  max_grad_norm=kw.get("max_grad_norm", 1.0), max_length=kw.get("max_length"),
                  progress=kw.get("progress", False), init_std=kw.get("init_std", 1e-3))
    if _kind(task) == "dpo":
        common["beta"] = kw.get("beta", 0.5)
    official = select_defaults(task)
    selection = select_heads(model, tokenizer, train_items, task=task, k=kw.get("k"), l1=kw.get("l1", official["l1"]),
                             lr=kw.get("select_lr", official["lr"]), **common)
    heads = selection.top()
    tune(model, tokenizer, train_items, heads, task=task, lr=kw.get("lr") or DEFAULT_LR["lofit"], **common)
    seconds = time.perf_counter() - t
    try:
        trainable = sum(p.numel() for p in trainable_parameters(model))
        if kw.get("out"):
            from ..adapter import save_adapter

            save_adapter(model, os.path.join(kw["out"], "lofit"), selection=selection, method="lofit",
                         hyperparameters={"task": task, "k": len(heads)})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unpatch(model)
    return metrics, trainable, 0, seconds, eval_seconds, {"heads": [list(h) for h in heads]}


def _train_shared(model, tokenizer, task, train_items, params, kw, method):
    from ..train import train

    extra = {"beta": kw.get("beta", 0.5)} if _kind(task) == "dpo" else {}
    return train(model, tokenizer, _examples(task, train_items), kind=_kind(task), params=params,
                 desc=method, **_train_kw(kw, method), **extra)


def _lora(model, tokenizer, task, train_items, eval_items, kw):
    from .comparators import lora, lora_parameters, unlora

    t = time.perf_counter()
    peft_model = lora(model, r=kw.get("r", 8), target_modules=kw.get("target_modules", ("q_proj", "v_proj")))
    try:
        params = lora_parameters(peft_model)
        record = _train_shared(peft_model, tokenizer, task, train_items, params, kw, "lora")
        seconds = time.perf_counter() - t
        if kw.get("out"):
            peft_model.save_pretrained(os.path.join(kw["out"], "lora"))
        t = time.perf_counter()
        metrics = _evaluate(task, peft_model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unlora(peft_model)
    return metrics, sum(p.numel() for p in params), 0, seconds, eval_seconds, {"final_loss": record["epoch_loss"][-1]}


def _red(model, tokenizer, task, train_items, eval_items, kw):
    from .comparators import red, red_parameters, red_state, unred

    t = time.perf_counter()
    red(model, kw.get("red_layers", "all"))
    try:
        params = red_parameters(model)
        record = _train_shared(model, tokenizer, task, train_items, params, kw, "red")
        seconds = time.perf_counter() - t
        if kw.get("out"):
            from safetensors.torch import save_file

            os.makedirs(kw["out"], exist_ok=True)
            state = {f"layers.{layer}.{name}": t_ for layer, d in red_state(model).items() for name, t_ in d.items()}
            save_file(state, os.path.join(kw["out"], "red.safetensors"))
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unred(model)
    return metrics, sum(p.numel() for p in params), 0, seconds, eval_seconds, {"final_loss": record["epoch_loss"][-1]}


def rep_tuning_examples(task: str, items: Sequence) -> list:
    """SFT examples for representation tuning: TruthfulQA's best answers, or the task's own SFT examples."""
    from ..data import MCItem, SFTExample, truthfulqa_completion

    items = list(items)
    if items and isinstance(items[0], MCItem):
        return [SFTExample(item.prompt, truthfulqa_completion(item.best)) for item in items]
    return _examples(task, items)


def _rep_tuning(model, tokenizer, task, train_items, eval_items, kw):
    from ..patch import patched_modules, unpatch
    from . import rep_tuning, repe

    t = time.perf_counter()
    layers = _middle_layers(model, kw)
    directions = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=kw.get("honesty_dir", repe.HONESTY_DIR),
                                      max_pairs=kw.get("max_pairs", 256), batch_size=kw.get("batch_size", 8))
    trainable = kw.get("trainable", "heads")
    snapshot = None
    if trainable == "layers":
        from ..steer import decoder_layers

        blocks = decoder_layers(model)
        snapshot = {layer: {k: v.detach().clone() for k, v in blocks[layer].state_dict().items()} for layer in layers}
    try:
        record = rep_tuning.train(model, tokenizer, rep_tuning_examples(task, train_items), directions, layers=layers,
                                  w=kw.get("w", 1.0), mode=kw.get("mode", "in"), trainable=trainable,
                                  **_train_kw(kw, "rep_tuning"))
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        if patched_modules(model):
            unpatch(model)
        if snapshot is not None:
            for layer, state in snapshot.items():
                blocks[layer].load_state_dict(state)
    return metrics, record["trainable_params"], 0, seconds, eval_seconds, {"layers": layers, "w": kw.get("w", 1.0)}


_RUNNERS = {"iti": _iti, "repe": _repe, "lofit": _lofit, "lora": _lora, "red": _red, "rep_tuning": _rep_tuning}


def run_method(method: str, model: nn.Module, tokenizer, task: str, train_items: Sequence, eval_items: Sequence,
               **kw) -> Dict[str, object]:
    """Fit/train `method` on `train_items`, evaluate on `eval_items`, and leave `model` as it came (no
    patch, steering, LoRA or RED attached; weights, requires_grad flags and mode unchanged).

    Keywords: epochs, batch_size, lr, seed, beta, max_grad_norm, max_length, eval_batch_size, max_new_tokens,
    progress, out (a folder for the method's artifacts); per method: k, alpha (iti); layers, coeff ("auto" or a
    number), coeff_grid, coeff_items, pairs ("task" or "honesty"), repe_method (repe); k, l1, select_lr,
    init_std (lofit); r, target_modules (lora); red_layers (red); layers, w, mode, trainable, honesty_dir
    (rep_tuning).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    with _restoring(model):
        if method == "base":
            t = time.perf_counter()
            metrics = _evaluate(task, model, tokenizer, eval_items, kw)
            result = (metrics, 0, 0, 0.0, time.perf_counter() - t, {})
        else:
            result = _RUNNERS[method](model, tokenizer, task, list(train_items), list(eval_items), kw)
    metrics, trainable, fitted, seconds, eval_seconds, info = result
    return {"method": method, "task": task, "metrics": metrics, "trainable_params": int(trainable),
            "fitted_params": int(fitted), "seconds": round(seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "train_examples": len(train_items), "eval_examples": len(eval_items), "info": info}


# ---------------------------------------------------------------------------------------------------- CLI
def _layers_arg(text: str) -> List[int]:
    out = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like '10-19' or '3,5,7', got {text!r}") from None
    return out


def _setup(args):
    from .. import cli

    torch.manual_seed(args.seed)
    model, tokenizer = cli.load_model_from_args(args)
    return cli, model, tokenizer


def cmd_iti(args) -> int:
    from ..adapter import save_adapter
    from ..patch import unpatch
    from . import iti

    cli, model, tokenizer = _setup(args)
    train_items = cli.load_items(args, "train")
    eval_items = None if args.no_eval else cli.load_items(args, "eval")
    rows = {}
    if eval_items:
        rows["base"] = _evaluate(args.task, model, tokenizer, eval_items, {"progress": not args.quiet,
                                                                           "eval_batch_size": args.eval_batch_size})
    result = iti.fit(model, tokenizer, train_items, k=args.k, alpha=args.alpha, val_fraction=args.val_fraction,
                     seed=args.seed, batch_size=args.batch_size, task=args.task)
    print(f"ITI: {len(result.heads)} heads, α = {result.alpha}; best probes (layer, head, val. accuracy):")
    for layer, head in result.heads[:10]:
        print(f"  {layer:3d} {head:3d}  {float(result.probe_accuracies[layer, head]):.3f}")
    iti.apply(model, result)
    if args.out:
        save_adapter(model, args.out, method="iti", selection={"probe_accuracies": result.probe_accuracies.tolist()},
                     hyperparameters={"task": args.task, "k": len(result.heads), "alpha": result.alpha,
                                      "model": args.model, "seed": args.seed})
        print(f"wrote the ITI adapter (fixed offsets; merge/export like any LoFiT adapter) to {args.out}")
    if eval_items:
        rows[f"iti (α={result.alpha:g})"] = _evaluate(args.task, model, tokenizer, eval_items,
                                                      {"progress": not args.quiet, "eval_batch_size": args.eval_batch_size})
        print(cli._table(rows))
    unpatch(model)
    return 0


def cmd_steer(args) -> int:
    from ..steer import set_coeff, steer
    from . import repe, rep_tuning

    cli, model, tokenizer = _setup(args)
    layers = args.layers or repe.middle_layers(model)
    if args.pairs == "honesty":
        vectors = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=args.honesty_dir, method=args.method,
                                       max_pairs=args.max_pairs, normalize=False, batch_size=args.batch_size)
    else:
        if not args.task:
            raise cli.UserError("--pairs task needs --task")
        pos, neg = repe.task_pairs(args.task, cli.load_items(args, "train"), seed=args.seed, max_pairs=args.max_pairs)
        vectors = repe.control_vector(model, tokenizer, pos, neg, layers=layers, method=args.method, normalize=False,
                                      batch_size=args.batch_size)
    vectors = {layer: v / len(layers) for layer, v in vectors.items()}
    print(f"control vectors ({args.pairs}, {args.method}) at layers {layers[0]}..{layers[-1]}")
    if args.out:
        from safetensors.torch import save_file

        os.makedirs(args.out, exist_ok=True)
        save_file({f"layers.{layer}": v.contiguous() for layer, v in vectors.items()},
                  os.path.join(args.out, "control_vectors.safetensors"))
        print(f"wrote {os.path.join(args.out, 'control_vectors.safetensors')}")
    steer(model, vectors, coeff=0.0)
    for coeff in args.coeff:
        set_coeff(model, coeff)
        line = [f"coeff {coeff:+g}:"]
        if args.prompt:
            from ..eval import generate_greedy

            text = generate_greedy(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens, progress=False)[0]
            line.append(repr(text))
        if args.task and not args.no_eval:
            items = cli.load_items(args, "eval")
            metrics = _evaluate(args.task, model, tokenizer, items, {"eval_batch_size": args.eval_batch_size})
            line.append(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if args.honesty_eval:
            scores = rep_tuning.honesty_eval(model, tokenizer, rep_tuning.fact_ab_items(
                rep_tuning.load_fact_rows(args.honesty_dir, "gpt4_facts.csv")), rep_tuning.honesty_choices(args.honesty_dir))
            line.append(" ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        print(" ".join(line))
    return 0


def cmd_rep_tune(args) -> int:
    from ..adapter import save_adapter
    from . import repe, rep_tuning

    cli, model, tokenizer = _setup(args)
    layers = args.layers or repe.middle_layers(model)
    directions = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=args.honesty_dir,
                                      max_pairs=args.max_pairs, batch_size=args.batch_size)
    rows = rep_tuning.load_fact_rows(args.honesty_dir)
    if args.max_train:
        rows = rows[: args.max_train]
    examples = rep_tuning.fact_ab_examples(rows)
    fact_items = rep_tuning.fact_ab_items(rep_tuning.load_fact_rows(args.honesty_dir, "gpt4_facts.csv"))
    choices = rep_tuning.honesty_choices(args.honesty_dir)
    before = rep_tuning.honesty_eval(model, tokenizer, fact_items, choices)
    record = rep_tuning.train(model, tokenizer, examples, directions, layers=layers, w=args.w, mode=args.mode,
                              trainable=args.trainable, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                              seed=args.seed, max_length=args.max_length, progress=not args.quiet)
    after = rep_tuning.honesty_eval(model, tokenizer, fact_items, choices)
    print(cli._table({"untuned": before, f"rep-tuned ({args.mode}, w={args.w:g}, {args.trainable})": after}))
    print(f"{record['trainable_params']} trainable parameters, {record['seconds']:.0f} s")
    if args.out:
        if args.trainable == "heads":
            save_adapter(model, args.out, method="rep_tuning",
                         hyperparameters={"layers": layers, "w": args.w, "mode": args.mode, "model": args.model})
        else:
            model.save_pretrained(args.out)
        print(f"wrote {args.out}")
    return 0


def _common(p, cli, *, task_required: bool, default_task: Optional[str] = None):
    cli.add_model_arguments(p)
    cli.add_data_arguments(p, required_task=task_required)
    if default_task:
        p.set_defaults(task=default_task)
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--out", help="output folder")


def register(subparsers) -> None:
    from .. import cli
    from .repe import HONESTY_DIR

    honesty_default = os.environ.get("LOFIT_FAST_HONESTY", str(HONESTY_DIR))

    p = subparsers.add_parser("iti", help="ITI: probe every head, shift the best K along their truth direction")
    _common(p, cli, task_required=False, default_task="truthfulqa")
    p.add_argument("--k", type=int, default=None, help="heads to shift (default: 48 per 1024 heads)")
    p.add_argument("--alpha", type=float, default=15.0, help="strength α (default 15)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="questions held out to rank probes (default 0.2)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating base and ITI")
    p.set_defaults(func=cmd_iti)

    p = subparsers.add_parser("steer", help="RepE control vectors: steer the residual stream, evaluate or generate")
    _common(p, cli, task_required=False)
    p.add_argument("--pairs", choices=("honesty", "task"), default="honesty",
                   help="contrast pairs: honesty personas on true statements (default) or the task's right/wrong answers")
    p.add_argument("--method", choices=REPE_METHODS, default="pca",
                   help="pca: RepE (uncentered differences); mean; pca_center: repeng's pca_diff recipe")
    p.add_argument("--layers", type=_layers_arg, default=None, help="e.g. 10-19 (default: the middle third)")
    p.add_argument("--coeff", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="coefficients to try")
    p.add_argument("--max-pairs", type=int, default=256)
    p.add_argument("--prompt", help="generate a continuation of this prompt at each coefficient")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--honesty-eval", action="store_true", help="score the two-choice honesty prompts")
    p.add_argument("--honesty-dir", default=honesty_default)
    p.add_argument("--no-eval", action="store_true", help="skip the task evaluation")
    p.set_defaults(func=cmd_steer)

    p = subparsers.add_parser("rep-tune", help="representation tuning: fine-tune the honesty direction in or out")
    cli.add_model_arguments(p)
    p.add_argument("--layers", type=_layers_arg, default=None, help="e.g. 10-19 (default: the middle third)")
    p.add_argument("--mode", choices=("in", "out"), default="in")
    p.add_argument("--w", type=float, default=1.0, help="weight of the cosine loss (0: token-only tuning)")
    p.add_argument("--trainable", choices=("heads", "layers"), default="heads")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None, help="use the first N statements")
    p.add_argument("--max-pairs", type=int, default=256)
    p.add_argument("--honesty-dir", default=honesty_default)
    p.add_argument("--out", help="adapter folder (heads) or model folder (layers)")
    p.set_defaults(func=cmd_rep_tune)


def write_json(path: str, payload) -> str:
    return atomic_write(path, json.dumps(payload, indent=2) + "\n")
