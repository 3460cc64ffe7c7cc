"""The cuda backend and the native ops' registration.

1. nvcc compile check of csrc/cuda/*.cu against torch's headers (runs on CPU-only machines too).
2. The CUDA kernels against the float64 reference (needs a GPU; the shared cases of test_op.py also run there).
3. torch.library registration: fake implementations, torch.compile(fullgraph=True) through forward and backward.
4. The dispatch table that picks cuda or triton under backend="auto" on a GPU.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

import lofit_fast
from lofit_fast.ops import dispatch, get_backend
from lofit_fast.ops.cpp_backend import native_ops

from reference import GRAD_TOL, OUT_TOL, poison_allocator, reference_forward, reference_grads, rel_err

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


# ------------------------------------------------------------------------------------------------------------
# 1. nvcc compile check


def find_nvcc():
    candidates = [os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                  shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_command(nvcc: str, source: Path, out: Path):
    inc = Path(torch.__file__).resolve().parent / "include"
    cmd = [nvcc, "-c", str(source), "-o", str(out), "-std=c++17", "-O3", "--use_fast_math", "-DLOFIT_WITH_CUDA",
           "-I", str(inc), "-I", str(inc / "torch" / "csrc" / "api" / "include"),
           "-I", sysconfig.get_paths()["include"], "-Xcompiler", "-fPIC",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           *COMMON_NVCC_FLAGS]  # what torch's BuildExtension adds (no implicit half/bfloat16 conversions)
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU-only torch ships c10/cuda headers without this generated file; a CUDA torch has it.
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME/bin, PATH, /usr/local/cuda/bin): the CUDA sources cannot be compiled")
    assert CUDA_SOURCES, "no csrc/cuda/*.cu sources"
    start = time.monotonic()
    procs = {src: subprocess.Popen(nvcc_command(nvcc, src, tmp_path / (src.stem + ".o")), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for src in CUDA_SOURCES}
    failures, own_warnings = [], []
    for src, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"{src.name} (exit {proc.returncode}):\n{out[-6000:]}")
        # Warnings inside our own sources (torch's headers have theirs).
        own_warnings += [line for line in out.splitlines() if "csrc/cuda/" in line and "warning" in line.lower()]
        assert (tmp_path / (src.stem + ".o")).exists() or proc.returncode != 0
    assert not failures, "\n\n".join(failures)
    assert not own_warnings, "\n".join(own_warnings)
    print(f"nvcc compiled {len(CUDA_SOURCES)} sources for sm_80 + sm_90 in {time.monotonic() - start:.1f}s")


def test_sm90_kernel_report_has_no_spills():
    """bench/sm90_cuda.py: every kernel compiled for sm_90a, registers / spills / shared memory from ptxas."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sm90_cuda
    finally:
        sys.path.remove(str(ROOT / "bench"))
    records = sm90_cuda.cuda_kernel_report("sm_90a", nvcc=nvcc)
    kernels = {r["kernel"] for r in records}
    assert {"decode_gemv_kernel", "materialize_kernel", "gather_scale_kernel", "bias_row_kernel",
            "head_reduce_kernel", "finish_partials_kernel", "head_slots_kernel"} <= kernels, kernels
    for r in records:
        assert set(r) >= {"kernel", "variant", "registers", "spill_bytes", "shared_bytes", "warnings"}
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert 0 < r["registers"] <= 255 and not r["warnings"], r
    gemv = [r for r in records if r["kernel"] == "decode_gemv_kernel"]
    assert len(gemv) == 15  # float32, bfloat16, float16 x N-tiles 1, 2, 4, 8, 16
    assert max(r["registers"] for r in gemv) <= 200  # the double buffer leaves room for 2+ blocks per SM


def test_sm90_report_parser():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sm90_cuda
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z3fooILi4EEvPf' for 'sm_90a'
        ptxas info    : Function properties for _Z3fooILi4EEvPf
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
        ptxas info    : Function properties for _Z3barPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 12 registers, used 0 barriers, 360 bytes cmem[0]
    """)
    recs = sm90_cuda.parse_ptxas(text, "sm_90a")
    assert [(r["kernel"], r["variant"], r["registers"], r["spill_bytes"], r["shared_bytes"], r["stack_bytes"])
            for r in recs] == [("foo", "4", 40, 12, 2048, 16), ("bar", "", 12, 0, 0, 0)]


# ------------------------------------------------------------------------------------------------------------
# 2. GPU: the kernels against float64


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if "cuda" not in lofit_fast.available_backends():
        return f"cuda backend unavailable: {lofit_fast.ops.unavailable_reason('cuda')}"
    return ""


needs_cuda = pytest.mark.skipif(bool(_cuda_skip_reason()), reason=_cuda_skip_reason() or "cuda available")
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_inputs(N, H, d, D_out, heads, dtype, *, A=True, v=True, bias=True, layout="contiguous", device="cuda"):
    """layout: contiguous | strided (column stride 2) | misaligned (x and W start one element off 16 bytes)."""
    C = H * d
    if layout == "strided":
        x = torch.randn(N, 2 * C, device=device).to(dtype)[:, ::2]
    elif layout == "misaligned":
        x = torch.randn(N, C + 1, device=device).to(dtype)[:, 1:]
    else:
        x = torch.randn(N, C, device=device).to(dtype)
    W = (torch.randn(D_out, C + (1 if layout == "misaligned" else 0), device=device) / math.sqrt(C)).to(dtype)
    W = W[:, 1:] if layout == "misaligned" else W
    b = torch.randn(D_out, device=device).to(dtype) if bias else None
    h = torch.tensor(heads, dtype=torch.int64, device=device)
    K = len(heads)
    A_ = 0.5 * torch.randn(K, d, device=device) if A else None
    v_ = 0.5 * torch.randn(K, d, device=device) if v else None
    return x, W, b, h, A_, v_


def kernel_names(fn) -> set:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N", list(range(1, 17)))
def test_decode_gemv_matches_float64(N, dtype):
    x, W, b, h, A, v = make_inputs(N, 8, 64, 129, [0, 3, 7], dtype, bias=N % 2 == 1)
    poison_allocator(1 << 20, "cuda")
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda")
    assert y.shape == (N, 129) and y.dtype == dtype
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("x_layout", ["strided", "offset"])
@pytest.mark.parametrize("N", [1, 7])
def test_decode_gemv_reads_strided_and_unaligned_x(N, x_layout):
    """x's rows are staged with scalar loads when they cannot be read as 16-byte packs; W stays aligned."""
    x, W, b, h, A, v = make_inputs(N, 8, 64, 70, [2, 5], torch.bfloat16, layout=x_layout.replace("offset", "strided"))
    if x_layout == "offset":
        x = torch.randn(N, 8 * 64 + 3, device="cuda").to(torch.bfloat16)[:, 3:]
    fn = lambda: lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda")  # noqa: E731
    assert any("decode_gemv" in k for k in kernel_names(fn))
    assert rel_err(fn(), reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]


@needs_cuda
def test_decode_gemv_is_the_kernel_for_small_n_only():
    x, W, b, h, A, v = make_inputs(17, 8, 64, 64, [1, 2], torch.bfloat16)
    run = lambda n: kernel_names(lambda: lofit_fast.head_affine_linear(x[:n], W, b, h, A, v, 64, backend="cuda"))  # noqa: E731
    assert any("decode_gemv" in k for k in run(1))
    assert any("decode_gemv" in k for k in run(16))
    assert not any("decode_gemv" in k for k in run(17))


@needs_cuda
@pytest.mark.parametrize(
    "heads,A,v,want,not_want",
    [
        (list(range(8)), True, True, "materialize_kernel", "gather_scale_kernel"),
        ([2], True, True, "gather_scale_kernel", "materialize_kernel"),
        ([2], True, True, "bias_row_kernel", "materialize_kernel"),
        (list(range(8)), False, True, "bias_row_kernel", "materialize_kernel"),
    ],
)
def test_large_n_forward_paths_run_their_kernels(heads, A, v, want, not_want):
    x, W, b, h, A_, v_ = make_inputs(256, 8, 64, 512, heads, torch.bfloat16, A=A, v=v)
    names = kernel_names(lambda: lofit_fast.head_affine_linear(x, W, b, h, A_, v_, 64, backend="cuda"))
    assert any(want in k for k in names) and not any(not_want in k for k in names), names


@needs_cuda
def test_backward_runs_one_reduction_pass():
    x, W, b, h, A, v = make_inputs(256, 8, 64, 512, [1, 4], torch.bfloat16)
    for t in (x, A, v):
        t.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda")
    names = kernel_names(lambda: torch.autograd.grad(y, [x, A, v], torch.ones_like(y)))
    assert sum("head_reduce_kernel" in k for k in names) == 1 and any("finish_partials" in k for k in names), names


@needs_cuda
@pytest.mark.parametrize("dtype,N,C", [(torch.bfloat16, 16, 8192), (torch.float32, 16, 4096), (torch.float16, 5, 16384)])
def test_decode_gemv_stages_x_in_several_chunks(dtype, N, C):
    """N * C does not fit the 48 KiB of shared memory: x' is staged chunk by chunk, the last one partial."""
    d = 128
    x, W, b, h, A, v = make_inputs(N, C // d, d, 67, [0, 5, C // d - 1], dtype)
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cuda")
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, d)) < OUT_TOL[dtype]


# (N, H, d, D_out, heads): the thin-GEMM path (few heads), the materialized path (every head; 6 of 8 heads in
# float32), N <= 16 where the GEMV cannot run (head_dim 12 in 16-bit), head_dim 64 / 128, and the scalar
# fallbacks (head_dim 4, 6, 12 are not multiples of a 16-byte pack of 2-byte elements, 6 not of float32's).
LARGE_CASES = [
    (300, 8, 64, 131, [2]),
    (300, 8, 64, 131, [0, 1, 2, 3, 5, 7]),
    (17, 4, 128, 64, [0, 1, 2, 3]),
    (2048, 32, 128, 96, [0, 9, 31]),
    (64, 6, 12, 33, [1, 4]),
    (40, 3, 4, 7, [0, 2]),
    (100, 4, 12, 40, [0, 1, 2, 3]),
    (100, 4, 6, 40, [0, 1, 2, 3]),
    (3, 6, 12, 33, [1, 4]),
]


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", LARGE_CASES)
@pytest.mark.parametrize("mode", ["both", "scale", "offset"])
def test_paths_match_float64(case, dtype, layout, mode):
    N, H, d, D_out, heads = case
    x, W, b, h, A, v = make_inputs(N, H, d, D_out, heads, dtype, A=mode != "offset", v=mode != "scale",
                                   layout=layout)
    x.requires_grad_(True)
    params = [p.requires_grad_(True) for p in (A, v) if p is not None]
    poison_allocator(1 << 22, "cuda")
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cuda")
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, d)) < OUT_TOL[dtype]
    dy = torch.randn_like(y)
    poison_allocator(1 << 22, "cuda")
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, h.cpu(), A, v, d, dy)
    assert rel_err(grads[0], ref_dx) < GRAD_TOL[dtype]
    refs = [r for r, p in ((ref_dA, A), (ref_dv, v)) if p is not None]
    for g, r in zip(grads[1:], refs):
        assert g.dtype == torch.float32 and rel_err(g, r) < GRAD_TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["dA+dv (no dx)", "dv only", "dx only"])
def test_backward_without_every_gradient(dtype, which):
    """The frozen-input paths: g_S = dy W_S (no dx), and dv = (sum_n dy) W_S (no dx, no A)."""
    N, H, d, D_out, heads = 500, 8, 64, 200, [1, 6]
    x, W, b, h, A, v = make_inputs(N, H, d, D_out, heads, dtype, A=which != "dv only")
    if dtype == torch.float64:  # float64 parameters too, so that their gradients keep float64 precision
        A, v = (None if A is None else A.double()), v.double()
    wants = {"dA+dv (no dx)": [A, v], "dv only": [v], "dx only": [x]}[which]
    for t in wants:
        t.requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cuda")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, wants, dy)
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, h.cpu(), A, v, d, dy)
    refs = {id(x): ref_dx, id(v): ref_dv}
    if A is not None:
        refs[id(A)] = ref_dA
    tol = GRAD_TOL[dtype] if dtype != torch.float64 else 1e-10
    for t, g in zip(wants, grads):
        assert rel_err(g, refs[id(t)]) < tol


@needs_cuda
def test_empty_batch_and_no_heads():
    x, W, b, h, A, v = make_inputs(0, 4, 64, 10, [1], torch.bfloat16)
    ops = native_ops()
    assert ops.head_affine_fwd(x, W, b, h, A, v, 64).shape == (0, 10)
    dx, dA, dv = ops.head_affine_bwd(torch.zeros(0, 10, device="cuda", dtype=torch.bfloat16), x[:, 64:128], W, h, A,
                                     64, True, True, True)
    assert dx.shape == (0, 256) and torch.equal(dA, torch.zeros(1, 64, device="cuda")) and not dv.any()
    x, W, b, _, _, _ = make_inputs(3, 4, 64, 10, [1], torch.float32)
    none = torch.zeros(0, dtype=torch.int64, device="cuda")
    y = ops.head_affine_fwd(x, W, b, none, torch.zeros(0, 64, device="cuda"), None, 64)
    assert torch.allclose(y, x @ W.T + b, atol=1e-5)


@needs_cuda
def test_backward_is_deterministic():
    x, W, b, h, A, v = make_inputs(4096, 8, 64, 64, [0, 2, 5], torch.bfloat16)
    for t in (x, A, v):
        t.requires_grad_(True)
    dy = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda"), [x, A, v], dy)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_cuda
@pytest.mark.parametrize("N", [1, 256])
def test_cuda_graph_capture(N):
    x, W, b, h, A, v = make_inputs(N, 8, 64, 64, [3, 4], torch.bfloat16)
    fn = lambda: lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda", validate=False)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(all="cpu"), "forward_cuda needs CUDA tensors, x is on cpu"),
        (dict(W="cpu"), "weight is on cpu but x is on cuda"),
        (dict(heads="cpu"), "heads is on cpu but x is on cuda"),
        (dict(A="cpu"), "A is on cpu but x is on cuda"),
        (dict(A_shape=(2, 64)), r"A must have shape \[K, head_dim\] = \[1, 64\]"),
        (dict(W_dtype=torch.float16), "weight dtype"),
        (dict(head_dim=48), "not a multiple of head_dim 48"),
    ],
)
def test_cuda_errors_name_the_problem(change, match):
    from lofit_fast import _C

    x, W, b, h, A, v = make_inputs(3, 2, 64, 5, [1], torch.float32)
    if change.get("all"):
        x, W, b, h, A = x.cpu(), W.cpu(), b.cpu(), h.cpu(), A.cpu()
    if change.get("W"):
        W = W.cpu()
    if change.get("heads"):
        h = h.cpu()
    if change.get("A"):
        A = A.cpu()
    if "A_shape" in change:
        A = torch.zeros(*change["A_shape"], device="cuda")
    if "W_dtype" in change:
        W = W.to(change["W_dtype"])
    with pytest.raises(RuntimeError, match=match):
        _C.forward_cuda(x, W, b, h, A, v, change.get("head_dim", 64))


@needs_cuda
def test_backward_errors_name_the_problem():
    from lofit_fast import _C

    x, W, b, h, A, v = make_inputs(3, 2, 64, 5, [1], torch.float32)
    with pytest.raises(RuntimeError, match="backward_cuda needs CUDA tensors, dy is on cpu"):
        _C.backward_cuda(torch.zeros(3, 5), x[:, 64:].cpu(), W.cpu(), h.cpu(), A.cpu(), 64, True, True, True)
    with pytest.raises(RuntimeError, match="heads is on cpu but dy is on cuda"):
        _C.backward_cuda(torch.zeros(3, 5, device="cuda"), x[:, 64:], W, h.cpu(), A, 64, True, True, True)
    with pytest.raises(RuntimeError, match=r"x_sel must be \[3, 64\]"):
        _C.backward_cuda(torch.zeros(3, 5, device="cuda"), x, W, h, A, 64, True, True, True)


@needs_cuda
@pytest.mark.parametrize("heads", ["[0, 2]", "[1, 0]", "[-1]"])
def test_bad_heads_on_the_device_trip_a_device_assert(heads):
    """Head values on the GPU are checked by the kernels (no host sync); a bad one kills the CUDA context, so it
    runs in a subprocess."""
    script = textwrap.dedent(f"""
        import torch, lofit_fast
        from lofit_fast.ops.cpp_backend import native_ops
        x = torch.randn(4, 128, device="cuda"); W = torch.randn(8, 128, device="cuda")
        h = torch.tensor({heads}, device="cuda"); A = torch.zeros(h.numel(), 64, device="cuda")
        native_ops().head_affine_fwd(x, W, None, h, A, None, 64)
        torch.cuda.synchronize()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr or "lofit_fast: " in proc.stderr, proc.stderr[-2000:]


@needs_cuda
def test_compiles_fullgraph_on_cuda():
    x, W, b, h, A, v = make_inputs(64, 8, 64, 64, [1, 5], torch.bfloat16)
    for t in (x, A, v):
        t.requires_grad_(True)
    fn = lambda x, A, v: lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda", validate=False)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dy = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    got = [compiled(x, A, v), *torch.autograd.grad(compiled(x, A, v), [x, A, v], dy)]
    want = [fn(x, A, v), *torch.autograd.grad(fn(x, A, v), [x, A, v], dy)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------------------------------------
# 2b. GPU: the prepared operands (slot table, W_S, folded bias) cached per parameter version


def _cuda_backend():
    from lofit_fast.ops.cuda_backend import BACKEND

    return BACKEND


def _params(A, v):
    return (None if A is None else nn.Parameter(A)), (None if v is None else nn.Parameter(v))


@needs_cuda
@pytest.mark.parametrize(
    "N,heads,mode",
    [
        (1, [0, 3], "both"),  # decode GEMV
        (1, [2], "offset"),  # decode GEMV, v folded into the float32 bias: one kernel
        (256, [2], "both"),  # thin GEMM: W_S and the folded bias cached
        (256, [1, 5], "offset"),  # one GEMM with the cached folded bias
        (256, list(range(8)), "both"),  # materialized x' (slot table cached)
    ],
)
def test_prepared_operands_are_cached_and_refreshed(N, heads, mode):
    """Second call: cache hits and the same result. Then v, A, heads and the weight are changed in place: every
    call still equals the float64 reference of the current values."""
    be = _cuda_backend()
    x, W, b, h, A, v = make_inputs(N, 8, 64, 96, heads, torch.bfloat16, A=mode != "offset", v=mode != "scale")
    A, v = _params(A, v)
    tol = OUT_TOL[torch.bfloat16]

    def run():
        with torch.no_grad():
            return lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda")

    def ref():
        return reference_forward(x, W, b, h.cpu(), A, v, 64)

    caches = (be.slots, be.weight_sel, be.bias_fold)
    y1 = run()
    hits = [c.hits for c in caches]
    y2 = run()
    assert torch.equal(y1, y2)
    assert sum(c.hits for c in caches) > sum(hits), "the second call did not hit any cache"
    assert rel_err(y2, ref()) < tol
    with torch.no_grad():
        v.add_(0.5)  # in place: the folded bias must be rebuilt
    assert rel_err(run(), ref()) < tol
    if A is not None:
        with torch.no_grad():
            A.mul_(-1.5)  # A is never cached, but must not be served stale either
        assert rel_err(run(), ref()) < tol
    new_heads = [(k + 1) % 8 for k in heads]
    with torch.no_grad():
        h.copy_(torch.tensor(sorted(new_heads), device="cuda"))  # the slot table, W_S and the fold all depend on it
    assert rel_err(run(), ref()) < tol
    with torch.no_grad():
        W.mul_(0.5)
    assert rel_err(run(), ref()) < tol


@needs_cuda
@pytest.mark.parametrize("N,mode", [(1, "both"), (1, "offset"), (256, "both"), (256, "offset"), (40, "both")])
def test_prepared_operands_match_the_direct_op(N, mode):
    """The op called directly (everything computed on the spot) and with the prepared operands agree: bit for
    bit on the GEMM paths (the same kernels, the same roundings), to bf16 tolerance in the decode GEMV (there the
    folded bias adds v W_S^T in float32 instead of through x')."""
    be = _cuda_backend()
    x, W, b, h, A, v = make_inputs(N, 8, 64, 80, [1, 6], torch.bfloat16, A=mode != "offset")
    direct = native_ops().head_affine_fwd(x, W, b, h, A, v, 64)
    prepared = be._prepared_forward(x, W, b, h, A, v, 64)
    assert prepared[0] is not None or A is None and N > 16
    with_prepared = native_ops().head_affine_fwd(x, W, b, h, A, v, 64, *prepared)
    if N > 16:
        assert torch.equal(direct, with_prepared)
    assert rel_err(with_prepared, reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]


@needs_cuda
def test_cached_decode_launches_one_kernel():
    be = _cuda_backend()
    x, W, b, h, A, v = make_inputs(1, 8, 64, 128, [2, 5], torch.bfloat16)
    A, v = _params(A, v)
    fn = lambda: be.forward(x, W, b, h, A, v, 64)  # noqa: E731
    fn()  # builds the slot table and the folded bias
    names = kernel_names(fn)
    assert len(names) == 1 and "decode_gemv" in next(iter(names)), names
    fn_v = lambda: be.forward(x, W, b, h, None, v, 64)  # noqa: E731
    fn_v()
    assert kernel_names(fn_v) == names


@needs_cuda
def test_cached_offset_gemm_is_one_gemm():
    be = _cuda_backend()
    x, W, b, h, _, v = make_inputs(512, 8, 64, 256, [1, 2], torch.bfloat16, A=False)
    v = nn.Parameter(v)
    fn = lambda: be.forward(x, W, b, h, None, v, 64)  # noqa: E731
    fn()
    names = kernel_names(fn)
    assert not any("bias_row" in k or "lofit" in k for k in names), names  # only cuBLAS


@needs_cuda
def test_folded_bias_keeps_float32_in_the_decode_gemv():
    """b = 256 and v W_S^T = 0.25, below bf16's resolution at 256 (ulp 2), and x W^T = -256 cancels b. The decode
    GEMV adds the float32 fold before its one rounding: y = 0.25 exactly. The GEMM path adds the fold rounded to
    bf16 once (documented): y within half an ulp of f = 256.25, i.e. |y - 0.25| <= 1."""
    be = _cuda_backend()
    H, d, D_out = 4, 64, 32
    C = H * d
    for N in (1, 64):
        x = torch.zeros(N, C, device="cuda", dtype=torch.bfloat16)
        x[:, 0] = 1.0  # head 0, not selected
        W = torch.zeros(D_out, C, device="cuda", dtype=torch.bfloat16)
        W[:, 0] = -256.0
        W[:, 2 * d] = 1.0  # head 2, selected
        b = torch.full((D_out,), 256.0, device="cuda", dtype=torch.bfloat16)
        h = torch.tensor([2], device="cuda")
        v = torch.zeros(1, d, device="cuda")
        v[0, 0] = 0.25
        v = nn.Parameter(v)
        fold, fold_acc = _C_mod().folded_bias_cuda(W, b, h, v.detach(), d)
        assert torch.all(fold_acc == 256.25) and torch.all(fold == 256.0)
        y = be.forward(x, W, b, h, None, v, d)
        ref = reference_forward(x, W, b, h.cpu(), None, v, d)
        assert torch.allclose(ref, torch.full_like(ref, 0.25))
        if N == 1:
            assert torch.all(y.float() == 0.25), y
        else:
            assert torch.all((y.float() - 0.25).abs() <= 1.0), y


def _C_mod():
    from lofit_fast import _C

    return _C


@needs_cuda
def test_folded_bias_is_float32_accurate():
    x, W, b, h, _, v = make_inputs(1, 8, 64, 300, [0, 4, 7], torch.bfloat16, A=False)
    fold, fold_acc = _C_mod().folded_bias_cuda(W, b, h, v, 64)
    cols = torch.cat([torch.arange(k * 64, (k + 1) * 64) for k in (0, 4, 7)]).cuda()
    want = b.double() + W.double()[:, cols] @ v.double().reshape(-1)
    assert fold_acc.dtype == torch.float32 and fold.dtype == torch.bfloat16
    assert (fold_acc.double() - want).abs().max().item() < 1e-5 * want.abs().max().item()
    assert torch.equal(fold, fold_acc.to(torch.bfloat16))  # rounded once


@needs_cuda
def test_head_slots_table():
    h = torch.tensor([1, 4, 6], device="cuda")
    slots = _C_mod().head_slots_cuda(h, 8)
    assert slots.dtype == torch.int32 and slots.tolist() == [-1, 0, -1, -1, 1, -1, 2, -1]


@needs_cuda
def test_backward_without_dx_uses_the_cached_weight_sel():
    be = _cuda_backend()
    x, W, b, h, A, v = make_inputs(300, 8, 64, 96, [3, 6], torch.bfloat16)
    A, v = _params(A, v)
    before = be.weight_sel.hits + be.weight_sel.misses
    for _ in range(2):
        y = lofit_fast.head_affine_linear(x, W, b, h, A, v, 64, backend="cuda")
        dy = torch.randn_like(y)
        dA, dv = torch.autograd.grad(y, [A, v], dy)
        _, ref_dA, ref_dv = reference_grads(x, W, h.cpu(), A, v, 64, dy)
        assert rel_err(dA, ref_dA) < GRAD_TOL[torch.bfloat16] and rel_err(dv, ref_dv) < GRAD_TOL[torch.bfloat16]
    assert be.weight_sel.hits + be.weight_sel.misses > before and be.weight_sel.hits > 0


@needs_cuda
def test_nothing_is_cached_for_inference_tensors():
    be = _cuda_backend()
    with torch.inference_mode():
        x, W, b, h, A, v = make_inputs(1, 8, 64, 64, [3], torch.bfloat16)
        n = len(be.bias_fold)
        y = be.forward(x, W, b, h, A, v, 64)
        assert len(be.bias_fold) == n
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("N", [1, 256])
def test_nothing_is_cached_under_cuda_graph_capture(N):
    """Captured with fresh parameters: the capture computes the prepared operands itself (nothing is cached from
    inside the capture), and a replay after an in-place change of v uses the new v."""
    be = _cuda_backend()
    stream = torch.cuda.Stream()  # warm up cuBLAS and the allocator on other tensors of the same shapes
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        be.forward(*make_inputs(N, 8, 64, 64, [3, 4], torch.bfloat16), 64)
    torch.cuda.current_stream().wait_stream(stream)
    x, W, b, h, A, v = make_inputs(N, 8, 64, 64, [3, 4], torch.bfloat16)
    sizes = [len(c) for c in (be.slots, be.weight_sel, be.bias_fold)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = be.forward(x, W, b, h, A, v, 64)
    assert [len(c) for c in (be.slots, be.weight_sel, be.bias_fold)] == sizes
    v.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference_forward(x, W, b, h.cpu(), A, v, 64)) < OUT_TOL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(slots=torch.zeros(7, dtype=torch.int32)), r"slots must be a contiguous int32 \[8\]"),
        (dict(slots=torch.zeros(8, dtype=torch.int64)), "slots must be a contiguous int32"),
        (dict(weight_sel=torch.zeros(5, 63)), r"weight_sel must be weight's selected columns \[D_out, K\*head_dim\]"),
        (dict(bias_fold=torch.zeros(5)), "bias_fold and bias_fold_acc are passed together"),
        (dict(bias_fold=torch.zeros(5), bias_fold_acc=torch.zeros(5, dtype=torch.float64)),
         "bias_fold_acc must be a contiguous"),
    ],
)
def test_prepared_operand_errors_name_the_problem(extra, match):
    x, W, b, h, A, v = make_inputs(20, 8, 64, 5, [1], torch.float32)
    args = {k: t.cuda() for k, t in extra.items()}
    with pytest.raises(RuntimeError, match=match):
        _C_mod().forward_cuda(x, W, b, h, A, v, 64, **args)


@needs_cuda
def test_backward_checks_the_dtype_of_A():
    x, W, b, h, A, v = make_inputs(3, 2, 64, 5, [1], torch.float32)
    dy = torch.zeros(3, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"A must be float32 or x's dtype \(Float\), got Double"):
        _C_mod().backward_cuda(dy, x[:, 64:], W, h, A.double(), 64, True, True, True)
    with pytest.raises(RuntimeError, match="A must be float32 or x's dtype"):
        native_ops().head_affine_bwd(dy, x[:, 64:], W, h, A.half(), 64, True, True, True)


SANITIZER_SCRIPT = """
import torch, lofit_fast
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for N, heads, layout in ((1, [0, 3], "c"), (16, [1], "c"), (5, [0, 1, 2, 3], "s"), (300, [2], "c"),
                             (300, [0, 1, 2, 3], "c"), (77, [1, 3], "m")):
        C, d, D_out = 256, 64, 67
        if layout == "c":  # contiguous
            x = torch.randn(N, C, device="cuda", dtype=dtype)
        elif layout == "s":  # column stride 2
            x = torch.randn(N, 2 * C, device="cuda", dtype=dtype)[:, ::2]
        else:  # rows start one element past 16-byte alignment
            x = torch.randn(N, C + 1, device="cuda", dtype=dtype)[:, 1:]
        W = torch.randn(D_out, C, device="cuda", dtype=dtype)
        b = torch.randn(D_out, device="cuda", dtype=dtype)
        h = torch.tensor(heads, device="cuda")
        A = torch.randn(len(heads), d, device="cuda", requires_grad=True)
        v = torch.randn(len(heads), d, device="cuda", requires_grad=True)
        for xg in (True, False):
            xi = x.detach().requires_grad_(xg)
            for Ai, vi in ((A, v), (A, None), (None, v)):
                y = lofit_fast.head_affine_linear(xi, W, b, h, Ai, vi, d, backend="cuda")
                wrt = [t for t in (xi, Ai, vi) if t is not None and t.requires_grad]
                torch.autograd.grad(y, wrt, torch.randn_like(y))
torch.cuda.synchronize()
print("sanitizer script done")
"""


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_kernels_pass_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer") or (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"))
    if not os.path.isfile(sanitizer):
        pytest.skip("compute-sanitizer not found")
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", "--kernel-name", "kns=lofit",
                           sys.executable, "-c", SANITIZER_SCRIPT], capture_output=True, text=True, timeout=1800,
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "sanitizer script done" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# ------------------------------------------------------------------------------------------------------------
# 3. torch.library registration and torch.compile (CPU)


def _cpu_case(N=6, H=4, d=16, D_out=10, heads=(0, 2), dtype=torch.float32):
    x = torch.randn(N, H * d, dtype=dtype)
    W = torch.randn(D_out, H * d, dtype=dtype)
    b = torch.randn(D_out, dtype=dtype)
    h = torch.tensor(heads, dtype=torch.int64)
    A = torch.randn(len(heads), d)
    v = torch.randn(len(heads), d)
    return x, W, b, h, A, v, d


@pytest.mark.parametrize("with_bias,with_A,with_v", [(True, True, True), (False, True, False), (True, False, True)])
def test_native_ops_pass_opcheck(with_bias, with_A, with_v):
    """Schema, fake (meta) implementation and AOT dispatch of lofit_fast::head_affine_fwd / head_affine_bwd."""
    x, W, b, h, A, v, d = _cpu_case()
    ops = native_ops()
    fwd_args = (x, W, b if with_bias else None, h, A if with_A else None, v if with_v else None, d)
    torch.library.opcheck(ops.head_affine_fwd.default, fwd_args)
    dy = torch.randn(x.shape[0], W.shape[0])
    x_sel = x[:, torch.cat([torch.arange(k * d, (k + 1) * d) for k in h.tolist()])]
    for need in [(True, with_A, with_v), (False, with_A, True), (False, False, True)]:
        torch.library.opcheck(ops.head_affine_bwd.default, (dy, x_sel, W, h, A if with_A else None, d, *need))


def test_native_ops_pass_opcheck_with_prepared_operands():
    """The schema's trailing optional operands (used by the CUDA kernels, ignored on the CPU) trace and fake
    consistently."""
    x, W, b, h, A, v, d = _cpu_case()
    H, K, D_out = x.shape[1] // d, h.numel(), W.shape[0]
    slots = torch.full((H,), -1, dtype=torch.int32)
    slots[h] = torch.arange(K, dtype=torch.int32)
    cols = torch.cat([torch.arange(k * d, (k + 1) * d) for k in h.tolist()])
    w_sel = W[:, cols].contiguous()
    fold_acc = b + w_sel @ v.reshape(-1)
    ops = native_ops()
    fwd_args = (x, W, b, h, A, v, d, slots, w_sel, fold_acc.clone(), fold_acc)
    torch.library.opcheck(ops.head_affine_fwd.default, fwd_args)
    assert torch.equal(ops.head_affine_fwd(*fwd_args), ops.head_affine_fwd(x, W, b, h, A, v, d))
    dy = torch.randn(x.shape[0], D_out)
    torch.library.opcheck(ops.head_affine_bwd.default, (dy, x[:, cols], W, h, A, d, False, True, True, w_sel))


def test_backward_op_checks_the_dtype_of_A():
    x, W, b, h, A, v, d = _cpu_case()
    dy = torch.randn(x.shape[0], W.shape[0])
    x_sel = x[:, torch.cat([torch.arange(k * d, (k + 1) * d) for k in h.tolist()])]
    with pytest.raises(RuntimeError, match=r"A must be float32 or x's dtype \(Float\), got Half"):
        native_ops().head_affine_bwd(dy, x_sel, W, h, A.half(), d, True, True, True)
    native_ops().head_affine_bwd(dy.double(), x_sel.double(), W.double(), h, A.double(), d, True, True, True)


def test_backward_op_returns_empty_tensors_for_unrequested_gradients():
    x, W, b, h, A, v, d = _cpu_case()
    dy = torch.randn(x.shape[0], W.shape[0])
    dx, dA, dv = native_ops().head_affine_bwd(dy, None, W, h, A, d, False, False, True)
    assert dx.numel() == 0 and dA.numel() == 0 and dv.shape == (2, d) and dv.dtype == torch.float32
    be = get_backend("cpp", x, W, 2)
    assert be.backward(dy, None, W, h, A, d, False, False, True)[:2] == (None, None)


class _GraphRecorder:
    """An aot_autograd backend that records the forward and backward graphs' nodes and runs them eagerly."""

    def __init__(self):
        self.graphs = {"fw": [], "bw": []}

    def backend(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(kind):
            def compiler(gm, example_inputs):
                self.graphs[kind].append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
                return make_boxed_func(gm.forward)
            return compiler

        return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_forward_and_backward_match_eager(dtype):
    x, W, b, h, A, v, d = _cpu_case(dtype=dtype)
    lofit_fast.available_backends()  # backends are loaded once, outside the traced code (as patch() does)

    def fn(x, A, v):
        return lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cpp", validate=False)

    rec = _GraphRecorder()
    compiled = torch.compile(fn, fullgraph=True, backend=rec.backend())
    leaves = [t.clone().requires_grad_(True) for t in (x, A, v)]
    y = compiled(*leaves)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, A, v)]
    y_ref = fn(*ref_leaves)
    want = torch.autograd.grad(y_ref, ref_leaves, dy)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert rec.graphs["fw"] and "lofit_fast.head_affine_fwd.default" in rec.graphs["fw"][0]
    assert rec.graphs["bw"] and "lofit_fast.head_affine_bwd.default" in rec.graphs["bw"][0]


def test_compile_patched_module_fullgraph_dynamic_batch():
    from lofit_fast.patch.module import HeadInterventionLinear

    lofit_fast.available_backends()
    base = nn.Linear(64, 24, bias=True).requires_grad_(False)
    mod = HeadInterventionLinear(base, torch.tensor([1, 3]), 16, A=0.1 * torch.randn(2, 16), v=torch.randn(2, 16),
                                 backend="cpp")
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    for n in (3, 7, 12):  # a new batch size makes the second compile dynamic
        x = torch.randn(2, n, 64, requires_grad=True)
        y = compiled(x)
        y_ref = reference_forward(x, base.weight, base.bias, mod.heads, mod.A, mod.v, 16)
        assert rel_err(y, y_ref) < OUT_TOL[torch.float32]
        dx, dA, dv = torch.autograd.grad(y.square().sum(), [x, mod.A, mod.v])
        ref_dx, ref_dA, ref_dv = reference_grads(x, base.weight, mod.heads, mod.A, mod.v, 16, 2 * y.detach())
        for g, r in ((dx, ref_dx), (dA, ref_dA), (dv, ref_dv)):
            assert rel_err(g, r) < GRAD_TOL[torch.float32]


def test_compile_fullgraph_with_auto_backend():
    x, W, b, h, A, v, d = _cpu_case()
    lofit_fast.available_backends()
    fn = lambda x: lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="auto", validate=False)  # noqa: E731
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


def test_compile_fullgraph_with_validation():
    x, W, b, h, A, v, d = _cpu_case()
    lofit_fast.available_backends()
    fn = lambda x: lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cpp")  # noqa: E731
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    x, W, b, h, A, v, d = _cpu_case()
    lofit_fast.available_backends()
    fn = lambda x, A, v: lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend="cpp", validate=False)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, v)]
    y = compiled(*leaves)
    got = torch.autograd.grad(y.sum(), leaves)
    ref = [t.clone().requires_grad_(True) for t in (x, A, v)]
    want = torch.autograd.grad(fn(*ref).sum(), ref)
    assert torch.allclose(y, fn(*ref), atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------------------------
# 4. The auto dispatch table


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Points the dispatch module at a table file written by the test; restores the real one afterwards."""
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    monkeypatch.setattr(dispatch, "_TABLE", None)  # undone at teardown: the real table's cache comes back
    monkeypatch.setattr(dispatch, "_TABLE_SOURCE", "")
    monkeypatch.setattr(dispatch, "_CHOICES", {})

    def write(rows):
        path.write_text(json.dumps({"version": 1, "rows": rows}))
        dispatch.load_table(reload=True)
        return path

    return write


def _row(N, cuda, triton, device="cpu", mode="fwd", C=64, D_out=64, K=1, dtype="float32"):
    return {"device": device, "dtype": dtype, "mode": mode, "N": N, "C": C, "D_out": D_out, "K": K,
            "ms": {"cuda": cuda, "triton": triton}}


def test_dispatch_without_a_table_is_the_unmeasured_default(table, tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "table_paths", lambda: [tmp_path / "missing.json"])
    assert dispatch.load_table(reload=True) == (None, "")
    x, W = torch.randn(4, 64), torch.randn(64, 64)
    assert dispatch.gpu_priority("cuda", x, W, 1) == dispatch.PICKED
    assert dispatch.gpu_priority("triton", x, W, 1) == dispatch.RUNNER_UP
    assert "unmeasured default" in dispatch.describe(x, W, 1)


def test_dispatch_picks_the_nearest_measured_row(table):
    table([_row(1, cuda=1.0, triton=2.0), _row(4096, cuda=3.0, triton=2.0), _row(4096, 1.0, 9.0, mode="fwd+bwd")])
    W = torch.randn(64, 64)
    with torch.no_grad():
        assert dispatch.choose(*dispatch._key(torch.randn(2, 64), W, 1)) == "cuda"
        assert dispatch.choose(*dispatch._key(torch.randn(3000, 64), W, 1)) == "triton"
        assert "nearest row N=4096" in dispatch.describe(torch.randn(3000, 64), W, 1)
    assert dispatch.choose(*dispatch._key(torch.randn(3000, 64), W, 1)) == "cuda"  # grad enabled: fwd+bwd rows


def test_dispatch_prefers_rows_of_this_device(table):
    table([_row(16, cuda=1.0, triton=2.0, device="cpu"), _row(16, cuda=2.0, triton=1.0, device="Other GPU")])
    with torch.no_grad():
        assert dispatch.choose(*dispatch._key(torch.randn(16, 64), torch.randn(64, 64), 1)) == "cuda"
    table([_row(16, cuda=2.0, triton=1.0, device="Other GPU")])
    with torch.no_grad():
        why = dispatch.describe(torch.randn(16, 64), torch.randn(64, 64), 1)
    assert why.startswith("triton") and "measured on Other GPU" in why


def test_dispatch_rejects_a_malformed_table(table):
    with pytest.raises(ValueError, match=r"row 0 lacks \['K'\]"):
        row = _row(1, 1.0, 2.0)
        del row["K"]
        table([row])


def test_dispatch_is_constant_under_torch_compile(table):
    table([_row(1, cuda=1.0, triton=2.0), _row(4096, cuda=3.0, triton=2.0)])
    W = torch.randn(64, 64)

    def f(x):
        return x * dispatch.gpu_priority("triton", x, W, 1)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with torch.no_grad():
        for n in (2, 3, 3000, 5000):  # the later sizes compile with a dynamic batch
            assert compiled(torch.ones(n, 64))[0, 0].item() == f(torch.ones(n, 64))[0, 0].item()
