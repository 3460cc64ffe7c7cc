"""ITI: probes, ranking, directions, the patched offset, merge, and padded/batched generation."""
import pytest
import torch

import lofit_fast
from lofit_fast.adapter import merge
from lofit_fast.data import MCItem
from lofit_fast.methods import iti
from lofit_fast.methods.activations import encode, head_activations, last_token_index
from lofit_fast.patch import patched_modules, trainable_parameters
from models import random_ids
from fixtures.tiny import byte_tokenizer
from test_steer import text_model, greedy, logits


def planted(N=240, L=3, H=4, d=8, signal=(1, 2), seed=0):
    """Noise activations with the label written into one coordinate of one head, questions of 4 answers."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, L, H, d, generator=g)
    labels = torch.arange(N) % 2
    acts[:, signal[0], signal[1], 3] += 2.5 * (2 * labels - 1)
    groups = torch.arange(N) // 4
    return acts, labels, groups


def test_default_k_scales_with_head_count():
    assert iti.default_k(32 * 32) == 48
    assert iti.default_k(30 * 9) == 13
    assert iti.default_k(4) == 1


def test_probe_ranking_finds_the_planted_head():
    acts, labels, groups = planted()
    result = iti.fit_from_activations(acts, labels, groups, k=3, alpha=2.0)
    assert result.heads[0] == (1, 2)
    acc = result.probe_accuracies
    assert acc.shape == (3, 4)
    assert acc[1, 2] > 0.9
    others = torch.cat([acc.flatten()[:6], acc.flatten()[7:]])
    assert others.max() < 0.8 and abs(others.mean() - 0.5) < 0.1
    # θ points along the planted coordinate (true − false is positive there); σ by hand
    theta = result.directions[0]
    assert theta[3] > 0.95 and torch.isclose(theta.norm(), torch.tensor(1.0))
    x = acts[:, 1, 2].double()
    by_hand = x[labels == 1].mean(0) - x[labels == 0].mean(0)
    by_hand = by_hand / by_hand.norm()
    torch.testing.assert_close(theta.double(), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.sigmas[0].double(), (x @ by_hand).std(unbiased=False), rtol=1e-6, atol=0)


def test_logistic_probe_matches_a_generic_optimizer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(200, generator=g) < torch.sigmoid(x[:, 0, 0] - x[:, 0, 1])).double()
    w = iti.fit_logistic(x, y, C=1.0)
    for p in range(3):
        wp = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([wp], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = x[:, p] @ wp[:-1] + wp[-1]
            loss = (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * (wp[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w[p], wp.detach(), rtol=0, atol=1e-6)


def test_split_keeps_questions_together_and_is_seeded():
    groups = torch.arange(40) // 4
    train, val = iti.split_by_group(groups, 0.2, seed=3)
    assert set(groups[train].tolist()).isdisjoint(groups[val].tolist())
    assert len(set(groups[val].tolist())) == 2 and train.numel() + val.numel() == 40
    assert torch.equal(val, iti.split_by_group(groups, 0.2, seed=3)[1])
    with pytest.raises(ValueError, match="val_fraction"):
        iti.split_by_group(groups, 1.0, seed=0)


def test_bad_k_is_an_error():
    acts, labels, groups = planted(N=40)
    with pytest.raises(ValueError, match="k must be in"):
        iti.fit_from_activations(acts, labels, groups, k=13)


ITEMS = [
    MCItem(question=q, prompt=f"Q: {q} A:", best=c[0], correct=c, incorrect=w)
    for q, c, w in [
        ("Is the sky blue?", ["Yes", "It is blue"], ["No", "It is green"]),
        ("Do fish swim?", ["Yes, they do"], ["No, never", "They fly"]),
        ("Is fire cold?", ["No, it is hot"], ["Yes", "It is icy"]),
        ("Can cats bark?", ["No"], ["Yes, often"]),
        ("Is 2+2 four?", ["Yes"], ["No, five"]),
    ]
]


def test_head_activations_are_padding_aware():
    model = text_model(dtype=torch.float32)
    tok = byte_tokenizer()
    texts = ["a", "Q: why? A: because", "hello there"]
    batched = head_activations(model, tok, texts, batch_size=3)
    single = torch.cat([head_activations(model, tok, [t]) for t in texts])
    assert batched.shape == (3, 3, 4, 16)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    _, mask = encode(tok, texts)
    assert last_token_index(mask).tolist() == [len(t) - 1 for t in texts]
    assert last_token_index(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [3, 3]


def test_fit_apply_merge_end_to_end():
    model = text_model()
    tok = byte_tokenizer()
    result = iti.fit(model, tok, ITEMS, k=3, alpha=5.0, val_fraction=0.4, batch_size=4)
    again = iti.fit(model, tok, ITEMS, k=3, alpha=5.0, val_fraction=0.4, batch_size=2)
    assert result.heads == again.heads and len(result.heads) == 3
    torch.testing.assert_close(result.directions, again.directions)
    assert result.directions.shape == (3, 16) and result.sigmas.shape == (3,)
    torch.testing.assert_close(result.directions.norm(dim=1), torch.ones(3))
    assert (result.sigmas > 0).all()

    ids = random_ids(2, 6) + 4
    base = logits(model, ids)
    iti.apply(model, result)
    mods = patched_modules(model)
    assert sorted((layer, h) for layer, m in mods.items() for h in m.head_list) == sorted(result.heads)
    assert trainable_parameters(model) == []  # v is fixed
    for layer, v in result.offsets().items():
        assert mods[layer].A is None
        torch.testing.assert_close(mods[layer].v.detach(), v.to(mods[layer].v.dtype))
    k0 = result.heads[0]
    expected = 5.0 * result.sigmas[0] * result.directions[0]
    row = mods[k0[0]].head_list.index(k0[1])
    torch.testing.assert_close(mods[k0[0]].v[row].detach(), expected)
    edited = logits(model, ids)
    assert (edited - base).abs().max() > 1e-4
    with lofit_fast.disabled(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    merge(model)
    assert patched_modules(model) == {}
    torch.testing.assert_close(logits(model, ids), edited, rtol=0, atol=1e-5)


def test_batched_generation_with_iti_equals_per_sequence():
    model = text_model()
    tok = byte_tokenizer()
    acts, labels, groups = planted(N=80, L=3, H=4, d=16)
    result = iti.fit_from_activations(acts, labels, groups, k=4, alpha=40.0)
    prompts = ["The sky is", "Q: 2+2? A:", "hello"]
    plain = greedy(model, tok, prompts)
    iti.apply(model, result)
    batched = greedy(model, tok, prompts)
    single = [greedy(model, tok, [p])[0] for p in prompts]
    assert batched == single
    assert batched != plain


def test_iti_adapter_saves_and_loads_like_any_lofit_adapter(tmp_path):
    from lofit_fast.adapter import load_adapter, save_adapter

    acts, labels, groups = planted(N=80, L=3, H=4, d=16)
    result = iti.fit_from_activations(acts, labels, groups, k=3, alpha=10.0)
    model = text_model()
    ids = random_ids(2, 6) + 4
    iti.apply(model, result)
    edited = logits(model, ids)
    save_adapter(model, tmp_path / "iti", method="iti", hyperparameters={"alpha": result.alpha})
    fresh = text_model()
    load_adapter(fresh, tmp_path / "iti")
    torch.testing.assert_close(logits(fresh, ids), edited, rtol=0, atol=1e-10)
