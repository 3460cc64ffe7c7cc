"""LoFiT training on tiny random models: the training loop, head selection, bias tuning, DPO reference."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import lofit_fast
from lofit_fast.analysis import plot_head_scores
from lofit_fast.data import MCItem, PreferenceExample, SFTExample, collate_preference
from lofit_fast.losses import sequence_logprobs
from lofit_fast.methods import HeadSelection, default_k, random_heads, select_heads, tune
from lofit_fast.patch import patch, patched_modules, unpatch
from lofit_fast.train import reference_logprobs, stack_pairs, train

LAYERS, HEADS, HEAD_DIM = 2, 4, 8


def char_tokenizer():
    """A real fast HF tokenizer with one token per printable ASCII character, built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(seed=0, dtype=torch.float32, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=104, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()


SFT = [
    SFTExample("Q: 2+2? A:", " 4"),
    SFTExample("Q: sky? A:", " blue"),
    SFTExample("Q: cat? A:", " meow"),
    SFTExample("Q: 1+1? A:", " 2"),
    SFTExample("Q: sun? A:", " hot"),
    SFTExample("Q: ice? A:", " cold"),
]
PAIRS = [
    PreferenceExample("Q: Can pigs fly? A:", " No", " Yes"),
    PreferenceExample("Q: Is ice hot? A:", " No, cold", " Yes"),
    PreferenceExample("Q: Is the sun a star? A:", " Yes", " No, a planet"),
    PreferenceExample("Q: Do fish walk? A:", " No", " Yes, often"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls only lose from threading, badly so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def silence_heads_except(model, live):
    """Zero the o_proj columns of every head not in `live`: those heads cannot change the output at all."""
    with torch.no_grad():
        for layer, decoder in enumerate(model.model.layers):
            w = decoder.self_attn.o_proj.weight
            for head in range(HEADS):
                if (layer, head) not in live:
                    w[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0


# ----------------------------------------------------------------------------------------------- train()


def test_train_sft_decreases_the_loss_and_follows_the_linear_schedule(tok):
    model = tiny_llama()
    patch(model, [(0, 1), (1, 2)], scale=True, offset=True, init_std=1e-3)
    lofit_fast.freeze_base(model)
    params = lofit_fast.trainable_parameters(model)
    out = train(model, tok, SFT, kind="sft", params=params, lr=5e-2, epochs=4, batch_size=3, progress=False)
    hist = out["history"]
    assert len(hist) == out["steps"] == 8
    assert out["epoch_loss"][-1] < out["epoch_loss"][0]
    lrs = [r["lr"] for r in hist]
    assert lrs[0] == pytest.approx(5e-2) and lrs[-1] == pytest.approx(5e-2 / 8)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert not model.training


def test_train_rejects_bad_arguments(tok):
    model = tiny_llama()
    patch(model, [(0, 0)], init_std=1e-3)
    params = lofit_fast.trainable_parameters(model)
    with pytest.raises(ValueError, match="kind"):
        train(model, tok, SFT, kind="ppo", params=params, lr=1e-2, epochs=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        train(model, tok, SFT, params=[], lr=1e-2, epochs=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        train(model, tok, [], params=params, lr=1e-2, epochs=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, tok, SFT, params=params, lr=0.0, epochs=1, batch_size=2, progress=False)


def test_train_puts_the_model_in_eval_mode_even_on_error(tok):
    model = tiny_llama()
    patch(model, [(0, 0)], init_std=1e-3)
    params = lofit_fast.trainable_parameters(model)
    with pytest.raises(TypeError):  # preference examples given to the SFT collator
        train(model, tok, PAIRS, kind="sft", params=params, lr=1e-2, epochs=1, batch_size=2, progress=False)
    assert not model.training


def test_gradient_clipping_caps_the_gradient_norm(tok, monkeypatch):
    model = tiny_llama()
    patch(model, [(0, 1)], scale=False, offset=True, init_std=0.0)
    params = lofit_fast.trainable_parameters(model)
    raw, clipped = [], []
    params[0].register_hook(lambda g: raw.append(g.norm().item()))
    original = torch.nn.utils.clip_grad_norm_

    def spy(ps, max_norm, *a, **k):
        out = original(ps, max_norm, *a, **k)
        clipped.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in ps)).item())
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(model, tok, SFT[:2], params=params, lr=1e-3, epochs=1, batch_size=2, max_grad_norm=1e-4, progress=False)
    assert raw[0] > 1e-3
    assert clipped == [pytest.approx(1e-4, rel=1e-3)]


# ----------------------------------------------------------------------------------------------- DPO


def test_dpo_reference_is_the_model_with_interventions_off(tok):
    model = tiny_llama()
    batch = stack_pairs(collate_preference(tok, PAIRS), tok.pad_token_id)
    with torch.no_grad():
        base = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    patch(model, [(0, 1), (1, 3)], scale=True, offset=True, init_std=0.5)
    with torch.no_grad():
        patched = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert (patched - base).abs().max() > 1e-2  # the intervention matters
    chosen, rejected = reference_logprobs(model, tok, PAIRS, batch_size=3)
    n = len(PAIRS)
    torch.testing.assert_close(chosen, base[:n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, base[n:], rtol=1e-5, atol=1e-5)
    assert all(m.enabled for m in patched_modules(model).values())  # disabled() restored the state


def test_dpo_first_step_loss_matches_a_hand_computed_value(tok):
    model = tiny_llama()
    batch = stack_pairs(collate_preference(tok, PAIRS), tok.pad_token_id)
    with torch.no_grad():
        ref = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).double()
    patch(model, [(0, 0), (1, 1)], scale=False, offset=True, init_std=0.5)
    with torch.no_grad():
        pol = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).double()
    n, beta = len(PAIRS), 0.5
    margin = beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    expected = float(-F.logsigmoid(margin).mean())
    assert abs(expected - math.log(2)) > 1e-3  # policy and reference differ, so a wrong reference shows
    params = lofit_fast.trainable_parameters(model)
    out = train(model, tok, PAIRS, kind="dpo", params=params, lr=1e-3, epochs=1, batch_size=n, beta=beta,
                progress=False)
    assert out["history"][0]["task_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert "rewards/accuracies" in out["history"][0]


def test_dpo_training_raises_the_chosen_margin(tok):
    model = tiny_llama()
    patch(model, [(0, 0), (1, 2)], scale=False, offset=True, init_std=1e-3)
    params = lofit_fast.trainable_parameters(model)
    out = train(model, tok, PAIRS, kind="dpo", params=params, lr=5e-2, epochs=6, batch_size=2, progress=False)
    hist = out["history"]
    assert hist[0]["task_loss"] == pytest.approx(math.log(2), abs=1e-2)  # policy ≈ reference at the start
    assert out["epoch_loss"][-1] < out["epoch_loss"][0]
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]


# ----------------------------------------------------------------------------------------------- select


def test_selection_finds_the_only_heads_that_can_matter(tok):
    live = [(0, 2), (1, 1)]
    model = tiny_llama()
    silence_heads_except(model, live)
    sel = select_heads(model, tok, SFT, task="clutrr", k=2, l1=1e-3, lr=1e-2, epochs=2, batch_size=3,
                       init_std=0.0, progress=False)
    assert sel.scores.shape == (LAYERS, HEADS)
    assert sorted(sel.top()) == sorted(live)
    dead = [(l, h) for l in range(LAYERS) for h in range(HEADS) if (l, h) not in live]
    assert all(sel.scores[l, h] == 0 for l, h in dead)  # no gradient ever reaches them
    assert all(sel.scores[l, h] > 1e-3 for l, h in live)


def test_select_heads_leaves_the_model_as_it_was(tok):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    before = base_state(model)
    select_heads(model, tok, SFT, task="mquake", epochs=1, batch_size=3, progress=False)
    assert not patched_modules(model)
    assert [layer.self_attn.o_proj for layer in model.model.layers] == o_projs
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert_same_state(model, before)
    assert not model.training


def test_selection_is_deterministic_given_the_seed(tok):
    model = tiny_llama()
    kw = dict(task="clutrr", epochs=1, batch_size=3, progress=False)
    a = select_heads(model, tok, SFT, seed=3, **kw)
    b = select_heads(model, tok, SFT, seed=3, **kw)
    c = select_heads(model, tok, SFT, seed=4, **kw)
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)


def test_l1_pushes_A_toward_zero(tok):
    model = tiny_llama()
    kw = dict(task="clutrr", lr=1e-2, epochs=4, batch_size=2, progress=False, seed=0)
    free = select_heads(model, tok, SFT, l1=0.0, **kw)
    sparse = select_heads(model, tok, SFT, l1=2.0, **kw)
    assert sparse.scores.sum() < 0.5 * free.scores.sum()


def test_select_heads_accepts_task_items_and_trains_truthfulqa_by_dpo(tok):
    items = [MCItem(question=p.prompt, prompt=p.prompt, best=p.chosen.strip(), correct=[p.chosen.strip()],
                    incorrect=[p.rejected.strip()]) for p in PAIRS]
    model = tiny_llama()
    sel = select_heads(model, tok, items, task="truthfulqa", epochs=1, batch_size=2, progress=False)
    assert sel.meta["train_examples"] == len(PAIRS)
    with pytest.raises(ValueError, match="DPO"):
        select_heads(model, tok, SFT, task="truthfulqa", epochs=1, batch_size=2, progress=False)


def test_select_heads_refuses_a_patched_model(tok):
    model = tiny_llama()
    patch(model, [(0, 0)])
    with pytest.raises(RuntimeError, match="already patched"):
        select_heads(model, tok, SFT, task="clutrr", epochs=1, progress=False)


# ----------------------------------------------------------------------------------------------- HeadSelection


def test_head_selection_ranking_top_and_round_trip(tmp_path):
    scores = torch.tensor([[0.1, 0.5, 0.0], [0.5, 0.9, 0.2]])
    sel = HeadSelection(scores, k=2, meta={"task": "clutrr"})
    assert sel.ranked()[:3] == [(1, 1, pytest.approx(0.9)), (0, 1, pytest.approx(0.5)), (1, 0, pytest.approx(0.5))]
    assert sel.top() == [(1, 1), (0, 1)]
    assert sel.top(4) == [(1, 1), (0, 1), (1, 0), (1, 2)]
    with pytest.raises(ValueError, match="k must be"):
        sel.top(7)
    again = HeadSelection.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert torch.equal(again.scores, sel.scores) and again.k == 2 and again.meta == {"task": "clutrr"}
    path = sel.save(tmp_path / "sub" / "selection.json")
    assert os.listdir(tmp_path / "sub") == ["selection.json"]  # no temporary file left behind
    loaded = HeadSelection.load(path)
    assert torch.equal(loaded.scores, sel.scores) and loaded.top() == sel.top()


def test_head_selection_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        HeadSelection.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadSelection.load(bad)
    bad.write_text(json.dumps({"scores": [[0.1, 0.2]], "num_heads": 3}))
    with pytest.raises(ValueError, match="num_heads=3"):
        HeadSelection.load(bad)
    bad.write_text(json.dumps({"scores": [1.0, float("nan")]}))
    with pytest.raises(ValueError):
        HeadSelection.load(bad)


def test_default_k_is_about_three_percent_of_heads():
    assert default_k(tiny_llama()) == 1  # 8 heads: at least one
    smollm2_shape = tiny_llama(layers=30, heads=9, head_dim=4)
    assert default_k(smollm2_shape) == 8  # 3 % of 270


def test_random_heads_are_distinct_and_seeded():
    model = tiny_llama()
    a = random_heads(model, 5, seed=1)
    assert len(set(a)) == 5 and a == sorted(a)
    assert all(0 <= l < LAYERS and 0 <= h < HEADS for l, h in a)
    assert random_heads(model, 5, seed=1) == a
    assert any(random_heads(model, 5, seed=s) != a for s in range(2, 6))
    with pytest.raises(ValueError, match="k must be"):
        random_heads(model, 9)


def test_heat_map_is_a_png(tmp_path):
    sel = HeadSelection(torch.rand(30, 9), k=8, meta={"task": "truthfulqa"})
    path = plot_head_scores(sel, tmp_path / "heads.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["heads.png"]


# ----------------------------------------------------------------------------------------------- tune


def test_tune_trains_only_v_on_the_chosen_heads(tok):
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = base_state(model)
    heads = [(1, 3), (0, 1), (1, 0)]
    out, record = tune(model, tok, SFT, heads, task="clutrr", lr=5e-2, epochs=3, batch_size=3, progress=False,
                       return_history=True)
    assert out is model and not model.training
    mods = patched_modules(model)
    assert {l: m.head_list for l, m in mods.items()} == {0: [1], 1: [0, 3]}
    for m in mods.values():
        assert m.A is None and m.v.requires_grad and m.v.dtype == torch.float32
        assert m.v.abs().max() > 1e-2  # trained away from its N(0, 1e-3) start
    base_flags = {n: p.requires_grad for n, p in model.named_parameters() if not n.endswith(".v")}
    assert base_flags == flags
    unpatch(model)
    assert_same_state(model, before)
    assert record["epoch_loss"][-1] < record["epoch_loss"][0]


def test_tune_accepts_a_selection_and_refuses_a_patched_model(tok):
    model = tiny_llama()
    sel = HeadSelection(torch.arange(LAYERS * HEADS, dtype=torch.float32).reshape(LAYERS, HEADS), k=2)
    tune(model, tok, SFT, sel, task="mquake", epochs=1, batch_size=3, progress=False)
    assert {l: m.head_list for l, m in patched_modules(model).items()} == {1: [2, 3]}
    with pytest.raises(RuntimeError, match="already patched"):
        tune(model, tok, SFT, [(0, 0)], task="mquake", epochs=1, progress=False)


def test_tune_is_deterministic_and_unpatches_on_error(tok):
    vs = []
    for _ in range(2):
        model = tiny_llama()
        tune(model, tok, SFT, [(0, 2)], task="clutrr", epochs=1, batch_size=2, seed=5, progress=False)
        vs.append(patched_modules(model)[0].v.detach().clone())
    assert torch.equal(vs[0], vs[1])
    model = tiny_llama()
    with pytest.raises(ValueError, match="lr"):
        tune(model, tok, SFT, [(0, 2)], task="clutrr", lr=-1.0, progress=False)
    assert not patched_modules(model)


def test_tune_works_in_bfloat16(tok):
    model = tiny_llama(dtype=torch.bfloat16)
    _, record = tune(model, tok, PAIRS, [(0, 1), (1, 1)], task="truthfulqa", lr=5e-2, epochs=2, batch_size=2,
                     progress=False, return_history=True)
    assert all(math.isfinite(r["loss"]) for r in record["history"])
    assert all(m.v.dtype == torch.float32 for m in patched_modules(model).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_and_tune_on_gpu(tok, dtype):
    model = tiny_llama(dtype=dtype).cuda()
    sel = select_heads(model, tok, PAIRS, task="truthfulqa", k=2, epochs=1, batch_size=2, progress=False)
    _, record = tune(model, tok, PAIRS, sel, task="truthfulqa", lr=5e-2, epochs=2, batch_size=2, progress=False,
                     return_history=True)
    assert all(math.isfinite(r["loss"]) for r in record["history"])
    assert all(m.v.is_cuda for m in patched_modules(model).values())
