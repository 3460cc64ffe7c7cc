"""Losses on completion tokens: sequence log-probabilities, completion-only cross-entropy, sigmoid DPO.

Labels follow the HF convention: `labels[b, t]` is the token at position t, -100 where no loss applies, and
the logits at position t - 1 predict it. Log-softmax runs in float32 (float64 for float64 models) whatever
the model's dtype, and only at the positions that predict a label token (the LM head is applied there only,
when the model supports `logits_to_keep`), so long prompts with short answers cost no [B, T, vocab] float32
tensor.

Right-padded rows are packed before the forward pass when the model can take packed sequences (`pack_rows`):
several short rows share one row of the batch's length, told apart by their position ids (HF's packed-sequence
masking), so the pass computes no padding tokens. The log-probs are those of the padded pass (to float
rounding).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Mapping, Optional, Tuple

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


# Model families whose HF attention masks separate packed sequences by their position ids (attention_mask None).
PACKABLE_MODEL_TYPES = ("llama", "gemma", "gemma2", "gemma3_text", "mistral", "qwen2", "qwen3")
PACKABLE_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def can_pack(model, accepted: Optional[set] = None) -> bool:
    """Whether `model` takes packed rows: a supported family, attention and transformers version. `accepted`:
    `forward_parameters(model)` when the caller has it already."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
        return False
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return "position_ids" in (forward_parameters(model) if accepted is None else accepted)


def pack_rows(attention_mask: torch.Tensor, lengths: Optional[List[int]] = None) -> Optional[List[List[int]]]:
    """Rows of a right-padded batch grouped so that each group's lengths sum to at most the batch's length,
    T (first fit, longest first), or None when that saves no row. Packing into rows of length T keeps each
    row's attention no larger than in the padded batch. `lengths`: the rows' lengths, when known."""
    if lengths is None:
        lengths = attention_mask.sum(dim=1).tolist()
    width = attention_mask.shape[1]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: List[List[int]] = []
    room: List[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(width - lengths[i])
    return groups if len(groups) < len(lengths) else None


def _packed(input_ids, labels, lengths: List[int], groups):
    """(input_ids, position_ids, labels, source row of each packed token) for the packed rows `groups`; the
    rest of a row is filler (token 0) that forms a sequence of its own (its labels are ignored)."""
    width = max(sum(lengths[b] for b in g) for g in groups)
    R = len(groups)
    ids = input_ids.new_zeros((R, width))
    pos = torch.zeros((R, width), dtype=torch.long, device=input_ids.device)
    lab = labels.new_full((R, width), IGNORE_INDEX)
    src = torch.full((R, width), -1, dtype=torch.long, device=input_ids.device)
    for r, group in enumerate(groups):
        at = 0
        for b in group:
            n = lengths[b]
            ids[r, at : at + n] = input_ids[b, :n]
            lab[r, at : at + n] = labels[b, :n]
            pos[r, at : at + n] = torch.arange(n, device=input_ids.device)
            src[r, at : at + n] = b
            at += n
        pos[r, at:] = torch.arange(width - at, device=input_ids.device)
    return ids, pos, lab, src


def label_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, adapter_names=None,
    *, pack: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p of every label token [N], the batch row of each [N]); float32 (float64 for a float64 model).
    Row-major order, except that packed rows (see the module's docstring) give their tokens grouped by packed
    row. `adapter_names`: one adapter per row, for a model holding several (`load_adapters`); such rows are
    never packed. pack: None packs when the model can (`can_pack`) and it saves rows; False never packs."""
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
    accepted = forward_parameters(model)
    kwargs = {"use_cache": False} if "use_cache" in accepted else {}  # no KV cache to build for one pass
    source = groups = None
    if pack is not False and adapter_names is None and input_ids.shape[0] > 1 and can_pack(model, accepted):
        lengths_t = attention_mask.sum(dim=1)
        right_padded = torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths_t.unsqueeze(1)
        # packable: right-padded, with no label on the padding
        ok = (attention_mask.bool() == right_padded).all() & ~(labels[~right_padded] != IGNORE_INDEX).any()
        lengths = lengths_t.tolist()
        if bool(ok):
            groups = pack_rows(attention_mask, lengths)
    if groups is not None:
        input_ids, position_ids, labels, source = _packed(input_ids, labels, lengths, groups)
        attention_mask = None
        kwargs["position_ids"] = position_ids
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX  # [B, T-1]: logits at t predict target[:, t]
    positions = mask.any(dim=0).nonzero().squeeze(1)  # logit positions needed by some row
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
    if source is None:
        rows = mask.nonzero()[:, 0]
    else:
        rows = source[:, 1:][:, positions][mask]
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
