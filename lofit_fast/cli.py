"""`lofit-fast`: LoFiT from the command line (select heads, tune, evaluate, merge, export, run, demo).

    lofit-fast run --task truthfulqa --data DATA_DIR --out runs/tqa     # select + tune + eval, + random heads
    lofit-fast demo                                                    # a short run on built-in examples

Errors a user can fix (a missing file, an unknown model, a bad option) print one line and exit with 1.
Other subcommands can be added by a `lofit_fast.methods.cli_methods` module with a `register(subparsers)`
function; it can reuse `add_model_arguments`, `add_data_arguments`, `add_training_arguments`,
`load_model_from_args` and `load_items` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ._files import atomic_write

DTYPES = ("float32", "bfloat16")
DEFAULT_SEED = 42  # the official LoFiT scripts' seed
CLUTRR_TRAIN_SIZE = 300  # LoFiT trains on 300 CLUTRR examples
DATA_ENV = "LOFIT_FAST_DATA"


class UserError(Exception):
    """A problem with the command line or the inputs: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _task_names() -> List[str]:
    from .data import TASKS

    return list(TASKS)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M-Instruct, default), gemma3-270m, an HF model directory or a .gguf file")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized frozen base (torchao; int4 needs CUDA); A and v train in float32")
    g.add_argument("--backend", default="auto", help="op backend: auto (default), torch, cpp, triton, cuda")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_data_arguments(p: argparse.ArgumentParser, *, required_task: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", required=required_task, choices=_task_names(), help="the task")
    g.add_argument("--data", default=os.environ.get(DATA_ENV),
                   help=f"data folder with truthfulqa/, clutrr/, mquake/ (default: ${DATA_ENV})")
    g.add_argument("--fold", type=int, default=0, choices=(0, 1), help="TruthfulQA fold (default 0)")
    g.add_argument("--max-train", type=_positive_int, default=None,
                   help=f"use at most N training examples (default: all; CLUTRR {CLUTRR_TRAIN_SIZE} as in LoFiT)")
    g.add_argument("--max-eval", type=_positive_int, default=None, help="evaluate on at most N examples")
    g.add_argument("--eval-batch-size", type=_positive_int, default=16, help="evaluation batch size (default 16)")


def add_training_arguments(p: argparse.ArgumentParser, *, select: bool = True, tune: bool = True) -> None:
    g = p.add_argument_group("training (defaults: the official LoFiT scripts, Llama-2-7B values)")
    g.add_argument("--epochs", type=_positive_int, default=5, help="epochs for each step (default 5)")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="training batch size (default 8)")
    if select:
        g.add_argument("--select-lr", type=_positive_float, default=None,
                       help="step 1 learning rate (default per task: 5e-3 TruthfulQA and MQuAKE, 5e-4 CLUTRR)")
        g.add_argument("--l1", type=_nonnegative_float, default=None,
                       help="step 1 L1 weight λ (default per task: 5e-4 TruthfulQA, 1e-3 MQuAKE, 5e-3 CLUTRR)")
    if tune:
        g.add_argument("--lr", type=_positive_float, default=None,
                       help="step 2 learning rate (default 1e-2; with run --method: that method's default)")
    g.add_argument("--k", type=_positive_int, default=None, help="number of heads to tune (default ≈3%% of heads)")
    g.add_argument("--init-std", type=_nonnegative_float, default=1e-3, help="A / v init std (default 1e-3)")
    g.add_argument("--beta", type=_positive_float, default=0.5, help="DPO β for TruthfulQA (default 0.5)")
    g.add_argument("--max-grad-norm", type=_nonnegative_float, default=1.0,
                   help="gradient clipping norm, 0 for none (default 1.0, the HF Trainer's)")
    g.add_argument("--max-length", type=_positive_int, default=None, help="truncate training sequences to N tokens")
    g.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="gradient accumulation: N forward passes of --batch-size per optimizer step, the same "
                        "result as an N-times larger batch (default 1)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="train under torch.autocast in bf16 or fp16; A and v stay float32 (default no)")


# ----------------------------------------------------------------------------------------------- helpers


def _device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and _launch()[1] > 1:  # accelerate launch / torchrun: this rank's GPU
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return name


def load_model_from_args(args):
    """(model, tokenizer) for --model / --dtype / --device."""
    import torch

    from .models import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    quiet = getattr(args, "quiet", False)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load_model(args.model, dtype=dtype, device=_device(args.device), quantize=getattr(args, "quantize", None),
                      progress=not quiet)


def _splits(task: str):
    """(training split, evaluation split): TruthfulQA reports test, CLUTRR / MQuAKE report val."""
    return ("train", "test") if task == "truthfulqa" else ("train", "val")


def _require_data(args) -> str:
    if not args.data:
        raise UserError(f"no data folder: pass --data DIR (or set ${DATA_ENV})")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder not found: {args.data}")
    return args.data


def load_items(args, which: str):
    """The task items for `which` ("train" or "eval") from --data, cut to --max-train / --max-eval."""
    from .data import load_split

    data = _require_data(args)
    train_split, eval_split = _splits(args.task)
    if which == "train":
        limit = args.max_train
        if limit is None and args.task == "clutrr":
            limit = CLUTRR_TRAIN_SIZE
        split = train_split
    else:
        limit, split = args.max_eval, eval_split
    items = load_split(args.task, data, split, fold=args.fold, limit=limit)
    if not items:
        raise UserError(f"no {args.task} {split} examples found in {data}")
    return list(items)


def _dumps(payload: dict) -> str:
    """JSON with one top-level key per line (head lists and metric dicts stay on their line)."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in payload.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_json(path: str, payload: dict) -> str:
    return atomic_write(path, _dumps(payload))


def _evaluate(args, model, tokenizer, items, label: str, predictions: Optional[list] = None) -> Dict[str, float]:
    """Metrics of `model` on `items`; for the generation tasks, each generation with its gold answers is
    appended to `predictions` (when given) as {"arm": label, "prompt", "generated", "prediction", "answers",
    "correct"}."""
    from .eval import evaluate

    _log(args, f"evaluating {label} on {len(items)} {args.task} examples ...")
    kw = {"return_predictions": True} if predictions is not None and args.task != "truthfulqa" else {}
    metrics = evaluate(args.task, model, tokenizer, items, batch_size=args.eval_batch_size, progress=not args.quiet,
                       **kw)
    for record in metrics.pop("predictions", []):
        predictions.append({"arm": label, **record})
    return {k: float(v) for k, v in metrics.items()}


def _write_predictions(out: str, predictions: list) -> None:
    if predictions:
        atomic_write(os.path.join(out, "predictions.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _train_kw(args) -> dict:
    return dict(
        batch_size=args.batch_size,
        epochs=args.epochs,
        init_std=args.init_std,
        seed=args.seed,
        backend=args.backend,
        beta=args.beta,
        max_grad_norm=args.max_grad_norm or None,
        max_length=args.max_length,
        progress=not args.quiet,
        grad_accum=getattr(args, "grad_accum", 1),
        mixed_precision=getattr(args, "mixed_precision", "no"),
    )


def _select(args, model, tokenizer, train_items):
    from .methods import default_k, select_heads

    k = args.k or default_k(model)
    return select_heads(
        model, tokenizer, train_items, task=args.task, k=k, l1=args.l1, lr=args.select_lr, **_train_kw(args)
    )


def _tune(args, model, tokenizer, train_items, heads, desc):
    from .methods import tune

    return tune(
        model, tokenizer, train_items, heads, task=args.task, lr=args.lr, return_history=True, desc=desc,
        **_train_kw(args),
    )


def _hyperparameters(args) -> dict:
    keys = ("epochs", "batch_size", "select_lr", "l1", "lr", "init_std", "beta", "max_grad_norm", "max_length",
            "seed", "dtype", "backend", "fold", "max_train", "max_eval", "grad_accum", "mixed_precision",
            "quantize")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _table(rows: Dict[str, Dict[str, float]], extra: Optional[Dict[str, str]] = None) -> str:
    metrics = []
    for values in rows.values():
        for m in values:
            if m not in metrics:
                metrics.append(m)
    head = ["", *metrics] + (list(next(iter(extra.values())).keys()) if extra else [])
    lines = [head]
    for name, values in rows.items():
        line = [name, *[f"{values[m]:.4f}" if m in values else "-" for m in metrics]]
        if extra:
            line += list(extra.get(name, {}).values())
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _trainable(model) -> int:
    from .patch import trainable_parameters

    return sum(p.numel() for p in trainable_parameters(model))


def _heads_arg(text: str):
    pairs = []
    for chunk in text.split(","):
        try:
            layer, head = chunk.strip().split(":")
            pairs.append((int(layer), int(head)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"heads must look like 'layer:head,layer:head', got {text!r}") from None
    return pairs


# ----------------------------------------------------------------------------------------------- commands


def cmd_select(args) -> int:
    from .analysis import plot_head_scores

    train_items = load_items(args, "train")
    model, tokenizer = load_model_from_args(args)
    selection = _select(args, model, tokenizer, train_items)
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
    from .methods import default_k, random_heads

    if args.random:
        return random_heads(model, args.k or default_k(model), seed=args.seed), None
    if args.heads:
        return args.heads, None
    selection = _given_selection(args.selection, model)
    return selection.top(args.k or selection.k or default_k(model)), selection


def cmd_tune(args) -> int:
    from .adapter import save_adapter

    if sum(bool(x) for x in (args.selection, args.heads, args.random)) != 1:
        raise UserError("tune needs exactly one of --selection FILE, --heads L:H,... or --random")
    train_items = load_items(args, "train")
    model, tokenizer = load_model_from_args(args)
    heads, selection = _heads_for_tune(args, model)
    model, record = _tune(args, model, tokenizer, train_items, heads, "LoFiT: tune v")
    method = "lofit-random-heads" if args.random else "lofit"
    save_adapter(model, args.out, selection=selection, method=method,
                 hyperparameters={**_hyperparameters(args), "task": args.task, "model": args.model})
    print(f"tuned {len(heads)} heads ({_trainable(model)} trainable parameters), final loss "
          f"{record['epoch_loss'][-1]:.4f}; adapter written to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .adapter import load_adapter

    items = load_items(args, "eval")
    model, tokenizer = load_model_from_args(args)
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.backend)
    metrics = _evaluate(args, model, tokenizer, items, "the adapter" if args.adapter else "the base model")
    name = "lofit" if args.adapter else "base"
    print(_table({name: metrics}))
    if args.out:
        path = _write_json(os.path.join(args.out, "eval.json"), {
            "task": args.task, "model": args.model, "adapter": args.adapter,
            "split": _splits(args.task)[1], "examples": len(items), name: metrics,
        })
        print(f"wrote {path}")
    return 0


def _probe_logits(model, tokenizer):
    import torch

    enc = tokenizer(["Q: What is the capital of France? A:", "The quick brown fox"], return_tensors="pt",
                    padding=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in enc.items()}).logits.float()


def cmd_merge(args) -> int:
    from .adapter import export, load_adapter, merge

    model, tokenizer = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    before = _probe_logits(model, tokenizer)
    merge(model)
    after = _probe_logits(model, tokenizer)
    diff = (before - after).abs().max().item()
    print(f"merged the adapter into o_proj; max |logit difference| on a probe: {diff:.3g}")
    if args.out:
        export(model, args.out, tokenizer=tokenizer)
        print(f"wrote the merged model to {args.out}")
    return 0


def cmd_export(args) -> int:
    from .adapter import export, load_adapter

    fmt = getattr(args, "format", "hf")
    if fmt == "control-vector":
        return _export_control_vector(args)
    if not args.adapter:
        raise UserError(f"--format {fmt} needs --adapter (the adapter folder to merge)")
    if fmt == "gguf":
        return _export_gguf(args)
    model, tokenizer = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    export(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote a plain Hugging Face checkpoint (loads with AutoModelForCausalLM) to {args.out}")
    return 0


def _gguf_out(out: str, default_name: str) -> str:
    return out if out.endswith(".gguf") else os.path.join(out, default_name)


def _export_gguf(args) -> int:
    from .adapter import load_adapter
    from .adapter.gguf_export import export_gguf
    from .models import resolve_model_path

    directory, gguf_file = resolve_model_path(args.model)
    if gguf_file is None:
        raise UserError(f"--format gguf starts from the model's GGUF file; --model {args.model} is not a GGUF")
    model, _ = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    out = _gguf_out(args.out, os.path.splitext(gguf_file)[0] + "-lofit.gguf")
    info = export_gguf(model, out, source_gguf=os.path.join(directory, gguf_file), requantize=args.requantize)
    print(f"wrote {out}: {len(info['added'])} tensors added, {len(info['rewritten'])} rewritten "
          f"({', '.join(sorted(set(info['weight_types'].values()))) or 'none'}), {info['copied']} copied as they were")
    return 0


def _export_control_vector(args) -> int:
    from .adapter.gguf_export import export_control_vector_gguf, model_type_and_layers, read_vectors_file

    if not args.vectors:
        raise UserError("--format control-vector needs --vectors (a safetensors file from `lofit-fast steer`)")
    vectors, saved_coeff = read_vectors_file(args.vectors)
    coeff = args.coeff if args.coeff is not None else (saved_coeff if saved_coeff is not None else 1.0)
    model_type, layers = model_type_and_layers(args.model)
    out = _gguf_out(args.out, "control_vector.gguf")
    export_control_vector_gguf(vectors, out, model_hint=model_type, coeff=coeff, num_layers=layers)
    print(f"wrote {out}: llama.cpp control vector for layers {sorted(vectors)} at coeff {coeff:g} "
          f"(use with --control-vector {out})")
    return 0


def cmd_import(args) -> int:
    from .adapter import import_official, save_adapter
    from .patch import patched_modules

    model, _ = load_model_from_args(args)
    import_official(args.checkpoint, model, backend=args.backend, atol=args.atol)

    heads = {layer: m.head_list for layer, m in patched_modules(model).items()}
    save_adapter(model, args.out, method="lofit",
                 hyperparameters={"imported_from": "fc2869/lo-fit", "checkpoint": os.path.abspath(args.checkpoint)})
    print(f"imported {sum(map(len, heads.values()))} heads from {args.checkpoint} into the adapter {args.out}: {heads}")
    return 0


def _previous_results(path: str, info: dict) -> dict:
    """The earlier results.json in --out when it comes from the same settings and data (else {})."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"--resume: {path} is unreadable ({type(exc).__name__}: {exc}); every stage runs again",
              file=sys.stderr, flush=True)
        return {}
    if not isinstance(previous, dict):
        print(f"--resume: {path} is not a results object; every stage runs again", file=sys.stderr, flush=True)
        return {}

    def later_stages(hyper):  # step 1's settings are checked with the selection itself
        return {k: v for k, v in (hyper or {}).items() if k not in ("select_lr", "l1")}

    same = all(previous.get(key) == info[key] for key in ("train_examples", "eval_examples", "eval_split"))
    same = same and later_stages(previous.get("hyperparameters")) == later_stages(info["hyperparameters"])
    return previous if same and isinstance(previous.get("seconds_by_stage"), dict) else {}


def _previous_selection(path: str, args, model, train_examples: int):
    """The earlier selection.json in --out when step 1 ran with the same settings on the same data (else None)."""
    from .methods import HeadSelection

    if not os.path.isfile(path):
        return None
    try:
        selection = HeadSelection.load(path)
        selection.check_model(model)
    except (OSError, ValueError):
        return None
    meta = selection.meta
    wanted = {"task": args.task, "l1": args.l1, "lr": args.select_lr, "epochs": args.epochs,
              "batch_size": args.batch_size, "init_std": args.init_std, "seed": args.seed,
              "max_grad_norm": args.max_grad_norm or None}
    same = all(meta.get(key) == value for key, value in wanted.items())
    same = same and meta.get("train_examples") == train_examples and meta.get("model") == args.model
    return selection if same else None


def _given_selection(path: str, model):
    """A selection.json from another run (e.g. another task: cross-task head sets), checked against the model."""
    from .methods import HeadSelection

    if not os.path.isfile(path):
        raise UserError(f"selection file not found: {path}")
    selection = HeadSelection.load(path)
    selection.check_model(model)
    return selection


RESULT_KEYS = ("task", "model", "k", "heads", "trainable_params", "seconds", "base", "lofit", "random")


def run_experiment(args, train_items, eval_items, *, model=None, tokenizer=None) -> dict:
    """Base, LoFiT and random-heads (same K) on one task; writes results.json, selection.json, heads.png and
    the LoFiT adapter to args.out and returns the results."""
    from .adapter import save_adapter
    from .analysis import plot_head_scores, plot_losses
    from .methods import default_k, random_heads
    from .patch import find_attention_sites, unpatch

    start = time.perf_counter()
    out = args.out
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.json")
    selection_path = os.path.join(out, "selection.json")
    if model is None:
        model, tokenizer = load_model_from_args(args)
    k = args.k or default_k(model)
    total = sum(site.num_heads for site in find_attention_sites(model))
    if k > total:
        raise UserError(f"--k {k}: the model has only {total} heads")
    hyper = {**_hyperparameters(args), "task": args.task, "model": args.model, "k": k}
    seconds: Dict[str, float] = {}
    results: Dict[str, object] = {"task": args.task, "model": args.model, "k": k}
    info = {
        "train_examples": len(train_items),
        "eval_examples": len(eval_items),
        "eval_split": _splits(args.task)[1],
        "device": str(next(model.parameters()).device),
        "hyperparameters": hyper,
        "seconds_by_stage": seconds,
        "train_loss": {},
    }
    resume = getattr(args, "resume", False)
    previous = _previous_results(results_path, info) if resume else {}
    predictions: list = []  # generations with their gold answers, every arm (predictions.jsonl)
    if resume and os.path.isfile(os.path.join(out, "predictions.jsonl")):
        with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
            kept = {"the base model"} if "base" in previous else set()
            predictions = [r for r in map(json.loads, f) if r.get("arm") in kept]

    def checkpoint(**fields):
        """results.json grows after every stage, so a long run shows its progress and keeps what it has."""
        results.update(fields)
        results["seconds"] = round(time.perf_counter() - start, 1)
        merged = {**results, **info}
        _write_json(results_path, {**{key: merged[key] for key in RESULT_KEYS if key in merged}, **merged})

    if "base" in previous:
        _log(args, f"resuming: base model metrics from {results_path}")
        base = previous["base"]
        seconds["eval_base"] = previous["seconds_by_stage"].get("eval_base", 0.0)
    else:
        t = time.perf_counter()
        base = _evaluate(args, model, tokenizer, eval_items, "the base model", predictions)
        seconds["eval_base"] = round(time.perf_counter() - t, 1)
        _write_predictions(out, predictions)
    checkpoint(base=base)

    given = getattr(args, "selection", None)
    selection = _previous_selection(selection_path, args, model, len(train_items)) if resume and not given else None
    if given:
        selection = _given_selection(given, model)
        source = selection.meta.get("task", "?")
        _log(args, f"head selection from {given} (selected on {source}); step 1 skipped")
        info["selection_from"] = {"path": os.path.abspath(given), "task": source}
        selection.k = k
    elif selection is not None:
        _log(args, f"resuming: head selection from {selection_path}")
        seconds["select"] = selection.meta.get("seconds", 0.0)
        selection.k = k
    else:
        t = time.perf_counter()
        _log(args, f"LoFiT step 1: selecting heads on {len(train_items)} {args.task} examples ...")
        selection = _select(args, model, tokenizer, train_items)
        selection.meta["model"] = args.model
        seconds["select"] = round(time.perf_counter() - t, 1)
        selection.save(selection_path)
        info["train_loss"]["select"] = selection.meta.get("final_loss")
    heads = selection.top(k)
    plot_head_scores(selection, os.path.join(out, "heads.png"))
    checkpoint(heads=[[layer, head] for layer, head in heads])

    def step2(name: str, heads, reuse: bool, announce: str, label: str, stages) -> Tuple[Dict[str, float], int]:
        """Step 2 on `heads` and its evaluation, or the earlier run's numbers when `reuse`."""
        if reuse:
            _log(args, f"resuming: {label} metrics from {results_path}")
            for stage in stages:
                seconds[stage] = previous["seconds_by_stage"].get(stage, 0.0)
            info["train_loss"][name] = previous.get("train_loss", {}).get(name)
            return previous[name], previous["trainable_params"]
        t = time.perf_counter()
        _log(args, announce)
        tuned, record = _tune(args, model, tokenizer, train_items, heads, f"{label}: tune v")
        seconds[stages[0]] = round(time.perf_counter() - t, 1)
        info["train_loss"][name] = record["epoch_loss"]
        if name == "lofit":
            save_adapter(tuned, adapter_dir, selection=selection, method="lofit", hyperparameters=hyper)
        t = time.perf_counter()
        metrics = _evaluate(args, tuned, tokenizer, eval_items, label, predictions)
        seconds[stages[1]] = round(time.perf_counter() - t, 1)
        _write_predictions(out, predictions)
        trainable = _trainable(tuned)
        unpatch(tuned)
        return metrics, trainable

    adapter_dir = os.path.join(out, "adapter")
    reuse = "lofit" in previous and previous.get("heads") == results["heads"] and os.path.isdir(adapter_dir)
    lofit, trainable = step2("lofit", heads, reuse, f"LoFiT step 2: tuning v on the top {k} heads ...", "LoFiT",
                             ("tune", "eval_lofit"))
    checkpoint(trainable_params=trainable, lofit=lofit)

    rand_heads = random_heads(model, k, seed=args.seed)
    info["random_heads"] = [[layer, head] for layer, head in rand_heads]
    reuse = "random" in previous and previous.get("random_heads") == info["random_heads"]
    rand, _ = step2("random", rand_heads, reuse, f"baseline: tuning v on {k} random heads {rand_heads} ...",
                    "random heads", ("tune_random", "eval_random"))
    checkpoint(random=rand)
    if any(isinstance(v, list) and v for v in info["train_loss"].values()):
        plot_losses(info["train_loss"], os.path.join(out, "losses.png"), title=f"LoFiT training loss ({args.task})")
    merged = {**results, **info}
    return {**{key: merged[key] for key in RESULT_KEYS}, **merged}


def _print_results(results: dict, out: str) -> None:
    k = results["k"]
    print(f"\n{results['task']} ({results['eval_split']}, {results['eval_examples']} examples), model "
          f"{results['model']}, K = {k} heads, {results['trainable_params']} trainable parameters, "
          f"{results['seconds']:.0f} s")
    source = results.get("selection_from", {}).get("task")
    label = f"lofit (top {k}" + (f", heads from {source})" if source else ")")
    print(_table({"base": results["base"], label: results["lofit"],
                  f"random {k} heads": results["random"]}))
    names = {"results.json": "results.json", "selection.json": "selection.json", "heads.png": "heads.png (heat map)",
             "losses.png": "losses.png", "predictions.jsonl": "predictions.jsonl", "adapter": "adapter/"}
    print(f"\noutputs in {out}: " + ", ".join(v for k, v in names.items() if os.path.exists(os.path.join(out, k))))


RUN_METHODS = ("lofit", "iti", "repe", "lora", "red")


def run_method_experiment(args, train_items, eval_items) -> dict:
    """Base and one relative of LoFiT (ITI, RepE, LoRA or RED) on one task, through the same data, training
    loop and evaluation; writes results.json ({"base": ..., METHOD: ...}) to args.out and returns it."""
    from .methods.cli_methods import run_method

    start = time.perf_counter()
    model, tokenizer = load_model_from_args(args)
    t = time.perf_counter()
    base = _evaluate(args, model, tokenizer, eval_items, "the base model")
    eval_base = round(time.perf_counter() - t, 1)
    _log(args, f"{args.method}: fitting on {len(train_items)} {args.task} examples ...")
    kw = {key: getattr(args, key) for key in ("epochs", "batch_size", "lr", "seed", "beta", "max_grad_norm",
                                              "max_length", "eval_batch_size", "k", "init_std")}
    row = run_method(args.method, model, tokenizer, args.task, train_items, eval_items, progress=not args.quiet,
                     out=os.path.join(args.out, "artifacts"), **kw)
    results = {
        "task": args.task, "model": args.model, "method": args.method, "trainable_params": row["trainable_params"],
        "fitted_params": row["fitted_params"], "seconds": round(time.perf_counter() - start, 1),
        "base": base, args.method: row["metrics"], "train_examples": len(train_items),
        "eval_examples": len(eval_items), "eval_split": _splits(args.task)[1],
        "device": str(next(model.parameters()).device), "hyperparameters": {**_hyperparameters(args), "k": args.k},
        "seconds_by_stage": {"eval_base": eval_base, "fit": row["seconds"], "eval": row["eval_seconds"]},
        "info": row["info"],
    }
    _write_json(os.path.join(args.out, "results.json"), results)
    return results


def _launch() -> Tuple[int, int]:
    """(rank, processes) of an `accelerate launch` / `torchrun` launch; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _rank_outputs(args):
    """Under a multi-process launch, ranks other than 0 train with rank 0 but write into a throw-away folder
    and stay quiet: every file in --out comes from rank 0, and there is one progress bar. Returns that
    folder (None on rank 0 and for a plain run)."""
    import tempfile

    rank, world = _launch()
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


def cmd_run(args) -> int:
    if args.out is None:
        args.out = os.path.join("runs", args.task if args.method == "lofit" else f"{args.task}_{args.method}")
    train_items = load_items(args, "train")
    eval_items = load_items(args, "eval")
    scratch = _rank_outputs(args)
    if scratch is not None:
        import shutil

        try:
            run_experiment(args, train_items, eval_items)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    if args.method != "lofit":
        results = run_method_experiment(args, train_items, eval_items)
        print(f"\n{args.task} ({results['eval_split']}, {results['eval_examples']} examples), model {args.model}, "
              f"{args.method}: {results['trainable_params']:,} trainable parameters, {results['seconds']:.0f} s")
        print(_table({"base": results["base"], args.method: results[args.method]}))
        print(f"\nresults in {os.path.join(args.out, 'results.json')}")
        return 0
    results = run_experiment(args, train_items, eval_items)
    _print_results(results, args.out)
    return 0


DEMO_TRAIN, DEMO_EVAL, DEMO_EPOCHS = 48, 48, 2


def cmd_demo(args) -> int:
    """A short TruthfulQA run: the fold's data when --data is given, else the built-in examples."""
    from .data import builtin_truthfulqa

    args.task = "truthfulqa"
    args.fold = getattr(args, "fold", 0)
    if args.out is None:
        args.out = os.path.join("runs", "demo")
    if args.data:
        args.max_train = args.max_train or DEMO_TRAIN
        args.max_eval = args.max_eval or DEMO_EVAL
        train_items = load_items(args, "train")
        eval_items = load_items(args, "eval")
        source = f"TruthfulQA fold {args.fold} from {args.data}"
    else:
        items = list(builtin_truthfulqa())
        half = len(items) // 2
        train_items, eval_items = items[:half], items[half:]
        if args.max_train:
            train_items = train_items[: args.max_train]
        if args.max_eval:
            eval_items = eval_items[: args.max_eval]
        source = "the built-in TruthfulQA examples (pass --data DIR for the real data)"
    scratch = _rank_outputs(args)
    if scratch is not None:  # a rank other than 0 of a multi-process launch: train along, write nothing to --out
        import shutil

        try:
            run_experiment(args, train_items, eval_items)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    print(f"lofit-fast demo: LoFiT on {args.model}, {source}: {len(train_items)} training and "
          f"{len(eval_items)} evaluation questions, {args.epochs} epochs per step", flush=True)
    results = run_experiment(args, train_items, eval_items)
    _print_results(results, args.out)
    return 0


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit-fast",
        description="LoFiT (localized fine-tuning of attention heads) on Llama / Gemma models, fast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
    heads.add_argument("--heads", type=_heads_arg, help="explicit heads, e.g. 3:1,17:4")
    heads.add_argument("--random", action="store_true", help="--k random heads (the baseline)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="evaluate the base model, or the model with an adapter")
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--adapter", help="adapter folder (from tune or run); omit for the base model")
    p.add_argument("--out", help="folder for eval.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold an adapter into the weights, check the logits, optionally save")
    add_model_arguments(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", help="write the merged model here as a plain HF checkpoint")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write base model + adapter as a plain Hugging Face checkpoint (or GGUF)")
    add_model_arguments(p)
    p.add_argument("--adapter", help="adapter folder (hf and gguf formats)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (gguf: a .gguf file or a folder)")
    p.add_argument("--format", choices=("hf", "gguf", "control-vector"), default="hf",
                   help="hf (default): HF checkpoint; gguf: the model's GGUF with the adapter merged (offsets as "
                        "blk.N.attn_output.bias); control-vector: --vectors as a llama.cpp control-vector GGUF")
    p.add_argument("--overwrite", action="store_true", help="hf: replace a non-empty --out folder")
    p.add_argument("--requantize", action="store_true",
                   help="gguf: re-quantize scaled attn_output weights to the source type (default: float32, exact)")
    p.add_argument("--vectors", help="control-vector: steering vectors (safetensors, keys layers.N)")
    p.add_argument("--coeff", type=float, default=None,
                   help="control-vector: strength folded into the vectors (default: the file's, else 1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert another tool's checkpoint into a lofit_fast adapter")
    add_model_arguments(p)
    p.add_argument("--from", dest="source_format", choices=("lofit",), required=True,
                   help="lofit: a state dict of the authors' code (fc2869/lo-fit: attn_A / attn_v per head), safetensors")
    p.add_argument("--checkpoint", required=True,
                   help="safetensors file, or a folder with model.safetensors / model.safetensors.index.json")
    p.add_argument("--atol", type=_nonnegative_float, default=0.0,
                   help="heads whose A and v are all within ±atol of zero are not selected (default 0)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("run", help="select + tune + evaluate: base, LoFiT and random heads with the same K")
    add_model_arguments(p)
    add_data_arguments(p)
    add_training_arguments(p)
    p.add_argument("--out", help="output folder (default runs/TASK)")
    p.add_argument("--resume", action="store_true",
                   help="reuse every stage (base metrics, head selection, LoFiT, random heads) that an earlier run "
                        "with the same settings and data finished in --out")
    p.add_argument("--method", choices=RUN_METHODS, default="lofit",
                   help="lofit (default: base, LoFiT and random heads) or a relative to compare: base and the method")
    p.add_argument("--selection", help="skip step 1 and tune the top --k heads of this selection.json, e.g. one "
                                       "selected on another task (cross-task head sets)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="a short LoFiT run on TruthfulQA (built-in examples unless --data)")
    add_model_arguments(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.environ.get(DATA_ENV), help="data folder with truthfulqa/ (optional)")
    g.add_argument("--fold", type=int, default=0, choices=(0, 1), help="TruthfulQA fold (default 0)")
    g.add_argument("--max-train", type=_positive_int, default=None,
                   help=f"training questions (default {DEMO_TRAIN} with --data)")
    g.add_argument("--max-eval", type=_positive_int, default=None,
                   help=f"evaluation questions (default {DEMO_EVAL} with --data)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=16, help="evaluation batch size")
    add_training_arguments(p)
    p.set_defaults(epochs=DEMO_EPOCHS)
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    from .methods.cli_methods import register

    register(sub)
    return parser


def _fill_task_defaults(args) -> None:
    """Learning rates and λ left unset: step 2's (or the compared method's) default, and step 1's official
    values for the task (the demo runs TruthfulQA)."""
    from .methods.cli_methods import DEFAULT_LR
    from .methods.lofit import select_defaults

    if getattr(args, "lr", False) is None:
        args.lr = DEFAULT_LR.get(getattr(args, "method", "lofit"), DEFAULT_LR["lofit"])
    official = select_defaults(getattr(args, "task", None) or "truthfulqa")
    if getattr(args, "select_lr", False) is None:
        args.select_lr = official["lr"]
    if getattr(args, "l1", False) is None:
        args.l1 = official["l1"]


def _writable_folder(path: str, flag: str) -> None:
    """The folder can be created and written: its nearest existing ancestor is a writable folder."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable")


def check_args(args) -> None:
    """Every argument and path checked before anything is loaded: a mistake costs no model load and no
    evaluation, and leaves no files behind."""
    from .adapter.schema import CONFIG_NAME
    from .ops import check_backend_name

    backend = getattr(args, "backend", None)
    if backend is not None:
        try:
            check_backend_name(backend)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"--backend {backend}: {exc}") from None
    if getattr(args, "selection", None) and not os.path.isfile(args.selection):
        raise UserError(f"selection file not found: {args.selection}")
    adapter = getattr(args, "adapter", None)
    if isinstance(adapter, str) and adapter and not os.path.isfile(os.path.join(adapter, CONFIG_NAME)):
        raise UserError(f"--adapter {adapter}: not an adapter folder (no {CONFIG_NAME}; see lofit-fast tune)")
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        _writable_folder(out if args.command != "export" or not out.endswith(".gguf") else os.path.dirname(out) or ".",
                         "--out")
    if args.command == "export" and getattr(args, "format", "hf") == "hf":
        from .adapter.export import check_export_target

        try:
            check_export_target(args.out, args.overwrite, args.model if os.path.isdir(args.model) else None)
        except FileExistsError as exc:
            raise UserError(f"--out {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _fill_task_defaults(args)
    try:
        check_args(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lofit-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if getattr(args, "debug", False) or os.environ.get("LOFIT_FAST_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, (UserError, FileNotFoundError, ValueError)) else f"{type(exc).__name__}: "
        print(f"lofit-fast {args.command}: error: {kind}{message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
