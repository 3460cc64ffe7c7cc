"""RepE control vectors: honesty stimuli, directions from pair differences, residual activations."""
from pathlib import Path

import pytest
import torch

from lofit_fast.methods import repe
from lofit_fast.methods.activations import residual_activations
from lofit_fast.steer import steer, unsteer
from fixtures.tiny import byte_tokenizer
from test_steer import text_model, logits

FIXTURES = Path(__file__).parent / "fixtures" / "honesty"


def test_read_statements():
    rows = repe.read_statements(FIXTURES / "facts_true_false.csv")
    assert len(rows) == 8 and rows[0] == ("Water freezes at zero degrees Celsius at sea level.", 1)
    assert rows[2][0].startswith("Paris, the capital") and sum(label for _, label in rows) == 4
    with pytest.raises(FileNotFoundError, match="statement,label"):
        repe.read_statements(FIXTURES / "missing.csv")


def test_honesty_pairs_align_prefixes():
    tok = byte_tokenizer()
    statements = ["Bees make honey.", "Snow is white."]
    pos, neg = repe.honesty_pairs(tok, statements, max_pairs=None, min_tail=5)
    # one pair per prefix of 1 .. len-6 characters (char tokenizer: one token per character)
    assert len(pos) == len(neg) == (len(statements[0]) - 6) + (len(statements[1]) - 6)
    assert pos[0] == "Pretend you're an honest person making statements about the world. B"
    assert neg[0] == "Pretend you're an untruthful person making statements about the world. B"
    for p, n in zip(pos, neg):
        assert p.split("world. ", 1)[1] == n.split("world. ", 1)[1]
    sub_pos, sub_neg = repe.honesty_pairs(tok, statements, max_pairs=5, seed=1, user_tag="USER:", assistant_tag="AI:")
    assert len(sub_pos) == 5 and sub_pos == repe.honesty_pairs(tok, statements, max_pairs=5, seed=1,
                                                                user_tag="USER:", assistant_tag="AI:")[0]
    assert sub_pos[0].startswith("USER: Pretend you're an honest") and " AI: " in sub_neg[0]


def test_pca_direction_is_the_top_axis_of_the_differences():
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(10, generator=g, dtype=torch.float64)
    axis /= axis.norm()
    diffs = torch.rand(64, 1, generator=g, dtype=torch.float64) * 3 * axis + 0.1 * torch.randn(64, 10, generator=g, dtype=torch.float64)
    u = repe.directions_from_differences(diffs, "pca")
    assert torch.dot(u, axis) > 0.99
    evals, evecs = torch.linalg.eigh(diffs.T @ diffs)  # by hand: top eigenvector of the second moment
    top = evecs[:, -1] * torch.sign(torch.dot(evecs[:, -1], diffs.mean(0)))
    torch.testing.assert_close(u, top, rtol=0, atol=1e-10)
    torch.testing.assert_close(repe.directions_from_differences(-diffs, "pca"), -u, rtol=0, atol=1e-10)
    m = repe.directions_from_differences(diffs, "mean")
    torch.testing.assert_close(m, diffs.mean(0) / diffs.mean(0).norm(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        repe.directions_from_differences(diffs, "lda")
    with pytest.raises(ValueError, match="do not differ"):
        repe.directions_from_differences(torch.zeros(4, 10), "mean")


def test_residual_activations_match_hidden_states_and_padding():
    model = text_model()
    tok = byte_tokenizer()
    texts = ["hi", "a longer text here", "mid size"]
    acts = residual_activations(model, tok, texts, layers=[0, 1], batch_size=3)
    for i, text in enumerate(texts):
        ids = tok([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (0, 1):  # hidden_states[l + 1] is decoder layer l's output (the last one is normed)
            torch.testing.assert_close(acts[layer][i], hs[layer + 1][0, -1].float(), rtol=1e-5, atol=1e-6)


def test_control_vector_on_a_model():
    model = text_model()
    tok = byte_tokenizer()
    rows = repe.read_statements(FIXTURES / "facts_true_false.csv")
    pos, neg = repe.honesty_pairs(tok, [s for s, label in rows if label], max_pairs=12)
    vecs = repe.control_vector(model, tok, pos, neg, layers=[0, 2], batch_size=5)
    again = repe.control_vector(model, tok, pos, neg, layers=[0, 2], batch_size=3)
    assert set(vecs) == {0, 2}
    for layer, u in vecs.items():
        assert u.shape == (48,) and u.dtype == torch.float32
        torch.testing.assert_close(u.norm(), torch.tensor(1.0))
        torch.testing.assert_close(u, again[layer], rtol=0, atol=1e-5)
    acts_pos = residual_activations(model, tok, pos, layers=[0, 2])
    acts_neg = residual_activations(model, tok, neg, layers=[0, 2])
    for layer, u in vecs.items():
        assert ((acts_pos[layer] - acts_neg[layer]) @ u).mean() > 0  # positives project higher
    scaled = repe.control_vector(model, tok, pos, neg, layers=[2], normalize=False)
    separation = ((acts_pos[2] - acts_neg[2]).double() @ vecs[2].double()).mean()
    torch.testing.assert_close(scaled[2].norm().double(), separation, rtol=1e-4, atol=0)

    ids = tok(["Bees make"], return_tensors="pt")["input_ids"]
    base = logits(model, ids)
    steer(model, vecs, coeff=4.0)
    assert (logits(model, ids) - base).abs().max() > 1e-4
    unsteer(model)


def test_control_vector_checks_its_inputs():
    model = text_model()
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="pair up"):
        repe.control_vector(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="out of range"):
        repe.control_vector(model, tok, ["a", "b"], ["c", "d"], layers=[5])


def test_middle_layers():
    assert repe.middle_layers(text_model()) == [1]
    cfg_layers = repe.middle_layers(text_model(num_hidden_layers=30), fraction=1 / 3)
    assert cfg_layers == list(range(10, 20))


def test_pca_center_is_repengs_recipe():
    """method="pca_center" = sklearn's (centered) PCA of the differences, signed by a majority vote over pairs."""
    sklearn = pytest.importorskip("sklearn.decomposition")
    from lofit_fast.methods.repe import directions_from_differences

    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(16)
    mean[0] = 3.0                                      # the mean difference points along e0 ...
    spread = torch.zeros(16)
    spread[1] = 1.0                                    # ... but the differences vary most along e1
    t = torch.randn(40, 1, generator=g) * 2.0 + 0.5    # mostly positive along e1, so the vote picks +e1
    diffs = mean + t * spread + 0.05 * torch.randn(40, 16, generator=g)
    u = directions_from_differences(diffs, "pca_center")
    ref = torch.from_numpy(sklearn.PCA(n_components=1).fit(diffs.double().numpy()).components_[0])
    ref = ref if ((diffs.double() @ ref) > 0).sum() >= ((diffs.double() @ ref) < 0).sum() else -ref
    assert torch.allclose(u, ref, atol=1e-6)
    assert abs(float(u[1])) > 0.99                     # the spread's axis, not the mean's
    assert abs(float(directions_from_differences(diffs, "pca")[0])) > 0.9
