"""export: a plain Hugging Face checkpoint of the merged model, loadable without lofit_fast."""
from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Set, Union

import torch
import torch.nn as nn

from ..hooks import hooked_modules
from ..models import FrozenQuantizedLinear, drop_dequantized_gguf_marker
from ..ops.function import is_quantized_weight
from ..patch import HeadInterventionLinear, patched_modules
from .merge import merge


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree and config that shares every parameter and buffer with `model`.

    Costs no tensor memory. Safe as long as the copy only *replaces* tensors (as merge and the bias filling
    below do) and never writes into the shared ones.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def dequantize_weights(model: nn.Module) -> int:
    """Replace every quantized parameter (torchao, `lofit_fast.models.quantize_base`) of `model` by a new plain
    parameter holding its dequantized values, in the dtype it dequantizes to; returns how many were replaced.

    Meant for a `copy_sharing_tensors` copy: the quantized tensors themselves are not changed, so the model
    they came from keeps them. A parameter shared by several modules stays shared. A FrozenQuantizedLinear
    becomes a plain nn.Linear, and a patched o_proj drops its cached W_S, so it (and `merge`) then runs the
    float path on the dequantized weight.
    """
    new = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and is_quantized_weight(p):
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(p.dequantize().contiguous(), requires_grad=False)
                setattr(module, name, new[id(p)])
        if type(module) is FrozenQuantizedLinear:
            module.__class__ = nn.Linear  # the copy's own module object: the caller's keeps its class
        if isinstance(module, HeadInterventionLinear) and module.w_sel is not None:
            module.w_sel = None
    return len(new)


def _state_keys_for(model: nn.Module, config) -> Set[str]:
    """The state-dict keys `type(model)` has under `config`, found by building it on the meta device."""
    try:
        with torch.device("meta"):
            probe = type(model)(config)
    except Exception as exc:
        raise RuntimeError(f"cannot build {type(model).__name__} from its config on the meta device: {exc}") from exc
    return set(probe.state_dict())


def _unsupported(model: nn.Module, keys) -> RuntimeError:
    import transformers

    shown = ", ".join(sorted(keys)[:4]) + (" …" if len(keys) > 4 else "")
    return RuntimeError(
        f"cannot export {type(model).__name__}: its Hugging Face config has no way to express the merged "
        f"o_proj biases in transformers {transformers.__version__} (built with attention_bias=True, the model "
        f"class has no parameter for {shown}). "
        "Keep the adapter with lofit_fast.save_adapter instead, or tune with offset=False (a scale-only "
        "intervention merges into the weights alone)."
    )


def express_biases_in_config(model: nn.Module) -> None:
    """Make `model`'s config describe exactly its parameters, turning on `attention_bias` when an o_proj has a
    bias; q/k/v (and o_proj of unmerged layers) then get zero biases, so loading finds no missing keys.

    Works on any family: the keys expected with `attention_bias=True` come from building the model class on
    the meta device, so a family whose modeling code ignores the flag for some projection (Mistral and
    Qwen2 in transformers 5 hard-code `o_proj` without a bias) gives a clear error instead of a checkpoint
    that silently drops the offsets.
    """
    present = set(model.state_dict())
    if present == _state_keys_for(model, model.config):
        return
    text_config = model.config.get_text_config()
    if getattr(text_config, "attention_bias", False):
        raise _unsupported(model, present ^ _state_keys_for(model, model.config))
    trial = copy.deepcopy(model.config)
    trial.get_text_config().attention_bias = True
    expected = _state_keys_for(model, trial)
    if present - expected:
        raise _unsupported(model, present - expected)
    filled = []
    for key in sorted(expected - present):
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        if name != "bias" or not isinstance(module, nn.Linear) or module.bias is not None:
            raise RuntimeError(f"cannot export {type(model).__name__}: attention_bias=True expects {key}, which is not a missing Linear bias")
        filled.append((module, torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)))
    for module, zeros in filled:
        module.bias = nn.Parameter(zeros, requires_grad=False)
    text_config.attention_bias = True


def export(
    model: nn.Module,
    directory: Union[str, Path],
    *,
    tokenizer=None,
    safe_serialization: bool = True,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
) -> Path:
    """Save `model` with its interventions merged as a plain Hugging Face checkpoint (model safetensors,
    config.json, generation_config.json, and the tokenizer when given); returns the directory.

    `AutoModelForCausalLM.from_pretrained(directory)` loads it with nothing from lofit_fast and gives the same
    logits. The caller's model is not changed: a patched model is merged on a copy that shares the base
    tensors (no extra memory beyond the merged o_proj weights). Offsets need an o_proj bias, which Hugging
    Face configs express only with `attention_bias=True`; that also adds q/k/v biases, written as zeros.

    A quantized frozen base (torchao weight-only, `lofit_fast.models.quantize_base`) is exported dequantized:
    plain float weights (the dtype the quantized tensors dequantize to) equal to the quantized ones, with A
    folded into the o_proj columns and v into an o_proj bias, exactly as on a float model (the same W_S the
    quantized forward uses; no requantization). Any serving stack loads it with transformers alone (no torchao,
    no lofit_fast), and may requantize it with its own scheme; the logits match the patched quantized model up
    to float rounding. The copy needs the memory of the dequantized weights while it is written.

    The checkpoint is written to a temporary folder beside `directory` and renamed into place at the end, so
    a failure (a full disk) leaves no half-written checkpoint and whatever was there before. A non-empty
    `directory` is refused unless `overwrite`; the folder the model was loaded from is always refused.
    """
    if not safe_serialization:
        raise ValueError("export writes safetensors only: pickle checkpoints can run arbitrary code when loaded")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"export needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    if hooked_modules(model):
        raise RuntimeError(
            "the model carries lofit_fast.hooks interventions, which export would drop; use lofit_fast.patch"
        )
    directory = Path(directory)
    check_export_target(directory, overwrite, model_source_folder(model))
    work = copy_sharing_tensors(model)
    dequantize_weights(work)
    if patched_modules(work):
        merge(work)
    drop_dequantized_gguf_marker(work)
    express_biases_in_config(work)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.export-"))
    try:
        work.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def model_source_folder(model: nn.Module) -> Optional[Path]:
    """The local folder `model` was loaded from (its config's name_or_path), if it is one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name)
    return path.resolve() if name and path.is_dir() else None


def check_export_target(directory: Path, overwrite: bool, source: Optional[Path] = None) -> None:
    """Refuse, before any work, a target that is the model's own folder (`source`) or a non-empty one (unless
    `overwrite`)."""
    directory = Path(directory)
    if source is not None and directory.resolve() == Path(source).resolve():
        raise FileExistsError(f"{directory} is the model folder (the folder the model was loaded from): exporting "
                              "there would replace the base model's own files; choose another --out")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass --overwrite (overwrite=True) to replace it")


def replace_folder(staging: Path, directory: Path) -> None:
    """Move a finished `staging` folder to `directory`, replacing any folder there (moved aside first, then
    removed: a crash between the two renames leaves it, whole, as .{name}.old-*)."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
    os.rmdir(aside)
    os.replace(directory, aside)
    os.replace(staging, directory)
    shutil.rmtree(aside, ignore_errors=True)
