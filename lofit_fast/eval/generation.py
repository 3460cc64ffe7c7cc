"""Exact-match accuracy of greedy generations (CLUTRR, MQuAKE).

A prediction is the generated continuation with leading whitespace removed, cut at the first stop string
(a newline; for CLUTRR also a period, as the official scorer splits on '.'), then normalized like SQuAD:
lowercase, punctuation and the articles a/an/the removed, whitespace collapsed. It is correct when it equals
the normalized answer or one of its aliases (MQuAKE's new_answer_alias).

The official LoFiT scorer is less forgiving: for MQuAKE it compares the raw lowercased text after the last
"A:" of prompt + generation, up to a newline (so a leading space or a trailing period makes it wrong), for
CLUTRR the generated text up to the first period, stripped and lowercased (so "father\\nThe story..." is
wrong). The normalization here counts those as right.
"""
from __future__ import annotations

import string
import unicodedata
from typing import Dict, List, Optional, Sequence

import torch

from ..data.collate import encode_prompts, pad_left, pad_token_id
from ..data.items import GenItem
from ._common import eval_mode, progress_bar

ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (any Unicode punctuation) and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(
        " " if ch in string.whitespace else ch
        for ch in text
        if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation
    )
    return " ".join(w for w in text.split() if w not in ARTICLES)


def extract_prediction(generated: str, stop: Sequence[str] = ("\n",)) -> str:
    """The answer part of a continuation: leading whitespace removed, cut at the first stop string."""
    text = generated.lstrip()
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    if not pred:
        return False
    return any(pred == normalize_answer(a) for a in answers if normalize_answer(a))


def _generation_kwargs(model, tokenizer, max_new_tokens: int) -> dict:
    """Greedy decoding on top of the model's own generation config (which keeps model-specific settings)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id(tokenizer))
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return kwargs


def generate_greedy(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 16,
    progress: bool = True, desc: str = "generating", adapter_names: Optional[Sequence] = None,
) -> List[str]:
    """Greedy continuations of `prompts` (decoded without special tokens), generated in left-padded batches
    of prompts of similar length. The prompts are tokenized as in training (BOS when the tokenizer adds one);
    the tokenizer itself is not modified. `adapter_names`: one adapter per prompt for a model holding several
    (`lofit_fast.load_adapters`; "__base__" for none), so prompts of every adapter share the batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts (one per prompt)")
    ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    pad = pad_token_id(tokenizer)
    kwargs = _generation_kwargs(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    outputs: List[str] = [""] * len(ids)
    with eval_mode(model), torch.no_grad(), progress_bar(len(ids), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [ids[i] for i in idx]
            input_ids = pad_left(rows, pad).to(device)
            attention_mask = pad_left([[1] * len(r) for r in rows], 0).to(device)
            routed = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **routed)
            new_tokens = out[:, input_ids.shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
            bar.update(len(idx))
    return outputs


def generation_accuracy(
    model, tokenizer, items: Sequence[GenItem], *, max_new_tokens: int = 16, batch_size: int = 16,
    progress: bool = True, stop: Sequence[str] = ("\n",), return_predictions: bool = False,
    adapter_names: Optional[Sequence] = None,
) -> Dict[str, object]:
    """{"accuracy": fraction of items whose greedy answer matches (see the module docstring)}; with
    `return_predictions`, also "predictions": [{prompt, generated, prediction, answers, correct}]."""
    if len(items) == 0:
        raise ValueError("generation_accuracy: no items to evaluate")
    for n, item in enumerate(items):
        if not isinstance(item, GenItem):
            raise TypeError(f"generation_accuracy: item {n} is a {type(item).__name__}, expected GenItem")
    generated = generate_greedy(
        model, tokenizer, [item.prompt for item in items], max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress, desc="generating answers", adapter_names=adapter_names,
    )
    records = []
    for item, text in zip(items, generated):
        prediction = extract_prediction(text, stop)
        answers = [item.answer] + list(item.aliases)
        records.append({"prompt": item.prompt, "generated": text, "prediction": prediction, "answers": answers,
                        "correct": is_correct(prediction, answers)})
    result: Dict[str, object] = {"accuracy": sum(r["correct"] for r in records) / len(records)}
    if return_predictions:
        result["predictions"] = records
    return result
