"""The commands of LoFiT's relatives: `iti` (inference-time intervention), `steer` (RepE control vectors) and
`rep-tune` (representation tuning)."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from ..adapter import save_adapter
from ..eval import evaluate, generate_greedy
from ..methods import iti, rep_tuning, repe
from ..methods.repe import HONESTY_DIR
from ..methods.repe import METHODS as REPE_METHODS
from ..patch import unpatch
from ..steer import set_coeff, steer
from .common import UserError, add_data_arguments, add_model_arguments, layers_arg, load_items, load_model_from_args, table


def _metrics(task, model, tokenizer, items, kw) -> Dict[str, float]:
    extra = {"batch_size": kw.get("eval_batch_size", 16), "progress": kw.get("progress", False)}
    return {k: float(v) for k, v in evaluate(task, model, tokenizer, items, **extra).items() if not isinstance(v, list)}


def _setup(args):
    torch.manual_seed(args.seed)
    return load_model_from_args(args)


def cmd_iti(args) -> int:
    model, tokenizer = _setup(args)
    train_items = load_items(args, "train")
    eval_items = None if args.no_eval else load_items(args, "eval")
    rows = {}
    if eval_items:
        rows["base"] = _metrics(args.task, model, tokenizer, eval_items, {"progress": not args.quiet,
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
        rows[f"iti (α={result.alpha:g})"] = _metrics(args.task, model, tokenizer, eval_items,
                                                      {"progress": not args.quiet, "eval_batch_size": args.eval_batch_size})
        print(table(rows))
    unpatch(model)
    return 0


def cmd_steer(args) -> int:
    model, tokenizer = _setup(args)
    layers = args.layers or repe.middle_layers(model)
    if args.pairs == "honesty":
        vectors = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=args.honesty_dir, method=args.method,
                                       max_pairs=args.max_pairs, normalize=False, batch_size=args.batch_size)
    else:
        if not args.task:
            raise UserError("--pairs task needs --task")
        pos, neg = repe.task_pairs(args.task, load_items(args, "train"), seed=args.seed, max_pairs=args.max_pairs)
        vectors = repe.control_vector(model, tokenizer, pos, neg, layers=layers, method=args.method, normalize=False,
                                      batch_size=args.batch_size)
    vectors = {layer: v / len(layers) for layer, v in vectors.items()}
    print(f"control vectors ({args.pairs}, {args.method}) at layers {layers[0]}..{layers[-1]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        save_file({f"layers.{layer}": v.contiguous() for layer, v in vectors.items()},
                  os.path.join(args.out, "control_vectors.safetensors"))
        print(f"wrote {os.path.join(args.out, 'control_vectors.safetensors')}")
    steer(model, vectors, coeff=0.0)
    for coeff in args.coeff:
        set_coeff(model, coeff)
        line = [f"coeff {coeff:+g}:"]
        if args.prompt:
            text = generate_greedy(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens, progress=False)[0]
            line.append(repr(text))
        if args.task and not args.no_eval:
            items = load_items(args, "eval")
            metrics = _metrics(args.task, model, tokenizer, items, {"eval_batch_size": args.eval_batch_size})
            line.append(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if args.honesty_eval:
            scores = rep_tuning.honesty_eval(model, tokenizer, rep_tuning.fact_ab_items(
                rep_tuning.load_fact_rows(args.honesty_dir, "gpt4_facts.csv")), rep_tuning.honesty_choices(args.honesty_dir))
            line.append(" ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        print(" ".join(line))
    return 0


def cmd_rep_tune(args) -> int:
    model, tokenizer = _setup(args)
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
    print(table({"untuned": before, f"rep-tuned ({args.mode}, w={args.w:g}, {args.trainable})": after}))
    print(f"{record['trainable_params']} trainable parameters, {record['seconds']:.0f} s")
    if args.out:
        if args.trainable == "heads":
            save_adapter(model, args.out, method="rep_tuning",
                         hyperparameters={"layers": layers, "w": args.w, "mode": args.mode, "model": args.model})
        else:
            model.save_pretrained(args.out)
        print(f"wrote {args.out}")
    return 0


def _common(p, *, task_required: bool, default_task: Optional[str] = None):
    add_model_arguments(p)
    add_data_arguments(p, required_task=task_required)
    if default_task:
        p.set_defaults(task=default_task)
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--out", help="output folder")


def register(subparsers) -> None:
    honesty_default = os.environ.get("LOFIT_FAST_HONESTY", str(HONESTY_DIR))

    p = subparsers.add_parser("iti", help="ITI: probe every head, shift the best K along their truth direction")
    _common(p, task_required=False, default_task="truthfulqa")
    p.add_argument("--k", type=int, default=None, help="heads to shift (default: 48 per 1024 heads)")
    p.add_argument("--alpha", type=float, default=15.0, help="strength α (default 15)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="questions held out to rank probes (default 0.2)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating base and ITI")
    p.set_defaults(func=cmd_iti)

    p = subparsers.add_parser("steer", help="RepE control vectors: steer the residual stream, evaluate or generate")
    _common(p, task_required=False)
    p.add_argument("--pairs", choices=("honesty", "task"), default="honesty",
                   help="contrast pairs: honesty personas on true statements (default) or the task's right/wrong answers")
    p.add_argument("--method", choices=REPE_METHODS, default="pca",
                   help="pca: RepE (uncentered differences); mean; pca_center: repeng's pca_diff recipe")
    p.add_argument("--layers", type=layers_arg, default=None, help="e.g. 10-19 (default: the middle third)")
    p.add_argument("--coeff", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="coefficients to try")
    p.add_argument("--max-pairs", type=int, default=256)
    p.add_argument("--prompt", help="generate a continuation of this prompt at each coefficient")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--honesty-eval", action="store_true", help="score the two-choice honesty prompts")
    p.add_argument("--honesty-dir", default=honesty_default)
    p.add_argument("--no-eval", action="store_true", help="skip the task evaluation")
    p.set_defaults(func=cmd_steer)

    p = subparsers.add_parser("rep-tune", help="representation tuning: fine-tune the honesty direction in or out")
    add_model_arguments(p)
    p.add_argument("--layers", type=layers_arg, default=None, help="e.g. 10-19 (default: the middle third)")
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
