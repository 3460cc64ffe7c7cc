"""head_affine_linear on every available backend against the float64 reference."""
import math

import pytest
import torch

import lofit_fast
from lofit_fast.ops import get_backend

from conftest import device_for
from reference import GRAD_TOL, OUT_TOL, poison_allocator, reference_forward, reference_grads, rel_err

BACKENDS = [b for b in lofit_fast.available_backends() if b in ("torch", "cpp", "triton", "cuda")]
INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()

# (leading shape, heads, head_dim, D_out): odd D_out, 2-D and 3-D inputs, head_dim 64/128/256.
SHAPES = [((5,), 4, 64, 67), ((2, 7), 3, 128, 129), ((13,), 2, 256, 31), ((1,), 6, 64, 50)]
K_PATTERNS = ["none", "one", "some", "all"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["both", "scale", "offset"]


def pick_heads(pattern: str, H: int) -> torch.Tensor:
    if pattern == "none":
        hs = []
    elif pattern == "one":
        hs = [H - 1]
    elif pattern == "some":
        hs = list(range(0, H, 2))
    else:
        hs = list(range(H))
    return torch.tensor(hs, dtype=torch.int64)


def make_case(lead, H, d, D_out, pattern, dtype, mode, with_bias, strided, device, param_dtype=torch.float32):
    C = H * d
    base = torch.randn(*lead, 2 * C if strided else C, device=device, dtype=torch.float32)
    x = (base[..., ::2] if strided else base).to(dtype) if not strided else base.to(dtype)[..., ::2]
    W = (torch.randn(D_out, C, device=device) / math.sqrt(C)).to(dtype)
    b = torch.randn(D_out, device=device).to(dtype) if with_bias else None
    heads = pick_heads(pattern, H).to(device)
    K = heads.numel()
    A = (0.5 * torch.randn(K, d, device=device)).to(param_dtype) if mode in ("both", "scale") else None
    v = (0.5 * torch.randn(K, d, device=device)).to(param_dtype) if mode in ("both", "offset") else None
    return x, W, b, heads, A, v


CASES = [
    (shape, pattern, dtype, MODES[i % 3], i % 2 == 0, i % 4 == 1)
    for i, (shape, pattern, dtype) in enumerate(
        (s, p, dt) for s in SHAPES for p in K_PATTERNS for dt in DTYPES
    )
]


def _skip_unsupported(backend, dtype):
    be_dtypes = get_backend(backend, torch.empty(1, device=device_for(backend)), torch.empty(1, 1), 1).dtypes
    if dtype not in be_dtypes:
        pytest.skip(f"{backend} does not take {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,pattern,dtype,mode,with_bias,strided", CASES)
def test_forward_matches_float64(backend, shape, pattern, dtype, mode, with_bias, strided):
    lead, H, d, D_out = shape
    device = device_for(backend)
    _skip_unsupported(backend, dtype)
    x, W, b, heads, A, v = make_case(lead, H, d, D_out, pattern, dtype, mode, with_bias, strided, device)
    x_before = x.clone()
    poison_allocator(x.numel() * 4 + D_out * 64, device)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend)
    assert y.shape == (*lead, D_out) and y.dtype == dtype
    ref = reference_forward(x, W, b, heads.cpu(), A, v, d)
    assert rel_err(y, ref) < OUT_TOL[dtype], rel_err(y, ref)
    assert torch.equal(x, x_before), "the op modified its input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,pattern,dtype,mode,with_bias,strided", CASES)
def test_gradients_match_float64(backend, shape, pattern, dtype, mode, with_bias, strided):
    lead, H, d, D_out = shape
    device = device_for(backend)
    _skip_unsupported(backend, dtype)
    x, W, b, heads, A, v = make_case(lead, H, d, D_out, pattern, dtype, mode, with_bias, strided, device)
    x.requires_grad_(True)
    params = [p.requires_grad_(True) for p in (A, v) if p is not None]
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend)
    dy = torch.randn_like(y)
    poison_allocator(x.numel() * 4 + 4096, device)
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, heads.cpu(), A, v, d, dy)
    assert grads[0].shape == x.shape and grads[0].dtype == dtype
    assert rel_err(grads[0], ref_dx) < GRAD_TOL[dtype]
    got = dict(zip([n for n, p in (("A", A), ("v", v)) if p is not None], grads[1:]))
    if heads.numel() == 0:
        assert all(g is None or g.abs().sum() == 0 for g in got.values())
        return
    for name, ref in (("A", ref_dA), ("v", ref_dv)):
        if name in got:
            assert got[name].dtype == torch.float32 and got[name].shape == ref.shape
            assert rel_err(got[name], ref) < GRAD_TOL[dtype], (name, rel_err(got[name], ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_gradients_without_input_grad(backend):
    """The frozen-model case: x does not require grad, only A and v do (the thin GEMM/GEMV path)."""
    device = device_for(backend)
    x, W, b, heads, A, v = make_case((9,), 4, 64, 33, "some", torch.float32, "both", True, False, device)
    A.requires_grad_(True)
    v.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, 64, backend=backend)
    dy = torch.randn_like(y)
    dA, dv = torch.autograd.grad(y, [A, v], dy)
    _, ref_dA, ref_dv = reference_grads(x, W, heads.cpu(), A, v, 64, dy)
    assert rel_err(dA, ref_dA) < GRAD_TOL[torch.float32]
    assert rel_err(dv, ref_dv) < GRAD_TOL[torch.float32]
    (dv_only,) = torch.autograd.grad(lofit_fast.head_affine_linear(x, W, b, heads, None, v, 64, backend=backend), [v], dy)
    assert rel_err(dv_only, ref_dv) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_in_input_dtype(backend):
    device = device_for(backend)
    _skip_unsupported(backend, torch.bfloat16)
    x, W, b, heads, A, v = make_case((6,), 4, 64, 40, "some", torch.bfloat16, "both", False, False, device,
                                     param_dtype=torch.bfloat16)
    A.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, 64, backend=backend)
    assert rel_err(y, reference_forward(x, W, b, heads.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]
    (dA,) = torch.autograd.grad(y, [A], torch.ones_like(y))
    assert dA.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in INTERPRETED])
def test_gradcheck_float64(backend):
    device = device_for(backend)
    _skip_unsupported(backend, torch.float64)
    H, d = 3, 4
    x = torch.randn(5, H * d, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(7, H * d, dtype=torch.float64, device=device)
    b = torch.randn(7, dtype=torch.float64, device=device)
    heads = torch.tensor([0, 2], device=device)
    A = torch.randn(2, d, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn(2, d, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, A, v: lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, v))
    all_heads = torch.arange(H, device=device)
    A3 = torch.randn(H, d, dtype=torch.float64, device=device, requires_grad=True)
    fn_all = lambda x, A: lofit_fast.head_affine_linear(x, W, None, all_heads, A, None, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn_all, (x, A3))


def test_trainable_weight_gets_its_gradient():
    x, W, b, heads, A, v = make_case((8,), 3, 64, 20, "some", torch.float64, "both", True, False, "cpu")
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, 64)
    dy = torch.randn_like(y)
    dW, db = torch.autograd.grad(y, [W, b], dy)
    xp = x.clone()
    for k, h in enumerate(heads.tolist()):
        xp[:, h * 64:(h + 1) * 64] = xp[:, h * 64:(h + 1) * 64] * (1 + A[k]) + v[k]
    assert rel_err(dW, dy.T @ xp) < 1e-12
    assert rel_err(db, dy.sum(0)) < 1e-12


def test_empty_batch_and_no_params():
    x = torch.randn(0, 128)
    W = torch.randn(5, 128)
    heads = torch.tensor([1])
    A = torch.zeros(1, 64, requires_grad=True)
    y = lofit_fast.head_affine_linear(x, W, None, heads, A, None, 64)
    assert y.shape == (0, 5)
    x = torch.randn(3, 128)
    assert torch.equal(lofit_fast.head_affine_linear(x, W, None, heads, None, None, 64), x @ W.T)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(heads=torch.tensor([0, 2])), "head 2 out of range: there are 2 heads"),
        (dict(heads=torch.tensor([1, 0])), "sorted and unique"),
        (dict(heads=torch.tensor([1, 1])), "sorted and unique"),
        (dict(heads=torch.tensor([0.0])), "int64"),
        (dict(A=torch.zeros(2, 64)), r"A must have shape \[K, head_dim\] = \[1, 64\]"),
        (dict(v=torch.zeros(1, 32)), r"v must have shape"),
        (dict(A=torch.zeros(1, 64, dtype=torch.float16)), "A must be float32 or x's dtype"),
        (dict(head_dim=48), "not a positive multiple of head_dim 48"),
        (dict(W=torch.randn(5, 64)), r"weight must be \[D_out, 128\]"),
        (dict(W=torch.randn(5, 128, dtype=torch.float64)), "weight dtype"),
        (dict(x=torch.randn(3, 128).int()), "not supported"),
        (dict(backend="fast"), "unknown backend 'fast'"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    args = dict(x=torch.randn(3, 128), W=torch.randn(5, 128), b=None, heads=torch.tensor([1]),
                A=torch.zeros(1, 64), v=None, head_dim=64, backend="auto")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        lofit_fast.head_affine_linear(args["x"], args["W"], args["b"], args["heads"], args["A"], args["v"],
                                      args["head_dim"], backend=args["backend"])


def test_unavailable_backend_is_a_clear_error():
    missing = [n for n in ("triton", "cuda") if n not in lofit_fast.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"backend '{missing[0]}' is not available here"):
        lofit_fast.head_affine_linear(torch.randn(2, 64), torch.randn(3, 64), None, torch.tensor([0]),
                                      torch.zeros(1, 64), None, 64, backend=missing[0])


def test_auto_picks_a_cpu_backend():
    be = get_backend("auto", torch.randn(2, 64), torch.randn(3, 64), 1)
    assert be.name in ("cpp", "torch") and "cpu" in be.device_types
