"""Collecting activations with hooks, batched and padding-aware.

- `head_activations`: the input of each layer's `self_attn.o_proj` (the concatenated per-head attention
  outputs, what ITI probes and what LoFiT edits), split into heads: [N, layers, heads, head_dim].
- `residual_activations`: each decoder layer's hidden-state output (the residual stream): {layer: [N, hidden]}.
- `record_residual`: a context manager that keeps the full decoder-layer outputs of one forward pass,
  with their autograd graph (what representation tuning puts a loss on).

Batches are right-padded (so causal attention never sees a pad before a real token and positions need no
fixing); the token read for each sequence is its last real one, found from the attention mask.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..patch.families import find_attention_sites


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    for tok_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    return 0  # the value under a zero attention mask never matters


def encode(
    tokenizer, texts: Sequence[str], *, max_length: Optional[int] = None, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [B, T], right-padded; with max_length, each text keeps its last
    max_length tokens (the end of a prompt is what the last-token readout needs)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    rows: List[List[int]] = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError(f"text {text!r} tokenizes to no tokens")
        if max_length is not None:
            ids = ids[-max_length:]
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token, for left or right padding."""
    if (attention_mask.sum(1) == 0).any():
        raise ValueError("a row of the attention mask has no real token")
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).to(torch.long).argmax(1)


def _layer_list(layers: Optional[Sequence[int]], n: int) -> List[int]:
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        layer = int(layer)
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: the model has {n} decoder layers")
        out.append(layer)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate layers in {list(layers)}")
    return out


def _batches(texts: Sequence[str], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(texts), batch_size):
        yield texts[start : start + batch_size]


@torch.no_grad()
def head_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
) -> torch.Tensor:
    """Per-head attention outputs (the o_proj input) at each text's last token: float32 [N, len(layers), H, d]
    on the CPU. Works on patched models too (it reads the input, before any LoFiT/ITI edit)."""
    sites = find_attention_sites(model)
    chosen = _layer_list(layers, len(sites))
    heads = {sites[i].num_heads for i in chosen}
    dims = {sites[i].head_dim for i in chosen}
    if len(heads) != 1 or len(dims) != 1:
        raise ValueError(f"the chosen layers differ in heads {sorted(heads)} or head_dim {sorted(dims)}")
    H, d = heads.pop(), dims.pop()
    device = model_device(model)
    out = []
    store: Dict[int, torch.Tensor] = {}

    def grab(slot):
        def pre_hook(module, args):
            store[slot] = args[0]
        return pre_hook

    handles = [sites[layer].attn.o_proj.register_forward_pre_hook(grab(j)) for j, layer in enumerate(chosen)]
    was_training = model.training
    model.eval()
    try:
        for chunk in _batches(texts, batch_size):
            ids, mask = encode(tokenizer, chunk, max_length=max_length, device=device)
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            rows = torch.arange(len(chunk), device=device)
            last = last_token_index(mask)
            acts = torch.stack([store[j][rows, last] for j in range(len(chosen))], dim=1)
            out.append(acts.float().cpu().view(len(chunk), len(chosen), H, d))
            store.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(out)


def _hidden(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def record_residual(model: nn.Module, layers: Sequence[int]) -> Iterator[Dict[int, torch.Tensor]]:
    """Inside the block, each forward pass stores {layer: decoder layer output [B, T, hidden]} in the yielded
    dict (with autograd history when grad is on). Steering, if any, is included: its hook runs first."""
    sites = find_attention_sites(model)
    chosen = _layer_list(layers, len(sites))
    store: Dict[int, torch.Tensor] = {}

    def grab(layer):
        def hook(module, args, output):
            store[layer] = _hidden(output)
        return hook

    handles = [model.get_submodule(sites[layer].path).register_forward_hook(grab(layer)) for layer in chosen]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def residual_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
) -> Dict[int, torch.Tensor]:
    """Residual stream (decoder layer output) at each text's last token: {layer: float32 [N, hidden]} (CPU)."""
    chosen = _layer_list(layers, len(find_attention_sites(model)))
    device = model_device(model)
    out: Dict[int, List[torch.Tensor]] = {layer: [] for layer in chosen}
    was_training = model.training
    model.eval()
    try:
        with record_residual(model, chosen) as store:
            for chunk in _batches(texts, batch_size):
                ids, mask = encode(tokenizer, chunk, max_length=max_length, device=device)
                model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
                rows = torch.arange(len(chunk), device=device)
                last = last_token_index(mask)
                for layer in chosen:
                    out[layer].append(store[layer][rows, last].float().cpu())
                store.clear()
    finally:
        model.train(was_training)
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}
