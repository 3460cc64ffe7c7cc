"""`transformers.Trainer` for patched models: checkpoints are LoFiT adapters, not copies of the base model.

A patched model is a plain `PreTrainedModel` whose `o_proj` modules carry A and v, so `Trainer` trains it as
it is (its optimizer takes the parameters that require grad: after `lofit_fast.freeze_base`, A and v only).
What a plain `Trainer` gets wrong is saving: every checkpoint is the whole model, and `from_pretrained` of it
gives back the base model with A and v as unexpected keys. `AdapterCheckpointMixin` fixes that the way PEFT
does for its models:

    from lofit_fast.integrations import LoFiTTrainer, SFTCollator
    trainer = LoFiTTrainer(model=patched, args=TrainingArguments(...), train_dataset=examples,
                           data_collator=SFTCollator(tokenizer))
    trainer.train()                       # checkpoint-N/ holds adapter.safetensors + adapter_config.json
    lofit_fast.load_adapter(base_model, "out/checkpoint-N")

`resume_from_checkpoint` and `load_best_model_at_end` load the adapter back. `adapter_trainer(cls)` builds the
same for any Trainer subclass (TRL's trainers: see `lofit_fast.integrations.trl`). For a trainer class that
cannot be subclassed, `AdapterCheckpointCallback` writes the adapter next to each (full) checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback

from ..adapter import load_adapter, save_adapter
from ..adapter.schema import CONFIG_NAME, WEIGHTS_NAME
from ..data import SFTExample, collate_sft
from ..patch import patched_modules

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments

logger = logging.getLogger(__name__)


def is_adapter_checkpoint(directory) -> bool:
    """Whether `directory` holds a lofit_fast adapter (adapter.safetensors + adapter_config.json)."""
    d = Path(directory)
    return (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()


def release_accelerate_preparation(model: nn.Module) -> bool:
    """Undo what an earlier `accelerate.Accelerator.prepare_model` left on `model` itself: the mixed-precision
    autocast wrapper around its `forward` and the `_is_accelerate_prepared` flag. Returns whether there was any.

    Why: a model that one trainer prepared keeps both, and the next Accelerator skips a flagged model, so a second
    trainer on the same model object does not set up its own precision. With TRL's DPOTrainer that breaks the
    reference: its fused LM head calls the backbone outside the old wrapper, so training runs without autocast
    while the precomputed reference log-probs were taken under the trainer's bf16 autocast, and the first loss of a
    policy equal to its reference is not log 2. Released, the model is prepared again by the new trainer."""
    state = model.__dict__
    original = state.pop("_original_forward", None)
    prepared = bool(state.pop("_is_accelerate_prepared", False))
    if original is None:
        return prepared
    if getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is type(model).forward:
        state.pop("forward", None)  # back to the class's forward
    else:  # a forward someone had set on the instance before accelerate wrapped it
        state["forward"] = original
    return True


def _unwrap(trainer, model: Optional[nn.Module] = None) -> nn.Module:
    model = trainer.model if model is None else model
    return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)


class AdapterCheckpointMixin:
    """Mix into a `transformers.Trainer` subclass (first in the bases) so that, for a patched model,
    `save_model` and every checkpoint write the adapter (`lofit_fast.save_adapter`: A, v and heads, a few KB)
    plus the tokenizer and training arguments instead of the whole model, and resuming or
    `load_best_model_at_end` loads the adapter back (`lofit_fast.load_adapter`). Unpatched models are saved
    and loaded as `Trainer` does.

    A patched model that an earlier trainer (or Accelerator) prepared is released first
    (`release_accelerate_preparation`), so this trainer runs it in its own precision."""

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module) and patched_modules(model) and release_accelerate_preparation(model):
            logger.info("lofit_fast: released the model from an earlier Accelerator (its autocast wrapper and "
                        "prepared flag) so that %s prepares it in its own precision", type(self).__name__)
        super().__init__(*args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = _unwrap(self)
        if not patched_modules(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # every file is written by the main process only
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(model, output_dir, method="lofit", hyperparameters={
            "trainer": type(self).__name__, "global_step": int(self.state.global_step),
        })
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if not is_adapter_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = _unwrap(self, model)
        if not patched_modules(target):
            raise RuntimeError(
                f"{resume_from_checkpoint} holds a lofit_fast adapter but the trainer's model is not patched; "
                "patch it with the same heads (or lofit_fast.load_adapter) before resuming"
            )
        load_adapter(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not is_adapter_checkpoint(best):
            return super()._load_best_model()
        load_adapter(_unwrap(self), best)


_CLASSES: Dict[type, type] = {}


def adapter_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (a `transformers.Trainer` subclass) with `AdapterCheckpointMixin` in front: the same
    trainer, saving and loading LoFiT adapters for patched models. One class per input class."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"adapter_trainer needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, AdapterCheckpointMixin):
        return trainer_cls
    if trainer_cls not in _CLASSES:
        _CLASSES[trainer_cls] = type(f"LoFiT{trainer_cls.__name__}", (AdapterCheckpointMixin, trainer_cls), {
            "__module__": __name__,
            "__doc__": f"{trainer_cls.__name__} whose checkpoints are lofit_fast adapters (AdapterCheckpointMixin).",
        })
    return _CLASSES[trainer_cls]


LoFiTTrainer = adapter_trainer(Trainer)


class AdapterCheckpointCallback(TrainerCallback):
    """For any Trainer: on each save, write the patched model's adapter into the checkpoint folder
    (`{output_dir}/checkpoint-{step}/{subdir}`; main process only). The trainer itself still writes what it
    always writes; use `LoFiTTrainer` / `adapter_trainer(cls)` for checkpoints that hold the adapter only."""

    def __init__(self, subdir: str = "lofit_adapter"):
        if not subdir or os.path.isabs(subdir) or ".." in Path(subdir).parts:
            raise ValueError(f"subdir must be a relative folder name inside the checkpoint, got {subdir!r}")
        self.subdir = subdir
        self.saved: List[Path] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        if model is None:
            raise RuntimeError("AdapterCheckpointCallback.on_save got no model from the Trainer")
        while hasattr(model, "module") and not patched_modules(model):  # DDP / other wrappers
            model = model.module
        target = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.subdir
        save_adapter(model, target, method="lofit", hyperparameters={"global_step": int(state.global_step)})
        self.saved.append(target)
        return control


def _fields(example: Any, names: Sequence[str]) -> List[str]:
    if isinstance(example, Mapping):
        missing = [n for n in names if n not in example]
        if missing:
            raise KeyError(f"example is missing the fields {missing} (has {sorted(example)})")
        return [example[n] for n in names]
    try:
        return [getattr(example, n) for n in names]
    except AttributeError as exc:
        raise TypeError(f"an example must be a mapping or have the attributes {list(names)}: {exc}") from None


class SFTCollator:
    """A `data_collator` for `Trainer`: a list of SFT examples (`lofit_fast.data.SFTExample` or dicts with
    "prompt" and "completion") → input_ids / attention_mask / labels, with the loss on the completion tokens
    only (`lofit_fast.data.collate_sft`)."""

    def __init__(self, tokenizer, max_length: Optional[int] = None, **collate_kwargs):
        self.tokenizer, self.max_length, self.collate_kwargs = tokenizer, max_length, collate_kwargs

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        rows = [e if isinstance(e, SFTExample) else SFTExample(*_fields(e, ("prompt", "completion"))) for e in examples]
        return collate_sft(self.tokenizer, rows, max_length=self.max_length, **self.collate_kwargs)
