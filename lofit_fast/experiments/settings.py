"""What an experiment needs to know: its settings (one dataclass, the CLI's options by name), the model it runs
on and the task's items, loaded the way every pipeline loads them."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data import TASKS, load_split
from ..methods.lofit import select_defaults
from ..models import load_model
from .recipes import DEFAULT_RECIPE, fill_recipe

DEFAULT_SEED = 42  # the official LoFiT scripts' seed
CLUTRR_TRAIN_SIZE = 300  # LoFiT trains on 300 CLUTRR examples
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Learning rates per method when none is given (LoFiT's are the official 7B values; LoRA / RED the usual
# ranges for models of this size).
DEFAULT_LR = {"lofit": 1e-2, "lora": 5e-4, "red": 5e-3, "rep_tuning": 5e-3}
HYPERPARAMETER_KEYS = ("epochs", "batch_size", "select_lr", "l1", "lr", "init_std", "beta", "max_grad_norm",
                       "max_length", "seed", "dtype", "backend", "fold", "max_train", "max_eval", "grad_accum",
                       "mixed_precision", "quantize", "recipe", "schedule", "add_eos", "prompt_style")


@dataclasses.dataclass
class RunSettings:
    """The settings of a LoFiT run (base, step 1, step 2 on the top K and on K random heads). The numeric
    defaults are the official LoFiT scripts' (Llama-2-7B values); the learning rates and λ left at None take the
    task's official value (`lofit_fast.methods.lofit.select_defaults`, 1e-2 for step 2), and the schedule, EOS,
    prompt and clipping left at None their recipe's (`lofit_fast.experiments.recipes`; default "plain", the
    one measured best, "official" for the authors' choices)."""

    task: str = "truthfulqa"
    out: str = os.path.join("runs", "truthfulqa")
    model: str = "smollm2"
    device: str = "auto"
    dtype: str = "float32"
    quantize: Optional[str] = None
    backend: str = "auto"
    seed: int = DEFAULT_SEED
    threads: Optional[int] = None
    quiet: bool = False
    fold: int = 0
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    eval_batch_size: int = 16
    epochs: int = 5
    batch_size: int = 8
    select_lr: Optional[float] = None
    l1: Optional[float] = None
    lr: Optional[float] = None
    k: Optional[int] = None
    init_std: float = 1e-3
    beta: float = 0.5
    max_grad_norm: Optional[float] = None
    max_length: Optional[int] = None
    grad_accum: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    fsdp: bool = False
    resume: bool = False
    selection: Optional[str] = None
    method: str = "lofit"
    recipe: str = DEFAULT_RECIPE
    schedule: Optional[str] = None
    add_eos: Optional[bool] = None
    prompt_style: Optional[str] = None

    def __post_init__(self):
        fill_recipe(self)
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method, DEFAULT_LR["lofit"])
        official = select_defaults(self.task)
        if self.select_lr is None:
            self.select_lr = official["lr"]
        if self.l1 is None:
            self.l1 = official["l1"]

    @classmethod
    def of(cls, settings: Any) -> "RunSettings":
        """`settings` itself, or a RunSettings with the fields an argparse Namespace (or any object) has."""
        if isinstance(settings, cls):
            return settings
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(settings).items() if k in names})


def hyperparameters(settings) -> Dict[str, Any]:
    """The settings recorded with a run's results and adapters (and compared by --resume)."""
    return {k: getattr(settings, k) for k in HYPERPARAMETER_KEYS if hasattr(settings, k)}


def launch() -> Tuple[int, int]:
    """(rank, processes) of an `accelerate launch` / `torchrun` launch; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> str:
    """cpu / cuda / cuda:N for a device name or "auto" (under a multi-process launch: this rank's GPU)."""
    if name == "auto":
        if torch.cuda.is_available() and launch()[1] > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return name


def load_model_for(settings):
    """(model, tokenizer) for the settings' model, dtype, device, quantization and thread count."""
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    if getattr(settings, "threads", None):
        torch.set_num_threads(settings.threads)
    quiet = getattr(settings, "quiet", False)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load_model(settings.model, dtype=DTYPES[settings.dtype], device=resolve_device(settings.device),
                      quantize=getattr(settings, "quantize", None), progress=not quiet)


def splits(task: str) -> Tuple[str, str]:
    """(training split, evaluation split): TruthfulQA reports test, CLUTRR / MQuAKE report val."""
    return ("train", "test") if task == "truthfulqa" else ("train", "val")


def task_items(task: str, data: str, which: str, *, fold: int = 0, max_train: Optional[int] = None,
               max_eval: Optional[int] = None) -> List:
    """The task's items for `which` ("train" or "eval") from the data folder, cut to max_train / max_eval
    (CLUTRR training defaults to LoFiT's 300 examples)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    train_split, eval_split = splits(task)
    if which == "train":
        limit = max_train if max_train is not None or task != "clutrr" else CLUTRR_TRAIN_SIZE
        split = train_split
    else:
        limit, split = max_eval, eval_split
    items = load_split(task, data, split, fold=fold, limit=limit)
    if not items:
        raise ValueError(f"no {task} {split} examples found in {data}")
    return list(items)


def log(settings, message: str) -> None:
    """A progress line on stderr, unless the settings say quiet."""
    if not getattr(settings, "quiet", False):
        print(message, file=sys.stderr, flush=True)
