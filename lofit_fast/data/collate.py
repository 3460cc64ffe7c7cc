"""Tokenization and padding for training and scoring.

The prompt and the completion are tokenized separately and concatenated, so the label tokens are exactly
the completion's own tokens, the ones a model generating after the prompt would produce. The prompt gets the
tokenizer's BOS when the tokenizer adds one (Gemma does; SmolLM2 does not), never an EOS; the completion gets
no special tokens except an optional EOS at the end (the official scripts train on `answer</s>`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .items import PreferenceExample, SFTExample

IGNORE_INDEX = -100


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` starts with the BOS token (it does for Gemma and Llama 2, not for SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and without[:1] != [bos]


def pad_token_id(tokenizer) -> int:
    """The pad id: the tokenizer's pad token, else its EOS (padding is always masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return int(pad)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> List[List[int]]:
    """Token ids of each prompt, with BOS first when the tokenizer adds one and nothing at the end."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [[tokenizer.bos_token_id] + list(x) for x in ids]
    empty = [i for i, x in enumerate(ids) if len(x) == 0]
    if empty:  # a model cannot condition on nothing (HF fails later with an opaque reshape error)
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) is empty: it gives no tokens"
                         + (f" ({len(empty)} empty prompts in all)" if len(empty) > 1 else ""))
    return [list(x) for x in ids]


def encode_completions(tokenizer, completions: Sequence[str], *, add_eos: bool) -> List[List[int]]:
    ids = [list(x) for x in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return ids


def fit_to_length(
    prompt: List[int], completion: List[int], max_length: Optional[int], *, keep_first: int = 0
) -> Tuple[List[int], List[int]]:
    """Cut prompt + completion to `max_length` tokens: the prompt loses tokens from its left (after its first
    `keep_first` tokens, the BOS), and the completion is cut on the right only if it cannot fit beside one
    prompt token."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion
    if max_length < keep_first + 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt token and a completion token")
    completion = completion[: max_length - keep_first - 1]
    room = max_length - len(completion) - keep_first
    return prompt[:keep_first] + prompt[len(prompt) - room :], completion


def pad_right(rows: Sequence[Sequence[int]], value: int, length: Optional[int] = None) -> torch.Tensor:
    length = max(len(r) for r in rows) if length is None else length
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def pad_left(rows: Sequence[Sequence[int]], value: int, length: Optional[int] = None) -> torch.Tensor:
    length = max(len(r) for r in rows) if length is None else length
    return torch.tensor([[value] * (length - len(r)) + list(r) for r in rows], dtype=torch.long)


def _check_examples(examples, cls, name):
    if len(examples) == 0:
        raise ValueError(f"{name}: no examples to collate")
    for i, ex in enumerate(examples):
        if not isinstance(ex, cls):
            raise TypeError(f"{name}: example {i} is a {type(ex).__name__}, expected {cls.__name__}")


def _token_rows(
    tokenizer, prompts: Sequence[str], completions: Sequence[str], *, max_length, add_eos
) -> Tuple[List[List[int]], List[List[int]]]:
    """(input ids, labels) per example, unpadded."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    completion_ids = encode_completions(tokenizer, completions, add_eos=add_eos)
    keep_first = 1 if adds_bos(tokenizer) else 0
    rows, labels = [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not c:
            raise ValueError(f"example {i}: the completion {completions[i]!r} has no tokens to learn or score")
        p, c = fit_to_length(p, c, max_length, keep_first=keep_first)
        rows.append(p + c)
        labels.append([IGNORE_INDEX] * len(p) + c)
    return rows, labels


def _padded(rows, labels, pad_id: int, length: int) -> Dict[str, torch.Tensor]:
    return {
        "input_ids": pad_right(rows, pad_id, length),
        "attention_mask": pad_right([[1] * len(r) for r in rows], 0, length),
        "labels": pad_right(labels, IGNORE_INDEX, length),
    }


def collate_sft(
    tokenizer, examples: Sequence[SFTExample], *, max_length: Optional[int] = None, add_eos: bool = True
) -> Dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, attention_mask, labels} (int64 [B, T]); labels are -100 on prompt
    tokens and padding, and the completion's tokens (+ EOS when `add_eos`) elsewhere. With `max_length`, the
    prompt is cut from the left (BOS kept)."""
    _check_examples(examples, SFTExample, "collate_sft")
    rows, labels = _token_rows(
        tokenizer, [e.prompt for e in examples], [e.completion for e in examples],
        max_length=max_length, add_eos=add_eos,
    )
    return _padded(rows, labels, pad_token_id(tokenizer), max(len(r) for r in rows))


def collate_preference(
    tokenizer, examples: Sequence[PreferenceExample], *, max_length: Optional[int] = None, add_eos: bool = True
) -> Dict[str, torch.Tensor]:
    """`collate_sft` of (prompt, chosen) and of (prompt, rejected), keys prefixed `chosen_` / `rejected_`, both
    padded to the same length so they can be concatenated into one forward pass. `add_eos` follows TRL's DPO
    (which the official script uses): both completions end in EOS."""
    _check_examples(examples, PreferenceExample, "collate_preference")
    prompts = [e.prompt for e in examples]
    kw = dict(max_length=max_length, add_eos=add_eos)
    chosen = _token_rows(tokenizer, prompts, [e.chosen for e in examples], **kw)
    rejected = _token_rows(tokenizer, prompts, [e.rejected for e in examples], **kw)
    length = max(len(r) for r in chosen[0] + rejected[0])
    pad_id = pad_token_id(tokenizer)
    out = {f"chosen_{k}": v for k, v in _padded(*chosen, pad_id, length).items()}
    out.update({f"rejected_{k}": v for k, v in _padded(*rejected, pad_id, length).items()})
    return out
