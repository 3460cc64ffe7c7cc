"""LoFiT (Yin, Ye, Durrett, NeurIPS 2024): select attention heads, then tune per-head offsets on them.

Step 1, `select_heads`: a scale A (applied as 1 + A) on the output of every attention head, trained on the
task loss + λ·Σ|A|; each head is scored by ‖A_h‖₂. Step 2, `tune`: an offset v on the K best heads of the
unmodified model, trained on the task loss; the result is the model to evaluate, save, merge or export.

Defaults follow the official scripts (github.com/fc2869/lo-fit, `train_script_*.sh` + `lofit_trainer.py`),
which train with the HF Trainer: AdamW, weight decay 0, linear decay to 0 without warmup, gradient-norm
clipping at 1.0, batch size 8, 5 epochs, A and v initialised N(0, 1e-3), TruthfulQA by DPO (β = 0.5) and
CLUTRR / MQuAKE by completion-only cross-entropy (CLUTRR on 300 training examples). Per model size:

    step 1 (A, heads selection):  lr 5e-3, λ 5e-4  Llama-2-7B (TruthfulQA), Gemma-7B
                                  lr 5e-3, λ 1e-3  Llama-2-7B (MQuAKE)
                                  lr 1e-3, λ 1e-3  Llama-2-13B
    step 2 (v, bias tuning):      lr 1e-2          Llama-2-7B (all tasks), Llama-2-13B (CLUTRR)
                                  lr 2e-2          Gemma-7B and Llama-2-13B (TruthfulQA)
                                  lr 8e-3          Gemma-7B and Llama-2-13B (MQuAKE)
    K (heads tuned):              16 of 448 Gemma-7B, 32 of 1024 Llama-2-7B, 48 of 1600 Llama-2-13B,
                                  i.e. about 3 % of all heads (`default_k`)

The defaults here are the 7B values (the smallest models in the paper, the closest to the small models this
package targets).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._files import atomic_write
from ..data import PreferenceExample, SFTExample, task_kind, training_examples
from ..patch import (
    find_attention_sites,
    freeze_base,
    normalize_heads,
    patch,
    patched_modules,
    trainable_parameters,
    unpatch,
)
from ..train import train

HEAD_FRACTION = 0.03  # K ≈ 3 % of all heads, as in the official scripts

Head = Tuple[int, int]


def default_k(model: nn.Module) -> int:
    """About 3 % of the model's attention heads, at least 1 (SmolLM2-135M: 8 of 270)."""
    total = sum(site.num_heads for site in find_attention_sites(model))
    return max(1, int(round(HEAD_FRACTION * total)))


def _model_name(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


@dataclass
class HeadSelection:
    """Per-head importance scores ‖A_h‖₂ from step 1 of LoFiT.

    scores: float32 [num_layers, num_heads]; k: the number of heads `top()` returns by default;
    meta: how the scores were obtained (task, hyper-parameters, ...), saved along with them.
    """

    scores: torch.Tensor
    k: Optional[int] = None
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if scores.dim() != 2 or scores.numel() == 0:
            raise ValueError(f"scores must be a non-empty [num_layers, num_heads] matrix, got shape {list(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")
        self.scores = scores
        if self.k is not None:
            self.k = self._check_k(self.k)

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    def _check_k(self, k) -> int:
        total = self.scores.numel()
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= total):
            raise ValueError(f"k must be an integer in [1, {total}] (the number of heads), got {k!r}")
        return k

    def ranked(self) -> List[Tuple[int, int, float]]:
        """Every (layer, head, score), best first; equal scores keep (layer, head) order."""
        flat = self.scores.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        return [(i // self.num_heads, i % self.num_heads, flat[i]) for i in order]

    def top(self, k: Optional[int] = None) -> List[Head]:
        """The k best (layer, head) pairs, best first (k defaults to `self.k`)."""
        if k is None:
            if self.k is None:
                raise ValueError("k is not set: pass top(k) or create the selection with k")
            k = self.k
        k = self._check_k(k)
        return [(layer, head) for layer, head, _ in self.ranked()[:k]]

    def to_dict(self) -> Dict[str, object]:
        return {
            "format": "lofit_fast.HeadSelection",
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "k": self.k,
            "scores": self.scores.tolist(),
            "ranked": [[layer, head, score] for layer, head, score in self.ranked()],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "HeadSelection":
        if not isinstance(data, dict) or "scores" not in data:
            raise ValueError("not a head selection: expected a JSON object with a 'scores' matrix")
        try:
            scores = torch.tensor(data["scores"], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"head selection scores are not a numeric matrix: {exc}") from None
        for key, dim in (("num_layers", 0), ("num_heads", 1)):
            if key in data and scores.dim() == 2 and data[key] != scores.shape[dim]:
                raise ValueError(f"head selection says {key}={data[key]} but its scores have {scores.shape[dim]}")
        return cls(scores, k=data.get("k"), meta=dict(data.get("meta") or {}))

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write JSON atomically (a failed save leaves the previous file intact)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "HeadSelection":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"head selection file not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"head selection file {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def check_model(self, model: nn.Module) -> None:
        """Raise if the selection's [layers, heads] shape does not match the model's."""
        sites = find_attention_sites(model)
        heads = {s.num_heads for s in sites}
        if len(sites) != self.num_layers or heads != {self.num_heads}:
            raise ValueError(
                f"head selection is for {self.num_layers} layers x {self.num_heads} heads but the model has "
                f"{len(sites)} layers x {sorted(heads)} heads"
            )


def random_heads(model: nn.Module, k: int, seed: int = 0) -> List[Head]:
    """k distinct (layer, head) pairs drawn uniformly from all the model's heads, sorted (a baseline)."""
    pairs = [(s.layer, h) for s in find_attention_sites(model) for h in range(s.num_heads)]
    if not (isinstance(k, int) and 1 <= k <= len(pairs)):
        raise ValueError(f"k must be an integer in [1, {len(pairs)}] (the number of heads), got {k!r}")
    generator = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(len(pairs), generator=generator)[:k].tolist()
    return sorted(pairs[i] for i in picked)


def as_training_examples(task: str, train_data: Sequence) -> list:
    """SFTExample / PreferenceExample lists pass through; task items are converted for `task`."""
    data = list(train_data)
    if not data:
        raise ValueError("no training data")
    if all(isinstance(x, (SFTExample, PreferenceExample)) for x in data):
        return data
    return list(training_examples(task, data))


def _loss_kind(task: str, examples: list) -> str:
    kind = task_kind(task)
    expected = "dpo" if isinstance(examples[0], PreferenceExample) else "sft"
    if kind != expected:
        raise ValueError(
            f"task {task!r} trains with {kind.upper()} but the training data are "
            f"{type(examples[0]).__name__} examples"
        )
    return kind


def _init_values(
    model: nn.Module, heads: Dict[int, List[int]], init_std: float, seed: int, salt: int
) -> Dict[int, torch.Tensor]:
    """N(0, init_std) [K_l, head_dim] per layer from a private generator (the global RNG is left alone)."""
    if not (math.isfinite(init_std) and init_std >= 0):
        raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
    sites = find_attention_sites(model)
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + salt)
    out = {}
    for layer, hs in heads.items():
        site = sites[layer]
        values = torch.randn(len(hs), site.head_dim, generator=generator, dtype=torch.float32) * init_std
        out[layer] = values.to(site.attn.o_proj.weight.device)
    return out


def _require_unpatched(model: nn.Module, what: str) -> None:
    already = sorted(patched_modules(model))
    if already:
        raise RuntimeError(
            f"{what} needs an unpatched model, but layers {already} are already patched; "
            f"call lofit_fast.unpatch(model) first (or load a fresh model)"
        )


class _FrozenBase:
    """freeze_base() for the duration of a block, then the base parameters' requires_grad flags come back."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        freeze_base(self.model)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False


# Step 1 (lr, λ) of the official Llama-2-7B scripts (fc2869/lo-fit, train_script_<task>.sh); step 2 uses
# lr 1e-2 on every task. `select_heads` keeps the TruthfulQA values as its own defaults; the CLI and
# `run_method` take the task's.
OFFICIAL_SELECT_DEFAULTS = {
    "truthfulqa": {"lr": 5e-3, "l1": 5e-4},
    "mquake": {"lr": 5e-3, "l1": 1e-3},
    "clutrr": {"lr": 5e-4, "l1": 5e-3},
}


def select_defaults(task: str) -> Dict[str, float]:
    """Step 1 learning rate and L1 weight of the official scripts for `task` (TruthfulQA's for other tasks)."""
    return dict(OFFICIAL_SELECT_DEFAULTS.get(task, OFFICIAL_SELECT_DEFAULTS["truthfulqa"]))


def select_heads(
    model: nn.Module,
    tokenizer,
    train_data: Sequence,
    *,
    task: str,
    k: Optional[int] = None,
    l1: float = 5e-4,
    lr: float = 5e-3,
    epochs: int = 5,
    batch_size: int = 8,
    init_std: float = 1e-3,
    seed: int = 0,
    backend: str = "auto",
    max_grad_norm: Optional[float] = 1.0,
    **train_kw,
) -> HeadSelection:
    """Step 1 of LoFiT: learn a scale A on every head with an L1 penalty, and rank heads by ‖A_h‖₂.

    train_data: SFTExample / PreferenceExample objects or task items (converted with `training_examples`).
    k: how many heads `HeadSelection.top()` returns by default (`default_k(model)`, ≈3 % of heads).
    Defaults (lr 5e-3, λ = l1 = 5e-4, 5 epochs, batch 8, A ~ N(0, 1e-3), clipping at 1.0) are the official
    Llama-2-7B TruthfulQA values; for 13B-sized models the official scripts use lr 1e-3 and λ 1e-3.
    Other keywords go to `lofit_fast.train.train` (beta, max_length, progress, schedule, ...).
    The model comes back unpatched, in eval mode, with its parameters' requires_grad flags as before.
    """
    _require_unpatched(model, "select_heads")
    examples = as_training_examples(task, train_data)
    kind = _loss_kind(task, examples)
    if k is None:
        k = default_k(model)
    sites = find_attention_sites(model)
    all_heads = normalize_heads("all", sites)
    A0 = _init_values(model, all_heads, init_std, seed, salt=1)
    patch(model, all_heads, scale=True, offset=False, A=A0, backend=backend)
    try:
        with _FrozenBase(model):
            params = trainable_parameters(model)
            result = train(
                model, tokenizer, examples, kind=kind, params=params, lr=lr, epochs=epochs,
                batch_size=batch_size, l1=l1, l1_params=params, max_grad_norm=max_grad_norm, seed=seed,
                desc=train_kw.pop("desc", "LoFiT step 1: select heads"), **train_kw,
            )
        modules = patched_modules(model)
        scores = torch.zeros(len(sites), max(s.num_heads for s in sites))
        for layer, module in modules.items():
            norms = module.A.detach().float().norm(dim=1).cpu()
            scores[layer, module.heads.cpu()] = norms
    finally:
        unpatch(model)
        model.eval()
    meta = {
        "method": "lofit",
        "step": "select",
        "task": task,
        "model": _model_name(model),
        "l1": l1,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "init_std": init_std,
        "seed": seed,
        "max_grad_norm": max_grad_norm,
        "train_examples": len(examples),
        "final_loss": result["epoch_loss"][-1],
        "seconds": result["seconds"],
    }
    return HeadSelection(scores, k=k, meta=meta)


def tune(
    model: nn.Module,
    tokenizer,
    train_data: Sequence,
    heads,
    *,
    task: str,
    lr: float = 1e-2,
    epochs: int = 5,
    batch_size: int = 8,
    init_std: float = 1e-3,
    seed: int = 0,
    scale: bool = False,
    offset: bool = True,
    backend: str = "auto",
    max_grad_norm: Optional[float] = 1.0,
    return_history: bool = False,
    **train_kw,
):
    """Step 2 of LoFiT: patch an offset v on `heads` of an unpatched model and train only those.

    heads: (layer, head) pairs, {layer: [heads]}, or a HeadSelection (its `top()`).
    scale / offset: which of A and v to learn (LoFiT: v only; scale=True as well gives the A+v ablation).
    Defaults (lr 1e-2, 5 epochs, batch 8, v ~ N(0, 1e-3), no L1, clipping at 1.0) are the official
    Llama-2-7B values; the official scripts use lr 2e-2 for Gemma-7B / Llama-2-13B on TruthfulQA and 8e-3
    on MQuAKE. Other keywords go to `lofit_fast.train.train` (beta, l1, max_length, progress, ...).
    Returns the patched model in eval mode (and the training record too with return_history=True). The base
    parameters' requires_grad flags are restored; A / v keep requires_grad=True. On error the model is
    unpatched again.
    """
    _require_unpatched(model, "tune")
    if isinstance(heads, HeadSelection):
        heads.check_model(model)
        heads = heads.top()
    examples = as_training_examples(task, train_data)
    kind = _loss_kind(task, examples)
    selection = normalize_heads(heads, find_attention_sites(model))
    if not selection:
        raise ValueError("no heads to tune")
    A0 = _init_values(model, selection, init_std, seed, salt=2) if scale else None
    v0 = _init_values(model, selection, init_std, seed, salt=3) if offset else None
    patch(model, selection, scale=scale, offset=offset, A=A0, v=v0, backend=backend)
    try:
        with _FrozenBase(model):
            params = trainable_parameters(model)
            result = train(
                model, tokenizer, examples, kind=kind, params=params, lr=lr, epochs=epochs,
                batch_size=batch_size, max_grad_norm=max_grad_norm, seed=seed,
                desc=train_kw.pop("desc", "LoFiT step 2: tune"), **train_kw,
            )
    except BaseException:
        unpatch(model)
        model.eval()
        raise
    model.eval()
    return (model, result) if return_history else model
