"""Decode (N = 1) bandwidth of the head-affine o_proj on a GPU, as a fraction of device-to-device copy bandwidth.

    python bench/decode_bandwidth.py                     # Llama-2-7B o_proj: 4096 x 4096 bf16, 32 heads of 128
    python bench/decode_bandwidth.py --n 1 4 16 --heads 8
    python bench/decode_bandwidth.py --device cpu --C 128 --D-out 96 --head-dim 32 --dtype float32   # a dry run

Providers: `copy` (a device-to-device copy of a large buffer: read + write bytes / time, the reference),
`linear` (plain F.linear, cuBLAS's bf16 GEMV of the same weight), and the lofit backends available on this GPU
(`cuda`: the fused GEMV; `triton`; `torch`), each called through the public op
`lofit_fast.head_affine_linear(..., backend=name)`. Every call is replayed from a CUDA graph that cycles through
enough weight copies to exceed the L2 cache several times, so each call reads its weight from HBM and no Python
or launch overhead is timed. Bytes per call = weight + x + y + bias + A + v.

`--device cpu` runs the same code path without a GPU (a dry run of bench/gpu_check.sh): wall-clock loops instead
of CUDA graphs, the CPU backends (and Triton under TRITON_INTERPRET=1); its numbers say nothing about a GPU.

Appends one row per (N, provider) to bench/results/decode_bandwidth.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lofit_fast  # noqa: E402

FIELDS = ["timestamp", "device", "torch", "dtype", "N", "C", "D_out", "head_dim", "K", "provider", "us_per_call",
          "GB_per_s", "pct_of_copy", "vs_linear"]


def graph_time_us(calls, reps: int) -> float:
    """Mean GPU time of one call, from a CUDA graph that runs every callable in `calls` `reps` times in turn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up outside the capture (allocations, lazy init)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in calls:
                fn()
    graph.replay()  # warm
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    return best


def loop_time_us(calls, reps: int) -> float:
    """The CPU stand-in for graph_time_us: best of 5 wall-clock passes over every callable `reps` times in turn."""
    import time

    for fn in calls:
        fn()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            for fn in calls:
                fn()
        best = min(best, (time.perf_counter() - t0) * 1e6 / (reps * len(calls)))
    return best


def copy_bandwidth_gbps(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = graph_time_us if device == "cuda" else loop_time_us
    us = timer([lambda: dst.copy_(src)], reps=10)
    return 2 * nbytes / (us * 1e-6) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--C", type=int, default=4096, help="o_proj input features (heads x head_dim)")
    p.add_argument("--D-out", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=None, help="number of intervened heads K (default: all)")
    p.add_argument("--n", type=int, nargs="+", default=[1], help="rows of x (decode batch)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=20, help="graph replays of the whole weight cycle")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the code path")
    p.add_argument("--copies", type=int, default=None, help="weight copies to cycle through (default: enough for 4x "
                   "the L2 cache, at least 4)")
    p.add_argument("--providers", default=None, help="comma list of linear and lofit backends (default: linear and "
                   "every lofit backend available on the device but cpp on a GPU)")
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / "decode_bandwidth.csv"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_bandwidth.py needs a CUDA GPU (--device cpu only checks the code path)")

    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    C, D_out, d = args.C, args.D_out, args.head_dim
    H = C // d
    K = args.heads or H
    esize = torch.finfo(dtype).bits // 8
    w_bytes = D_out * C * esize
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20) if gpu else 64 << 20
    copies = args.copies or max(4, math.ceil(4 * l2 / w_bytes))  # cycle through >= 4x L2 of weights
    weights = [(torch.randn(D_out, C, device=dev) / math.sqrt(C)).to(dtype) for _ in range(copies)]
    bias = torch.randn(D_out, device=dev).to(dtype)
    heads = torch.linspace(0, H - 1, K, device=dev).round().long().unique()
    K = heads.numel()
    A = 0.1 * torch.randn(K, d, device=dev)
    v = 0.1 * torch.randn(K, d, device=dev)
    copy_gbps = copy_bandwidth_gbps(device=dev.type) if gpu else copy_bandwidth_gbps(1 << 26, "cpu")
    here = lofit_fast.available_backends(dev)
    if args.providers:
        wanted = [s.strip() for s in args.providers.split(",") if s.strip()]
        missing = [b for b in wanted if b != "linear" and b not in here]
        if missing:
            print(f"not available on {dev}: {missing} (available: {here})")
        providers = ["linear"] + [b for b in wanted if b != "linear" and b in here]
    else:
        providers = ["linear"] + [b for b in ("cuda", "triton", "torch", "cpp") if b in here and not (gpu and b == "cpp")]
    timer = graph_time_us if gpu else loop_time_us
    device_name = torch.cuda.get_device_name(dev) if gpu else "cpu"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    print(f"{device_name}: copy {copy_gbps:.0f} GB/s; W [{D_out}, {C}] {args.dtype}, K={K} heads of {d}, "
          f"{copies} weight copies; providers {providers}")
    failed = []
    for N in args.n:
        x = torch.randn(N, C, device=dev).to(dtype)
        moved = w_bytes + N * C * esize + N * D_out * esize + D_out * esize + 2 * K * d * 4
        times = {}
        with torch.no_grad():
            for prov in providers:
                if prov == "linear":
                    calls = [lambda W=W: F.linear(x, W, bias) for W in weights]
                else:
                    calls = [lambda W=W, prov=prov: lofit_fast.head_affine_linear(x, W, bias, heads, A, v, d, backend=prov,
                                                                                  validate=False)
                             for W in weights]
                try:
                    times[prov] = timer(calls, args.reps)
                except RuntimeError as exc:  # e.g. a backend that cannot be captured in a CUDA graph
                    print(f"N={N} {prov}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})")
                    failed.append(f"N={N} {prov}")
        for prov, us in times.items():
            gbps = moved / (us * 1e-6) / 1e9
            vs = f"{us / times['linear']:.3f}" if "linear" in times else ""
            row = dict(timestamp=stamp, device=device_name, torch=torch.__version__, dtype=args.dtype, N=N, C=C,
                       D_out=D_out, head_dim=d, K=K, provider=prov, us_per_call=f"{us:.3f}", GB_per_s=f"{gbps:.1f}",
                       pct_of_copy=f"{100 * gbps / copy_gbps:.1f}", vs_linear=vs)
            rows.append(row)
            print(f"N={N:3d} {prov:7s} {us:8.2f} us  {gbps:7.0f} GB/s  {100 * gbps / copy_gbps:5.1f}% of copy  "
                  f"{vs}x linear")
    rows.append(dict(timestamp=stamp, device=device_name, torch=torch.__version__, dtype="uint8", N=0, C=0, D_out=0,
                     head_dim=0, K=0, provider="copy", us_per_call="", GB_per_s=f"{copy_gbps:.1f}", pct_of_copy="100.0",
                     vs_linear=""))
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or os.path.getsize(out) == 0
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {out}")
    if failed:
        raise SystemExit(f"not measured: {failed}")


if __name__ == "__main__":
    main()
