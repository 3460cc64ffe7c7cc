"""What every `lofit-fast` command shares: the user-error type, argument types and groups, loading the model
and the task's items from the arguments, the results table, and the checks made before anything loads."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..adapter.export import check_export_target
from ..adapter.schema import CONFIG_NAME
from ..data import TASKS
from ..experiments import CLUTRR_TRAIN_SIZE, DEFAULT_LR, DEFAULT_SEED, load_model_for, selection_file, task_items
from ..experiments.recipes import DEFAULT_RECIPE, RECIPES, fill_recipe, with_prompt_style
from ..experiments.settings import DTYPES, launch
from ..methods.lofit import select_defaults
from ..models import resolve_model_path
from ..ops import check_backend_name

DATA_ENV = "LOFIT_FAST_DATA"


class UserError(Exception):
    """A problem with the command line or the inputs: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------- argument types


def _number_type(cast, ok, what: str, parsed: str):
    """An argparse type: `cast(text)` that satisfies `ok`, else an error saying "expected `what`"."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {parsed}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer", "a positive integer")
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0", "an integer >= 0")
positive_float = _number_type(float, lambda v: v > 0, "a number > 0", "a number")
nonnegative_float = _number_type(float, lambda v: v >= 0, "a number >= 0", "a number")


def heads_arg(text: str):
    pairs = []
    for chunk in text.split(","):
        try:
            layer, head = chunk.strip().split(":")
            pairs.append((int(layer), int(head)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"heads must look like 'layer:head,layer:head', got {text!r}") from None
    return pairs


def seeds_arg(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like '42,43,44', got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers, e.g. '42,43,44', got {text!r}")
    return seeds


def adapter_spec(text: str):
    """NAME=PATH (a named adapter of several), or a bare PATH (one adapter, named "lofit")."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        if not path:
            raise argparse.ArgumentTypeError(f"--adapter {text!r}: no path after {name}=")
        return name, path
    return None, text


def named_adapters(specs) -> Dict[str, str]:
    """{name: path} of repeated --adapter values: several need NAME=PATH each, with distinct names."""
    if len(specs) == 1 and specs[0][0] is None:
        return {"lofit": specs[0][1]}
    out: Dict[str, str] = {}
    for name, path in specs:
        if name is None:
            raise UserError(f"--adapter {path}: with several adapters, name each one (--adapter NAME=PATH)")
        if name in out or name in ("base", "__base__"):
            raise UserError(f"--adapter {name}: the name is given twice or reserved ('base' is the base model)")
        out[name] = path
    return out


def layers_arg(text: str) -> List[int]:
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


# ----------------------------------------------------------------------------------------------- argument groups


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M-Instruct, default), gemma3-270m, an HF model directory or a .gguf file")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model dtype (default float32)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized frozen base (torchao; int4 needs CUDA); A and v train in float32")
    g.add_argument("--backend", default="auto", help="op backend: auto (default), torch, cpp, triton, cuda")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_data_arguments(p: argparse.ArgumentParser, *, required_task: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", required=required_task, choices=list(TASKS), help="the task")
    g.add_argument("--data", default=os.environ.get(DATA_ENV),
                   help=f"data folder with truthfulqa/, clutrr/, mquake/ (default: ${DATA_ENV})")
    g.add_argument("--fold", type=int, default=0, choices=(0, 1), help="TruthfulQA fold (default 0)")
    g.add_argument("--max-train", type=positive_int, default=None,
                   help=f"use at most N training examples (default: all; CLUTRR {CLUTRR_TRAIN_SIZE} as in LoFiT)")
    g.add_argument("--max-eval", type=positive_int, default=None, help="evaluate on at most N examples")
    g.add_argument("--eval-batch-size", type=positive_int, default=16, help="evaluation batch size (default 16)")


def add_training_arguments(p: argparse.ArgumentParser, *, select: bool = True, tune: bool = True) -> None:
    g = p.add_argument_group("training (defaults: the official LoFiT scripts, Llama-2-7B values)")
    g.add_argument("--epochs", type=positive_int, default=5, help="epochs for each step (default 5)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="training batch size (default 8)")
    if select:
        g.add_argument("--select-lr", type=positive_float, default=None,
                       help="step 1 learning rate (default per task: 5e-3 TruthfulQA and MQuAKE, 5e-4 CLUTRR)")
        g.add_argument("--l1", type=nonnegative_float, default=None,
                       help="step 1 L1 weight λ (default per task: 5e-4 TruthfulQA, 1e-3 MQuAKE, 5e-3 CLUTRR)")
    if tune:
        g.add_argument("--lr", type=positive_float, default=None,
                       help="step 2 learning rate (default 1e-2; with run --method: that method's default)")
    g.add_argument("--k", type=positive_int, default=None, help="number of heads to tune (default ≈3%% of heads)")
    g.add_argument("--init-std", type=nonnegative_float, default=1e-3, help="A / v init std (default 1e-3)")
    g.add_argument("--beta", type=positive_float, default=0.5, help="DPO β for TruthfulQA (default 0.5)")
    g.add_argument("--max-grad-norm", type=nonnegative_float, default=None,
                   help="gradient clipping norm, 0 for none (default: the recipe's; plain none, official 1.0, the HF "
                        "Trainer's)")
    g.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="plain (default; measured best on SmolLM2): constant rate, no EOS, 'Q: {q}\\nA:', no clipping; "
                        "official: the authors' scripts — linear decay, EOS after each completion, prompt 'Q: {q} A:', "
                        "clipping 1.0")
    g.add_argument("--schedule", choices=("linear", "constant"), default=None,
                   help="learning-rate schedule (default: the recipe's)")
    g.add_argument("--eos", dest="add_eos", action=argparse.BooleanOptionalAction, default=None,
                   help="append EOS to every training completion (default: the recipe's)")
    g.add_argument("--prompt-style", choices=("official", "newline"), default=None,
                   help="TruthfulQA prompt: official 'Q: {q} A:' or newline 'Q: {q}\\nA:' (default: the recipe's)")
    g.add_argument("--max-length", type=positive_int, default=None, help="truncate training sequences to N tokens")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="gradient accumulation: N forward passes of --batch-size per optimizer step, the same "
                        "result as an N-times larger batch (default 1)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="train under torch.autocast in bf16 or fp16; A and v stay float32 (default no)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the frozen base per decoder layer with FSDP2 "
                        "while training (A and v all-reduced as without it)")


# ----------------------------------------------------------------------------------------------- loading


def load_model_from_args(args):
    """(model, tokenizer) for --model / --dtype / --device / --quantize / --threads."""
    try:
        return load_model_for(args)
    except ValueError as exc:
        if str(exc).startswith("--device"):
            raise UserError(str(exc)) from None
        raise


def require_data(args) -> str:
    if not args.data:
        raise UserError(f"no data folder: pass --data DIR (or set ${DATA_ENV})")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder not found: {args.data}")
    return args.data


def load_items(args, which: str):
    """The task items for `which` ("train" or "eval") from --data, cut to --max-train / --max-eval."""
    data = require_data(args)
    try:
        items = task_items(args.task, data, which, fold=args.fold, max_train=args.max_train, max_eval=args.max_eval)
        return with_prompt_style(items, args.prompt_style) if getattr(args, "prompt_style", None) else items
    except ValueError as exc:
        if str(exc).startswith("no "):
            raise UserError(str(exc)) from None
        raise


# ----------------------------------------------------------------------------------------------- output


def table(rows: Dict[str, Dict[str, float]], extra: Optional[Dict[str, Dict[str, str]]] = None) -> str:
    """A plain-text table: one row per arm, one column per metric (4 decimals), then the `extra` columns."""
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


# ----------------------------------------------------------------------------------------------- checks


def fill_task_defaults(args) -> None:
    """Learning rates and λ left unset: step 2's (or the compared method's) default, and step 1's official
    values for the task (the demo runs TruthfulQA)."""
    if getattr(args, "lr", False) is None:
        args.lr = DEFAULT_LR.get(getattr(args, "method", "lofit"), DEFAULT_LR["lofit"])
    official = select_defaults(getattr(args, "task", None) or "truthfulqa")
    if getattr(args, "select_lr", False) is None:
        args.select_lr = official["lr"]
    if getattr(args, "l1", False) is None:
        args.l1 = official["l1"]
    if hasattr(args, "recipe"):
        fill_recipe(args)


def writable_folder(path: str, flag: str) -> None:
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


def head_count(model: str) -> Optional[int]:
    """Attention heads over all layers of a model name / .gguf / HF folder, from its metadata alone (None when
    the metadata does not say; the model load then reports what is wrong)."""
    try:
        directory, gguf_file = resolve_model_path(model)
        if gguf_file is not None:
            import gguf

            reader = gguf.GGUFReader(Path(directory) / gguf_file)
            arch = reader.get_field("general.architecture").contents()
            layers = reader.get_field(f"{arch}.block_count").contents()
            heads = reader.get_field(f"{arch}.attention.head_count").contents()
        else:
            config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
            config = config.get("text_config", config) if "num_hidden_layers" not in config else config
            layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        return int(layers) * int(heads)
    except Exception:  # noqa: BLE001 - any unreadable metadata: leave it to the model load
        return None


def check_args(args) -> None:
    """Every argument and path checked before anything is loaded: a mistake costs no model load and no
    evaluation, and leaves no files behind."""
    backend = getattr(args, "backend", None)
    if backend is not None:
        try:
            check_backend_name(backend)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"--backend {backend}: {exc}") from None
    if getattr(args, "fsdp", False):
        if launch()[1] < 2:
            raise UserError("--fsdp shards the base over the processes of a launch: run it under "
                            "`torchrun --nproc-per-node N -m lofit_fast.cli ...` or `accelerate launch`")
        if getattr(args, "quantize", None):
            raise UserError(f"--fsdp cannot shard a quantized base (--quantize {args.quantize})")
    k = getattr(args, "k", None)
    if k and args.command in ("run", "demo", "select", "tune") and getattr(args, "model", None):
        total = head_count(args.model)
        if total is not None and k > total:
            raise UserError(f"--k {k}: the model has only {total} heads")
    if getattr(args, "selection", None):
        seeds = getattr(args, "seeds", None) or [getattr(args, "seed", None)]
        for seed in seeds:
            try:
                selection_file(args.selection, seed)
            except FileNotFoundError as exc:
                raise UserError(str(exc)) from None
    adapter = getattr(args, "adapter", None)
    paths = [adapter] if isinstance(adapter, str) else [p for _, p in adapter or []]
    if not isinstance(adapter, str) and adapter:
        named_adapters(adapter)  # names checked too
    for path in paths:
        if path and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise UserError(f"--adapter {path}: not an adapter folder (no {CONFIG_NAME}; see lofit-fast tune)")
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        is_file = args.command == "generate" or (args.command == "export" and out.endswith(".gguf"))
        target = os.path.dirname(os.path.abspath(out)) if is_file else out
        writable_folder(target, "--out")
    if args.command == "export" and getattr(args, "format", "hf") == "hf":
        try:
            check_export_target(args.out, args.overwrite, args.model if os.path.isdir(args.model) else None)
        except FileExistsError as exc:
            raise UserError(f"--out {exc}") from None
