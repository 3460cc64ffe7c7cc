"""ITI, inference-time intervention (Li et al., NeurIPS 2023), on the LoFiT machinery.

fit: per-head attention outputs (the o_proj input) at the last token of `Q: {question} A: {answer}` for every
true and false answer; one logistic probe per (layer, head) trained on a question-level split; heads ranked by
validation accuracy; for the top K, the mass-mean direction θ = unit(mean(true) − mean(false)) and σ, the
std of the activations projected on θ (both over all examples, as in the reference implementation).

apply: the shift α·σ·θ is a LoFiT offset `v` on those heads with no scale and no training, so the edited model
is a `lofit_fast.patch`-ed model like any other (same kernels, save/merge/export), and because the offset is
applied inside o_proj it edits every position of every sequence, padded batches and generation included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data import MCItem
from ..patch import patch, patched_modules
from .activations import head_activations
from .repe import answer_pairs

# Li et al. shift 48 of the 1024 heads of 32-layer x 32-head models; other models keep that fraction.
REFERENCE_K, REFERENCE_HEADS = 48, 1024


def default_k(total_heads: int) -> int:
    return max(1, round(total_heads * REFERENCE_K / REFERENCE_HEADS))


@dataclass
class ITIResult:
    """heads: (layer, head) best first; directions [K, d] unit; sigmas [K]; probe_accuracies [L, H] (validation
    accuracy of every head's probe); alpha: the default strength."""

    heads: List[Tuple[int, int]]
    directions: torch.Tensor
    sigmas: torch.Tensor
    probe_accuracies: torch.Tensor
    alpha: float = 15.0
    meta: Dict[str, object] = field(default_factory=dict)

    def offsets(self, alpha: Optional[float] = None) -> Dict[int, torch.Tensor]:
        """{layer: [K_layer, d]} shifts α·σ·θ, rows in ascending head order (the order `patch` uses)."""
        alpha = self.alpha if alpha is None else float(alpha)
        rows: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        for (layer, head), theta, sigma in zip(self.heads, self.directions, self.sigmas):
            rows.setdefault(layer, []).append((head, alpha * sigma * theta))
        return {layer: torch.stack([v for _, v in sorted(r, key=lambda t: t[0])]) for layer, r in sorted(rows.items())}

    def head_map(self) -> Dict[int, List[int]]:
        out: Dict[int, List[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, []).append(head)
        return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def qa_text(question: str, answer: str) -> str:
    return f"Q: {question} A: {answer}"


def probe_examples(items: Sequence, task: str = "truthfulqa", seed: int = 0) -> Tuple[List[str], torch.Tensor, torch.Tensor]:
    """(texts, labels [N] (1 true / 0 false), item index [N]).

    TruthfulQA items (question, correct, incorrect): `Q: {question} A: {answer}` for every answer, as in the
    reference implementation. CLUTRR / MQuAKE items (prompt, answer): the prompt with its answer (true) and
    with another item's different answer (false), see `repe.answer_pairs`.
    """
    texts, labels, groups = [], [], []
    if items and all(isinstance(item, MCItem) or hasattr(item, "incorrect") for item in items):
        for q, item in enumerate(items):
            for answers, label in ((item.correct, 1), (item.incorrect, 0)):
                for answer in answers:
                    texts.append(qa_text(item.question, answer))
                    labels.append(label)
                    groups.append(q)
    else:
        for q, (prompt, good, bad) in enumerate(answer_pairs(task, items, seed=seed)):
            texts += [prompt + good, prompt + bad]
            labels += [1, 0]
            groups += [q, q]
    if not texts:
        raise ValueError("no answers in the items")
    return texts, torch.tensor(labels), torch.tensor(groups)


def split_by_group(groups: torch.Tensor, val_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, val) example indices, with every question's answers on the same side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = torch.unique(groups)
    if ids.numel() < 2:
        raise ValueError("need at least 2 questions to split into train and validation")
    perm = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(int(seed)))]
    n_val = min(ids.numel() - 1, max(1, round(val_fraction * ids.numel())))
    val_groups = perm[:n_val]
    is_val = torch.isin(groups, val_groups)
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _logistic_loss(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    """[P] mean log-loss of logits z [N, P] against y [N], plus lam/2·‖w without bias‖²."""
    nll = torch.nn.functional.softplus(z) - y[:, None] * z
    return nll.mean(0) + 0.5 * lam * (w[:, :-1] ** 2).sum(1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, C: float = 1.0, iters: int = 50, tol: float = 1e-9) -> torch.Tensor:
    """Independent L2-regularized logistic regressions, one per probe, by damped Newton steps in float64.

    x [N, P, d] (features of P probes), y [N] in {0, 1}. Minimizes Σ_n logloss + ‖w‖²/(2C) per probe (the
    sklearn objective; the bias is not penalized). Returns weights [P, d + 1] (last column: bias).
    """
    x = x.double()
    y = y.double()
    N, P, d = x.shape
    lam = 1.0 / (C * N)
    xb = torch.cat([x, x.new_ones(N, P, 1)], dim=2).permute(1, 0, 2)  # [P, N, d+1]
    reg = torch.full((d + 1,), lam, dtype=torch.float64)
    reg[-1] = 1e-10
    w = torch.zeros(P, d + 1, dtype=torch.float64)
    z = torch.zeros(N, P, dtype=torch.float64)
    loss = _logistic_loss(z, y, w, lam)
    for _ in range(iters):
        p = torch.sigmoid(z)
        grad = torch.einsum("pnd,np->pd", xb, p - y[:, None]) / N + reg * w
        if grad.abs().max() < tol:
            break
        s = (p * (1 - p)).T[:, :, None]  # [P, N, 1]
        hess = (xb * s).transpose(1, 2) @ xb / N + torch.diag_embed(reg.expand(P, -1))
        step = torch.linalg.solve(hess, grad)
        decrease = (grad * step).sum(1)
        t = torch.ones(P, dtype=torch.float64)
        for _ in range(30):  # backtracking per probe (Armijo)
            w_new = w - t[:, None] * step
            z_new = torch.einsum("pnd,pd->np", xb, w_new)
            new_loss = _logistic_loss(z_new, y, w_new, lam)
            ok = new_loss <= loss - 1e-4 * t * decrease
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        if not ok.any():
            break
        w = torch.where(ok[:, None], w_new, w)
        z = torch.where(ok[None, :], z_new, z)
        loss = torch.where(ok, new_loss, loss)
    return w


def probe_accuracies(
    acts: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor, *, chunk: int = 64
) -> torch.Tensor:
    """Validation accuracy [P] of one logistic probe per column of acts [N, P, d] (features standardized with
    the training statistics)."""
    N, P, d = acts.shape
    y = labels.double()
    out = torch.empty(P, dtype=torch.float64)
    for start in range(0, P, chunk):
        block = acts[:, start : start + chunk].double()
        train, val = block[train_idx], block[val_idx]
        mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
        w = fit_logistic((train - mean) / std, y[train_idx])
        xv = (val - mean) / std
        z = torch.einsum("npd,pd->np", xv, w[:, :-1]) + w[:, -1]
        out[start : start + chunk] = ((z > 0).double() == y[val_idx, None]).double().mean(0)
    return out


def mass_mean_directions(acts: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(θ [P, d] unit mean(true) − mean(false), σ [P] std of acts·θ) for acts [N, P, d]."""
    a = acts.double()
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("need both true and false examples")
    diff = a[pos].mean(0) - a[neg].mean(0)
    theta = diff / diff.norm(dim=1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("npd,pd->np", a, theta)
    return theta, proj.std(0, unbiased=False)


def fit_from_activations(
    acts: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    *,
    k: Optional[int] = None,
    alpha: float = 15.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ITIResult:
    """ITI from activations [N, L, H, d] with labels [N] (1/0) and question ids [N] (for the split)."""
    if acts.dim() != 4:
        raise ValueError(f"acts must be [N, layers, heads, head_dim], got {list(acts.shape)}")
    N, L, H, d = acts.shape
    if labels.shape != (N,) or groups.shape != (N,):
        raise ValueError(f"labels and groups must have shape [{N}], got {list(labels.shape)}, {list(groups.shape)}")
    k = default_k(L * H) if k is None else int(k)
    if not 1 <= k <= L * H:
        raise ValueError(f"k must be in [1, {L * H}] (the model's head count), got {k}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    flat = acts.reshape(N, L * H, d)
    train_idx, val_idx = split_by_group(groups, val_fraction, seed)
    acc = probe_accuracies(flat, labels, train_idx, val_idx)
    order = sorted(range(L * H), key=lambda p: (-float(acc[p]), p))[:k]
    theta, sigma = mass_mean_directions(flat[:, order], labels)
    return ITIResult(
        heads=[(p // H, p % H) for p in order],
        directions=theta.float(),
        sigmas=sigma.float(),
        probe_accuracies=acc.float().view(L, H),
        alpha=float(alpha),
        meta={"examples": N, "train": int(train_idx.numel()), "val": int(val_idx.numel()), "seed": seed},
    )


def fit(
    model: nn.Module,
    tokenizer,
    items: Sequence,
    *,
    k: Optional[int] = None,
    alpha: float = 15.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    task: str = "truthfulqa",
) -> ITIResult:
    """Probe every head on the items (see `probe_examples`; TruthfulQA by default) and pick the ITI heads."""
    texts, labels, groups = probe_examples(items, task, seed)
    acts = head_activations(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return fit_from_activations(acts, labels, groups, k=k, alpha=alpha, val_fraction=val_fraction, seed=seed)


def apply(model: nn.Module, result: ITIResult, *, alpha: Optional[float] = None, backend: str = "auto") -> nn.Module:
    """Patch the ITI heads with the fixed offset α·σ·θ (v frozen, no scale). Undo with `lofit_fast.unpatch`;
    merge/save with the adapter helpers like any LoFiT adapter."""
    device = next(model.parameters()).device
    offsets = {layer: v.to(device) for layer, v in result.offsets(alpha).items()}
    patch(model, result.head_map(), scale=False, offset=True, v=offsets, backend=backend)
    for module in patched_modules(model).values():
        module.v.requires_grad_(False)
    return model
