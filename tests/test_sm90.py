"""Hopper code without a GPU: every Triton variant that `auto` launches on the GPU hot path, compiled for
sm_90 by bench/sm90_report.py, must use wgmma, draw no serialized-wgmma warning (ptxas C7515), spill
nothing, read no 16-bit element of W or x with a scalar global load, and keep at least two shared-memory
buffers for each GEMM operand (a pipelined main loop). The CUDA kernels' registers and spills are checked
in test_cuda.py (bench/sm90_cuda.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest.py sets it for this process
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_report.py"), "--json", "--no-cuda"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_every_hot_path_variant_compiles_for_sm90(records):
    kernels = {r["kernel"] for r in records}
    assert {"_fwd_kernel", "_decode_kernel", "_head_affine_bwd_kernel"} <= kernels
    assert {"_rows_fwd_kernel", "_rows_decode_kernel"} <= kernels  # many adapters in one batch (kernels/rows.py)
    hot = [r for r in records if r["hot"]]
    assert len(hot) >= 40
    assert not [r["variant"] for r in records if r["error"]]


@pytest.mark.parametrize("check", ["wgmma", "C7515", "spills", "scalar loads", "buffers"])
def test_hot_path_requirement(records, check):
    hot = [r for r in records if r["hot"]]
    bad = {
        "wgmma": [r for r in hot if not r["wgmma"]],
        "C7515": [r for r in hot if r["serialized_wgmma_warning"]],
        "spills": [r for r in records if r["spill_bytes"]],
        "scalar loads": [r for r in hot if r["scalar_global_loads"]],
        "buffers": [r for r in hot if r["x_buffers"] < 2 or r["w_buffers"] < 2],
    }[check]
    assert not bad, [(r["variant"], r["config"]) for r in bad]


def test_the_report_sees_an_unpipelined_operand():
    """The buffer count is read from the TTGIR's shared-memory allocations, so it can fail: an operand
    with a single buffer (or none, held in registers) counts as such."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sm90_report

    ttgir = ("%a = ttg.local_alloc : () -> !ttg.memdesc<1x128x64xbf16, #shared, #smem, mutable>\n"
             "%b = ttg.local_alloc : () -> !ttg.memdesc<3x64x256xbf16, #shared1, #smem, mutable>\n")
    assert sm90_report.operand_buffers(ttgir, (128, 64)) == 1
    assert sm90_report.operand_buffers(ttgir, (64, 256)) == 3
    assert sm90_report.operand_buffers(ttgir, (32, 32)) == 0
