"""The files a run leaves in its folder: results.json (one top-level key per line, rewritten atomically after
every stage), predictions.jsonl, and reading an earlier results.json back for --resume."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from .._files import atomic_write

RESULT_KEYS = ("task", "model", "k", "heads", "trainable_params", "seconds", "base", "lofit", "random")


def folder_seed(name: str) -> Optional[int]:
    """The seed of a seeds run's seed_<seed>/ folder name, or None for any other name."""
    return int(name[5:]) if name.startswith("seed_") and name[5:].isdigit() else None


def dumps(payload: dict) -> str:
    """JSON with one top-level key per line (head lists and metric dicts stay on their line)."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in payload.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json(path: str, payload: dict) -> str:
    return atomic_write(path, dumps(payload))


def write_predictions(out: str, predictions: list) -> None:
    """Every generation with its gold answers, one JSON object per line (nothing when there are none)."""
    if predictions:
        atomic_write(os.path.join(out, "predictions.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))


def read_predictions(out: str, arms) -> list:
    """The earlier predictions.jsonl rows of the given arms (for --resume), or [] when there is none."""
    path = os.path.join(out, "predictions.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("arm") in arms]


def previous_results(path: str, info: dict) -> dict:
    """The earlier results.json in a run folder when it comes from the same settings and data (else {}); an
    unreadable one is reported on stderr, so --resume never starts over silently."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"--resume: {path} is unreadable ({type(exc).__name__}: {exc}); every stage runs again",
              file=sys.stderr, flush=True)
        return {}
    if not isinstance(previous, dict):
        print(f"--resume: {path} is not a results object; every stage runs again", file=sys.stderr, flush=True)
        return {}

    def later_stages(hyper: Optional[dict]):  # step 1's settings are checked with the selection itself
        return {k: v for k, v in (hyper or {}).items() if k not in ("select_lr", "l1")}

    same = all(previous.get(key) == info[key] for key in ("train_examples", "eval_examples", "eval_split"))
    same = same and later_stages(previous.get("hyperparameters")) == later_stages(info["hyperparameters"])
    return previous if same and isinstance(previous.get("seconds_by_stage"), dict) else {}
