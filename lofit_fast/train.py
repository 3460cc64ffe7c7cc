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
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .patch import disabled

KINDS = ("sft", "dpo")
SCHEDULES = ("linear", "constant")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _pair_logprobs(model, tokenizer, examples, max_length) -> Tuple[torch.Tensor, torch.Tensor]:
    from .data import collate_preference, pad_token_id
    from .losses import sequence_logprobs

    batch = collate_preference(tokenizer, list(examples), max_length=max_length)
    stacked = _move(stack_pairs(batch, pad_token_id(tokenizer)), _model_device(model))
    logps = sequence_logprobs(model, stacked["input_ids"], stacked["attention_mask"], stacked["labels"])
    n = len(examples)
    return logps[:n], logps[n:]


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, tokenizer, examples: Sequence, *, batch_size: int = 8, max_length: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (chosen [N], rejected [N], float32 on the model's device) of the preference pairs under the
    model with every intervention off: the DPO reference, without a second copy of the model."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with disabled(model):
            for start in range(0, len(examples), batch_size):
                c, r = _pair_logprobs(model, tokenizer, examples[start : start + batch_size], max_length)
                chosen.append(c.float())
                rejected.append(r.float())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


class Runtime:
    """Where the loop runs: this process alone, or one rank of a multi-process launch.

    A launch is recognised by the launcher's environment (WORLD_SIZE > 1, set by `accelerate launch` and
    `torchrun`); `accelerate.PartialState` then initialises the process group and picks this rank's device.
    """

    def __init__(self, model_device: torch.device):
        self.world_size, self.rank, self.state = 1, 0, None
        self.device = model_device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=model_device.type == "cpu")
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
) -> Dict[str, object]:
    """Train `params` of `model` on `examples` and return {"history": [...], "steps", "seconds", ...}.

    kind: "sft" (SFTExample: cross-entropy on the completion tokens only) or "dpo" (PreferenceExample: the
    sigmoid DPO loss with temperature `beta`; the reference log-probs come from the same model inside
    `lofit_fast.disabled(model)`, computed once before training under no_grad).
    l1 / l1_params: adds l1·Σ|p| over `l1_params` (default: `params`) to the loss.
    max_grad_norm: clip the gradient norm of `params` (the HF Trainer, hence the official scripts, uses 1.0).
    seed: seeds the batch order (a private generator; the global RNG is left alone).
    schedule: "linear" decays the learning rate to zero over all steps (HF's default); "constant" keeps it.
    batch_size: examples per forward pass (per process); grad_accum: forward passes per optimizer step. One step
    takes batch_size × grad_accum × processes examples and is exactly one step on that global batch.
    mixed_precision: "no" (default), "bf16" or "fp16" (torch.autocast; fp16 adds a gradient scaler).
    loss_fn: for kind "sft", replaces the completion loss: loss_fn(model, batch) -> (mean loss of the batch,
    {name: float} metrics kept in the history); micro-batches are then weighted by their number of examples.
    Each history row has step, epoch, lr, loss (the total), task_loss, l1 and, for DPO, the loss's metrics;
    with several processes or micro-batches every value is the global batch's.
    The model is in train() mode while training and in eval() mode afterwards, even on error.
    """
    from .data import collate_preference, collate_sft, pad_token_id
    from .losses import IGNORE_INDEX, completion_loss, dpo_loss, sequence_logprobs

    examples = list(examples)
    params = list(params)
    l1_params = params if l1_params is None else list(l1_params)
    _check_args(examples, kind, params, lr, epochs, batch_size, beta, l1, max_grad_norm, schedule,
                grad_accum, mixed_precision)
    if loss_fn is not None and kind != "sft":
        raise ValueError(f"loss_fn replaces the SFT loss; it cannot be used with kind={kind!r}")
    rt = runtime(model)
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

    start_time = time.perf_counter()
    ref_chosen = ref_rejected = None
    if kind == "dpo":
        with autocast():
            ref_chosen, ref_rejected = reference_logprobs(
                model, tokenizer, examples, batch_size=batch_size, max_length=max_length
            )

    def micro_batches(idx: List[int]):
        """This rank's non-empty parts of the global batch `idx`, each (indices, batch, weight)."""
        out = []
        for j in range(rt.rank * grad_accum, (rt.rank + 1) * grad_accum):
            part = idx[j * batch_size : (j + 1) * batch_size]
            if not part:
                continue
            chunk = [examples[i] for i in part]
            if kind == "sft":
                cpu_batch = collate_sft(tokenizer, chunk, max_length=max_length)  # counted here: no device sync
                weight = len(part) if loss_fn is not None else int((cpu_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                batch = _move(cpu_batch, device)
            else:
                batch = _move(stack_pairs(collate_preference(tokenizer, chunk, max_length=max_length), pad_id), device)
                weight = len(part)
            out.append((part, batch, weight))
        return out

    history: List[Dict[str, float]] = []
    bar = None
    if progress and rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=desc or f"train ({kind})", dynamic_ncols=True)
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for first in range(0, n, global_batch):
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
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
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
                    **metric_sums,
                }
                history.append(row)
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
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
    }


def _loss_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (the losses' own rule, `lofit_fast.losses`)."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def _raise_non_finite(loss: torch.Tensor, step: int, epoch: int, lr: float):
    raise FloatingPointError(
        f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower the learning "
        f"rate (lr={lr}) or enable gradient clipping (max_grad_norm)"
    )
