"""Evaluation: TruthfulQA MC1/MC2 from answer log-probs, exact match of greedy generations for CLUTRR and
MQuAKE, and `evaluate(task, ...)` dispatching by task."""
from __future__ import annotations

from typing import Dict, Sequence

from ..data.items import check_task
from .generation import (
    extract_prediction,
    generate_greedy,
    generation_accuracy,
    is_correct,
    normalize_answer,
)
from .stats import paired_bootstrap
from .truthfulqa import mc_scores, score_answers, score_token_continuations, takes_kv_cache, truthfulqa_mc

# Where a generated answer ends, per task (CLUTRR's official scorer also cuts at the first period).
STOP_STRINGS = {"clutrr": ("\n", "."), "mquake": ("\n",)}


def evaluate(task: str, model, tokenizer, items: Sequence, **kw) -> Dict[str, float]:
    """TruthfulQA → {"mc1", "mc2"} (`truthfulqa_mc`); CLUTRR, MQuAKE → {"accuracy"} (`generation_accuracy`,
    with the task's stop strings unless `stop` is given). Keyword arguments go to that function."""
    check_task(task)
    if task == "truthfulqa":
        return truthfulqa_mc(model, tokenizer, items, **kw)
    kw.setdefault("stop", STOP_STRINGS[task])
    return generation_accuracy(model, tokenizer, items, **kw)


__all__ = [
    "evaluate",
    "truthfulqa_mc",
    "mc_scores",
    "score_answers",
    "score_token_continuations",
    "takes_kv_cache",
    "generation_accuracy",
    "generate_greedy",
    "normalize_answer",
    "extract_prediction",
    "is_correct",
    "paired_bootstrap",
    "STOP_STRINGS",
]
