"""backend="auto" on a GPU: the per-shape choice between the `cuda` and `triton` backends, from measured times.

Both GPU backends' `auto_priority(x, weight, K)` return `gpu_priority(<their name>, x, weight, K)`: the backend
that `choose` picks for the shape gets PICKED, the other one RUNNER_UP, so "auto" runs the picked backend when it
is available and the other GPU backend otherwise (the torch backend's priority is 0).

The table is JSON, written on a GPU by

    python -m lofit_fast.ops.dispatch --out bench/results/dispatch.json

which times both backends on a grid of o_proj shapes, forward alone and forward + backward, and stores one row
per (shape, mode) with the time of each backend; or, without timing again, from the rows of bench/op_bench.py
(what bench/gpu_check.sh does):

    python -m lofit_fast.ops.dispatch --from-op-csv op.csv --out dispatch.json

    {"version": 1, "rows": [{"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "mode": "fwd+bwd",
                             "N": 2048, "C": 4096, "D_out": 4096, "K": 8, "ms": {"cuda": 0.41, "triton": 0.39}}]}

Lookup: rows with the same dtype and mode (fwd+bwd when autograd is recording, fwd otherwise), from this device
when the table has any row for it, else from any device; the nearest in (log2 N, log2 C, log2 D_out,
log2 (K + 1)); the faster backend of that row wins.

Where the table comes from: $LOFIT_FAST_DISPATCH_TABLE, else dispatch.json next to this module, else
bench/results/dispatch.json of the source checkout.

UNMEASURED DEFAULT. Without a table (this repository has none until a GPU run commits one) every shape goes to
`cuda`. That is a guess, not a measurement: cuBLAS for the GEMMs with small head-restricted kernels around them,
and the fused GEMV for decode (N <= 16). `describe()` says which rule decided.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .._files import atomic_write
from .function import head_affine_linear
from .registry import available_backends

GPU_BACKENDS = ("cuda", "triton")
PICKED = 3.0
RUNNER_UP = 2.0
UNMEASURED_DEFAULT = "cuda"
TABLE_ENV = "LOFIT_FAST_DISPATCH_TABLE"
TABLE_VERSION = 1

_HERE = Path(__file__).resolve().parent
_TABLE: Optional[Dict] = None
_TABLE_SOURCE: str = ""
_CHOICES: Dict[Tuple, str] = {}  # choose() per shape key: eager calls pay one dict lookup
_DEVICE_NAMES: Dict[int, str] = {}


def table_paths() -> List[Path]:
    """Where the table is looked for, in order."""
    paths = []
    if os.environ.get(TABLE_ENV):
        paths.append(Path(os.environ[TABLE_ENV]))
    paths.append(_HERE / "dispatch.json")
    paths.append(_HERE.parent.parent / "bench" / "results" / "dispatch.json")
    return paths


def _validate(table: Dict, path: Path) -> Dict:
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not isinstance(table.get("rows"), list):
        raise ValueError(f"{path}: not a lofit_fast dispatch table (version {TABLE_VERSION} with a 'rows' list)")
    for i, row in enumerate(table["rows"]):
        missing = {"device", "dtype", "mode", "N", "C", "D_out", "K", "ms"} - set(row)
        if missing:
            raise ValueError(f"{path}: row {i} lacks {sorted(missing)}")
        if not any(b in row["ms"] for b in GPU_BACKENDS):
            raise ValueError(f"{path}: row {i} has no time for {GPU_BACKENDS}")
    return table


def load_table(reload: bool = False) -> Tuple[Optional[Dict], str]:
    """(table or None, the path it came from or '')."""
    global _TABLE, _TABLE_SOURCE
    if _TABLE is None or reload:
        _CHOICES.clear()
        table, source = {"version": TABLE_VERSION, "rows": []}, ""
        for path in table_paths():
            if path.is_file():
                with open(path) as f:
                    table, source = _validate(json.load(f), path), str(path)  # a bad table raises every time
                break
        _TABLE, _TABLE_SOURCE = table, source
    return (_TABLE if _TABLE_SOURCE else None), _TABLE_SOURCE


def _distance(row: Dict, N: int, C: int, D_out: int, K: int) -> float:
    lg = lambda a: math.log2(max(int(a), 1))  # noqa: E731
    return (abs(lg(row["N"]) - lg(N)) + abs(lg(row["C"]) - lg(C)) + abs(lg(row["D_out"]) - lg(D_out))
            + 0.5 * abs(lg(row["K"] + 1) - lg(K + 1)))


def _decide(device: str, dtype: str, mode: str, N: int, C: int, D_out: int, K: int) -> Tuple[str, str]:
    """(backend name, the rule that decided) for one shape."""
    table, source = load_table()
    rows = [r for r in (table or {"rows": []})["rows"] if r["dtype"] == dtype and r["mode"] == mode]
    same_device = [r for r in rows if r["device"] == device]
    rows = same_device or rows
    if not rows:
        return UNMEASURED_DEFAULT, f"unmeasured default ({UNMEASURED_DEFAULT}): no measured {dtype} {mode} row"
    row = min(rows, key=lambda r: _distance(r, N, C, D_out, K))
    times = {b: t for b, t in row["ms"].items() if b in GPU_BACKENDS}
    winner = min(times, key=times.get)
    where = "" if same_device else f", measured on {row['device']}, not this {device}"
    return winner, (f"measured ({source}): nearest row N={row['N']} C={row['C']} D_out={row['D_out']} K={row['K']} "
                    f"{mode} {times}{where}")


@torch.compiler.assume_constant_result
def choose(device: str, dtype: str, mode: str, N: int, C: int, D_out: int, K: int) -> str:
    """The GPU backend for this shape (a constant for torch.compile: it reads a file, never a tensor)."""
    key = (device, dtype, mode, N, C, D_out, K)
    if key not in _CHOICES or _TABLE is None:
        choice = _decide(*key)[0]  # loads the table first if needed (which clears the cache)
        _CHOICES[key] = choice
    return _CHOICES[key]


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def _rows_bucket(N) -> int:
    """The power of two >= N, found by comparisons, so that under torch.compile with a dynamic N the choice is
    a constant guarded by the bucket's bounds instead of a graph break."""
    bucket = 1
    while bucket < N:
        bucket *= 2
    return bucket


def _key(x: torch.Tensor, weight: torch.Tensor, K: int) -> Tuple[str, str, str, int, int, int, int]:
    device = _device_name(x.device.index if x.device.index is not None else 0) if x.is_cuda else x.device.type
    mode = "fwd+bwd" if torch.is_grad_enabled() else "fwd"
    N = x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])
    return (device, str(x.dtype).replace("torch.", ""), mode, _rows_bucket(N), int(weight.shape[1]),
            int(weight.shape[0]), int(K))


def gpu_priority(name: str, x: torch.Tensor, weight: torch.Tensor, K: int) -> float:
    """auto_priority of the GPU backend `name` for this call."""
    return PICKED if choose(*_key(x, weight, K)) == name else RUNNER_UP


def describe(x: torch.Tensor, weight: torch.Tensor, K: int) -> str:
    """Which GPU backend "auto" picks for this call, and why (measured row or the unmeasured default)."""
    name, why = _decide(*_key(x, weight, K))
    return f"{name}: {why}"


# ------------------------------------------------------------------------------------------------------------
# Measuring the table (GPU only).

# (name, C = H * head_dim, D_out, head_dim) of o_proj layers.
MEASURE_SHAPES = [
    ("llama-2-7b", 4096, 4096, 128),
    ("smollm2-135m", 576, 576, 64),
    ("gemma-3-270m", 1024, 640, 256),
]
MEASURE_N = [1, 4, 16, 64, 512, 4096]


def _time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure(dtype: torch.dtype = torch.bfloat16, reps: int = 50) -> Dict:
    """Times every available GPU backend on MEASURE_SHAPES x MEASURE_N x {1, H/4, H} heads; returns the table."""
    backends = [b for b in GPU_BACKENDS if b in available_backends("cuda")]
    if len(backends) < 2:
        raise RuntimeError(f"need both GPU backends to compare, available here: {backends}")
    dev = torch.device("cuda")
    device_name = torch.cuda.get_device_name(dev)
    rows = []
    for _, C, D_out, d in MEASURE_SHAPES:
        H = C // d
        W = (torch.randn(D_out, C, device=dev) / math.sqrt(C)).to(dtype)
        b = torch.zeros(D_out, device=dev, dtype=dtype)
        for K in sorted({1, max(1, H // 4), H}):
            heads = torch.arange(0, H, H // K, device=dev)[:K]
            for N in MEASURE_N:
                x = torch.randn(N, C, device=dev, dtype=dtype)
                dy = torch.randn(N, D_out, device=dev, dtype=dtype)
                A = torch.zeros(K, d, device=dev, requires_grad=True)
                v = torch.zeros(K, d, device=dev, requires_grad=True)
                xg = x.clone().requires_grad_(True)
                for mode in ("fwd", "fwd+bwd"):
                    ms = {}
                    for name in backends:
                        if mode == "fwd":
                            def step(name=name):
                                with torch.no_grad():
                                    head_affine_linear(x, W, b, heads, A, v, d, backend=name, validate=False)
                        else:
                            def step(name=name):
                                y = head_affine_linear(xg, W, b, heads, A, v, d, backend=name, validate=False)
                                torch.autograd.grad(y, [xg, A, v], dy)
                        ms[name] = _time_ms(step, reps)
                    rows.append({"device": device_name, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                                 "N": N, "C": C, "D_out": D_out, "K": K, "ms": ms})
    return {"version": TABLE_VERSION, "torch": torch.__version__, "rows": rows}


OP_MODES = {"fwd": "fwd", "full": "fwd+bwd"}  # op_bench.py's modes -> the table's
OP_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _op_case(provider: str) -> Tuple[str, str]:
    """op_bench's provider column -> (backend, parameters): "cuda" (LoFiT's parameters), "triton:both", ..."""
    backend, _, params = provider.partition(":")
    return backend, params or "lofit"


def table_from_op_rows(rows: List[Dict[str, str]]) -> Dict:
    """The table from bench/op_bench.py rows: one row per (device, dtype, mode, N, C, D_out, K) that has a time for
    both GPU backends in the same case. Where several parameter cases share a key (v only and A and v on K heads),
    LoFiT's own case (op_bench's `lofit`: v on K < H heads, A on all heads) decides; another case only where that
    one is missing. ms are op_bench's medians (ms_p50)."""
    cases: Dict[Tuple, Dict[str, Dict[str, float]]] = {}
    for r in rows:
        backend, params = _op_case(r["provider"])
        if backend not in GPU_BACKENDS or r["mode"] not in OP_MODES or not r.get("ms_p50"):
            continue
        key = (r["device"], OP_DTYPES.get(r["dtype"], r["dtype"]), OP_MODES[r["mode"]], int(r["n_tokens"]),
               int(r["d_in"]), int(r["d_out"]), int(r["heads_selected"]))
        cases.setdefault(key, {}).setdefault(params, {})[backend] = float(r["ms_p50"])
    order = ["lofit", "offset", "both", "scale"]
    out = []
    for key in sorted(cases):
        complete = {p: ms for p, ms in cases[key].items() if all(b in ms for b in GPU_BACKENDS)}
        if not complete:
            continue
        params = min(complete, key=lambda p: order.index(p) if p in order else len(order))
        device, dtype, mode, N, C, D_out, K = key
        out.append({"device": device, "dtype": dtype, "mode": mode, "N": N, "C": C, "D_out": D_out, "K": K,
                    "ms": {b: complete[params][b] for b in GPU_BACKENDS}, "case": params})
    return {"version": TABLE_VERSION, "torch": torch.__version__, "source": "bench/op_bench.py rows (ms_p50)",
            "rows": out}


def main(argv: Optional[List[str]] = None) -> None:
    import argparse
    import csv

    p = argparse.ArgumentParser(description="Measure the cuda vs triton dispatch table on this GPU, or derive it "
                                            "from bench/op_bench.py rows (--from-op-csv).")
    p.add_argument("--out", default=str(_HERE.parent.parent / "bench" / "results" / "dispatch.json"))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--from-op-csv", default=None, help="derive the table from this op_bench.py CSV (no timing; "
                   "rows without both GPU backends are left out)")
    args = p.parse_args(argv)
    if args.from_op_csv:
        with open(args.from_op_csv, newline="") as f:
            table = table_from_op_rows(list(csv.DictReader(f)))
        if not table["rows"]:
            table["note"] = (f"{args.from_op_csv} has no shape timed on both {GPU_BACKENDS}: no measured rows, so "
                             f"`auto` keeps the unmeasured default ({UNMEASURED_DEFAULT})")
            print(table["note"])
    else:
        table = measure(getattr(torch, args.dtype), args.reps)
    _validate(table, Path(args.out))
    atomic_write(args.out, json.dumps(table, indent=1))
    print(f"wrote {len(table['rows'])} rows to {args.out}")


if __name__ == "__main__":
    main()
