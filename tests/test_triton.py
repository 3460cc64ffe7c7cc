"""The Triton kernels beyond the shared backend tests: tile geometries against head boundaries, decode,
strided inputs, the offset fold, untouched unselected columns, poisoned outputs, and the backend's wiring.

Without a GPU these run in the interpreter (TRITON_INTERPRET=1, set by conftest.py) on small shapes; the
tests marked `gpu` run real launches with the rule's configs on model-sized shapes.
"""
import math

import pytest
import torch

import lofit_fast
from lofit_fast.ops import get_backend, unavailable_reason

from reference import GRAD_TOL, OUT_TOL, reference_forward, reference_grads, rel_err

pytest.importorskip("triton", reason="triton is not installed")


def test_backend_is_available_wherever_triton_is():
    """conftest.py turns the interpreter on without a GPU, so a broken kernel module must fail here
    rather than silently drop the backend (and every triton case of test_op.py) from the run."""
    assert "triton" in lofit_fast.available_backends(), unavailable_reason("triton")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Triton launches)")


@pytest.fixture(scope="module")
def K():
    from lofit_fast.ops.triton_backend import import_kernels

    return import_kernels()


def tile(bm, bn, bk, group_m=2):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=4, num_stages=1 if not torch.cuda.is_available() else 2)


# Tile geometries against head_dim: tiles spanning two heads (one selected, one not), several tiles per
# head with ragged row and D_out edges, and a 256-wide head split in k and n.
GEOMETRIES = [
    ("straddle_d64", 4, 64, tile(16, 128, 128)),
    ("small_tiles_d64", 4, 64, tile(32, 16, 16)),
    ("split_d128", 3, 128, tile(16, 32, 64)),
    ("split_d256", 2, 256, tile(16, 64, 32)),
    ("ragged_d80", 3, 80, tile(16, 32, 32)),
]


def make(N, H, d, D_out, heads, dtype, mode, *, bias=True, x_layout="contiguous", param_dtype=torch.float32):
    C = H * d
    if x_layout == "contiguous":
        x = torch.randn(N, C, device=DEVICE).to(dtype)
    elif x_layout == "cols_stride2":
        x = torch.randn(N, 2 * C, device=DEVICE).to(dtype)[:, ::2]
    elif x_layout == "row_slice":
        x = torch.randn(N, 3 * C, device=DEVICE).to(dtype)[:, C:2 * C]
    elif x_layout == "transposed":
        x = torch.randn(C, N, device=DEVICE).to(dtype).t()
    else:
        raise ValueError(x_layout)
    W = (torch.randn(D_out, C, device=DEVICE) / math.sqrt(C)).to(dtype)
    b = torch.randn(D_out, device=DEVICE).to(dtype) if bias else None
    heads = torch.tensor(heads, dtype=torch.int64, device=DEVICE)
    k = heads.numel()
    A = (0.5 * torch.randn(k, d, device=DEVICE)).to(param_dtype) if mode in ("both", "scale") else None
    v = (0.5 * torch.randn(k, d, device=DEVICE)).to(param_dtype) if mode in ("both", "offset") else None
    return x, W, b, heads, A, v


def selected(x, heads, d):
    H = x.shape[1] // d
    if heads.numel() == H:
        return x
    cols = (heads[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1)
    return x.index_select(1, cols)


def check_kernels(K, x, W, b, heads, A, v, d, config, dtype):
    """Forward and all three gradients straight from the kernels, against the float64 reference."""
    H = x.shape[1] // d
    slot = K.head_slots(heads, H)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731  (the reference runs on the CPU)
    y = K.head_affine_forward(x, W, b, heads, slot, A, v, d, config=config)
    assert y.dtype == dtype and y.shape == (x.shape[0], W.shape[0])
    assert rel_err(y, reference_forward(cpu(x), cpu(W), cpu(b), heads.cpu(), cpu(A), cpu(v), d)) < OUT_TOL[dtype]
    dy = torch.randn_like(y)
    ref_dx, ref_dA, ref_dv = reference_grads(cpu(x), cpu(W), heads.cpu(), cpu(A), cpu(v), d, cpu(dy))
    dx, dA, dv = K.head_affine_backward(dy, W, heads, slot, A, selected(x, heads, d), d, True, True, True,
                                        config=config)
    assert dx.dtype == dtype and dA.dtype == dv.dtype == torch.float32
    assert rel_err(dx, ref_dx) < GRAD_TOL[dtype]
    assert rel_err(dA, ref_dA) < GRAD_TOL[dtype]
    assert rel_err(dv, ref_dv) < GRAD_TOL[dtype]
    _, dA_thin, dv_thin = K.head_affine_backward(dy, W, heads, slot, None, selected(x, heads, d), d,
                                                 False, True, True, config=config)
    assert rel_err(dA_thin, ref_dA) < GRAD_TOL[dtype]
    assert rel_err(dv_thin, ref_dv) < GRAD_TOL[dtype]


@pytest.mark.parametrize("name,H,d,config", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("pattern", ["alternate", "last", "all"])
def test_tile_geometries(K, name, H, d, config, pattern):
    heads = {"alternate": list(range(0, H, 2)), "last": [H - 1], "all": list(range(H))}[pattern]
    x, W, b, heads, A, v = make(37, H, d, 45, heads, torch.float32, "both")
    check_kernels(K, x, W, b, heads, A, v, d, config, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["scale", "offset"])
def test_half_precision_straddling_tiles(K, dtype, mode):
    x, W, b, heads, A, v = make(19, 4, 64, 33, [1, 2], dtype, mode)
    check_kernels(K, x, W, b, heads, A, v, 64, tile(16, 128, 128), dtype)


@pytest.mark.parametrize("x_layout", ["cols_stride2", "row_slice", "transposed"])
@pytest.mark.parametrize("pattern", ["some", "all"])
def test_strided_x_is_read_in_place(K, x_layout, pattern):
    H, d = 3, 64
    heads = [0, 2] if pattern == "some" else [0, 1, 2]
    x, W, b, heads, A, v = make(21, H, d, 40, heads, torch.float32, "both", x_layout=x_layout)
    assert not x.is_contiguous()
    check_kernels(K, x, W, b, heads, A, v, d, None, torch.float32)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("mode", ["both", "scale", "offset"])
def test_decode_single_row(mode, d):
    """N = 1 through the op (autograd included), on every head_dim the issue names."""
    H = 512 // d
    x, W, b, heads, A, v = make(1, H, d, 48, [H - 1], torch.float32, mode)
    x.requires_grad_(True)
    params = [p.requires_grad_(True) for p in (A, v) if p is not None]
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend="triton")
    assert rel_err(y, reference_forward(x, W, b, heads.cpu(), A, v, d)) < OUT_TOL[torch.float32]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, heads.cpu(), A, v, d, dy)
    refs = [ref_dx] + [r for r, p in ((ref_dA, A), (ref_dv, v)) if p is not None]
    for g, r in zip(grads, refs):
        assert rel_err(g, r) < GRAD_TOL[torch.float32]


def test_offset_bias_is_b_plus_W_S_v(K):
    x, W, b, heads, _, v = make(4, 4, 64, 70, [0, 3], torch.float32, "offset")
    cols = (heads[:, None] * 64 + torch.arange(64, device=DEVICE)).reshape(-1)
    ref = b.double() + W.double()[:, cols] @ v.double().reshape(-1)
    out = K.offset_bias(W, b, heads, v, 64)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    assert rel_err(K.offset_bias(W, None, heads, v, 64), ref - b.double()) < 1e-6


@pytest.mark.parametrize("N", [3, 80])
def test_offsets_fold_into_a_cached_float32_bias(K, N):
    """v only ever enters as b + W_S v in float32, built once per version of v: the GEMM itself is plain."""
    from lofit_fast.ops.triton_backend import BACKEND

    x, W, b, heads, _, v = make(N, 4, 64, 36, [1], torch.bfloat16, "offset")
    y = lofit_fast.head_affine_linear(x, W, b, heads, None, v, 64, backend="triton")
    assert rel_err(y, reference_forward(x, W, b, heads.cpu(), None, v, 64)) < OUT_TOL[torch.bfloat16]
    folded = BACKEND._folded_bias(W, b, heads, v, 64)
    assert folded.dtype == torch.float32 and BACKEND._folded_bias(W, b, heads, v, 64) is folded
    with torch.no_grad():
        v.mul_(-3.0)  # an optimizer step: in place, so the cache must notice
    assert BACKEND._folded_bias(W, b, heads, v, 64) is not folded
    y = lofit_fast.head_affine_linear(x, W, b, heads, None, v, 64, backend="triton")
    assert rel_err(y, reference_forward(x, W, b, heads.cpu(), None, v, 64)) < OUT_TOL[torch.bfloat16]


@pytest.mark.parametrize("N,heads", [(20, [1]), (40, [0, 2]), (300, [0, 1, 2, 3])],
                         ids=["decode-thin", "thin", "scaled-weight"])
def test_scale_paths(K, N, heads):
    """Few heads: the thin loop over W_S ⊙ A; many heads and rows: the plain GEMM on W · diag(1 + A)."""
    from lofit_fast.kernels import forward as fwd

    x, W, b, heads, A, v = make(N, 4, 64, 24, heads, torch.float32, "both")
    assert fwd.use_scaled_weight(N, heads.numel() * 64, 256) == (N == 300)
    check_kernels(K, x, W, b, heads, A, v, 64, None, torch.float32)


def test_unselected_columns_stay_out_of_dA_and_dv(K):
    """NaN in the unselected heads' weight columns reaches only their own dx columns: the epilogue's
    reductions, the selected heads' dx and the thin GEMM never mix them in (tiles span both kinds)."""
    H, d = 4, 64
    x, W, b, heads, A, v = make(24, H, d, 30, [1, 2], torch.float32, "both")
    unselected = torch.ones(H * d, dtype=torch.bool, device=DEVICE)
    unselected[d:3 * d] = False
    W_nan = W.clone()
    W_nan[:, unselected] = float("nan")
    dy = torch.randn(24, 30, device=DEVICE)
    slot = K.head_slots(heads, H)
    x_sel = selected(x, heads, d)
    _, ref_dA, ref_dv = reference_grads(x, W, heads.cpu(), A, v, d, dy)
    for config in (tile(16, 128, 128), tile(16, 32, 32), None):
        dx, dA, dv = K.head_affine_backward(dy, W_nan, heads, slot, A, x_sel, d, True, True, True, config=config)
        assert torch.isnan(dx[:, unselected]).all() and torch.isfinite(dx[:, ~unselected]).all()
        assert rel_err(dA, ref_dA) < GRAD_TOL[torch.float32] and rel_err(dv, ref_dv) < GRAD_TOL[torch.float32]
        _, dA, dv = K.head_affine_backward(dy, W_nan, heads, slot, None, x_sel, d, False, True, True, config=config)
        assert rel_err(dA, ref_dA) < GRAD_TOL[torch.float32] and rel_err(dv, ref_dv) < GRAD_TOL[torch.float32]


class _NanEmpty:
    """`torch` as the kernel launchers see it, except that torch.empty hands out NaN-filled memory."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def test_every_output_element_is_written(K, monkeypatch):
    """Outputs and the partial-sum buffer start as NaN: any element a kernel forgets shows up."""
    import sys

    for mod in ("lofit_fast.kernels.forward", "lofit_fast.kernels.backward"):
        monkeypatch.setattr(sys.modules[mod], "torch", _NanEmpty())
    for H, d, heads, config in ((4, 64, [0, 3], tile(16, 128, 128)), (3, 128, [0, 1, 2], tile(16, 32, 64)),
                                (2, 256, [1], None)):
        x, W, b, heads, A, v = make(35, H, d, 41, heads, torch.float32, "both")
        check_kernels(K, x, W, b, heads, A, v, d, config, torch.float32)


def test_params_gradient_without_input_gradient_takes_the_thin_path(K, monkeypatch):
    calls = []
    real = K.head_affine_backward

    def spy(dy, weight, heads, slot, A, x_sel, head_dim, need_dx, need_dA, need_dv, config=None):
        calls.append((need_dx, need_dA, need_dv))
        return real(dy, weight, heads, slot, A, x_sel, head_dim, need_dx, need_dA, need_dv, config=config)

    monkeypatch.setattr(K, "head_affine_backward", spy)
    x, W, b, heads, A, v = make(10, 4, 64, 20, [2], torch.float32, "both")
    A.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, 64, backend="triton")
    (dA,) = torch.autograd.grad(y, [A], torch.ones_like(y))
    assert calls == [(False, True, False)]
    assert rel_err(dA, reference_grads(x, W, heads.cpu(), A, v, 64, torch.ones_like(y))[1]) < GRAD_TOL[torch.float32]


def test_backend_contract_here():
    be = get_backend("triton", torch.empty(1, device=DEVICE), torch.empty(1, 1, device=DEVICE), 1)
    assert be.dtypes == {torch.float32, torch.float16, torch.bfloat16}
    x = torch.randn(2, 64, device=DEVICE)
    if torch.cuda.is_available():
        assert be.device_types == {"cuda"}
    else:
        assert be.device_types == {"cpu"}
        assert get_backend("auto", x, torch.randn(3, 64), 1).name != "triton"
        assert be.auto_priority(x, torch.randn(3, 64), 1) < 0


def test_one_config_under_the_interpreter(K):
    from lofit_fast.kernels import _common as c

    for kind, n in (("fwd", 1000), ("decode", 3), ("bwd", 5000)):
        assert len(c.candidates(kind, n)) == (1 if K.INTERPRETED else 2)


def test_config_rule_is_deterministic_and_fits_hopper():
    """One config per (kernel, rows): the same shape always sums in the same order. Every GPU candidate
    fits shared memory; the decode kernel keeps W's rows on wgmma's 64-row side."""
    from lofit_fast.kernels import _common as c

    for kind, regimes in c.GPU_CONFIGS.items():
        for cands in regimes.values():
            for cfg in cands:
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                assert (bm * bk + bk * bn) * 2 * cfg["num_stages"] <= 228 * 1024
                if kind == "decode":
                    assert bn >= 64
    assert c.regime("decode", 16) == "16" and c.regime("decode", 17) == "32"
    assert c.regime("fwd", 256) == "mid" and c.regime("fwd", 257) == "large"
    assert c.pick_config("fwd", 4096) == c.pick_config("fwd", 4096)


def test_head_slots_are_built_once_per_heads_tensor():
    from lofit_fast.ops.triton_backend import BACKEND

    heads = torch.tensor([0, 2], device=DEVICE)
    first = BACKEND._slot(heads, 4)
    assert first.tolist() == [0, -1, 1, -1]
    assert BACKEND._slot(heads, 4) is first
    heads[1] = 3  # in place: the map must follow
    assert BACKEND._slot(heads, 4).tolist() == [0, -1, -1, 1]
    assert BACKEND._slot(torch.tensor([1], device=DEVICE), 4).tolist() == [-1, 0, -1, -1]


# --- real launches on a GPU: the rule's configs, model-sized shapes, every dtype ---------------------------

GPU_SHAPES = [(32, 128, 4096), (16, 256, 3072), (9, 64, 576)]


@gpu
@pytest.mark.parametrize("H,d,D_out", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [1, 300])
def test_gpu_model_shapes(K, H, d, D_out, dtype, N):
    for pattern in ([0, H - 1], list(range(H))):
        x, W, b, heads, A, v = make(N, H, d, D_out, pattern, dtype, "both")
        check_kernels(K, x, W, b, heads, A, v, d, None, dtype)
        x, W, b, heads, _, v = make(N, H, d, D_out, pattern, dtype, "offset")
        y = lofit_fast.head_affine_linear(x, W, b, heads, None, v, d, backend="triton")
        assert rel_err(y, reference_forward(x, W, b, heads.cpu(), None, v, d)) < OUT_TOL[dtype]


@gpu
def test_gpu_partial_sums_with_many_row_tiles(K):
    """Several regimes in a row: the second pass must sum exactly the chosen tiling's rows."""
    for N in (17, 33, 257, 1000, 4097):
        x, W, b, heads, A, v = make(N, 8, 128, 512, [1, 5], torch.bfloat16, "both")
        check_kernels(K, x, W, b, heads, A, v, 128, None, torch.bfloat16)
