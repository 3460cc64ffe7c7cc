"""lofit_fast.patch on every supported family: equals the hook baselines, atomic on bad input."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import lofit_fast
from lofit_fast import hooks
from lofit_fast.patch import HeadInterventionLinear

from models import ATTENTION, FAMILIES, random_ids, tiny_gemma3_multimodal, tiny_model

CPU_BACKENDS = [b for b in lofit_fast.available_backends("cpu") if b in ("torch", "cpp")]
FAMILY_ATTN = [(f, a) for f in FAMILIES for a in ATTENTION[f]]
HEADS = [(0, 1), (0, 3), (2, 0), (2, 1), (2, 2), (2, 3)]  # layer 2: every head (the dense path)


def snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    mods, state, grads = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def values_for(model):
    """The A and v of a patched model, as {layer: tensor} for hooks.patch(..., A=, v=)."""
    mods = lofit_fast.patched_modules(model)
    return ({l: m.A.detach() for l, m in mods.items() if m.A is not None},
            {l: m.v.detach() for l, m in mods.items() if m.v is not None})


def grads_of(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family,attn", FAMILY_ATTN)
def test_patched_equals_hook_baselines(family, attn, backend):
    base = tiny_model(family, attn)
    ids = random_ids()
    fused = lofit_fast.patch(copy.deepcopy(base), HEADS, init_std=0.2, backend=backend)
    A, v = values_for(fused)
    dense = hooks.patch(copy.deepcopy(base), HEADS, A=A, v=v)
    loop = hooks.patch_loop(copy.deepcopy(base), HEADS, A=A, v=v)
    out = {}
    for name, model, params in (
        ("fused", fused, lofit_fast.trainable_parameters(fused)),
        ("dense", dense, hooks.trainable_parameters(dense)),
        ("loop", loop, hooks.trainable_parameters(loop)),
    ):
        logits = model(ids).logits
        (logits.float().pow(2).mean()).backward()
        out[name] = (logits.detach(), grads_of(params))
    ref_logits, ref_grads = out["loop"]
    assert not torch.allclose(ref_logits, base(ids).logits, atol=1e-4), "the intervention changed nothing"
    for name in ("fused", "dense"):
        logits, grads = out[name]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_intervention_is_the_unpatched_model(family, backend):
    base = tiny_model(family, ATTENTION[family][-1])
    ids = random_ids()
    with torch.no_grad():
        ref = base(ids).logits
        lofit_fast.patch(base, "all", backend=backend)
        got = base(ids).logits
    if backend == "torch":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_with_kv_cache_matches_hooks(family):
    base = tiny_model(family, "sdpa")
    ids = random_ids(batch=2, seq=5)
    fused = lofit_fast.patch(copy.deepcopy(base), HEADS, init_std=0.5)
    A, v = values_for(fused)
    dense = hooks.patch(copy.deepcopy(base), HEADS, A=A, v=v)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    out_fused = fused.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    out_dense = dense.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(out_fused, out_dense)
    out_nocache = fused.generate(ids, attention_mask=torch.ones_like(ids), **{**kw, "use_cache": False})
    assert torch.equal(out_fused, out_nocache)


def test_train_mode_bf16_and_gemma3_multimodal():
    model = tiny_model("llama", "eager", dtype=torch.bfloat16).train()
    lofit_fast.patch(model, {1: [0, 2]}, init_std=1e-3)
    m = lofit_fast.patched_modules(model)[1]
    assert m.A.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    model(random_ids()).logits.float().mean().backward()
    assert m.A.grad is not None and m.v.grad is not None and m.A.grad.abs().sum() > 0

    mm = tiny_gemma3_multimodal()
    ids = random_ids()
    ref = mm(input_ids=ids).logits
    lofit_fast.patch(mm, [(0, 1), (2, 3)], init_std=0.3)
    assert set(lofit_fast.patched_modules(mm)) == {0, 2}
    assert not torch.allclose(mm(input_ids=ids).logits, ref)
    with lofit_fast.disabled(mm):
        torch.testing.assert_close(mm(input_ids=ids).logits, ref)


def test_patch_shares_weights_and_adds_only_A_v():
    model = tiny_model("llama")
    o_proj = model.model.layers[1].self_attn.o_proj
    n_before = sum(p.numel() for p in model.parameters())
    lofit_fast.patch(model, {1: [0, 3]}, init_std=0.1)
    new = model.model.layers[1].self_attn.o_proj
    assert isinstance(new, HeadInterventionLinear)
    assert new.weight is o_proj.weight and new.base_layer is o_proj
    assert new.heads.dtype == torch.int64 and new.heads.tolist() == [0, 3]
    assert new.A.shape == new.v.shape == (2, 16)
    params = lofit_fast.trainable_parameters(model)
    assert len(params) == 2 and {id(p) for p in params} == {id(new.A), id(new.v)}
    assert sum(p.numel() for p in model.parameters()) == n_before + 2 * 2 * 16
    assert all(p.requires_grad for p in model.parameters())  # patch does not freeze anything
    lofit_fast.freeze_base(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.layers.1.self_attn.o_proj.A", "model.layers.1.self_attn.o_proj.v"]


def test_scale_only_offset_only_and_init():
    model = tiny_model("llama")
    lofit_fast.patch(model, [(0, 0)], offset=False, init_std=0.0)
    m = lofit_fast.patched_modules(model)[0]
    assert m.v is None and torch.equal(m.A, torch.zeros(1, 16))
    lofit_fast.unpatch(model)
    torch.manual_seed(0)
    lofit_fast.patch(model, [(0, 0)], scale=False, init_std=1e-3)
    m = lofit_fast.patched_modules(model)[0]
    assert m.A is None and 0 < m.v.std() < 5e-3


def test_head_spec_formats_agree():
    sites = lofit_fast.find_attention_sites(tiny_model("llama"))
    from lofit_fast.patch import normalize_heads

    want = {0: [1, 3], 2: [0]}
    assert normalize_heads([(2, 0), (0, 3), (0, 1)], sites) == want
    assert normalize_heads(np.array([[2, 0], [0, 3], [0, 1]]), sites) == want
    assert normalize_heads(torch.tensor([[2, 0], [0, 3], [0, 1]]), sites) == want
    assert normalize_heads({0: [3, 1], 2: [0]}, sites) == want
    assert normalize_heads("all", sites) == {l: [0, 1, 2, 3] for l in range(3)}


def test_unpatch_and_disabled_restore_the_model():
    model = tiny_model("qwen3")
    ids = random_ids()
    originals = [l.self_attn.o_proj for l in model.model.layers]
    ref = model(ids).logits
    lofit_fast.patch(model, "all", init_std=0.3)
    patched = model(ids).logits
    assert not torch.allclose(patched, ref)
    with lofit_fast.disabled(model):
        torch.testing.assert_close(model(ids).logits, ref)
    with pytest.raises(KeyError):
        with lofit_fast.disabled(model):
            raise KeyError("boom")
    assert all(m.enabled for m in lofit_fast.patched_modules(model).values())
    torch.testing.assert_close(model(ids).logits, patched)
    lofit_fast.unpatch(model)
    assert [l.self_attn.o_proj for l in model.model.layers] == originals
    assert torch.equal(model(ids).logits, ref)
    with pytest.raises(RuntimeError, match="not patched"):
        lofit_fast.unpatch(model)


BAD = [
    (dict(heads=[(3, 0)]), ValueError, "layer 3 out of range: the model has 3 layers"),
    (dict(heads=[(1, 4)]), ValueError, "head 4 out of range: layer 1 has 4 heads"),
    (dict(heads={1: [-1]}), ValueError, "head -1 out of range"),
    (dict(heads=[(1, 2), (1, 2)]), ValueError, r"duplicate head: \(layer 1, head 2\)"),
    (dict(heads=[(1, 2, 3)]), ValueError, "pair"),
    (dict(heads="some"), ValueError, "heads must be"),
    (dict(heads=[]), ValueError, "no heads selected"),
    (dict(heads=[(1, 2)], A={1: torch.zeros(2, 16)}), ValueError, r"A for layer 1 must have shape \[1, 16\]"),
    (dict(heads=[(1, 2)], v={1: torch.zeros(1, 8)}), ValueError, r"v for layer 1 must have shape \[1, 16\]"),
    (dict(heads=[(1, 2)], A={1: torch.zeros(1, 16, dtype=torch.int32)}), TypeError, "must be a floating tensor"),
    (dict(heads=[(1, 2)], A={1: torch.zeros(1, 16, device="meta")}), ValueError, "is on meta but the layer's weight is on cpu"),
    (dict(heads=[(1, 2)], A={1: torch.full((1, 16), float("nan"))}), ValueError, "A for layer 1 contains NaN or inf"),
    (dict(heads=[(1, 2)], v={1: torch.full((1, 16), float("inf"))}), ValueError, "v for layer 1 contains NaN or inf"),
    (dict(heads=[(1, 2)], A={0: torch.zeros(1, 16)}), ValueError, r"A given for layers \[0\]"),
    (dict(heads=[(1, 2)], scale=False, offset=False), ValueError, "scale and offset are both False"),
    (dict(heads=[(1, 2)], backend="warp"), ValueError, "unknown backend 'warp'"),
    (dict(heads=[(1, 2)], init_std=float("nan")), ValueError, "init_std"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_input_leaves_model_unchanged(kwargs, exc, match):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lofit_fast.patch(model, **kwargs)
    assert_unchanged(model, snap)


def test_patching_twice_and_unsupported_models():
    model = tiny_model("gemma")
    lofit_fast.patch(model, [(0, 0)])
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="already patched"):
        lofit_fast.patch(model, [(1, 0)])
    assert_unchanged(model, snap)

    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    snap = snapshot(gpt2)
    with pytest.raises(TypeError, match="unsupported model class GPT2LMHeadModel"):
        lofit_fast.patch(gpt2)
    assert_unchanged(gpt2, snap)
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        lofit_fast.patch(nn.Linear(4, 4))


def test_failure_midway_restores_every_layer(monkeypatch):
    """If a swap fails after some layers were replaced, the earlier ones are put back."""
    model = tiny_model("llama")
    snap = snapshot(model)
    attn2 = model.model.layers[2].self_attn
    real_setattr = nn.Module.__setattr__

    def failing_setattr(self, name, value):
        if self is attn2 and name == "o_proj" and isinstance(value, HeadInterventionLinear):
            raise RuntimeError("injected failure")
        real_setattr(self, name, value)

    monkeypatch.setattr(type(attn2), "__setattr__", failing_setattr)
    with pytest.raises(RuntimeError, match="injected failure"):
        lofit_fast.patch(model, "all")
    monkeypatch.undo()
    assert_unchanged(model, snap)


def test_hooks_bad_input_and_unpatch():
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="head 9 out of range"):
        hooks.patch(model, [(0, 9)])
    assert_unchanged(model, snap)
    hooks.patch_loop(model, [(0, 1)], init_std=0.1)
    with pytest.raises(RuntimeError, match="already has lofit_fast hooks"):
        hooks.patch(model, [(0, 1)])
    hooks.unpatch(model)
    assert_unchanged(model, snap)


def test_layers_renamed_by_fsdp2_are_found():
    """FSDP2's fully_shard swaps each layer's class for an `FSDP<Name>` subclass; patch must still find it."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lofit_fast.patch import find_attention_sites

    model = tiny_model("llama")
    expected = [(s.path, s.num_heads, s.head_dim) for s in find_attention_sites(model)]
    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        assert type(model.model.layers[0]).__name__ == "FSDPLlamaDecoderLayer"
        assert [(s.path, s.num_heads, s.head_dim) for s in find_attention_sites(model)] == expected
    finally:
        if started:
            dist.destroy_process_group()
