"""Residual-stream steering (lofit_fast.steer): the shift itself, coefficients, atomicity, merge, generation."""
import pytest
import torch
import torch.nn as nn
import transformers as tf

from lofit_fast.methods.activations import record_residual
from lofit_fast.steer import (
    SteeringVector,
    get_coeff,
    merge_steering,
    set_coeff,
    steer,
    steered_layers,
    steering_disabled,
    steering_state,
    steering_vectors,
    unsteer,
)
from fixtures.tiny import BOS, BYTE_VOCAB, EOS, PAD, byte_tokenizer
from models import FAMILIES, random_ids, tiny_config

VOCAB = BYTE_VOCAB  # the byte tokenizer's 259 tokens


def text_model(family: str = "llama", dtype=torch.float64, seed: int = 0, **overrides):
    """A tiny random model of `family` whose vocabulary covers `byte_tokenizer`."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.vocab_size = VOCAB
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = PAD, BOS, EOS
    for key, value in overrides.items():
        setattr(cfg, key, value)
    attn = "eager" if family == "gemma2" else "sdpa"
    cfg._attn_implementation = attn
    if family == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(dtype).eval()


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def random_vectors(layers, size=48, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(size, generator=g, dtype=dtype) for layer in layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_is_coeff_times_vector_at_every_position(family):
    model = text_model(family)
    ids = random_ids(2, 6) + 4
    vecs = random_vectors([1])
    with record_residual(model, [1]) as rec:
        logits(model, ids)
        base = rec[1].clone()
    steer(model, vecs, coeff=0.7)
    with record_residual(model, [1]) as rec:
        logits(model, ids)
        steered = rec[1].clone()
    torch.testing.assert_close(steered, base + 0.7 * vecs[1], rtol=0, atol=1e-12)


def test_coefficient_disable_and_unsteer():
    model = text_model()
    ids = random_ids(2, 7) + 4
    base = logits(model, ids)
    steer(model, random_vectors([0, 2]), coeff=2.0)
    assert steered_layers(model) == [0, 2] and get_coeff(model) == {0: 2.0, 2: 2.0}
    steered = logits(model, ids)
    assert (steered - base).abs().max() > 1e-3
    with steering_disabled(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), steered, rtol=0, atol=0)
    set_coeff(model, 0.0)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    set_coeff(model, -2.0)
    assert (logits(model, ids) - steered).abs().max() > 1e-3
    state = steering_state(model)
    assert set(state["vectors"]) == {0, 2} and state["coeff"] == {0: -2.0, 2: -2.0}
    unsteer(model)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    assert steered_layers(model) == []
    assert not any("lofit_steering" in k for k in model.state_dict())


@pytest.mark.parametrize(
    "vectors, coeff, error",
    [
        ({3: torch.ones(48)}, 1.0, "layer 3 out of range"),
        ({-1: torch.ones(48)}, 1.0, "out of range"),
        ({0: torch.ones(48), 1: torch.ones(47)}, 1.0, r"shape \[48\]"),
        ({0: torch.ones(48), 2: torch.full((48,), float("nan"))}, 1.0, "NaN"),
        ({0: torch.ones(48, dtype=torch.long)}, 1.0, "floating"),
        ({0: torch.ones(48)}, float("inf"), "coeff"),
        ({}, 1.0, "non-empty"),
    ],
)
def test_bad_input_leaves_model_unchanged(vectors, coeff, error):
    model = text_model()
    ids = random_ids(1, 5) + 4
    base = logits(model, ids)
    with pytest.raises((ValueError, TypeError), match=error):
        steer(model, vectors, coeff=coeff)
    assert steered_layers(model) == []
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)


def test_steer_twice_is_refused():
    model = text_model()
    steer(model, random_vectors([1]))
    with pytest.raises(RuntimeError, match="already steered"):
        steer(model, random_vectors([0]))
    assert steered_layers(model) == [1]


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_merge_equals_steering_for_llama(mlp_bias):
    model = text_model("llama", mlp_bias=mlp_bias)
    if mlp_bias:
        for layer in model.model.layers:
            nn.init.normal_(layer.mlp.down_proj.bias, std=0.1)
    ids = random_ids(2, 7) + 4
    steer(model, random_vectors([0, 2]), coeff=1.5)
    steered = logits(model, ids)
    merge_steering(model)
    assert steered_layers(model) == []
    assert model.model.layers[0].mlp.down_proj.bias is not None
    assert model.model.layers[1].mlp.down_proj.bias is None or mlp_bias
    torch.testing.assert_close(logits(model, ids), steered, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_merge_refused_where_a_norm_follows_the_mlp(family):
    model = text_model(family)
    ids = random_ids(1, 5) + 4
    steer(model, random_vectors([1]))
    steered = logits(model, ids)
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        merge_steering(model)
    assert steered_layers(model) == [1]
    assert model.model.layers[1].mlp.down_proj.bias is None
    torch.testing.assert_close(logits(model, ids), steered, rtol=0, atol=0)


def test_merge_refused_while_disabled():
    model = text_model()
    steer(model, random_vectors([1]))
    with steering_disabled(model), pytest.raises(RuntimeError, match="disabled"):
        merge_steering(model)
    assert steered_layers(model) == [1]


def test_tuple_outputs_are_shifted_in_their_first_element():
    sv = SteeringVector(torch.ones(4), 2.0, 0)
    h, extra = torch.zeros(1, 3, 4), torch.zeros(2)
    out = sv.hook(None, (), (h, extra))
    torch.testing.assert_close(out[0], torch.full((1, 3, 4), 2.0))
    assert out[1] is extra
    with pytest.raises(TypeError, match="hidden-state tensor"):
        sv.hook(None, (), {"h": h})


def greedy(model, tok, prompts, new_tokens=6):
    """Greedy continuations of each prompt, as token lists, from one left-padded batch."""
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )
    return out[:, batch["input_ids"].shape[1]:].tolist()


def test_batched_generation_equals_per_sequence_generation():
    model = text_model()
    tok = byte_tokenizer()
    prompts = ["The sky is", "Q: 2+2? A:", "hello"]
    unsteered = greedy(model, tok, prompts)
    steer(model, random_vectors([1], seed=3), coeff=3.0)
    batched = greedy(model, tok, prompts)
    single = [greedy(model, tok, [p])[0] for p in prompts]
    assert batched == single
    assert batched != unsteered  # the steering acts on the generated tokens
    assert steering_vectors(model)[1].dtype == torch.float64
