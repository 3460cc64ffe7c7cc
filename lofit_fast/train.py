"""The generic training loop shared by LoFiT and the other intervention methods.

It reproduces what the official LoFiT scripts get from the HF `Trainer` (+ TRL's `DPOTrainer`/`SFTTrainer`):
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), a linear learning-rate decay to zero with no warmup,
shuffled batches, completion-only cross-entropy for SFT tasks, the sigmoid DPO loss with the reference
log-probabilities precomputed once (TRL's `precompute_ref_log_probs=True`) and an optional L1 penalty
λ·Σ|p| on a set of parameters (the LoFiT head-selection step).

The DPO reference is the same model with every intervention off (`lofit_fast.disabled`), so no second copy
of the model is ever made.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .patch import disabled

KINDS = ("sft", "dpo")
SCHEDULES = ("linear", "constant")


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


def _check_args(examples, kind, params, lr, epochs, batch_size, beta, l1, max_grad_norm, schedule):
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
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (l1 >= 0 and math.isfinite(l1)):
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")


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
) -> Dict[str, object]:
    """Train `params` of `model` on `examples` and return {"history": [...], "steps", "seconds", ...}.

    kind: "sft" (SFTExample: cross-entropy on the completion tokens only) or "dpo" (PreferenceExample: the
    sigmoid DPO loss with temperature `beta`; the reference log-probs come from the same model inside
    `lofit_fast.disabled(model)`, computed once before training under no_grad).
    l1 / l1_params: adds l1·Σ|p| over `l1_params` (default: `params`) to the loss.
    max_grad_norm: clip the gradient norm of `params` (the HF Trainer, hence the official scripts, uses 1.0).
    seed: seeds the batch order (a private generator; the global RNG is left alone).
    schedule: "linear" decays the learning rate to zero over all steps (HF's default); "constant" keeps it.
    Each history row has step, epoch, lr, loss (the total), task_loss, l1 and, for DPO, the loss's metrics.
    The model is in train() mode while training and in eval() mode afterwards, even on error.
    """
    from .data import collate_preference, collate_sft, pad_token_id
    from .losses import completion_loss, dpo_loss, sequence_logprobs

    examples = list(examples)
    params = list(params)
    l1_params = params if l1_params is None else list(l1_params)
    _check_args(examples, kind, params, lr, epochs, batch_size, beta, l1, max_grad_norm, schedule)
    device = _model_device(model)
    pad_id = pad_token_id(tokenizer)

    n = len(examples)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if schedule == "linear":
        decay = lambda step: max(0.0, (total_steps - step) / total_steps)  # noqa: E731
    else:
        decay = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    generator = torch.Generator().manual_seed(int(seed))

    start_time = time.perf_counter()
    ref_chosen = ref_rejected = None
    if kind == "dpo":
        ref_chosen, ref_rejected = reference_logprobs(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length
        )

    history: List[Dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=desc or f"train ({kind})", dynamic_ncols=True)
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for first in range(0, n, batch_size):
                idx = order[first : first + batch_size]
                chunk = [examples[i] for i in idx]
                metrics: Dict[str, float] = {}
                if kind == "sft":
                    batch = _move(collate_sft(tokenizer, chunk, max_length=max_length), device)
                    task_loss = completion_loss(model, batch)
                else:
                    pair = collate_preference(tokenizer, chunk, max_length=max_length)
                    stacked = _move(stack_pairs(pair, pad_id), device)
                    logps = sequence_logprobs(
                        model, stacked["input_ids"], stacked["attention_mask"], stacked["labels"]
                    ).float()
                    sel = torch.tensor(idx, device=ref_chosen.device)
                    task_loss, dpo_metrics = dpo_loss(
                        logps[: len(idx)], logps[len(idx) :], ref_chosen[sel], ref_rejected[sel], beta=beta
                    )
                    metrics = {k: float(v) for k, v in dpo_metrics.items()}
                loss = task_loss.float()
                penalty = torch.zeros((), device=loss.device)
                if l1 > 0:
                    penalty = sum(p.abs().sum().float() for p in l1_params)
                    loss = loss + l1 * penalty
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower the learning "
                        f"rate (lr={lr}) or enable gradient clipping (max_grad_norm)"
                    )
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                current_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": current_lr,
                    "loss": float(loss.detach()),
                    "task_loss": float(task_loss.detach()),
                    "l1": float(penalty.detach()) if l1 > 0 else 0.0,
                    **metrics,
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
    }
