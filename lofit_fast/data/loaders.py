"""Loaders for the official LoFiT data files: TruthfulQA fold CSVs, CLUTRR JSON, MQuAKE JSONL.

Every format problem raises `DataFormatError` naming the file, the row (CSV line, JSON record, JSONL line)
and what is wrong.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Union

from .items import DataFormatError, GenItem, MCItem, check_task
from .prompts import (
    clutrr_completion,
    clutrr_prompt,
    mquake_edit,
    mquake_prompt,
    truthfulqa_prompt,
)

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "val", "test")
TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def split_answers(text: str) -> List[str]:
    """`"a; b;c"` → `["a", "b", "c"]`: `;`-separated, stripped, empty pieces dropped."""
    return [a.strip() for a in text.split(";") if a.strip()]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a file in another encoding is a DataFormatError naming the file and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(path, f"line {line}, byte {exc.start}",
                              f"not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None


def _csv_rows(reader, path) -> Iterator[list]:
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFormatError(path, f"line {reader.line_num}", f"bad CSV: {exc}") from None
        yield fields


def load_truthfulqa(path: PathLike) -> List[MCItem]:
    """A TruthfulQA fold CSV (Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers,
    Source; answers separated by `;`) → one `MCItem` per row, prompt `Q: {question} A:`."""
    path = Path(path)
    items: List[MCItem] = []
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, "", "the file is empty (no header row)")
        missing = [c for c in TRUTHFULQA_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(path, "header (line 1)", f"missing column(s) {missing}; found {header}")
        row_start = reader.line_num + 1
        for fields in _csv_rows(reader, path):
            where = f"line {row_start}"
            row_start = reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataFormatError(path, where, f"{len(fields)} fields, the header has {len(header)}")
            row = dict(zip(header, fields))
            cells = {c: (row.get(c) or "").strip() for c in TRUTHFULQA_COLUMNS}
            for column in ("Question", "Best Answer"):
                if not cells[column]:
                    raise DataFormatError(path, where, f"empty {column!r}")
            correct = split_answers(cells["Correct Answers"])
            incorrect = split_answers(cells["Incorrect Answers"])
            for column, answers in (("Correct Answers", correct), ("Incorrect Answers", incorrect)):
                if not answers:
                    raise DataFormatError(path, where, f"empty answer list in {column!r}")
            items.append(
                MCItem(
                    question=cells["Question"],
                    prompt=truthfulqa_prompt(cells["Question"]),
                    best=cells["Best Answer"],
                    correct=correct,
                    incorrect=incorrect,
                )
            )
    return items


def _required(record: dict, key: str, path, where: str, kind=str):
    if not isinstance(record, dict):
        raise DataFormatError(path, where, f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataFormatError(path, where, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise DataFormatError(path, where, f"field {key!r} should be a {kind.__name__}, got {type(value).__name__}")
    if kind is str and not value.strip():
        raise DataFormatError(path, where, f"field {key!r} is empty")
    if kind is list and not value:
        raise DataFormatError(path, where, f"field {key!r} is an empty list")
    return value


def load_clutrr(path: PathLike) -> List[GenItem]:
    """A CLUTRR JSON file (a list of records with clean_story, query, target_text, ...) → `GenItem`s with the
    official `'s` prompt and the relation as the answer."""
    path = Path(path)
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"line {exc.lineno}, column {exc.colno}", f"bad JSON: {exc.msg}") from None
    if not isinstance(records, list):
        raise DataFormatError(path, "", f"expected a JSON list of records, got {type(records).__name__}")
    items: List[GenItem] = []
    for i, record in enumerate(records):
        where = f"record {i}"
        story = _required(record, "clean_story", path, where)
        query = _required(record, "query", path, where)
        relation = _required(record, "target_text", path, where)
        try:
            prompt = clutrr_prompt(story, query)
        except ValueError as exc:
            raise DataFormatError(path, where, str(exc)) from None
        items.append(GenItem(prompt=prompt, answer=clutrr_completion(relation), aliases=[]))
    return items


def _jsonl_records(path: Path) -> Iterator[tuple]:
    with io.StringIO(_read_text(path)) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"line {lineno}", f"bad JSON at column {exc.colno}: {exc.msg}") from None


def load_mquake(path: PathLike) -> List[GenItem]:
    """A MQuAKE JSONL file → `GenItem`s: prompt `Q: Imagine that {edit}. {first question} A:`, answer
    new_answer, aliases new_answer_alias. As in the official code, only the first requested rewrite and the
    first of the paraphrased questions are used."""
    path = Path(path)
    items: List[GenItem] = []
    for lineno, record in _jsonl_records(path):
        where = f"line {lineno}"
        rewrites = _required(record, "requested_rewrite", path, where, list)
        questions = _required(record, "questions", path, where, list)
        answer = _required(record, "new_answer", path, where)
        aliases = record.get("new_answer_alias", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise DataFormatError(path, where, "field 'new_answer_alias' should be a list of strings")
        rewrite = rewrites[0]
        template = _required(rewrite, "prompt", path, where + ", requested_rewrite[0]")
        subject = _required(rewrite, "subject", path, where + ", requested_rewrite[0]")
        target = _required(rewrite, "target_new", path, where + ", requested_rewrite[0]", dict)
        target = _required(target, "str", path, where + ", requested_rewrite[0].target_new")
        if not isinstance(questions[0], str) or not questions[0].strip():
            raise DataFormatError(path, where, "questions[0] is not a non-empty string")
        try:
            edit = mquake_edit(template, subject, target)
        except ValueError as exc:
            raise DataFormatError(path, where, str(exc)) from None
        items.append(
            GenItem(
                prompt=mquake_prompt(edit, questions[0].strip()),
                answer=answer.strip(),
                aliases=[a.strip() for a in aliases if a.strip()],
            )
        )
    return items


LOADERS = {"truthfulqa": load_truthfulqa, "clutrr": load_clutrr, "mquake": load_mquake}


def split_path(task: str, data_dir: PathLike, split: str, *, fold: int = 0) -> Path:
    """Where the official layout keeps `split` of `task` under `data_dir`."""
    check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(data_dir)
    if task == "truthfulqa":
        return root / "truthfulqa" / f"fold_{fold}_{split}_seed_42.csv"
    if task == "clutrr":
        return root / "clutrr" / f"{split}.json"
    return root / "mquake" / f"{split}.jsonl"


def load_split(task: str, data_dir: PathLike, split: str, *, fold: int = 0, limit: Optional[int] = None) -> list:
    """Items of `split` ("train", "val", "test") of `task` from the official layout under `data_dir`:
    `truthfulqa/fold_{fold}_{split}_seed_42.csv`, `clutrr/{split}.json`, `mquake/{split}.jsonl`.
    `limit` keeps the first N items (file order, no shuffling)."""
    path = split_path(task, data_dir, split, fold=fold)
    if not path.is_file():
        folder = path.parent
        if folder.is_dir():
            present = sorted(p.name for p in folder.iterdir() if p.is_file())
            found = f"{folder} has: {', '.join(present) if present else 'no files'}"
        else:
            found = f"{folder} does not exist" + (
                f" ({Path(data_dir)} has: {', '.join(sorted(p.name for p in Path(data_dir).iterdir()))})"
                if Path(data_dir).is_dir() else f" and neither does {data_dir}"
            )
        raise FileNotFoundError(f"no {task} {split} split at {path}; {found}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    items = LOADERS[task](path)
    return items if limit is None else items[:limit]
