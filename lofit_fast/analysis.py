"""Pictures of a run: a layers x heads heat map of the LoFiT scores with the top K marked, and the training losses."""
from __future__ import annotations

import io
import os
from typing import Optional, Union

from ._files import atomic_write


def plot_head_scores(
    selection,
    path: Union[str, os.PathLike],
    *,
    k: Optional[int] = None,
    title: Optional[str] = None,
) -> str:
    """Write a PNG heat map of `selection.scores` (layers on the y axis, heads on the x axis) and return
    its path. The top k heads (default: `selection.k`, none if unset) are outlined and numbered by rank.
    The file is written atomically."""
    from matplotlib.figure import Figure  # the OO API renders with Agg and leaves pyplot's state alone
    from matplotlib.patches import Rectangle

    scores = selection.scores.float().numpy()
    num_layers, num_heads = scores.shape
    if k is None:
        k = selection.k or 0
    top = selection.top(k) if k else []

    width = min(16.0, 2.5 + 0.45 * num_heads)
    height = min(20.0, 1.5 + 0.22 * num_layers)
    fig = Figure(figsize=(width, height), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="‖A‖₂ (head score)")
    for rank, (layer, head) in enumerate(top, start=1):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
        if num_layers <= 64 and num_heads <= 64:
            ax.text(head, layer, str(rank), ha="center", va="center", color="white", fontsize=7, weight="bold")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    step_x = max(1, num_heads // 16)
    step_y = max(1, num_layers // 16)
    ax.set_xticks(range(0, num_heads, step_x))
    ax.set_yticks(range(0, num_layers, step_y))
    if title is None:
        task = selection.meta.get("task") if isinstance(selection.meta, dict) else None
        title = "LoFiT head scores" + (f" ({task})" if task else "")
        if top:
            title += f", top {len(top)} outlined"
    ax.set_title(title)
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())


def plot_losses(train_loss: dict, path: Union[str, os.PathLike], *, title: Optional[str] = None) -> str:
    """Write a PNG of the per-epoch training losses a run records (`results.json`'s "train_loss": a list per
    stage, or one final number for a stage that kept only that) and return its path; written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = {stage: v for stage, v in train_loss.items() if isinstance(v, list) and v}
    finals = {stage: v for stage, v in train_loss.items() if isinstance(v, (int, float))}
    if not curves and not finals:
        raise ValueError("no training losses to plot (train_loss is empty)")
    fig = Figure(figsize=(6.0, 3.8), dpi=110)
    ax = fig.subplots()
    for stage, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=stage)
    for stage, value in finals.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(f"{stage} (final) {value:.3f}", (1, value), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss per epoch")
    if curves:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())
