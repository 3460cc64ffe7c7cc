"""Training examples for each task from its loaded items."""
from __future__ import annotations

from typing import List, Sequence, Union

from .items import GenItem, MCItem, PreferenceExample, SFTExample, check_task
from .prompts import clutrr_completion, mquake_completion, truthfulqa_completion

PAIRINGS = ("official", "zip")


def truthfulqa_pairs(items: Sequence[MCItem], pairs: str = "official") -> List[PreferenceExample]:
    """DPO preference pairs from TruthfulQA items.

    "official" (default): one pair per question, (best answer, first incorrect answer). This is what the
    official LoFiT script builds: its chosen list holds only the best answer and it truncates the chosen and
    rejected lists to the same length, so fold 0's 326 training questions give 326 pairs.
    "zip": every correct answer paired with an incorrect answer, cycling through the incorrect ones
    (max(len(correct), len(incorrect)) pairs per question); more data, not the official recipe.
    """
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {PAIRINGS}, got {pairs!r}")
    out: List[PreferenceExample] = []
    for i, item in enumerate(items):
        if not isinstance(item, MCItem):
            raise TypeError(f"truthfulqa item {i} is a {type(item).__name__}, expected MCItem")
        if not item.incorrect:
            raise ValueError(f"truthfulqa item {i} ({item.question!r}) has no incorrect answer to pair with")
        if pairs == "official":
            chosen_rejected = [(item.best, item.incorrect[0])]
        else:
            correct = item.correct or [item.best]
            n = max(len(correct), len(item.incorrect))
            chosen_rejected = [(correct[j % len(correct)], item.incorrect[j % len(item.incorrect)]) for j in range(n)]
        out.extend(
            PreferenceExample(item.prompt, truthfulqa_completion(c), truthfulqa_completion(r))
            for c, r in chosen_rejected
        )
    return out


def training_examples(
    task: str, items: Sequence, *, pairs: str = "official"
) -> Union[List[SFTExample], List[PreferenceExample]]:
    """CLUTRR / MQuAKE → `SFTExample(prompt, answer)` (the loss covers the answer tokens and EOS);
    TruthfulQA → `PreferenceExample`s for DPO, see `truthfulqa_pairs` for `pairs`."""
    check_task(task)
    if task == "truthfulqa":
        return truthfulqa_pairs(items, pairs)
    complete = clutrr_completion if task == "clutrr" else mquake_completion
    out: List[SFTExample] = []
    for i, item in enumerate(items):
        if not isinstance(item, GenItem):
            raise TypeError(f"{task} item {i} is a {type(item).__name__}, expected GenItem")
        out.append(SFTExample(item.prompt, complete(item.answer)))
    return out
