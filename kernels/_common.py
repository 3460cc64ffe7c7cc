"""What the forward and backward kernels share: interpreter detection, GEMM tile configs, tile ordering."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

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

# The smallest tile side tl.dot takes: the row tile kept for any row count up to it.
MIN_TILE = 16


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


GPU_CONFIGS = [
    # many rows: compute-bound tiles (Hopper / Ampere); the first that suits is the untuned choice
    gemm_config(128, 256, 64, 8, 3),
    gemm_config(128, 128, 64, 8, 4),
    gemm_config(128, 128, 64, 4, 4),
    gemm_config(64, 128, 64, 4, 4),
    gemm_config(128, 64, 64, 4, 4),
    # few rows (decode, short prompts): narrow tiles so every SM streams part of the weight
    gemm_config(64, 64, 128, 4, 4),
    gemm_config(32, 64, 128, 4, 4),
    gemm_config(16, 64, 128, 4, 4),
    gemm_config(16, 32, 256, 4, 4),
    gemm_config(16, 128, 128, 4, 3),
]
# One config, so the interpreter never benchmarks: tiles narrower than a 64-wide head on the K side, and
# ragged against every test shape's D_out.
INTERPRETER_CONFIGS = [gemm_config(16, 64, 32, 4, 1)]
GEMM_CONFIGS = INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS

SMEM_BUDGET = 200 * 1024

# LOFIT_TRITON_AUTOTUNE=0: no autotuning, the first config that suits the row count and dtype (no
# benchmarking pause at each new shape; what the launchers read at every call, so it can be switched live).
AUTOTUNE: bool = os.environ.get("LOFIT_TRITON_AUTOTUNE", "1") != "0"


def row_bucket(n_rows: int) -> int:
    """Autotuning key for the row count: the next power of two, so varying sequence lengths share tunings."""
    return 1 << max(0, int(n_rows) - 1).bit_length()


def _suits(c: triton.Config, rows: int, elem_bytes: int) -> bool:
    """Not far taller than the row count, fits shared memory at this dtype, and (for many rows) not one of
    the short tiles meant for decode."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    if (bm * bk + bk * bn) * elem_bytes * c.num_stages > SMEM_BUDGET:
        return False
    return bm <= max(MIN_TILE, rows) and not (rows >= 256 and bm < 64)


def _kept(configs, rows: int, elem_bytes: int):
    if len(configs) == 1:
        return list(configs)
    kept = [c for c in configs if _suits(c, rows, elem_bytes)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def prune_gemm_configs(configs, named_args, **kwargs):
    """The autotuner's early pruning: keep the configs that suit this row bucket and dtype (the first
    tensor argument's)."""
    elem = next(a.element_size() for a in named_args.values() if isinstance(a, torch.Tensor))
    return _kept(configs, named_args["N_BUCKET"], elem)


def launch_config(config: Optional[dict], n_rows: int, like: torch.Tensor) -> Optional[dict]:
    """`config` if pinned; else None (autotune), or with autotuning off the first config that suits."""
    if config is not None or AUTOTUNE:
        return config
    c = _kept(GEMM_CONFIGS, row_bucket(n_rows), like.element_size())[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def smallest_block_m() -> int:
    return min(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)


def chosen_block_m(kernel, config) -> int:
    """BLOCK_M of the launch that just ran: the explicit config, or the autotuner's pick."""
    if config is not None:
        return config["BLOCK_M"]
    return kernel.best_config.kwargs["BLOCK_M"]


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
