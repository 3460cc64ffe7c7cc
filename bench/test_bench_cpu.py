"""pytest-benchmark micro-benchmarks of the CPU path, so that a CPU regression shows:

    pytest bench/ --benchmark-only                               # all of them (minutes on 2 busy cores)
    pytest bench/ --benchmark-only -k o_proj                     # one group
    pytest bench/ --benchmark-only --benchmark-autosave          # keep the run in .benchmarks/ ...
    pytest bench/ --benchmark-only --benchmark-compare           # ... and compare the next one against it

Groups: one o_proj (SmolLM2-135M's, 576 -> 576 with 9 heads of 64) forward + backward at 512 tokens; one LoFiT
training step and a short greedy decode of a 4-layer model with SmolLM2-135M's widths and random weights.
Providers are bench/e2e_bench.py's. These are not part of the test run's pass/fail (`python -m pytest` collects
tests/ only); tests/test_bench_smoke.py checks that the benchmark code itself works.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import e2e_bench as E
import lofit_fast
from lofit_fast.hooks import HookIntervention
from lofit_fast.ops import head_affine_linear

CPU = torch.device("cpu")
H, D = 9, 64  # SmolLM2-135M's o_proj: 9 heads of 64
N_TOKENS = 512
OP_PROVIDERS = ["linear", "hooks", "torch", "cpp"]


def _needs(provider: str) -> None:
    if provider in ("torch", "cpp") and provider not in lofit_fast.available_backends():
        pytest.skip(f"backend {provider!r} is not available here")


@pytest.fixture(scope="module")
def o_proj():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(H * D, H * D, generator=g) / math.sqrt(H * D)
    x = torch.randn(N_TOKENS, H * D, generator=g)
    dy = torch.randn(N_TOKENS, H * D, generator=g)
    return weight, x, dy


@pytest.mark.parametrize("workload", ["step1", "step2"])
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_o_proj_forward_backward(benchmark, o_proj, provider, workload):
    """step1: A on all 9 heads; step2: v on 1 head. `linear` is the frozen Linear alone (x still needs grad)."""
    _needs(provider)
    weight, x0, dy = o_proj
    heads = list(range(H)) if workload == "step1" else [4]
    p = torch.full((len(heads), D), 1e-3, requires_grad=True)
    A, v = (p, None) if workload == "step1" else (None, p)
    heads_t = torch.tensor(heads)
    hook = HookIntervention(heads, H, D, A, v, loop=False)  # its own nn.Parameter over p's values
    trained = (hook.A if A is not None else hook.v) if provider == "hooks" else p

    def run():
        x = x0.detach().requires_grad_(True)
        if provider == "linear":
            y = F.linear(x, weight)
        elif provider == "hooks":
            y = F.linear(hook.apply_dense(x), weight)
        else:
            y = head_affine_linear(x, weight, None, heads_t, A, v, D, provider)
        y.backward(dy)

    benchmark.group = f"o_proj fwd+bwd {workload} N={N_TOKENS}"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    if provider != "linear":
        assert trained.grad is not None and torch.isfinite(trained.grad).all()


@pytest.fixture(scope="module")
def shallow_model():
    """SmolLM2-135M's widths with 4 layers and random weights."""
    return E.build_model("smollm2-135m", CPU, torch.float32, num_hidden_layers=4)


@pytest.mark.parametrize("workload", ["step1", "step2"])
@pytest.mark.parametrize("provider", ["floor", "fused", "torch", "hooks", "hooks_loop"])
def test_training_step(benchmark, shallow_model, provider, workload):
    """One LoFiT step (forward, completion CE, backward, AdamW) at batch 2 x 64 tokens."""
    _needs(provider)
    model = shallow_model
    providers = E.training_providers(model, workload, [provider])
    prov = providers[provider]
    batch = E.training_batch(model.config.vocab_size, 2, 64, 0.25, CPU)
    step = E.training_step(model, batch, prov)
    benchmark.group = f"training {workload} 2x64"
    model.train()
    try:
        with prov.attached():
            benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    finally:
        model.eval()
    E.check_gradients({provider: prov}, workload)


@pytest.mark.parametrize("provider", ["base", "fused", "hooks", "merged"])
def test_decode(benchmark, shallow_model, provider):
    """Greedy generate of 8 new tokens after a 16-token prompt, batch 1."""
    model = shallow_model
    prov = E.inference_providers(model, [provider])[provider]
    ids = E.prompt_ids(model.config.vocab_size, 1, 16, CPU)
    call = E.decode_call(model, ids, 8)
    benchmark.group = "decode b=1 8 new tokens"
    with prov.attached():
        benchmark.pedantic(call, rounds=5, warmup_rounds=1)
