"""Losses on completion tokens: sequence log-probabilities, completion-only cross-entropy, sigmoid DPO.

Labels follow the HF convention: `labels[b, t]` is the token at position t, -100 where no loss applies, and
the logits at position t - 1 predict it. Log-softmax runs in float32 (float64 for float64 models) whatever
the model's dtype, and only at the positions that predict a label token (the LM head is applied there only,
when the model supports `logits_to_keep`), so long prompts with short answers cost no [B, T, vocab] float32
tensor.
"""
from __future__ import annotations

import inspect
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def forward_parameters(model) -> set:
    """The keyword arguments `model.forward` accepts (empty when it cannot be inspected)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def label_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, adapter_names=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p of every label token [N], the batch row of each [N]), in row-major order; float32 (float64 for
    a float64 model). `adapter_names`: one adapter per row, for a model holding several (`load_adapters`)."""
    if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
            f"{tuple(labels.shape)} must have the same shape [B, T]"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"expected [B, T] tensors, got input_ids of shape {tuple(input_ids.shape)}")
    device = _model_device(model)
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    if bool((labels[:, 0] != IGNORE_INDEX).any()):
        raise ValueError("labels at position 0 cannot be scored (no token precedes them); mask them with -100")
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX  # [B, T-1]: logits at t predict target[:, t]
    positions = mask.any(dim=0).nonzero().squeeze(1)  # logit positions needed by some row
    accepted = forward_parameters(model)
    kwargs = {"use_cache": False} if "use_cache" in accepted else {}  # no KV cache to build for one pass
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    if "logits_to_keep" in accepted and positions.numel() > 0:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions, **kwargs).logits
        if logits.shape[1] != positions.numel():  # the model ignored logits_to_keep
            logits = logits[:, positions]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, :-1][:, positions]
    target, mask = target[:, positions], mask[:, positions]
    selected = logits[mask]  # [N, V]
    selected = selected.to(torch.promote_types(selected.dtype, torch.float32))
    tokens = target[mask]
    logps = selected.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    rows = mask.nonzero()[:, 0]
    return logps, rows


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, adapter_names=None,
) -> torch.Tensor:
    """Σ log p(label tokens) per row: [B] in float32 (float64 for a float64 model) whatever the model's dtype;
    rows without label tokens give 0. `adapter_names`: one adapter per row (`load_adapters`)."""
    logps, rows = label_token_logprobs(model, input_ids, attention_mask, labels, adapter_names)
    out = torch.zeros(input_ids.shape[0], dtype=logps.dtype, device=logps.device)
    return out.index_add(0, rows, logps)


def completion_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over all completion tokens of the batch (labels != -100): a float32 scalar (float64 for
    a float64 model)."""
    logps, _ = label_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    if logps.numel() == 0:
        raise ValueError("the batch has no completion tokens (every label is -100)")
    return -logps.mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Sigmoid DPO (Rafailov et al. 2023): mean of -log σ(β·[(π_c − ref_c) − (π_r − ref_r)]).

    Reference log-probs are treated as constants. Metrics (floats, TRL's names): rewards/chosen and
    rewards/rejected (means of β·(π − ref)), rewards/accuracies (fraction with chosen reward > rejected
    reward), rewards/margins (mean reward difference).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape, got {sorted(map(tuple, shapes))}")
    chosen_rewards = beta * (policy_chosen_logps.float() - ref_chosen_logps.detach().float())
    rejected_rewards = beta * (policy_rejected_logps.float() - ref_rejected_logps.detach().float())
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    with torch.no_grad():
        metrics = {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((margins > 0).float().mean()),
            "rewards/margins": float(margins.mean()),
        }
    return loss, metrics
