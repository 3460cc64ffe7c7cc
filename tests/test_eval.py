"""TruthfulQA MC1/MC2 and exact-match generation accuracy (lofit_fast.eval)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lofit_fast.eval as lf_eval
from fixtures.tiny import BYTE_VOCAB, EOS, byte_tokenizer, tiny_llama
from lofit_fast.data import GenItem, MCItem, builtin_truthfulqa, truthfulqa_prompt
from lofit_fast.eval import (
    evaluate,
    extract_prediction,
    generation_accuracy,
    is_correct,
    mc_scores,
    normalize_answer,
    truthfulqa_mc,
)

# ------------------------------------------------------------------------------------------------- MC1 / MC2


def test_mc_scores_by_hand():
    # MC2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-3)
    mc1, mc2 = mc_scores(-1.0, [-1.0, -2.0], [-3.0])
    assert mc1 == 1.0
    e = math.exp
    assert mc2 == pytest.approx((e(-1) + e(-2)) / (e(-1) + e(-2) + e(-3)), rel=1e-12)
    assert mc_scores(-2.0, [-2.0, -0.5], [-2.0])[0] == 0.0  # a tie is not a win (strict >, as in TruthfulQA)
    # very long answers: no underflow to 0/0
    mc1, mc2 = mc_scores(-2000.0, [-2000.0], [-2001.0, -2003.0])
    assert mc1 == 1.0 and mc2 == pytest.approx(1 / (1 + e(-1) + e(-3)), rel=1e-12)


class FavoursLetter(nn.Module):
    """A causal LM whose next-token logits are `bonus` for one token and 0 for all others, everywhere: an answer's
    log-prob is known in closed form."""

    def __init__(self, token: int, bonus: float = 6.0, vocab: int = BYTE_VOCAB):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.token, self.bonus, self.vocab = token, bonus, vocab

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.bonus
        return SimpleNamespace(logits=logits + self.dummy)

    def logprob(self, tok, completion: str) -> float:
        log_z = math.log(math.exp(self.bonus) + self.vocab - 1)
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        return sum((self.bonus if i == self.token else 0.0) - log_z for i in ids)


def test_truthfulqa_mc_on_a_model_with_known_logprobs():
    tok = byte_tokenizer()
    model = FavoursLetter(tok("Y", add_special_tokens=False)["input_ids"][0])
    items = [
        # best " YYYY" beats every incorrect answer: MC1 = 1
        MCItem("q1", truthfulqa_prompt("q1"), "YYYY", ["YYYY", "YY"], ["no", "nope"]),
        # best " nn" loses to the incorrect " Y": MC1 = 0
        MCItem("q2", truthfulqa_prompt("q2"), "nn", ["nn"], ["Y", "nnn"]),
    ]
    got = truthfulqa_mc(model, tok, items, batch_size=3, progress=False)
    s = lambda a: model.logprob(tok, " " + a)  # noqa: E731
    mc2_1 = (math.exp(s("YYYY")) + math.exp(s("YY"))) / sum(math.exp(s(a)) for a in ["YYYY", "YY", "no", "nope"])
    mc2_2 = math.exp(s("nn")) / sum(math.exp(s(a)) for a in ["nn", "Y", "nnn"])
    assert got["mc1"] == pytest.approx(0.5)
    assert got["mc2"] == pytest.approx((mc2_1 + mc2_2) / 2, rel=1e-5)
    assert mc2_1 > 0.99 and mc2_2 < 0.01  # the case is not a coin flip
    per_item = truthfulqa_mc(model, tok, items, batch_size=3, progress=False, return_items=True)["items"]
    assert [r["mc1"] for r in per_item] == [1.0, 0.0]
    assert [r["mc2"] for r in per_item] == pytest.approx([mc2_1, mc2_2], rel=1e-5)


def slow_answer_logprob(model, tok, prompt: str, completion: str, prefix=()) -> float:
    """One unpadded float64 forward per (prompt, answer), summing log p over the answer's tokens."""
    p = tok.convert_tokens_to_ids(list(prefix)) + tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) - 1 + j, c[j]]) for j in range(len(c)))


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_truthfulqa_mc_matches_a_slow_per_pair_scorer(add_bos):
    tok = byte_tokenizer(add_bos=add_bos)
    model = tiny_llama(seed=5, dtype=torch.float64)
    items = builtin_truthfulqa()[:5]
    prefix = [tok.bos_token] if add_bos else []
    mc1 = mc2 = 0.0
    for item in items:
        answers = item.correct + item.incorrect
        score = {a: slow_answer_logprob(model, tok, item.prompt, " " + a, prefix) for a in answers}
        mc1 += float(score[item.best] > max(score[a] for a in item.incorrect))
        weights = {a: math.exp(v) for a, v in score.items()}
        mc2 += sum(weights[a] for a in item.correct) / sum(weights.values())
    model.train()
    # batch_size=7: answers of different questions and lengths share a batch
    got = truthfulqa_mc(model, tok, items, batch_size=7, progress=False)
    assert model.training  # mode restored
    assert got["mc1"] == pytest.approx(mc1 / len(items), abs=1e-12)
    assert got["mc2"] == pytest.approx(mc2 / len(items), rel=1e-9)


# -------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "text,normalized",
    [
        ("The Father.", "father"),
        ("  an apple a day ", "apple day"),
        ("Washington, D.C.", "washington dc"),
        ("brother-in-law", "brotherinlaw"),
        ("\u201cNorth  America\u201d", "north america"),
        ("Theatre", "theatre"),
        ("...", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_extract_prediction_and_matching():
    assert extract_prediction(" North America\nQ: next") == "North America"
    assert extract_prediction("\n\nfather\nmore") == "father"
    assert extract_prediction(" father. He is", stop=("\n", ".")) == "father"
    assert extract_prediction(" father. He is", stop=("\n",)) == "father. He is"
    assert is_correct("the North America.", ["North America"])
    assert is_correct("Turtle Island", ["North America", "Turtle Island"])  # an alias counts
    assert not is_correct("North", ["North America"])
    assert not is_correct("", ["", "x"]) and not is_correct("the", ["a"])  # nothing left to match


def greedy_reference(model, tok, prompt: str, steps: int) -> str:
    """Greedy decoding one token at a time on the unpadded prompt, no cache, no generate()."""
    ids = tok(prompt)["input_ids"]  # with the tokenizer's own special tokens (BOS for the Gemma-like one)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == EOS:
                break
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_left_padded_batched_generation_matches_one_by_one_greedy(add_bos):
    tok = byte_tokenizer(add_bos=add_bos)
    model = tiny_llama(seed=7, dtype=torch.float64)
    prompts = ["Q: a A:", "Q: a much longer question? A:", "Story. Answer: X is Y 's\n", "Q: mid size A:"]
    expected = [greedy_reference(model, tok, p, 6) for p in prompts]
    assert all(normalize_answer(e) for e in expected), "pick another seed: a reference answer normalizes to ''"
    # items 0 and 2 are answered right (item 2 through an alias), 1 and 3 wrong
    items = [
        GenItem(prompts[0], expected[0]),
        GenItem(prompts[1], "zzz unlikely"),
        GenItem(prompts[2], "nope", aliases=[expected[2]]),
        GenItem(prompts[3], expected[3] + " extra"),
    ]
    padding_side = tok.padding_side
    model.train()
    result = generation_accuracy(
        model, tok, items, max_new_tokens=6, batch_size=3, progress=False, stop=(), return_predictions=True
    )
    assert [r["generated"] for r in result["predictions"]] == expected
    assert [r["correct"] for r in result["predictions"]] == [True, False, True, False]
    assert result["accuracy"] == 0.5
    assert model.training and tok.padding_side == padding_side


def test_evaluate_dispatches_by_task(monkeypatch):
    tok = byte_tokenizer()
    model = tiny_llama(seed=8)
    out = evaluate("truthfulqa", model, tok, builtin_truthfulqa()[:2], progress=False)
    assert set(out) == {"mc1", "mc2"} and 0 <= out["mc1"] <= 1 and 0 < out["mc2"] < 1
    calls = []
    monkeypatch.setattr(lf_eval, "generation_accuracy", lambda *a, **kw: calls.append(kw) or {"accuracy": 0.0})
    evaluate("clutrr", model, tok, [GenItem("p", "father")], progress=False)
    evaluate("mquake", model, tok, [GenItem("p", "Paris")], progress=False, stop=("X",))
    assert calls[0]["stop"] == ("\n", ".") and calls[1]["stop"] == ("X",)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate("squad", model, tok, [])


def test_generation_accuracy_on_real_task_items_returns_a_fraction():
    tok = byte_tokenizer()
    model = tiny_llama(seed=9)
    from fixtures.tiny import DATA
    from lofit_fast.data import load_split

    items = load_split("mquake", DATA, "val")
    out = evaluate("mquake", model, tok, items, max_new_tokens=4, progress=False)
    assert set(out) == {"accuracy"} and out["accuracy"] == 0.0  # a random byte model does not know the answer
    with pytest.raises(TypeError, match="expected GenItem"):
        generation_accuracy(model, tok, builtin_truthfulqa()[:1], progress=False)


def test_paired_bootstrap_on_known_differences():
    from lofit_fast.eval import paired_bootstrap

    a = [1.0] * 60 + [0.0] * 40
    better = paired_bootstrap(a, [0.0] * 100, seed=1)
    assert better["mean_diff"] == pytest.approx(0.6) and better["p_not_better"] == 0.0
    assert better["ci_low"] < 0.6 < better["ci_high"] and better["ci_low"] > 0.45 and better["ci_high"] < 0.75
    same = paired_bootstrap(a, a, seed=1)
    assert same["mean_diff"] == same["ci_low"] == same["ci_high"] == 0.0 and same["p_not_better"] == 1.0
    # pairing matters: a shuffled copy has the same mean but a wide interval around 0
    shuffled = paired_bootstrap(a, a[50:] + a[:50], seed=1)
    assert shuffled["mean_diff"] == pytest.approx(0.0) and shuffled["ci_low"] < -0.1 < 0.1 < shuffled["ci_high"]
    with pytest.raises(ValueError, match="100 scores against 99"):
        paired_bootstrap(a, a[:99])


def test_shared_prompt_scoring_equals_scoring_each_pair():
    """Each prompt runs once and its KV cache serves all its answers: the same Σ log p as scoring every
    (prompt, answer) pair alone, on a real model with left padding across questions of different lengths."""
    from lofit_fast.data.prompts import truthfulqa_completion
    from lofit_fast.eval.truthfulqa import score_answers, score_with_shared_prompts
    from fixtures.tiny import byte_tokenizer, tiny_llama

    model, tok = tiny_llama(seed=3), byte_tokenizer(add_bos=True)
    prompts = ["Q: Why is the sky blue? A:", "Q: 2+2? A:", "Q: Who wrote Hamlet, and when? A:"]
    answers = [["Rayleigh scattering", "It is not", "Because of the sea"], ["4", "five"],
               ["Shakespeare", "Marlowe, 1590", "nobody", "a committee of monks"]]
    comps = [[truthfulqa_completion(a) for a in group] for group in answers]
    shared = score_with_shared_prompts(model, tok, prompts, comps, batch_tokens=60, progress=False)
    alone = score_answers(model, tok, [(p, c) for p, cs in zip(prompts, comps) for c in cs], progress=False)
    flat = [x for row in shared for x in row]
    assert [len(r) for r in shared] == [3, 2, 4]
    assert max(abs(a - b) for a, b in zip(flat, alone)) < 1e-5


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", None), ("gemma3", None), ("gemma3", 64)])
def test_token_continuations_from_a_shared_primer_equal_each_pair_in_float64(family, window):
    """Prompts that all start with a 20-token primer (the primer then runs once, its KV cache copied into every
    batch) and end in questions of different lengths: Σ log p and the greedy flags equal each (prompt, answer)
    run whole, in float64. Under a sliding window (8) shorter than the rows, the primer is not shared."""
    from models import VOCAB, tiny_model

    from lofit_fast.eval import score_token_continuations

    model = tiny_model(family, attn="sdpa", dtype=torch.float64, seed=2)
    if window is not None:
        model.config.sliding_window = window
        for layer in model.model.layers:
            layer.self_attn.sliding_window = window if layer.self_attn.sliding_window else None
    g = torch.Generator().manual_seed(7)
    primer = torch.randint(3, VOCAB, (20,), generator=g).tolist()
    prompts = [primer + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 3, 9, 2)]
    answers = [[torch.randint(3, VOCAB, (m,), generator=g).tolist() for m in ms]
               for ms in ((3, 1), (4,), (2, 6, 1), (5, 2), (1, 1, 3))]
    with torch.no_grad():  # the greedy continuation of prompt 2, so one flag must be True
        ids = torch.tensor([prompts[2]])
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    answers[2].append(ids[0, len(prompts[2]):].tolist())
    first_lengths = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: first_lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = score_token_continuations(model, prompts, answers, batch_tokens=30, max_rows=4, progress=False)
    hook.remove()
    assert (first_lengths[0] == 20) == (family != "gemma3" or window == 64)
    for p, group, scored in zip(prompts, answers, got):
        assert len(scored) == len(group)
        for a, (logp, greedy) in zip(group, scored):
            with torch.no_grad():
                logits = model(torch.tensor([p + a])).logits[0, len(p) - 1 : -1].log_softmax(-1)
            want = logits.gather(1, torch.tensor(a)[:, None]).sum().item()
            assert abs(logp - want) <= 1e-9 * max(1.0, abs(want))
            assert greedy == bool((logits.argmax(-1) == torch.tensor(a)).all())
    assert got[2][-1][1] is True
