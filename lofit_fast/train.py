"""The training loop shared by LoFiT and the other intervention methods (one loop: `rep_tuning` uses it too).

It reproduces what the official LoFiT scripts get from the HF `Trainer` (+ TRL's `DPOTrainer`/`SFTTrainer`):
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), a linear learning-rate decay to zero with no warmup,
shuffled batches, completion-only cross-entropy for SFT tasks, the sigmoid DPO loss with the reference
log-probabilities precomputed once (TRL's `precompute_ref_log_probs=True`) and an optional L1 penalty
λ·Σ|p| on a set of parameters (the LoFiT head-selection step).

The DPO reference is the same model with every intervention off (`lofit_fast.disabled`), so no second copy
of the model is ever made.

Scaling out. The same loop runs in every process of a multi-process launch (`accelerate launch
--num_processes N ...` or `torchrun --nproc-per-node N ...`): `accelerate.PartialState` reads the launcher's
environment, sets up the process group (gloo on CPU, NCCL on GPU) and gives each rank its device. A step takes a
global batch of `batch_size × grad_accum × processes` examples from the same seeded order as one process would;
each rank runs `grad_accum` micro-batches of `batch_size`, and each micro-batch's loss is weighted by its share of
the global batch (completion tokens for SFT, pairs for DPO, examples for a custom `loss_fn`), so one optimizer
step sees exactly the gradient of the global batch's loss: `grad_accum=N` equals an N-times larger batch, and
N processes equal one process on the same global batch. The trainable parameters (A and v: a few KB to MB) are
broadcast from rank 0 at the start and their gradients are summed over ranks with one all-reduce per step,
instead of wrapping the model in DDP: the frozen base never enters a gradient bucket and an uneven last batch
(a rank with nothing to do) needs no dummy forward. Every rank ends with the same parameters; only rank 0 shows
a progress bar. Mixed precision (`mixed_precision="bf16" | "fp16"`) runs forward and loss under
`torch.autocast` (fp16 with a gradient scaler); A and v stay float32. With one process, `grad_accum=1` and
float32 the loop is the one it always was (same batches, losses and parameters; tests/test_distributed.py).

FSDP2 (`fsdp=True`): the frozen base is sharded per decoder layer with `fully_shard` for the loop (A and v stay
out of FSDP, in `ignored_params`, and are all-reduced as above), and the plain model is given back at the end.
Checkpoints (`checkpoint_dir`, `checkpoint_every`): rank 0 writes the whole training state atomically
(safetensors + a JSON manifest written last); `train` resumes from a matching checkpoint and ends exactly where
the uninterrupted run ends (tests/test_checkpoint.py kills it with SIGKILL).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import safetensors.torch
import torch
import torch.nn as nn

from ._files import TEMP_SUFFIX, atomic_write
from .data import collate_preference, collate_sft, pad_token_id
from .losses import IGNORE_INDEX, completion_loss, dpo_loss, sequence_logprobs
from .patch import disabled, find_attention_sites

KINDS = ("sft", "dpo")
SCHEDULES = ("linear", "constant")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DIST_TIMEOUT_ENV = "LOFIT_FAST_DIST_TIMEOUT"


def _move(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad a [B, T] tensor to [B, length]."""
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1]), value)
    return torch.cat([t, pad], dim=1)


def stack_pairs(batch: Dict[str, torch.Tensor], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """One [2B, T] batch (chosen rows first, then rejected) from a preference batch, right-padded to a common
    length, so that policy log-probs of both completions come from a single forward pass."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.cat(
            [_pad_to(batch[f"chosen_{key}"], length, pad), _pad_to(batch[f"rejected_{key}"], length, pad)], dim=0
        )
    return out


def token_batches(lengths: Sequence[int], max_tokens: int, rows_per_item: int = 1) -> List[List[int]]:
    """Indices of `lengths` grouped into batches of at most `max_tokens` padded tokens each (a batch of b items
    padded to its longest, L, costs rows_per_item × b × L): longest first, so that items of similar length
    share a batch and little is padding. An item longer than the budget gets a batch of its own."""
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))  # stable: ties keep their order
    batches: List[List[int]] = []
    for i in order:
        if batches and rows_per_item * (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, tokenizer, examples: Sequence, *, batch_size: int = 8, max_length: Optional[int] = None,
    max_tokens: Optional[int] = None, add_eos: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (chosen [N], rejected [N], float32 on the model's device) of the preference pairs under the
    model with every intervention off: the DPO reference, without a second copy of the model.

    Batches: `batch_size` pairs each, in order (max_tokens None); or, with `max_tokens`, as many pairs as fit
    in that many padded tokens (a batch of b pairs padded to length L is one [2b, L] forward: 2·b·L tokens),
    longest pairs first, the results put back in the examples' order. The pairs are tokenized once."""
    examples = list(examples)
    if not examples:
        raise ValueError("no preference pairs to score")
    full = collate_preference(tokenizer, examples, max_length=max_length, add_eos=add_eos)
    lengths = torch.maximum(full["chosen_attention_mask"].sum(1), full["rejected_attention_mask"].sum(1)).tolist()
    if max_tokens is None:
        batches = [list(range(start, min(start + batch_size, len(examples))))
                   for start in range(0, len(examples), batch_size)]
    else:
        batches = token_batches(lengths, max_tokens, rows_per_item=2)
    pad_id = pad_token_id(tokenizer)
    device = _model_device(model)
    chosen = torch.empty(len(examples), dtype=torch.float32, device=device)
    rejected = torch.empty(len(examples), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with disabled(model):
            for idx in batches:
                length = max(lengths[i] for i in idx)  # what collating these pairs alone pads them to
                rows = torch.tensor(idx)
                part = {k: v[rows, :length] for k, v in full.items()}
                stacked = _move(stack_pairs(part, pad_id), device)
                logps = sequence_logprobs(model, stacked["input_ids"], stacked["attention_mask"], stacked["labels"])
                where = rows.to(device)
                chosen[where] = logps[: len(idx)].float()
                rejected[where] = logps[len(idx) :].float()
    finally:
        model.train(was_training)
    return chosen, rejected


def default_reference_tokens(tokenizer, examples: Sequence, batch_size: int, max_length: Optional[int],
                             add_eos: bool = True) -> int:
    """The token budget `train` gives the DPO reference pass: what a batch of `batch_size` of the longest pairs
    takes (2 × batch_size × the longest pair), so no reference batch is larger than the largest row batch
    would be, and short pairs share bigger batches."""
    full = collate_preference(tokenizer, list(examples), max_length=max_length, add_eos=add_eos)
    return 2 * batch_size * int(full["chosen_input_ids"].shape[1])


class Runtime:
    """Where the loop runs: this process alone, or one rank of a multi-process launch.

    A launch is recognised by the launcher's environment (WORLD_SIZE > 1, set by `accelerate launch` and
    `torchrun`); `accelerate.PartialState` then initialises the process group and picks this rank's device.
    LOFIT_FAST_DIST_TIMEOUT (seconds) sets the process group's timeout, i.e. how long a collective waits for a
    process that hangs before the run fails (torch's default: 10 min on gloo and NCCL); a process that dies
    is noticed sooner (its connections close).
    """

    def __init__(self, model_device: torch.device):
        self.world_size, self.rank, self.state = 1, 0, None
        self.device = model_device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            kwargs = {}
            timeout = os.environ.get(DIST_TIMEOUT_ENV)
            if timeout:
                try:
                    seconds = float(timeout)
                except ValueError:
                    seconds = -1.0
                if not seconds > 0:
                    raise ValueError(f"{DIST_TIMEOUT_ENV} must be a number of seconds > 0, got {timeout!r}")
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
            self.state = PartialState(cpu=model_device.type == "cpu", **kwargs)
            self.world_size, self.rank = self.state.num_processes, self.state.process_index
            self.device = self.state.device if model_device.type != "cpu" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place (nothing with one process)."""
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.broadcast(t, src=0)
        return t


def runtime(model: nn.Module) -> Runtime:
    """The Runtime for `model` (its device with one process; this rank's device in a launch)."""
    return Runtime(_model_device(model))


def _check_args(examples, kind, params, lr, epochs, batch_size, beta, l1, max_grad_norm, schedule,
                grad_accum=1, mixed_precision="no"):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if len(examples) == 0:
        raise ValueError("no training examples")
    if not params:
        raise ValueError("no parameters to train: params is empty")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"params {frozen} do not require grad")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(grad_accum, int) and not isinstance(grad_accum, bool) and grad_accum >= 1):
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {tuple(MIXED_PRECISION)}, got {mixed_precision!r}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (l1 >= 0 and math.isfinite(l1)):
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")


def _sum_gradients(rt: Runtime, params: List[nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks with one all-reduce; a parameter without a gradient on every
    rank keeps None (as with one process)."""
    if not rt.distributed:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=rt.device)
    rt.all_reduce_(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not live:
        return
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in live
    ])
    rt.all_reduce_(flat)
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


# ------------------------------------------------------------------------------------------------- FSDP2
def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _patched_with_base(model: nn.Module) -> List[nn.Module]:
    """The patched o_proj modules (they keep the Linear they replaced, for unpatch, outside the module tree)."""
    return [m for m in model.modules() if "base_layer" in m.__dict__]


def fsdp_shard(model: nn.Module, trainable: Iterable[nn.Parameter], *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard the frozen base of `model` over the processes of the current launch with FSDP2 (`fully_shard`):
    one unit per decoder layer, and the model itself (embeddings, final norm, LM head). `trainable` (A and v)
    stays out of FSDP (`ignored_params`): plain, replicated tensors whose gradients `train` sums over ranks
    with one all-reduce, as without FSDP. The patched o_proj modules keep working: FSDP gathers each layer's
    weights before its forward and backward and sets them on the modules that own them. The Linear each
    patched module keeps for `unpatch` is pointed at the shard, so no full copy of its weight stays behind.
    Every forward and backward is then a collective: every rank must run the same passes. `fsdp_unshard`
    gives the plain model back."""
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("fsdp_shard needs the process group of a multi-process launch (torchrun / "
                           "accelerate launch); none is initialised")
    if _fsdp_modules(model):
        raise ValueError("the model is already sharded with FSDP")
    patched = _patched_with_base(model)
    quantized = [m for m in patched if getattr(m, "w_sel", None) is not None]
    if quantized:
        raise ValueError("fsdp: a quantized frozen base (torchao weights) cannot be sharded with FSDP2 here; "
                         "train it without fsdp")
    ignored = set(trainable)
    sites = find_attention_sites(model)
    if not sites:
        raise ValueError("fsdp: no decoder layers found to shard")
    for site in sites:
        fully_shard(model.get_submodule(site.path), ignored_params=ignored,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    for m in patched:  # drop the last reference to each full o_proj weight
        m.base_layer.weight = m.weight
        if m.base_layer.bias is not None and m.bias is not None:
            m.base_layer.bias = m.bias
    return model


def fsdp_unshard(model: nn.Module) -> nn.Module:
    """Undo `fsdp_shard`: gather every sharded parameter (a collective: every rank calls it) and give the model
    plain, full parameters, its own classes and no FSDP hooks, so that unpatch, merge, saving and evaluation
    work as on a model that was never sharded."""
    from torch.distributed._composable_state import _module_state_mapping

    modules = _fsdp_modules(model)
    for m in modules:
        m.reshard()
    for m in modules:
        state = m._get_fsdp_state()
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                sharded = fp.sharded_param
                full = nn.Parameter(sharded.full_tensor().detach(), requires_grad=sharded.requires_grad)
                info = fp._module_info
                for owner, name in [(info.module, info.param_name)] + list(zip(info.shared_modules,
                                                                                 info.shared_param_names)):
                    owner._parameters[name] = full
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        m.__class__ = type(m).__mro__[type(m)._orig_cls_mro_index]
        _module_state_mapping.pop(m, None)
    for sub in model.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            sub.__dict__.pop(attr, None)
    for m in _patched_with_base(model):
        m.base_layer.weight = m.weight
        if m.base_layer.bias is not None and m.bias is not None:
            m.base_layer.bias = m.bias
    return model


_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout")


def _lost_peer(rt: "Runtime", e: BaseException) -> Optional[RuntimeError]:
    """The error to raise instead of `e` when `e` is a failed collective of a multi-process run (another
    process died, was killed or hangs past the timeout); None for any other error."""
    if not rt.distributed:
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _LOST_PEER))):
        return None
    return RuntimeError(
        f"training stopped on rank {rt.rank} of {rt.world_size}: a collective operation failed, most likely "
        f"because another process of the launch died or was killed ({type(e).__name__}: {e})"
    )


@contextlib.contextmanager
def _lost_peers_named(rt: "Runtime"):
    try:
        yield
    except Exception as e:
        lost = _lost_peer(rt, e)
        if lost is None:
            raise
        raise lost from e


# ------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_FORMAT = "lofit_fast.train_checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_MANIFEST = "checkpoint.json"
_TENSORS_PREFIX = "checkpoint-"
_TENSORS_SUFFIX = ".safetensors"

# Test hook: called with the step number after a checkpoint's tensor file is in place and before the manifest
# that names it is written (the one window in which a kill leaves two generations side by side).
_between_checkpoint_writes: Optional[Callable[[int], None]] = None


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: unreadable, incomplete, or from another run."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint in the folder was written by a run with other settings."""


def _fingerprint(model: nn.Module, params: List[nn.Parameter], l1_params: List[nn.Parameter], examples: List,
                 settings: Dict[str, object]) -> Dict[str, object]:
    """What must be equal for a checkpoint to continue this run: the hyperparameters, the trained parameters'
    names, shapes and dtypes, and the data (its size and a hash of its content)."""
    names = {id(p): name for name, p in model.named_parameters()}
    data = hashlib.sha256()
    for example in examples:
        data.update(repr(example).encode("utf-8"))
        data.update(b"\0")
    return {
        **settings,
        "examples": len(examples),
        "examples_sha256": data.hexdigest(),
        "params": [[names.get(id(p), f"<not in the model: {i}>"), list(p.shape), str(p.dtype).replace("torch.", "")]
                   for i, p in enumerate(params)],
        "l1_params": [names.get(id(p), f"<not in the model: {i}>") for i, p in enumerate(l1_params)],
    }


def _rng_state(device: torch.device) -> Dict[str, object]:
    """This process's random states: torch (CPU, and this rank's CUDA device if used), Python's `random`, and
    numpy's global one if numpy has been imported."""
    state: Dict[str, object] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": None,
                                "cuda": None}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, object], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["numpy"] is not None:
        import numpy as np  # recorded only where numpy was imported, so it is installed

        np.random.set_state(state["numpy"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _encode_rng(states: List[Dict[str, object]], tensors: Dict[str, torch.Tensor]) -> List[Dict[str, object]]:
    """The per-rank RNG states as tensors (into `tensors`) and JSON (returned)."""
    out = []
    for rank, st in enumerate(states):
        version, internal, gauss = st["python"]
        row: Dict[str, object] = {"python": [version, list(internal), gauss], "numpy": None,
                                  "cuda": st["cuda"] is not None}
        tensors[f"rng.{rank}.torch"] = st["torch"]
        if st["cuda"] is not None:
            tensors[f"rng.{rank}.cuda"] = st["cuda"].cpu()
        if st["numpy"] is not None:
            name, key, pos, has_gauss, cached = st["numpy"]
            tensors[f"rng.{rank}.numpy"] = torch.from_numpy(key.astype("int64"))
            row["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
        out.append(row)
    return out


def _decode_rng(rows: List[Dict[str, object]], tensors: Dict[str, torch.Tensor]) -> List[Dict[str, object]]:
    out = []
    for rank, row in enumerate(rows):
        version, internal, gauss = row["python"]
        st: Dict[str, object] = {"torch": tensors[f"rng.{rank}.torch"], "python": (version, tuple(internal), gauss),
                                 "numpy": None, "cuda": tensors[f"rng.{rank}.cuda"] if row["cuda"] else None}
        if row["numpy"] is not None:
            name, pos, has_gauss, cached = row["numpy"]
            st["numpy"] = (name, tensors[f"rng.{rank}.numpy"].numpy().astype("uint32"), pos, has_gauss, cached)
        out.append(st)
    return out


def _encode_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The optimizer's state_dict as safetensors tensors (into `tensors`) and JSON scalars and structure."""
    sd = optimizer.state_dict()
    state: Dict[str, Dict[str, object]] = {}
    for idx, entries in sd["state"].items():
        row: Dict[str, object] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
                row[key] = {"tensor": f"optimizer.{idx}.{key}"}
            else:
                row[key] = {"value": value}
        state[str(idx)] = row
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in sd["param_groups"]]
    tuples = [[k for k, v in group.items() if isinstance(v, tuple)] for group in sd["param_groups"]]
    return {"state": state, "param_groups": groups, "tuples": tuples}


def _decode_optimizer(blob: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> Dict[str, object]:
    state = {}
    for idx, row in blob["state"].items():
        state[int(idx)] = {key: (tensors[entry["tensor"]] if "tensor" in entry else entry["value"])
                           for key, entry in row.items()}
    groups = []
    for group, tuple_keys in zip(blob["param_groups"], blob["tuples"]):
        groups.append({k: (tuple(v) if k in tuple_keys else v) for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_leftovers(directory: Path, keep: Optional[str]) -> None:
    """Delete what killed checkpoint writes left behind: temporary files, and tensor files that no manifest
    names (written just before a kill, or superseded)."""
    for path in directory.iterdir():
        name = path.name
        stale_temp = name.startswith((f".{CHECKPOINT_MANIFEST}.", f".{_TENSORS_PREFIX}")) and name.endswith(TEMP_SUFFIX)
        orphan = name.startswith(_TENSORS_PREFIX) and name.endswith(_TENSORS_SUFFIX) and name != keep
        if stale_temp or orphan:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _fingerprint_differences(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key)), json.dumps(new.get(key))
            a = a if len(a) <= 80 else a[:77] + "..."
            b = b if len(b) <= 80 else b[:77] + "..."
            out.append(f"{key}: {a} in the checkpoint, {b} now")
    return out


def read_checkpoint(directory, fingerprint: Optional[Dict[str, object]] = None) -> Optional[Dict[str, object]]:
    """The checkpoint in `directory` as {"meta": the manifest (JSON), "tensors": {name: tensor}}, or None when
    the folder holds none. With `fingerprint`, a checkpoint written by a run with other settings raises
    CheckpointMismatchError naming every difference; an unreadable one raises CheckpointError."""
    directory = Path(directory)
    manifest = directory / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest} is not a readable checkpoint manifest ({e}); delete {directory} "
                              f"to start over") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{manifest} is not a lofit_fast training checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{manifest} has checkpoint version {meta.get('version')!r}; this lofit_fast reads "
                              f"version {CHECKPOINT_VERSION}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        diffs = _fingerprint_differences(meta.get("fingerprint") or {}, fingerprint)
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} was written by a training run with other settings, so it cannot be "
            f"resumed: " + "; ".join(diffs) + f". Use another checkpoint_dir, or delete {manifest} to start over "
            f"(nothing is discarded automatically)"
        )
    tensor_file = directory / str(meta.get("tensors"))
    if not tensor_file.is_file():
        raise CheckpointError(f"{manifest} names {tensor_file.name}, which is missing")
    digest = _sha256(tensor_file)
    if digest != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensor_file} does not match the hash recorded in {manifest} (corrupted file)")
    try:
        tensors = safetensors.torch.load_file(tensor_file)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{tensor_file} cannot be read as safetensors: {e}") from e
    return {"meta": meta, "tensors": tensors}


def _write_checkpoint(directory: Path, meta: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> None:
    """Tensors first (a new file, named by step), then the manifest that names it: each written atomically
    (temporary file, fsync, os.replace), so after a kill at any instant the manifest names a complete checkpoint
    (the new one or the previous one)."""
    step = int(meta["step"])
    name = f"{_TENSORS_PREFIX}{step:08d}{_TENSORS_SUFFIX}"
    data = safetensors.torch.save(tensors)
    atomic_write(directory / name, data)
    if _between_checkpoint_writes is not None:
        _between_checkpoint_writes(step)
    meta = {**meta, "tensors": name, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    # NaN allowed: a custom loss_fn metric may be NaN (Python reads it back; the loss itself is always finite)
    atomic_write(directory / CHECKPOINT_MANIFEST, json.dumps(meta, indent=1))
    _fsync_dir(directory)
    _remove_leftovers(directory, keep=name)


def train(
    model: nn.Module,
    tokenizer,
    examples: Sequence,
    *,
    kind: str = "sft",
    params: Iterable[nn.Parameter],
    lr: float,
    epochs: int,
    batch_size: int,
    beta: float = 0.5,
    l1: float = 0.0,
    l1_params: Optional[Iterable[nn.Parameter]] = None,
    max_grad_norm: Optional[float] = None,
    seed: int = 0,
    max_length: Optional[int] = None,
    progress: bool = True,
    desc: Optional[str] = None,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    mixed_precision: str = "no",
    loss_fn: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, float]]]] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 0,
    fsdp: bool = False,
    add_eos: bool = True,
) -> Dict[str, object]:
    """Train `params` of `model` on `examples` and return {"history": [...], "steps", "seconds", ...}.

    kind: "sft" (SFTExample: cross-entropy on the completion tokens only) or "dpo" (PreferenceExample: the
    sigmoid DPO loss with temperature `beta`; the reference log-probs come from the same model inside
    `lofit_fast.disabled(model)`, computed once before training under no_grad).
    l1 / l1_params: adds l1·Σ|p| over `l1_params` (default: `params`) to the loss.
    max_grad_norm: clip the gradient norm of `params` (the HF Trainer, hence the official scripts, uses 1.0).
    seed: seeds the batch order (a private generator; the global RNG is left alone).
    schedule: "linear" decays the learning rate to zero over all steps (HF's default); "constant" keeps it.
    add_eos: append the tokenizer's EOS to every completion (SFT targets and both DPO completions), as TRL's
    trainers, hence the official scripts, do; False scores the completions as MC evaluation sees them.
    batch_size: examples per forward pass (per process); grad_accum: forward passes per optimizer step. One step
    takes batch_size × grad_accum × processes examples and is exactly one step on that global batch.
    mixed_precision: "no" (default), "bf16" or "fp16" (torch.autocast; fp16 adds a gradient scaler).
    loss_fn: for kind "sft", replaces the completion loss: loss_fn(model, batch) -> (mean loss of the batch,
    {name: float} metrics kept in the history); micro-batches are then weighted by their number of examples.
    Each history row has step, epoch, lr, loss (the total), task_loss, l1, grad_norm (the gradient norm of
    `params` before clipping; after unscaling with fp16) and, for DPO, the loss's metrics;
    with several processes or micro-batches every value is the global batch's.
    checkpoint_dir / checkpoint_every: every `checkpoint_every` optimizer steps (0: never) and after the last
    step, write to `checkpoint_dir` (rank 0 only) the trained parameters, the optimizer, scheduler and gradient
    scaler states, every rank's RNG states (torch CPU and CUDA, Python `random`, numpy's if imported), the data
    position (next epoch and step, that epoch's shuffled order, the order generator's state) and the history so
    far: safetensors tensors plus a JSON manifest, each written atomically. When `train` starts and the folder
    holds a checkpoint of the same run (same fingerprint: hyperparameters, parameter names / shapes / dtypes,
    number of processes, data size and content hash), it continues from there and ends exactly where the
    uninterrupted run ends (bit for bit on CPU); a checkpoint of another run raises CheckpointMismatchError
    (it is never overwritten), an unreadable one CheckpointError. A finished run's checkpoint gives back its
    parameters and history without training again.
    fsdp: under a multi-process launch, shard the frozen base per decoder layer with FSDP2 while training
    (`fsdp_shard`; A and v stay plain and are all-reduced as without it) and give the plain model back at the
    end (`fsdp_unshard`). Every rank then runs the same forward / backward passes (a rank without examples in
    the last step runs one with weight 0). Needs WORLD_SIZE > 1.
    With several processes, a failed collective (another process died or was killed) raises a RuntimeError
    that says so; the checkpoint folder keeps its last complete checkpoint.
    The model is in train() mode while training and in eval() mode afterwards, even on error.
    """
    examples = list(examples)
    params = list(params)
    l1_params = params if l1_params is None else list(l1_params)
    _check_args(examples, kind, params, lr, epochs, batch_size, beta, l1, max_grad_norm, schedule,
                grad_accum, mixed_precision)
    if loss_fn is not None and kind != "sft":
        raise ValueError(f"loss_fn replaces the SFT loss; it cannot be used with kind={kind!r}")
    if not (isinstance(checkpoint_every, int) and not isinstance(checkpoint_every, bool) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an integer >= 0 (optimizer steps; 0: never), got {checkpoint_every!r}")
    if checkpoint_every > 0 and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir to write the checkpoints to")
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if ckpt_dir is not None and ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"checkpoint_dir {ckpt_dir} exists and is not a folder")
    if not isinstance(fsdp, bool):
        raise ValueError(f"fsdp must be True or False, got {fsdp!r}")
    rt = runtime(model)
    if fsdp and not rt.distributed:
        raise ValueError("fsdp=True shards the model over the processes of a launch (torchrun / accelerate "
                         "launch with 2 or more processes); this process runs alone (WORLD_SIZE is not > 1)")
    if rt.distributed and _model_device(model) != rt.device:
        model.to(rt.device)
    device = rt.device
    pad_id = pad_token_id(tokenizer)
    amp_dtype = MIXED_PRECISION[mixed_precision]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    n = len(examples)
    global_batch = batch_size * grad_accum * rt.world_size
    steps_per_epoch = math.ceil(n / global_batch)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if schedule == "linear":
        decay = lambda step: max(0.0, (total_steps - step) / total_steps)  # noqa: E731
    else:
        decay = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    generator = torch.Generator().manual_seed(int(seed))
    if rt.distributed:  # every rank starts from rank 0's values (as DDP does)
        with torch.no_grad():
            for p in params:
                rt.broadcast_(p.data)
    fingerprint = None
    resumed = None
    if ckpt_dir is not None:
        fingerprint = _fingerprint(model, params, l1_params, examples, dict(
            kind=kind, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, processes=rt.world_size,
            beta=beta, l1=l1, max_grad_norm=max_grad_norm, seed=int(seed), max_length=max_length,
            schedule=schedule, weight_decay=weight_decay, mixed_precision=mixed_precision, add_eos=add_eos,
            loss_fn=None if loss_fn is None else getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
        ))
        resumed = _load_for_resume(rt, ckpt_dir, fingerprint)

    start_time = time.perf_counter()
    ref_chosen = ref_rejected = None
    if kind == "dpo":
        with autocast(), _lost_peers_named(rt):
            ref_chosen, ref_rejected = reference_logprobs(
                model, tokenizer, examples, max_length=max_length, add_eos=add_eos,
                max_tokens=default_reference_tokens(tokenizer, examples, batch_size, max_length, add_eos),
            )

    if fsdp:  # after the reference pass, which runs on each rank's whole model (no collectives)
        fsdp_shard(model, params)

    def micro_batches(idx: List[int]):
        """This rank's non-empty parts of the global batch `idx`, each (indices, batch, weight). Under FSDP every
        rank runs as many passes as rank 0 (forward and backward are collectives there): a rank short of
        examples gets stand-ins (the batch's first example) with weight 0."""
        out = []
        passes = min(grad_accum, math.ceil(len(idx) / batch_size))  # rank 0's
        for j in range(rt.rank * grad_accum, (rt.rank + 1) * grad_accum):
            part = idx[j * batch_size : (j + 1) * batch_size]
            stand_in = False
            if not part:
                if not (fsdp and j - rt.rank * grad_accum < passes):
                    continue
                part, stand_in = idx[:1], True
            chunk = [examples[i] for i in part]
            if kind == "sft":
                cpu_batch = collate_sft(tokenizer, chunk, max_length=max_length, add_eos=add_eos)  # counted here: no device sync
                weight = len(part) if loss_fn is not None else int((cpu_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                batch = _move(cpu_batch, device)
            else:
                batch = _move(stack_pairs(collate_preference(tokenizer, chunk, max_length=max_length, add_eos=add_eos),
                                          pad_id), device)
                weight = len(part)
            out.append((part, batch, 0 if stand_in else weight))
        return out

    history: List[Dict[str, float]] = []
    step, start_epoch, start_in_epoch, order = 0, 0, 0, None
    if resumed is not None:
        meta, saved = resumed["meta"], resumed["tensors"]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[f"param.{i}"])
        optimizer.load_state_dict(_decode_optimizer(meta["optimizer"], saved))
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        generator.set_state(saved["rng.generator"])
        _set_rng_state(_decode_rng(meta["rng"], saved)[rt.rank], device)
        history = list(meta["history"])
        step, start_epoch, start_in_epoch, order = meta["step"], meta["epoch"], meta["step_in_epoch"], meta["order"]

    def save_checkpoint(next_epoch: int, next_in_epoch: int, epoch_order: Optional[List[int]]) -> None:
        states = [_rng_state(device)]
        if rt.distributed:  # every rank's RNG, gathered on rank 0 (a collective: every rank calls it)
            states = [None] * rt.world_size
            torch.distributed.all_gather_object(states, _rng_state(device))
        if not rt.is_main:
            return
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        tensors["rng.generator"] = generator.get_state()
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
            "step": step, "total_steps": total_steps, "finished": step == total_steps,
            "epoch": next_epoch, "step_in_epoch": next_in_epoch, "order": epoch_order,
            "history": history, "optimizer": _encode_optimizer(optimizer, tensors),
            "scheduler": scheduler.state_dict(), "scaler": None if scaler is None else scaler.state_dict(),
            "rng": _encode_rng(states, tensors),
        }
        _write_checkpoint(ckpt_dir, meta, tensors)

    bar = None
    if progress and rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=desc or f"train ({kind})", dynamic_ncols=True)
    model.train()
    try:
        for epoch in range(start_epoch, epochs):
            if order is None:
                order = torch.randperm(n, generator=generator).tolist()
            for in_epoch in range(start_in_epoch if epoch == start_epoch else 0, steps_per_epoch):
                first = in_epoch * global_batch
                parts = micro_batches(order[first : first + global_batch])
                total_weight = float(sum(w for _, _, w in parts))
                if rt.distributed:
                    total_weight = float(rt.all_reduce_(torch.tensor([total_weight], dtype=torch.float64,
                                                                     device=device)).item())
                step_task = torch.zeros((), device=device, dtype=_loss_dtype(model))
                metric_sums: Dict[str, float] = {}
                penalty = torch.zeros((), device=device)
                for i, (part, batch, weight) in enumerate(parts):
                    share = weight / total_weight if total_weight > 0 else 0.0
                    metrics: Dict[str, float] = {}
                    with autocast():
                        if kind == "sft" and loss_fn is None:
                            task_loss = completion_loss(model, batch)
                        elif kind == "sft":
                            task_loss, metrics = loss_fn(model, batch)
                        else:
                            logps = sequence_logprobs(
                                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
                            ).float()
                            sel = torch.tensor(part, device=ref_chosen.device)
                            task_loss, metrics = dpo_loss(
                                logps[: len(part)], logps[len(part) :], ref_chosen[sel], ref_rejected[sel], beta=beta
                            )
                    # float32 at least (a float64 model keeps float64, e.g. for gradient checks)
                    loss = task_loss.to(torch.promote_types(task_loss.dtype, torch.float32)) * share
                    step_task = step_task + loss.detach()
                    for k, v in metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * share
                    if l1 > 0 and rt.is_main and i == len(parts) - 1:  # once per global step
                        penalty = sum(p.abs().sum().float() for p in l1_params)
                        loss = loss + l1 * penalty
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                if rt.distributed:
                    keys = [None] * rt.world_size  # a rank with no examples this step has no metric names
                    torch.distributed.all_gather_object(keys, sorted(metric_sums))
                    names = sorted({k for ks in keys for k in ks})
                    packed = torch.tensor([float(step_task), float(penalty)] + [metric_sums.get(k, 0.0) for k in names],
                                          dtype=torch.float64, device=device)
                    rt.all_reduce_(packed)
                    step_task, penalty = packed[0].to(step_task.dtype), packed[1].float()
                    metric_sums = dict(zip(names, packed[2:].tolist()))
                    _sum_gradients(rt, params)
                total = step_task + l1 * penalty if l1 > 0 else step_task
                if not torch.isfinite(total):  # every rank sees the same value, so all of them stop
                    _raise_non_finite(total, step, epoch, lr)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if max_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                current_lr = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": current_lr,
                    "loss": float(total.detach()),
                    "task_loss": float(step_task),
                    "l1": float(penalty.detach()) if l1 > 0 else 0.0,
                    "grad_norm": float(grad_norm),
                    **metric_sums,
                }
                history.append(row)
                step += 1
                if ckpt_dir is not None and (step == total_steps or (checkpoint_every and step % checkpoint_every == 0)):
                    if in_epoch + 1 == steps_per_epoch:
                        save_checkpoint(epoch + 1, 0, None)
                    else:
                        save_checkpoint(epoch, in_epoch + 1, order)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}")
            order = None
    except Exception as e:
        lost = _lost_peer(rt, e)
        if lost is None:
            raise
        raise lost from e
    finally:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    if fsdp:
        with _lost_peers_named(rt):
            fsdp_unshard(model)
        model.eval()

    epoch_loss = [
        sum(r["loss"] for r in history if r["epoch"] == e) / max(1, sum(1 for r in history if r["epoch"] == e))
        for e in range(epochs)
    ]
    return {
        "history": history,
        "epoch_loss": epoch_loss,
        "steps": total_steps,
        "examples": n,
        "seconds": time.perf_counter() - start_time,
        "processes": rt.world_size,
        "grad_accum": grad_accum,
        "global_batch": global_batch,
        "resumed_from_step": None if resumed is None else int(resumed["meta"]["step"]),
    }


def _load_for_resume(rt: Runtime, directory: Path, fingerprint: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The checkpoint to continue from (None: start from scratch). Rank 0 reads and checks it (and removes what
    killed writes left behind) and sends it to the other ranks, so every rank resumes from the same state or
    every rank raises the same error."""
    payload: Tuple = ("none",)
    if rt.is_main:
        try:
            if directory.is_dir():
                found = read_checkpoint(directory, fingerprint)
                _remove_leftovers(directory, keep=None if found is None else found["meta"]["tensors"])
                if found is not None:
                    payload = ("ok", found)
        except CheckpointError as e:
            payload = ("error", type(e).__name__, str(e))
    if rt.distributed:
        box = [payload]
        torch.distributed.broadcast_object_list(box, src=0)
        payload = box[0]
    if payload[0] == "error":
        raise (CheckpointMismatchError if payload[1] == "CheckpointMismatchError" else CheckpointError)(payload[2])
    return payload[1] if payload[0] == "ok" else None


def _loss_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (the losses' own rule, `lofit_fast.losses`)."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def _raise_non_finite(loss: torch.Tensor, step: int, epoch: int, lr: float):
    raise FloatingPointError(
        f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower the learning "
        f"rate (lr={lr}) or enable gradient clipping (max_grad_norm)"
    )
