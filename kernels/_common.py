"""What the kernels share: interpreter detection, the tile configs and the deterministic pick among them,
tile ordering.

Config choice is a fixed rule of (kernel, row count, element size): the same shape always gets the same tiles,
so the summation order, and with it every bit of the result, does not change between processes (an autotuner
times the candidates and may pick differently in each one). The candidates after the first are the
alternatives that `bench/sm90_report.py` also checks and a GPU run may time.

The rule's configs were chosen by compiling every variant for sm_90 (`python bench/sm90_report.py`): each one
issues wgmma, has no serialized-wgmma warning (ptxas C7515), no spills, and at least two shared-memory buffers
for both operands. Interpreted (TRITON_INTERPRET=1) there is one small config per kernel.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List

import torch
import triton
import triton.language as tl


def _interpreter_on() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit reads TRITON_INTERPRET when a kernel is defined, so this must agree with how ours were defined.
INTERPRETED: bool = _interpreter_on()

# Row counts up to this go to the decode kernel (rows on the wgmma N side, W rows on the M side).
DECODE_MAX_ROWS = 32


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> Dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps,
            "num_stages": stages}


# kernel kind -> regime -> candidates, the rule's pick first. For `decode`, BLOCK_M tiles the rows of x (the
# wgmma N side) and BLOCK_N the rows of W (the M side, at least 64 for wgmma).
GPU_CONFIGS: Dict[str, Dict[str, List[Dict]]] = {
    "fwd": {
        "mid": [gemm_config(64, 128, 64, 4, 4), gemm_config(64, 256, 64, 8, 3)],
        "large": [gemm_config(128, 128, 64, 8, 4), gemm_config(128, 256, 64, 8, 4)],
    },
    "decode": {
        "16": [gemm_config(16, 64, 128, 4, 4), gemm_config(16, 128, 64, 4, 4)],
        "32": [gemm_config(32, 64, 128, 4, 4), gemm_config(32, 128, 64, 4, 4)],
    },
    "bwd": {
        "mid": [gemm_config(64, 128, 64, 4, 4), gemm_config(64, 64, 64, 4, 4)],
        "large": [gemm_config(128, 128, 64, 8, 4), gemm_config(128, 64, 64, 4, 4)],
    },
}
INTERPRETER_CONFIG = gemm_config(16, 64, 32, 4, 1)


def regime(kind: str, n_rows: int) -> str:
    if kind == "decode":
        return "16" if n_rows <= 16 else "32"
    return "mid" if n_rows <= 256 else "large"


def candidates(kind: str, n_rows: int) -> List[Dict]:
    if INTERPRETED:
        return [INTERPRETER_CONFIG]
    return GPU_CONFIGS[kind][regime(kind, n_rows)]


def pick_config(kind: str, n_rows: int) -> Dict:
    """The rule's config for this kernel and row count (deterministic)."""
    return dict(candidates(kind, n_rows)[0])


def kernel_args(config: Dict):
    """(meta-parameters, launch options) of a config dict."""
    meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return meta, {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


_SAME_DEVICE = contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); free when it already is current."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP_M row tiles per column sweep for L2 reuse."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
