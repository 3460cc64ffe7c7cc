"""Sequence log-probs, completion-only cross-entropy and the DPO loss (lofit_fast.losses)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fixtures.tiny import byte_tokenizer, tiny_llama
from lofit_fast.data import PreferenceExample, SFTExample, collate_preference, collate_sft
from lofit_fast.losses import completion_loss, dpo_loss, sequence_logprobs
from lofit_fast.train import default_reference_tokens, token_batches
from lofit_fast.train import reference_logprobs as reference_logprobs_of_pairs

EXAMPLES = [
    SFTExample("Q: Which planet is red? A:", " Mars"),
    SFTExample("Q: hi A:", " a somewhat longer answer"),
    SFTExample("Read the story. Answer: Ivan is Gina 's\n", "grandfather"),
]


def reference_logprobs(model, batch) -> list:
    """Float64, one unpadded row at a time, every position's log-softmax, summed where labels != -100."""
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        with torch.no_grad():
            logits = model.double()(input_ids=ids[:n].unsqueeze(0)).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        total = 0.0
        for t in range(1, n):
            if labels[t] != -100:
                total += float(logp[t - 1, labels[t]])
        out.append(total)
    return out


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward does not accept `logits_to_keep` (the fallback path)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "full-logits"])
def test_sequence_logprobs_match_float64_per_row_reference(wrap):
    tok = byte_tokenizer()
    model = tiny_llama(seed=1, dtype=torch.float64)
    batch = collate_sft(tok, EXAMPLES)
    expected = reference_logprobs(model, batch)
    got = sequence_logprobs(NoLogitsToKeep(model) if wrap else model, **batch)
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    got32 = sequence_logprobs(model.float(), **batch)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_logits_to_keep_path_matches_full_logits_across_families(family):
    """Gemma 2/3 soft-cap their final logits: the kept positions must see the same post-processing."""
    from models import VOCAB, tiny_model

    model = tiny_model(family, attn="eager", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 6:] = -100
    labels[2, 5] = -100
    fast = sequence_logprobs(model, input_ids, attention_mask, labels)
    full = sequence_logprobs(NoLogitsToKeep(model), input_ids, attention_mask, labels)
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)


def test_sequence_logprobs_ignore_padding_and_prompt_labels():
    tok = byte_tokenizer()
    model = tiny_llama(seed=2)
    batch = collate_sft(tok, EXAMPLES)
    base = sequence_logprobs(model, **batch).detach()
    # other pad token ids in the padding change nothing (masked, and after the sequence)
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["input_ids"][noisy["attention_mask"] == 0] = 65
    torch.testing.assert_close(sequence_logprobs(model, **noisy), base)
    # a row alone gives the same value as inside the padded batch
    alone = collate_sft(tok, EXAMPLES[1:2])
    torch.testing.assert_close(sequence_logprobs(model, **alone), base[1:2], rtol=1e-5, atol=1e-5)
    # unmasking one prompt label adds exactly that token's log-prob
    more = {k: v.clone() for k, v in batch.items()}
    more["labels"][0, 3] = more["input_ids"][0, 3]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=batch["input_ids"][:1]).logits[0, 2].double(), -1)
    added = float((sequence_logprobs(model, **more)[0] - base[0]).detach())
    assert added == pytest.approx(float(lp[batch["input_ids"][0, 3]]), abs=1e-4)


def test_sequence_logprobs_in_float32_for_bf16_models():
    tok = byte_tokenizer()
    batch = collate_sft(tok, EXAMPLES)
    model = tiny_llama(seed=3, dtype=torch.float64)
    expected = torch.tensor(reference_logprobs(model, batch), dtype=torch.float64)
    model = model.to(torch.bfloat16)
    got = sequence_logprobs(model, **batch)
    assert got.dtype == torch.float32
    # the same bf16 logits, log-softmax and sum in float64: only float32 rounding may separate them
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    picked = logp.gather(2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(got.double(), (picked * mask).sum(1), rtol=1e-6, atol=1e-4)
    # and bf16 weights stay near the float64 model
    torch.testing.assert_close(got.double(), expected, rtol=0.02, atol=0.1)


def test_completion_loss_equals_hf_shifted_cross_entropy_and_trains_only_through_completions():
    tok = byte_tokenizer()
    model = tiny_llama(seed=4)
    batch = collate_sft(tok, EXAMPLES)
    loss = completion_loss(model, batch)
    with torch.no_grad():
        hf = model(**batch).loss
    torch.testing.assert_close(loss.detach(), hf, rtol=1e-5, atol=1e-6)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss.detach(), -sequence_logprobs(model, **batch).sum() / n_tokens, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_loss_input_errors():
    tok = byte_tokenizer()
    model = tiny_llama()
    batch = collate_sft(tok, EXAMPLES[:1])
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no completion tokens"):
        completion_loss(model, empty)
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["input_ids"])
    with pytest.raises(ValueError, match="same shape"):
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"][:, 1:], batch["labels"])


def test_dpo_loss_against_hand_computed_values():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.5])
    rr = torch.tensor([-1.5, -1.5])
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margins: 0.5·[(−1+1.5) − (−2+1.5)] = 0.5 and 0.5·[(−3+2.5) − (−1+1.5)] = −0.5
    # loss = mean(log(1 + e^−0.5), log(1 + e^0.5))
    assert float(loss.detach()) == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.7240769, abs=1e-6)
    assert metrics == pytest.approx(
        {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.5, "rewards/margins": 0.0}, abs=1e-7
    )
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d loss / d π_c = −β σ(−margin) / B; d loss / d π_r = +β σ(−margin) / B
    assert pc.grad.tolist() == pytest.approx([-0.5 * sig(-0.5) / 2, -0.5 * sig(0.5) / 2], rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([0.5 * sig(-0.5) / 2, 0.5 * sig(0.5) / 2], rel=1e-6)


def test_dpo_loss_float64_reference_and_constant_reference():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.1
    loss, m = dpo_loss(pc.float(), pr.float(), rc.float().requires_grad_(), rr.float(), beta=beta)
    z = beta * ((pc - rc) - (pr - rr))
    expected = torch.mean(torch.log1p(torch.exp(-z)))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx(float((z > 0).double().mean()))
    assert m["rewards/margins"] == pytest.approx(float(z.mean()), rel=1e-5, abs=1e-6)
    assert not loss.requires_grad  # the reference log-probs are constants
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


# ------------------------------------------------------------------- DPO reference batches by token count
PAIRS = [PreferenceExample(f"Q{i}: " + "why " * (i % 5) + "?", " yes" * (1 + i % 3), " no" * (1 + (i * 7) % 4))
         for i in range(13)]


def test_token_batches_respect_the_budget_and_cover_every_item_once():
    lengths = [5, 30, 7, 7, 12, 3, 40, 9]
    batches = token_batches(lengths, 60, rows_per_item=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # 2 × 40 > 60: over budget alone, its own batch
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert len(b) == 1 or 2 * len(b) * max(lengths[i] for i in b) <= 60
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert token_batches(lengths, 10**6) == [[6, 1, 4, 7, 2, 3, 0, 5]]  # longest first, ties in order
    with pytest.raises(ValueError, match="max_tokens"):
        token_batches(lengths, 0)


def test_reference_logprobs_by_token_budget_equal_row_batches():
    """Token-budget batches (sorted by length, several sizes) give today's row-batch log-probs, in the
    examples' order, to 1e-6 in float32."""
    tok = byte_tokenizer()
    model = tiny_llama(seed=5)
    rows_c, rows_r = reference_logprobs_of_pairs(model, tok, PAIRS, batch_size=4)
    full = collate_preference(tok, PAIRS)
    lengths = torch.maximum(full["chosen_attention_mask"].sum(1), full["rejected_attention_mask"].sum(1)).tolist()
    budget = 2 * 3 * max(lengths)
    batches = token_batches(lengths, budget, rows_per_item=2)
    assert len({len(b) for b in batches}) > 1 and [i for b in batches for i in b] != list(range(len(PAIRS)))
    tok_c, tok_r = reference_logprobs_of_pairs(model, tok, PAIRS, max_tokens=budget)
    assert tok_c.dtype == torch.float32 and tok_c.shape == (len(PAIRS),)
    torch.testing.assert_close(tok_c, rows_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tok_r, rows_r, rtol=1e-6, atol=1e-6)
    # in order: pair i's values are pair i's alone (the check fails if the results were left sorted)
    alone = [reference_logprobs_of_pairs(model, tok, PAIRS[i : i + 1], batch_size=1) for i in (0, 6, 12)]
    for i, (c, r) in zip((0, 6, 12), alone):
        torch.testing.assert_close(tok_c[i : i + 1], c, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tok_r[i : i + 1], r, rtol=1e-6, atol=1e-6)
    assert (rows_c - rows_c.flip(0)).abs().max() > 1e-3  # the pairs' values differ, so order is checked
    # the budget train() uses: the largest row batch's padded tokens
    assert default_reference_tokens(tok, PAIRS, 4, None) == 2 * 4 * max(lengths)


def _ragged_batch(lengths, width, seed=0):
    from models import VOCAB

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    attention_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def test_pack_rows_groups_fit_the_width_and_cover_every_row_once():
    from lofit_fast.losses import pack_rows

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        width = int(torch.randint(4, 30, (1,), generator=g))
        lengths = torch.randint(1, width + 1, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        groups = pack_rows(mask)
        if groups is None:  # no two rows fit together
            assert all(int(a) + int(b) > width for i, a in enumerate(lengths) for b in lengths[i + 1:])
            continue
        assert sorted(i for grp in groups for i in grp) == list(range(len(lengths)))
        assert len(groups) < len(lengths)
        assert all(sum(int(lengths[i]) for i in grp) <= width for grp in groups)


@pytest.mark.parametrize("family,attn", [(f, a) for f in ["llama", "gemma", "gemma2", "gemma3", "mistral", "qwen2", "qwen3"]
                                         for a in (("eager",) if f == "gemma2" else ("eager", "sdpa"))])
def test_packed_rows_match_float64_per_row_reference_and_padded_gradients(family, attn):
    """Rows longer than Gemma's sliding window (8) and short ones packed beside them: each packed sequence
    must see only itself, with its own positions and window."""
    from models import tiny_model

    from lofit_fast import patch
    from lofit_fast.losses import can_pack, label_token_logprobs, pack_rows
    from lofit_fast.patch import trainable_parameters

    lengths = [14, 4, 9, 5, 3, 6, 2]
    input_ids, attention_mask, labels = _ragged_batch(lengths, 14, seed=len(family))
    model = tiny_model(family, attn=attn, dtype=torch.float64, seed=1)
    assert can_pack(model) and pack_rows(attention_mask) is not None
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    expected = torch.tensor(reference_logprobs(model, batch), dtype=torch.float64)
    # eager attention's additive padding mask moves even the padded pass by ~1e-8 (float64) from one row alone
    tol = 1e-10 if attn == "sdpa" else 1e-7
    torch.testing.assert_close(sequence_logprobs(model, **batch), expected, rtol=tol, atol=tol)

    for p in model.parameters():
        p.requires_grad_(False)
    patch(model, "all", scale=True, offset=True, backend="torch")
    params = trainable_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    weights = torch.arange(1, len(lengths) + 1, dtype=torch.float64)  # a different weight per row
    for p in params:
        p.grad = None
    logps, rows = label_token_logprobs(model, input_ids, attention_mask, labels)
    packed = torch.zeros(len(lengths), dtype=logps.dtype).index_add(0, rows, logps)
    (packed * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in params]
    # the reference: each row alone, unpadded (a padded batch is no reference: Gemma 2's eager attention gives
    # NaN for short right-padded rows in float64)
    for p in params:
        p.grad = None
    alone = []
    for b, n in enumerate(lengths):
        one = sequence_logprobs(model, input_ids[b:b + 1, :n], attention_mask[b:b + 1, :n], labels[b:b + 1, :n])
        (one[0] * weights[b]).backward()
        alone.append(one.detach()[0])
    torch.testing.assert_close(packed.detach(), torch.stack(alone), rtol=tol, atol=tol)
    for a, p in zip(packed_grads, params):
        assert float((a - p.grad).norm() / p.grad.norm()) < 1e-5  # A and v are float32


def test_rows_are_not_packed_for_models_that_cannot_take_packed_sequences():
    from lofit_fast.losses import can_pack

    model = tiny_llama(seed=1, dtype=torch.float64)
    assert can_pack(model)
    assert not can_pack(NoLogitsToKeep(model))  # no config, no position_ids: padded rows
    input_ids, attention_mask, labels = _ragged_batch([9, 3, 4, 2], 9)
    input_ids = input_ids % 50
    labels = torch.where(labels >= 0, labels % 50, labels)
    torch.testing.assert_close(sequence_logprobs(NoLogitsToKeep(model), input_ids, attention_mask, labels),
                               sequence_logprobs(model, input_ids, attention_mask, labels), rtol=1e-10, atol=1e-10)
