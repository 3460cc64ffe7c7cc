"""The records the loaders produce and the training code consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

TASKS = ("truthfulqa", "clutrr", "mquake")

# TruthfulQA trains with DPO on (best answer, incorrect answer) pairs; CLUTRR and MQuAKE with supervised
# fine-tuning on the answer, as in the official LoFiT scripts.
_TASK_KINDS = {"truthfulqa": "dpo", "clutrr": "sft", "mquake": "sft"}


def check_task(task: str) -> str:
    if task not in _TASK_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def task_kind(task: str) -> str:
    """"dpo" for TruthfulQA, "sft" for CLUTRR and MQuAKE."""
    return _TASK_KINDS[check_task(task)]


@dataclass
class MCItem:
    """One TruthfulQA question. `prompt` is the formatted question; answers are raw strings (no leading space).
    `best` is also in `correct` for every row of the official files."""

    question: str
    prompt: str
    best: str
    correct: List[str] = field(default_factory=list)
    incorrect: List[str] = field(default_factory=list)


@dataclass
class GenItem:
    """One generation example (CLUTRR, MQuAKE): a prompt to continue, the reference answer and any aliases
    that also count as correct."""

    prompt: str
    answer: str
    aliases: List[str] = field(default_factory=list)


@dataclass
class SFTExample:
    """Supervised example: the loss covers the completion's tokens only (plus EOS, see `collate_sft`)."""

    prompt: str
    completion: str


@dataclass
class PreferenceExample:
    """DPO example: `chosen` and `rejected` are completions of the same `prompt`."""

    prompt: str
    chosen: str
    rejected: str


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file, the row and the problem."""

    def __init__(self, path, where: str, problem: str):
        self.path = str(path)
        self.where = where
        self.problem = problem
        location = f"{self.path}, {where}" if where else self.path
        super().__init__(f"{location}: {problem}")
