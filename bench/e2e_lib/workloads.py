"""The workloads: a LoFiT training step, decode and prefill calls, and the checks that every provider computes
the same thing before anything is timed."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn

from lofit_fast.losses import completion_loss

from .common import L1
from .providers import Provider


def training_batch(vocab: int, batch: int, seq: int, completion_frac: float, device: torch.device,
                   seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random token ids; labels (the completion) on the last `completion_frac` of each row, -100 before."""
    completion = max(1, round(completion_frac * seq))
    if completion >= seq:
        raise ValueError(f"seq {seq} leaves no prompt before a completion of {completion} tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq - completion] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def training_step(model: nn.Module, batch: Dict[str, torch.Tensor], provider: Provider) -> Callable[[], None]:
    def step():
        provider.optimizer.zero_grad(set_to_none=True)
        loss = completion_loss(model, batch)
        if provider.l1_params:
            loss = loss + L1 * sum(p.abs().sum() for p in provider.l1_params)
        loss.backward()
        provider.optimizer.step()
    return step


def prompt_ids(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def decode_call(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens instead of {new_tokens}")
    return run


def prefill_call(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return run


def check_gradients(providers: Dict[str, Provider], workload: str) -> None:
    """After a step every trainable parameter must have a finite gradient (the step really trained)."""
    for name, provider in providers.items():
        missing = [i for i, p in enumerate(provider.params) if p.grad is None or not torch.isfinite(p.grad).all()]
        if missing:
            raise RuntimeError(f"{workload}/{name}: {len(missing)} of {len(provider.params)} trainable parameters got "
                               f"no finite gradient")


@torch.no_grad()
def check_inference(model: nn.Module, providers: Dict[str, Provider], vocab: int, device: torch.device) -> None:
    """fused, hooks and merged carry the same intervention: their logits must agree with each other (to 1e-4 in
    float32; in 16-bit dtypes at least 2x closer to each other than to the base model's) and differ from base."""
    ids = prompt_ids(vocab, 1, 16, device, seed=7)
    logits = {}
    for name, provider in providers.items():
        with provider.attached():
            logits[name] = model(input_ids=ids).logits.float()
    patched = [n for n in logits if n != "base"]
    if not patched:
        return
    first = logits[patched[0]]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    shift = rel(logits["base"], first) if "base" in logits else None
    if shift == 0.0:
        raise RuntimeError(f"{patched[0]} gives the base model's logits: the intervention is not active")
    fp32 = next(model.parameters()).dtype == torch.float32
    for name in patched[1:]:
        err = rel(logits[name], first)
        bound = 1e-4 if fp32 else (0.5 * shift if shift is not None else 5e-2)
        if not err <= bound:
            raise RuntimeError(f"inference providers disagree: {name} vs {patched[0]} relative error {err:.2e} "
                               f"(bound {bound:.2e}; the intervention moves the logits by {shift})")
