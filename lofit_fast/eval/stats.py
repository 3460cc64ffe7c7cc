"""Paired comparisons of two evaluations of the same items (e.g. LoFiT vs random heads on one test set)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, samples: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> Dict[str, float]:
    """Mean of a − b over items, its percentile bootstrap interval (items resampled with replacement, the
    pairs kept together), and the fraction of resamples where a does not beat b (a one-sided p-value)."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} scores against {len(b)}; the items must be the same")
    if len(a) == 0:
        raise ValueError("paired_bootstrap: no items")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (samples, len(diff)), generator=generator)
    means = diff[idx].mean(dim=1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return {"mean_diff": float(diff.mean()), "ci_low": low, "ci_high": high,
            "p_not_better": float((means <= 0).double().mean()), "items": len(diff), "confidence": confidence}
