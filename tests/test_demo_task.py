"""The built-in demo task (`builtin_fictional`: questions about made-up entities): deterministic generation, a
valid TruthfulQA-style format, its sizes, no question shared by train and test, and (slow, real SmolLM2) LoFiT
step 2 on a small slice beating the base model beyond the paired bootstrap's noise, also on an int8 base."""
import re

import pytest
import torch

from lofit_fast.data import (
    MCItem,
    builtin_fictional,
    builtin_truthfulqa,
    training_examples,
    truthfulqa_completion,
    truthfulqa_prompt,
)
from lofit_fast.data.builtin import FICTIONAL_EVAL_SIZE, FICTIONAL_TRAIN_SIZE
from lofit_fast.eval import paired_bootstrap, truthfulqa_mc


def _name(item: MCItem) -> str:
    """The made-up entity: the one word of the truthful answer 'There is no KIND called NAME'."""
    answer = next(a for a in item.correct if a.startswith("There is no "))
    return answer.rsplit(" called ", 1)[1]


def test_generation_is_deterministic_and_depends_on_the_seed():
    a, b = builtin_fictional(seed=0), builtin_fictional(seed=0)
    assert a == b
    other = builtin_fictional(seed=1)
    assert [i.question for i in other] != [i.question for i in a]
    # the train part depends only on the seed, not on how many test items follow it
    assert builtin_fictional("train", eval_size=3) == builtin_fictional("train")


def test_sizes_and_splits():
    train, test, every = builtin_fictional("train"), builtin_fictional("test"), builtin_fictional()
    assert len(train) == FICTIONAL_TRAIN_SIZE and len(test) == FICTIONAL_EVAL_SIZE
    assert every == train + test
    assert len(builtin_fictional("train", train_size=5, eval_size=7)) == 5
    assert len(builtin_fictional("test", train_size=5, eval_size=7)) == 7
    assert builtin_fictional("test", eval_size=0) == []
    with pytest.raises(ValueError, match="split"):
        builtin_fictional("val")
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="train_size"):
            builtin_fictional(train_size=bad)
        with pytest.raises(ValueError, match="eval_size"):
            builtin_fictional(eval_size=bad)


def test_items_have_the_truthfulqa_format():
    items = builtin_fictional(train_size=100, eval_size=200, seed=3)
    kinds = set()
    for item in items:
        assert isinstance(item, MCItem)
        assert item.prompt == truthfulqa_prompt(item.question)
        assert item.best == item.correct[0] and len(item.correct) == 2 and len(item.incorrect) == 2
        answers = item.correct + item.incorrect
        assert len(set(answers)) == 4 and all(a.strip() == a and a for a in answers)
        name = _name(item)
        assert re.fullmatch(r"[A-Z][a-z]+", name)
        assert name in item.question and all(name in a for a in answers)
        kind = re.match(r"There is no (.+) called ", next(a for a in item.correct if a.startswith("There"))).group(1)
        assert f"{name} is not a real {kind}" in item.correct
        assert not any("not a real" in a or "There is no" in a for a in item.incorrect)
        kinds.add(kind)
    assert len(kinds) == 10  # every category shows up
    # the best answer is either truthful form, about half the time each (not one fixed string to learn)
    first = sum(i.best.startswith("There is no ") for i in items)
    assert 0.35 * len(items) < first < 0.65 * len(items)
    # DPO trains on (best answer, first made-up answer), as for TruthfulQA
    pairs = training_examples("truthfulqa", items[:3])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (i.prompt, truthfulqa_completion(i.best), truthfulqa_completion(i.incorrect[0])) for i in items[:3]]


def test_no_item_is_shared_between_train_and_test():
    for seed in (0, 1):
        train, test = builtin_fictional("train", seed=seed), builtin_fictional("test", seed=seed)
        names = [_name(i) for i in train + test]
        assert len(set(names)) == len(names)  # every entity is made up once
        assert not {i.question for i in train} & {i.question for i in test}
        assert not {a for i in train for a in i.correct + i.incorrect} & {a for i in test for a in i.correct + i.incorrect}


def test_builtin_truthfulqa_is_unchanged():
    assert len(builtin_truthfulqa()) == 24
    assert len(builtin_truthfulqa("train")) == 16 and len(builtin_truthfulqa("test")) == 8


# ----------------------------------------------------------------------------------------- real model

def _smollm2(quantize=None):
    from lofit_fast.models import load_model

    try:
        return load_model("smollm2", quantize=quantize, progress=False)
    except FileNotFoundError as exc:
        pytest.skip(f"smollm2 is not installed here: {exc}")
    except ImportError as exc:  # torchao missing for quantize="int8"
        pytest.skip(f"cannot quantize here: {exc}")


# The heads LoFiT's step 1 selects on the demo task (float32 SmolLM2, 48 items, 2 epochs, seed 42).
DEMO_HEADS = [(15, 4), (14, 0), (16, 7), (15, 2), (19, 6), (13, 1), (12, 5), (14, 2)]


def _lofit_beats_base(model, tok, *, n_train=48, n_eval=48, epochs=2, heads=None):
    """Step 1 (unless `heads` are given) and step 2 on `n_train` items, the LoFiT model against the base on
    `n_eval` unseen items."""
    from lofit_fast.methods import select_heads, tune
    from lofit_fast.patch import unpatch

    train = builtin_fictional("train", train_size=n_train, eval_size=n_eval)
    test = builtin_fictional("test", train_size=n_train, eval_size=n_eval)
    kw = dict(epochs=epochs, batch_size=8, seed=42, progress=False)
    base = truthfulqa_mc(model, tok, test, progress=False, return_items=True)
    if heads is None:
        heads = select_heads(model, tok, train, task="truthfulqa", k=8, **kw).top(8)
    tuned = tune(model, tok, train, heads, task="truthfulqa", lr=1e-2, **kw)
    try:
        lofit = truthfulqa_mc(tuned, tok, test, progress=False, return_items=True)
    finally:
        unpatch(tuned)
    gains = {m: paired_bootstrap([r[m] for r in lofit["items"]], [r[m] for r in base["items"]]) for m in ("mc1", "mc2")}
    return base, lofit, gains


# Each: model load + base eval + LoFiT step 2 on the heads step 1 selects on this task (DEMO_HEADS; the selection
# itself runs in `lofit-fast demo` and, on a tiny model, in tests/test_cli.py) + eval. Step 2 is what issue 12 asks
# of an int8 base.
@pytest.mark.slow
def test_lofit_beats_the_base_model_on_the_demo_task():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = _smollm2()
    base, lofit, gains = _lofit_beats_base(model, tok, heads=DEMO_HEADS)
    assert base["mc2"] < 0.5  # the base model prefers the made-up facts
    assert gains["mc2"]["ci_low"] > 0, gains
    assert gains["mc1"]["mean_diff"] > 0, gains


@pytest.mark.slow
def test_lofit_on_an_int8_base_beats_the_int8_base_on_the_demo_task():
    model, tok = _smollm2("int8")
    from lofit_fast.ops.function import is_quantized_weight

    assert is_quantized_weight(model.model.layers[0].self_attn.o_proj.weight)
    base, lofit, gains = _lofit_beats_base(model, tok, n_train=40, n_eval=40, heads=DEMO_HEADS)
    assert gains["mc2"]["ci_low"] > 0, gains
    assert gains["mc1"]["mean_diff"] > 0, gains
