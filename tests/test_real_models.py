"""Patched real models (packaged GGUF weights) match the hook baselines on logits and on A/v gradients."""
import copy

import pytest
import torch

import lofit_fast
from lofit_fast import hooks
from lofit_fast.models import load_model

pytestmark = pytest.mark.slow
CPU_BACKENDS = [b for b in lofit_fast.available_backends("cpu") if b in ("torch", "cpp")]


def _load(name):
    try:
        return load_model(name)
    except FileNotFoundError as exc:
        pytest.skip(f"{name} is not installed here: {exc}")


@pytest.fixture(scope="module", params=["smollm2", "gemma3-270m"])
def real(request):
    model, tok = _load(request.param)
    ids = tok(["Q: What happens if you crack your knuckles a lot? A:", "Q: Where is the Eiffel Tower? A: Paris"],
              return_tensors="pt", padding=True)
    return request.param, model, ids


def _heads(model, k, seed=0):
    sites = lofit_fast.find_attention_sites(model)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(sum(s.num_heads for s in sites), generator=g)[:k].tolist()
    H = sites[0].num_heads
    return sorted((i // H, i % H) for i in flat)


def _run(model, params, ids):
    for p in params:
        p.grad = None
    logits = model(**ids).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_real_model_matches_hooks(real, backend):
    name, base, ids = real
    heads = _heads(base, 12) + [(3, h) for h in range(lofit_fast.find_attention_sites(base)[3].num_heads)]
    heads = sorted(set(heads))
    with torch.no_grad():
        ref = base(**ids).logits
    fused = lofit_fast.patch(copy.deepcopy(base), heads, init_std=0.05, backend=backend)
    mods = lofit_fast.patched_modules(fused)
    A = {l: m.A.detach() for l, m in mods.items()}
    v = {l: m.v.detach() for l, m in mods.items()}
    loop = hooks.patch_loop(copy.deepcopy(base), heads, A=A, v=v)
    got, g_fused = _run(fused, lofit_fast.trainable_parameters(fused), ids)
    want, g_loop = _run(loop, hooks.trainable_parameters(loop), ids)
    assert (got - ref).abs().max() > 1e-3, "the intervention changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_real_model_zero_intervention_is_exact(real, backend):
    name, base, ids = real
    model = copy.deepcopy(base)
    with torch.no_grad():
        ref = model(**ids).logits
        lofit_fast.patch(model, "all", backend=backend)
        got = model(**ids).logits
    if backend == "torch":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
