"""Loaders, prompts, training examples and collation (lofit_fast.data)."""
from __future__ import annotations

import pytest
import torch

from fixtures.tiny import BOS, DATA, EOS, MALFORMED, PAD, byte_tokenizer, smollm2_tokenizer
from lofit_fast.data import (
    TASKS,
    DataFormatError,
    GenItem,
    MCItem,
    PreferenceExample,
    SFTExample,
    adds_bos,
    builtin_truthfulqa,
    collate_preference,
    collate_sft,
    load_clutrr,
    load_mquake,
    load_split,
    load_truthfulqa,
    task_kind,
    training_examples,
)
from lofit_fast.data.collate import fit_to_length

# ----------------------------------------------------------------------------------------------- loaders


def test_tasks_and_kinds():
    assert TASKS == ("truthfulqa", "clutrr", "mquake")
    assert [task_kind(t) for t in TASKS] == ["dpo", "sft", "sft"]
    with pytest.raises(ValueError, match="unknown task 'boolq'"):
        task_kind("boolq")


def test_load_truthfulqa_splits_and_strips_answers():
    items = load_truthfulqa(DATA / "truthfulqa" / "fold_0_train_seed_42.csv")
    assert len(items) == 3
    mars = items[0]
    assert mars == MCItem(
        question="How many moons does Mars have?",
        prompt="Q: How many moons does Mars have? A:",
        best="Mars has two moons",
        correct=["Mars has two moons", "Two", "Phobos and Deimos"],
        incorrect=["Mars has no moons", "Mars has one moon", "Mars has dozens of moons"],
    )
    # a quoted question with a comma
    assert items[1].question == "Which city is the capital of Australia, Sydney or Canberra?"


def test_load_truthfulqa_multiline_question():
    items = load_truthfulqa(DATA / "truthfulqa" / "fold_0_test_seed_42.csv")
    assert items[0].question == "Can penguins fly?\n(asked on two lines)"
    assert items[0].best == "No. Penguins cannot fly" and items[0].incorrect == ["Yes. Penguins can fly", "Yes"]


def test_load_clutrr_official_prompt():
    items = load_clutrr(DATA / "clutrr" / "val.json")
    assert len(items) == 2
    expected = (
        'Read the following story about a family. "Gina called her mother Hana. Hana\'s father Ivan was asleep." '
        "Assume the relations described in the story are all true. Based on relations between the fictional "
        "characters in the story (assume the relations are all true) and your commonsense knowledge about "
        "family relationship, how is Ivan related to Gina? Answer: Ivan is Gina 's\n"
    )
    assert items[0] == GenItem(prompt=expected, answer="grandfather", aliases=[])
    assert items[1].answer == "brother-in-law"


def test_load_mquake_official_prompt():
    items = load_mquake(DATA / "mquake" / "val.jsonl")
    assert items[0] == GenItem(
        prompt="Q: Imagine that Tinybot was created in the country of Chile. "
        "What continent is the country of origin of Tinybot located in? A:",
        answer="South America",
        aliases=["S. America", "the South American continent"],
    )
    assert items[1].prompt.startswith("Q: Imagine that The head of Acme Corp is Ada Smith. Where was")


@pytest.mark.parametrize(
    "task,split,n",
    [("truthfulqa", "train", 3), ("truthfulqa", "test", 2), ("clutrr", "train", 2), ("mquake", "val", 2)],
)
def test_load_split_layout(task, split, n):
    assert len(load_split(task, DATA, split)) == n
    assert len(load_split(task, DATA, split, limit=1)) == 1


def test_load_split_missing_file_lists_what_exists():
    missing = r"no mquake test split at .*mquake/test\.jsonl.*has: train\.jsonl, val\.jsonl"
    with pytest.raises(FileNotFoundError, match=missing):
        load_split("mquake", DATA, "test")
    with pytest.raises(FileNotFoundError, match="fold_1_train_seed_42.csv.*fold_0_test_seed_42.csv"):
        load_split("truthfulqa", DATA, "train", fold=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split("clutrr", DATA / "nowhere", "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split("clutrr", DATA, "dev")


MALFORMED_CASES = [
    (load_truthfulqa, "truthfulqa_missing_column.csv",
     r"header \(line 1\): missing column\(s\) \['Incorrect Answers'\]"),
    (load_truthfulqa, "truthfulqa_empty_incorrect.csv", r"line 3: empty answer list in 'Incorrect Answers'"),
    (load_truthfulqa, "truthfulqa_extra_field.csv", r"line 5: 8 fields, the header has 7"),
    (load_clutrr, "clutrr_bad_json.json", r"line 3, column \d+: bad JSON"),
    (load_clutrr, "clutrr_missing_field.json", r"record 1: missing field 'target_text'"),
    (load_clutrr, "clutrr_bad_query.json", r"record 0: query 'Anna and Ben' is not a pair of names"),
    (load_mquake, "mquake_bad_json.jsonl", r"line 2: bad JSON"),
    (load_mquake, "mquake_missing_field.jsonl", r"line 2: missing field 'new_answer'"),
    (load_mquake, "mquake_no_slot.jsonl", r"line 2: the rewrite prompt .* has no '\{\}' slot"),
    (load_mquake, "mquake_empty_questions.jsonl", r"line 2: field 'questions' is an empty list"),
]


@pytest.mark.parametrize("loader,name,message", MALFORMED_CASES, ids=[c[1] for c in MALFORMED_CASES])
def test_loader_errors_name_file_row_and_problem(loader, name, message):
    with pytest.raises(DataFormatError, match=message) as info:
        loader(MALFORMED / name)
    assert str(info.value).startswith(str(MALFORMED / name))


def test_builtin_truthfulqa():
    items = builtin_truthfulqa()
    assert len(items) == 24
    assert len(builtin_truthfulqa("train")) == 16 and len(builtin_truthfulqa("test")) == 8
    for item in items:
        assert item.prompt == f"Q: {item.question} A:"
        assert item.best in item.correct and len(item.incorrect) >= 3
        assert not set(item.correct) & set(item.incorrect)
    assert len({i.question for i in items}) == 24


# --------------------------------------------------------------------------------------- training examples


def test_truthfulqa_pairs_follow_the_official_script():
    items = load_truthfulqa(DATA / "truthfulqa" / "fold_0_train_seed_42.csv")
    pairs = training_examples("truthfulqa", items)
    # one pair per question: (best answer, first incorrect answer), answers after a space
    assert pairs == [
        PreferenceExample("Q: How many moons does Mars have? A:", " Mars has two moons", " Mars has no moons"),
        PreferenceExample(items[1].prompt, " Canberra is the capital", " Sydney is the capital"),
        PreferenceExample(items[2].prompt, " A spider has eight legs", " A spider has six legs"),
    ]
    zipped = training_examples("truthfulqa", items[:1], pairs="zip")
    assert [(p.chosen, p.rejected) for p in zipped] == [
        (" Mars has two moons", " Mars has no moons"), (" Two", " Mars has one moon"),
        (" Phobos and Deimos", " Mars has dozens of moons"),
    ]


def test_sft_examples_use_the_answer_as_completion():
    clutrr = training_examples("clutrr", load_clutrr(DATA / "clutrr" / "train.json"))
    assert clutrr[0] == SFTExample(clutrr[0].prompt, "granddaughter") and clutrr[0].prompt.endswith("Anna 's\n")
    mquake = training_examples("mquake", load_mquake(DATA / "mquake" / "train.jsonl"))
    assert mquake[0].prompt.endswith(" A:") and mquake[0].completion == "France"
    with pytest.raises(TypeError, match="expected GenItem"):
        training_examples("clutrr", builtin_truthfulqa()[:1])


# ------------------------------------------------------------------------------------------------ collation


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos (SmolLM2-like)", "bos (Gemma-like)"])
def test_collate_sft_masks_prompt_and_pads_right(add_bos):
    tok = byte_tokenizer(add_bos=add_bos)
    examples = [SFTExample("Q: hi A:", " yes"), SFTExample("Q: a longer question A:", " no")]
    batch = collate_sft(tok, examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    prefix = [BOS] if add_bos else []
    for row, ex in enumerate(examples):
        prompt, completion = prefix + _ids(tok, ex.prompt), _ids(tok, ex.completion) + [EOS]
        n = len(prompt) + len(completion)
        assert batch["input_ids"][row, :n].tolist() == prompt + completion
        assert batch["labels"][row, :n].tolist() == [-100] * len(prompt) + completion
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][row, n:].eq(PAD).all() and batch["labels"][row, n:].eq(-100).all()
    assert batch["input_ids"].shape[1] == max(
        len(prefix) + len(_ids(tok, e.prompt)) + len(_ids(tok, e.completion)) + 1 for e in examples
    )
    no_eos = collate_sft(tok, examples, add_eos=False)
    assert EOS not in no_eos["labels"].tolist()[0]


def test_collate_truncates_prompt_from_the_left_and_keeps_bos():
    tok = byte_tokenizer(add_bos=True)
    batch = collate_sft(tok, [SFTExample("0123456789", "ab")], max_length=8)
    assert batch["input_ids"][0].tolist() == [BOS] + _ids(tok, "6789") + _ids(tok, "ab") + [EOS]
    assert batch["labels"][0].tolist() == [-100] * 5 + _ids(tok, "ab") + [EOS]
    # a completion too long for max_length is cut on the right, one prompt token stays before it
    assert fit_to_length([1, 2, 3], [7, 8, 9, 10], 4) == ([3], [7, 8, 9])
    assert fit_to_length([0, 2, 3], [7, 8, 9, 10], 4, keep_first=1) == ([0, 3], [7, 8])
    with pytest.raises(ValueError, match="no room"):
        fit_to_length([0, 2, 3], [7], 2, keep_first=1)


def test_collate_preference_pads_chosen_and_rejected_to_one_length():
    tok = byte_tokenizer()
    batch = collate_preference(tok, [PreferenceExample("Q: x A:", " a much longer answer", " b")])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    rejected = batch["rejected_labels"][0]
    assert rejected[rejected != -100].tolist() == _ids(tok, " b") + [EOS]
    assert batch["rejected_attention_mask"][0].sum() == len(_ids(tok, "Q: x A: b")) + 1
    with pytest.raises(TypeError, match="expected PreferenceExample"):
        collate_preference(tok, [SFTExample("a", "b")])


@pytest.mark.slow
def test_collate_with_the_smollm2_tokenizer():
    """SmolLM2 adds no BOS; the label tokens decode to exactly the completion (+ EOS), for each task's format."""
    tok = smollm2_tokenizer()
    assert not adds_bos(tok)
    examples = [
        SFTExample("Q: Imagine that X is in Chile. Where is X? A:", "South America"),
        SFTExample("Answer: Ivan is Gina 's\n", "grandfather"),
        SFTExample("Q: Can pigs fly? A:", " No, pigs cannot fly"),
    ]
    batch = collate_sft(tok, examples)
    for row, ex in enumerate(examples):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        labels = batch["labels"][row]
        label_ids = labels[labels != -100].tolist()
        assert ids[: len(ids) - len(label_ids)] == _ids(tok, ex.prompt)
        assert label_ids[-1] == tok.eos_token_id
        assert tok.decode(label_ids[:-1]) == ex.completion
