"""Training recipes (issue 16's factorial): each choice reaches the loop, and `add_eos` changes exactly the
EOS term of the DPO log-probs."""
import json
from pathlib import Path

import pytest
import torch

from lofit_fast.cli import main
from lofit_fast.data import MCItem, PreferenceExample, collate_preference, truthfulqa_prompt
from lofit_fast.experiments import RunSettings, train_kw
from lofit_fast.experiments.recipes import RECIPES, with_prompt_style
from lofit_fast.losses import sequence_logprobs
from lofit_fast.train import reference_logprobs, stack_pairs
from test_lofit import char_tokenizer, tiny_llama

FIXTURES = str(Path(__file__).parent / "fixtures" / "lofit")


def test_recipes_fill_what_is_left_unset():
    official, plain = RunSettings(recipe="official"), RunSettings()  # plain is the default (measured best)
    assert plain.recipe == "plain"
    assert (official.schedule, official.add_eos, official.prompt_style, official.max_grad_norm) == \
        ("linear", True, "official", 1.0)
    assert (plain.schedule, plain.add_eos, plain.prompt_style, plain.max_grad_norm) == ("constant", False, "newline", 0.0)
    mixed = RunSettings(recipe="plain", add_eos=True, max_grad_norm=0.5)  # a single choice overridden
    assert (mixed.schedule, mixed.add_eos, mixed.max_grad_norm) == ("constant", True, 0.5)
    kw = train_kw(plain)
    assert kw["schedule"] == "constant" and kw["add_eos"] is False and kw["max_grad_norm"] is None
    with pytest.raises(ValueError, match="unknown recipe 'bogus'"):
        RunSettings(recipe="bogus")
    assert set(RECIPES) == {"official", "plain"}


def test_prompt_style_rewrites_truthfulqa_prompts_only_and_is_idempotent():
    item = MCItem(question="Is it? ", prompt=truthfulqa_prompt("Is it?"), best="yes", correct=["yes"], incorrect=["no"])
    once = with_prompt_style([item, "other"], "newline")
    assert once[0].prompt == "Q: Is it?\nA:" and once[1] == "other" and item.prompt == "Q: Is it? A:"
    assert with_prompt_style(once, "newline") == once and with_prompt_style(once, "official")[0] == item


def test_add_eos_changes_the_dpo_reference_by_the_eos_term_exactly():
    torch.manual_seed(0)
    model, tok = tiny_llama(seed=3), char_tokenizer()
    pairs = [PreferenceExample("Q: a A:", " yes", " no"), PreferenceExample("Q: bb A:", " maybe so", " x")]
    with_eos = reference_logprobs(model, tok, pairs, add_eos=True)
    without = reference_logprobs(model, tok, pairs, add_eos=False)
    batch = stack_pairs(collate_preference(tok, pairs, add_eos=True), tok.pad_token_id)
    # log p(EOS | prompt + answer) per row: the EOS label alone
    eos_only = batch["labels"].clone()
    for row in range(eos_only.shape[0]):
        last = int((eos_only[row] != -100).nonzero().max())
        keep = eos_only[row, last].item()
        eos_only[row] = -100
        eos_only[row, last] = keep
        assert keep == tok.eos_token_id
    eos_term = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], eos_only)
    torch.testing.assert_close(torch.cat(with_eos) - torch.cat(without), eos_term, rtol=0, atol=1e-5)
    assert (eos_term < 0).all()


def test_run_records_and_uses_the_recipe(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    common = ["run", "--model", str(path), "--task", "truthfulqa", "--data", FIXTURES, "--k", "2", "--epochs", "2",
              "--batch-size", "2", "--threads", "1", "--quiet", "--device", "cpu"]
    assert main(common + ["--recipe", "official", "--out", str(tmp_path / "official")]) == 0
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0  # the default
    official, plain = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("official", "plain"))
    assert {k: official["hyperparameters"][k] for k in ("recipe", "schedule", "add_eos", "prompt_style")} == \
        {"recipe": "official", "schedule": "linear", "add_eos": True, "prompt_style": "official"}
    assert {k: plain["hyperparameters"][k] for k in ("recipe", "schedule", "add_eos", "prompt_style", "max_grad_norm")} \
        == {"recipe": "plain", "schedule": "constant", "add_eos": False, "prompt_style": "newline", "max_grad_norm": 0.0}
    assert official["base"] != plain["base"]  # another prompt: other base scores
    assert official["train_loss"]["lofit"] != plain["train_loss"]["lofit"]
