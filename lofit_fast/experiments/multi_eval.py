"""Several adapters evaluated in one batched pass: every item once per adapter, the rows of all adapters mixed
in the same batches (`adapter_names` per row through the fused op), then the metrics split per adapter. With
several seeds or baselines loaded at once (`lofit_fast.load_adapters`), this is one pass over the data instead
of one per adapter."""
from __future__ import annotations

from typing import Dict, List, Sequence

from ..eval import evaluate
from ..patch.multi import BASE_NAME

BASE_ROW = "base"


def evaluate_adapters(task: str, model, tokenizer, items: Sequence, names: Sequence[str], *, batch_size: int = 16,
                      progress: bool = False, return_items: bool = False) -> Dict[str, Dict[str, object]]:
    """{name: {metric: value}} for every adapter name loaded in `model` (and "base" for "__base__"), computed
    in one pass over `items`; with `return_items`, each row also has "items": the per-item scores
    ({metric: [score per item]})."""
    names = list(names)
    if not names:
        raise ValueError("no adapters to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}")
    items = list(items)
    rows = [item for item in items for _ in names]
    row_names = [name for _ in items for name in names]
    kw = {"return_items": True} if task == "truthfulqa" else {"return_predictions": True}
    out = evaluate(task, model, tokenizer, rows, batch_size=batch_size, progress=progress, adapter_names=row_names, **kw)
    if task == "truthfulqa":
        per_row = out["items"]
        metrics = ("mc1", "mc2")
    else:
        per_row = [{"accuracy": float(r["correct"])} for r in out["predictions"]]
        metrics = ("accuracy",)
    table: Dict[str, Dict[str, object]] = {}
    for j, name in enumerate(names):
        scores: Dict[str, List[float]] = {m: [float(per_row[i * len(names) + j][m]) for i in range(len(items))]
                                          for m in metrics}
        row: Dict[str, object] = {m: sum(v) / len(v) for m, v in scores.items()}
        if return_items:
            row["items"] = scores
        table[BASE_ROW if name == BASE_NAME else name] = row
    return table
