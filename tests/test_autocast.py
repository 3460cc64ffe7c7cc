"""Mixed precision: the op and patched models under torch.autocast (bf16 and fp16) on every backend.

Under autocast the base GEMM runs in the autocast dtype (as autocast does for nn.Linear), while A and v stay
float32 and get float32 gradients. Checked against the float64 reference of the float32 inputs, within the
autocast dtype's tolerance.
"""
import math

import pytest
import torch
import torch.nn as nn

import lofit_fast
from lofit_fast.patch.module import HeadInterventionLinear

from conftest import device_for
from reference import GRAD_TOL, OUT_TOL, reference_forward, reference_grads, rel_err

BACKENDS = [b for b in lofit_fast.available_backends() if b in ("torch", "cpp", "triton", "cuda")]
LOW = [torch.bfloat16, torch.float16]


def _case(device, lead=(2, 3), H=4, d=64, D_out=40, heads=(1, 3), bias=True):
    C = H * d
    x = torch.randn(*lead, C, device=device)
    W = torch.randn(D_out, C, device=device) / math.sqrt(C)
    b = torch.randn(D_out, device=device) if bias else None
    h = torch.tensor(heads, dtype=torch.int64, device=device)
    A = 0.5 * torch.randn(len(heads), d, device=device)
    v = 0.5 * torch.randn(len(heads), d, device=device)
    return x, W, b, h, A, v, d


def _skip_missing_autocast(device, dtype):
    try:
        with torch.autocast(device, dtype=dtype):
            pass
    except (RuntimeError, ValueError) as exc:  # e.g. an autocast dtype this torch does not support on `device`
        pytest.skip(f"autocast({device}, {dtype}) is not supported here: {exc}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("heads", [(1, 3), (0, 1, 2, 3)])
def test_op_under_autocast_matches_float64(backend, dtype, heads):
    device = device_for(backend)
    _skip_missing_autocast(device, dtype)
    x, W, b, h, A, v, d = _case(device, heads=heads)
    x, A, v = (t.clone().requires_grad_(True) for t in (x, A, v))
    with torch.autocast(device, dtype=dtype):
        y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend=backend)
    assert y.dtype == dtype, "the base GEMM must run in the autocast dtype"
    ref = reference_forward(x, W, b, h.cpu(), A, v, d)
    assert rel_err(y, ref) < OUT_TOL[dtype], rel_err(y, ref)

    dy = torch.randn_like(y, dtype=torch.float32)
    y.backward(dy.to(dtype))
    assert A.grad.dtype == torch.float32 and v.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert A.dtype == torch.float32 and v.dtype == torch.float32
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, h.cpu(), A, v, d, dy.to(dtype))
    for name, got, want in (("dx", x.grad, ref_dx), ("dA", A.grad, ref_dA), ("dv", v.grad, ref_dv)):
        assert rel_err(got, want) < GRAD_TOL[dtype], (name, rel_err(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_x_with_float32_weight_under_autocast(backend):
    """The failing case of a real model: x comes out of autocast attention in bf16 while the frozen o_proj
    weight is float32; with validation on (the public op) this used to be a dtype error."""
    device = device_for(backend)
    x, W, b, h, A, v, d = _case(device)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    A.requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lofit_fast.head_affine_linear(xb, W, b, h, A, v, d, backend=backend)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference_forward(xb, W, b, h.cpu(), A, v, d)) < OUT_TOL[torch.bfloat16]
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_autocast_region(backend):
    """Calling backward inside the autocast block must not recast the backend's backward GEMMs."""
    device = device_for(backend)
    x, W, b, h, A, v, d = _case(device)
    A.requires_grad_(True)
    v.requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend=backend)
        dy = torch.randn(y.shape, device=device).to(torch.bfloat16)
        dA, dv = torch.autograd.grad(y, [A, v], dy)
    _, ref_dA, ref_dv = reference_grads(x, W, h.cpu(), A, v, d, dy)
    assert dA.dtype == torch.float32 and dv.dtype == torch.float32
    assert rel_err(dA, ref_dA) < GRAD_TOL[torch.bfloat16]
    assert rel_err(dv, ref_dv) < GRAD_TOL[torch.bfloat16]


def test_autocast_leaves_float64_alone_and_is_off_outside():
    x, W, b, h, A, v, d = _case("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = lofit_fast.head_affine_linear(x.double(), W.double(), b.double(), h, A.double(), v.double(), d)
    assert y64.dtype == torch.float64  # autocast does not touch float64
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d)
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert lofit_fast.head_affine_linear(x, W, b, h, A, v, d).dtype == torch.float32


def test_trainable_weight_under_autocast_gets_float32_grads():
    """The differentiable path (a weight that requires grad) under autocast: grads reach the fp32 weight."""
    x, W, b, h, A, v, d = _case("cpu")
    W.requires_grad_(True)
    A.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference_forward(x, W, b, h, A, v, d)) < OUT_TOL[torch.bfloat16]
    y.float().sum().backward()
    assert W.grad.dtype == torch.float32 and A.grad.dtype == torch.float32


def test_bad_inputs_still_named_under_autocast():
    x, W, b, h, A, v, d = _case("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="A must have shape"):
            lofit_fast.head_affine_linear(x, W, b, h, A[:1], v, d)
        with pytest.raises(ValueError, match="sorted and unique"):
            lofit_fast.head_affine_linear(x, W, b, torch.tensor([3, 1]), A, v, d)


# The Triton interpreter (CPU) cannot be traced by dynamo at all, autocast or not; torch/cpp cover the op's path.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpp")])
def test_compiled_op_under_autocast(backend):
    """torch.compile(fullgraph=True) of the op inside an autocast region: same values as eager."""
    x, W, b, h, A, v, d = _case("cpu")
    lofit_fast.available_backends()

    def fn(x, A, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend=backend, validate=False)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (x, A, v)]
    y = compiled(*leaves)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y.float().square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, A, v)]
    y_ref = fn(*ref_leaves)
    want = torch.autograd.grad(y_ref.float().square().sum(), ref_leaves)
    assert rel_err(y, y_ref) < 1e-2
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and rel_err(g, w) < 2e-2


# ------------------------------------------------------------------------------------------ patched models
def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_patched_frozen_model_trains_under_autocast(backend, dtype):
    """The issue's repro: tiny Llama, patch(m, [(0, 1)]), freeze_base, forward + backward inside autocast."""
    device = device_for(backend)
    _skip_missing_autocast(device, dtype)
    model = _tiny_llama().to(device)
    lofit_fast.patch(model, {0: [1], 1: [0, 2]}, init_std=0.1, backend=backend)
    lofit_fast.freeze_base(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)

    model.zero_grad()
    loss32 = model(input_ids=ids, labels=ids).loss
    loss32.backward()
    ref = [p.grad.clone() for p in lofit_fast.trainable_parameters(model)]
    model.zero_grad()

    with torch.autocast(device, dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype
    out.loss.backward()
    params = lofit_fast.trainable_parameters(model)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert abs(out.loss.item() - loss32.item()) < 5e-2 * abs(loss32.item())
    for p, r in zip(params, ref):
        assert rel_err(p.grad, r) < 0.1, rel_err(p.grad, r)  # a whole low-precision model, not one op
    # base weights stay frozen and float32
    assert all(not p.requires_grad and p.dtype == torch.float32 for n, p in model.named_parameters()
               if not n.endswith((".A", ".v")))


def test_disabled_module_under_autocast_is_the_base_linear():
    base = nn.Linear(64, 24).requires_grad_(False)
    mod = HeadInterventionLinear(base, torch.tensor([1, 3]), 16, A=torch.randn(2, 16), v=torch.randn(2, 16))
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mod.enabled = False
        off = mod(x)
        want = base(x)
        mod.enabled = True
        on = mod(x)
    assert off.dtype == on.dtype == torch.bfloat16
    assert torch.equal(off, want)
    assert rel_err(on, reference_forward(x, base.weight, base.bias, mod.heads, mod.A, mod.v, 16)) < OUT_TOL[torch.bfloat16]


def test_one_adamw_step_under_autocast_moves_float32_params():
    """A small update on float32 A survives (it would round away in bf16)."""
    model = _tiny_llama()
    lofit_fast.patch(model, [(0, 1)], scale=True, offset=True)
    lofit_fast.freeze_base(model)
    params = lofit_fast.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    for p in params:
        moved = p.detach().abs().max().item()
        assert 1e-5 < moved < 1e-3 and p.dtype == torch.float32
