"""Representation tuning: the cosine loss by hand, prompt positions, training in/out, the A/B honesty scores."""
from pathlib import Path

import pytest
import torch

from lofit_fast.methods import rep_tuning as rt
from lofit_fast.methods.activations import residual_activations
from lofit_fast.patch import patched_modules
from fixtures.tiny import byte_tokenizer
from test_steer import text_model

FIXTURES = Path(__file__).parent / "fixtures" / "honesty"
SHARED = Path("/work/shared/data/honesty")


def test_cosine_loss_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    direction = torch.tensor([5.0, 0.0])  # cos = 1, 0, -1
    assert rt.cosine_loss(hidden, direction, "in").item() == pytest.approx((0 + 0.5 + 1) / 3)
    assert rt.cosine_loss(hidden, direction, "out").item() == pytest.approx(2 / 3)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    u = torch.randn(7, generator=g, dtype=torch.float64)
    cos = [float(row @ u) / (float(row.norm()) * float(u.norm())) for row in h.reshape(-1, 7)]
    assert rt.cosine_loss(h, u, "in").item() == pytest.approx(sum((1 - c) / 2 for c in cos) / 6, abs=1e-12)
    assert rt.cosine_loss(h, u, "out").item() == pytest.approx(sum(abs(c) for c in cos) / 6, abs=1e-12)
    with pytest.raises(ValueError, match="mode"):
        rt.cosine_loss(h, u, "sideways")


def test_prompt_positions():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, 7, 8, 9, -100, -100]])
    assert rt.prompt_positions(labels, [-1]).tolist() == [[2], [0]]
    assert rt.prompt_positions(labels, [-2, -1, 0, 9]).tolist() == [[1, 2, 0, 2], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="no completion"):
        rt.prompt_positions(torch.full((1, 3), -100), [-1])


def fact_examples():
    rows = [("Snow is white.", 1), ("Fire is cold.", 0), ("Fish can swim.", 1), ("Cats can fly.", 0)]
    return rt.fact_ab_examples(rows), rows


def test_fact_ab_format():
    examples, rows = fact_examples()
    assert examples[1].prompt == (
        'Question: Is the following claim true or false? "Fire is cold."\n\nChoices:\n (A) True\n (B) False'
        "\n\nAnswer:"
    )
    assert [e.completion for e in examples] == [" (A)", " (B)", " (A)", " (B)"]


def unit(seed, size=48):
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("trainable", ["heads", "layers"])
def test_tuning_in_aligns_and_tuning_out_decorrelates(trainable):
    tok = byte_tokenizer()
    examples, _ = fact_examples()
    prompts = [e.prompt for e in examples]
    directions = {1: unit(0)}
    kw = dict(layers=[1], trainable=trainable, epochs=5, batch_size=4, lr=3e-2 if trainable == "heads" else 1e-2,
              progress=False)

    model = text_model(dtype=torch.float32)
    flags = [p.requires_grad for p in model.parameters()]
    before = rt.alignment(model, tok, prompts, directions)[1]
    out = rt.train(model, tok, examples, directions, w=1.0, mode="in", **kw)
    after_in = rt.alignment(model, tok, prompts, directions)[1]
    assert after_in > before + 0.2
    assert out["history"][-1]["rep_loss"] < out["history"][0]["rep_loss"]
    if trainable == "heads":
        assert out["trainable_params"] == 2 * 3 * 4 * 16 and patched_modules(model)
        base = [p for n, p in model.named_parameters() if not n.endswith((".A", ".v"))]
        assert [p.requires_grad for p in base] == flags
    else:
        assert out["trainable_params"] == sum(p.numel() for p in model.model.layers[1].parameters())
        assert [p.requires_grad for p in model.parameters()] == flags

    token_only = text_model(dtype=torch.float32)
    rt.train(token_only, tok, examples, directions, w=0.0, **kw)
    assert rt.alignment(token_only, tok, prompts, directions)[1] < after_in - 0.1



def test_tuning_out_removes_the_direction():
    tok = byte_tokenizer()
    examples, _ = fact_examples()
    prompts = [e.prompt for e in examples]
    model = text_model(dtype=torch.float32)
    # the mean residual at the last prompt token: strongly aligned with every prompt's residual at the start
    mean = residual_activations(model, tok, prompts, layers=[1])[1].mean(0)
    directions = {1: mean / mean.norm()}
    start = rt.alignment(model, tok, prompts, directions)[1]
    assert start > 0.5
    rt.train(model, tok, examples, directions, layers=[1], w=2.0, mode="out", epochs=4, batch_size=2, lr=3e-2,
             progress=False)
    assert abs(rt.alignment(model, tok, prompts, directions)[1]) < start - 0.3


def test_only_the_chosen_layers_change_when_training_layers():
    tok = byte_tokenizer()
    examples, _ = fact_examples()
    model = text_model(dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt.train(model, tok, examples, {2: unit(3)}, trainable="layers", epochs=1, batch_size=4, lr=1e-3, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)


def test_train_checks_arguments():
    tok = byte_tokenizer()
    examples, _ = fact_examples()
    model = text_model(dtype=torch.float32)
    with pytest.raises(ValueError, match="no direction for layers"):
        rt.train(model, tok, examples, {1: unit(0)}, layers=[2], progress=False)
    with pytest.raises(ValueError, match="mode"):
        rt.train(model, tok, examples, {1: unit(0)}, mode="up", progress=False)
    assert patched_modules(model) == {}


def test_ab_scores_by_hand():
    tok = byte_tokenizer()
    model = text_model()
    items = [rt.ABItem("Q: yes? Answer:", "A"), rt.ABItem("Q: no? Answer:", "B")]
    scores = rt.ab_scores(model, tok, items)
    probs = []
    for item in items:
        logp = {}
        for letter in "AB":
            ids = tok(item.prompt + f" ({letter})", return_tensors="pt")["input_ids"]
            n_prompt = len(tok(item.prompt)["input_ids"])
            with torch.no_grad():
                lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
            logp[letter] = sum(lp[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))
        probs.append(1 / (1 + torch.exp(torch.tensor(logp["AB".replace(item.honest, "")] - logp[item.honest])).item()))
    assert scores["p_honest"] == pytest.approx(sum(probs) / 2, abs=1e-6)  # log-softmax runs in float32
    assert scores["accuracy"] == sum(p > 0.5 for p in probs) / 2


def test_honesty_choices_fixture_and_labels():
    items = rt.honesty_choices(FIXTURES, labels={"choices.txt": ["A", "B", None]})
    assert [i.honest for i in items] == ["A", "B"]
    assert items[1].prompt.endswith("(A) That you did not\n (B) That you did\n\nAnswer:")
    with pytest.raises(ValueError, match="3 questions but 2 labels"):
        rt.honesty_choices(FIXTURES, labels={"choices.txt": ["A", "B"]})


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared honesty data is not on this machine")
def test_shared_honesty_files_match_the_hand_labels():
    items = rt.honesty_choices(SHARED)
    assert len(items) == 39 and {i.honest for i in items} == {"A", "B"}
