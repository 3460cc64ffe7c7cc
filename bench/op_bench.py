"""Benchmark of one o_proj with a head intervention, against the plain frozen Linear it replaces.

Providers (each run only where it works on the device):
  linear      the bare frozen nn.Linear (x requires grad): the baseline every ratio is taken against
  hooks       a forward pre-hook applying dense (1 + A) ⊙ x + v over all heads (lofit_fast.hooks)
  hooks_loop  the official LoFiT per-head loop in a pre-hook (clone + slice write per head)
  torch, cpp, triton, cuda   HeadInterventionLinear on that lofit_fast backend
Modes: fwd (no-grad forward: inference / decode), bwd (backward of a recorded forward), full (forward with
grad, then backward). The gradient goes to x and to the intervention parameters; W is frozen.

Cases are (K, parameters) pairs, `--cases K[:params],...` with K a head count or `all` and params one of
lofit (the default), both, scale, offset. `lofit` follows LoFiT: with every head selected (head selection)
only the scales A; with K < H heads (bias tuning) only the offsets v. Rows measured with other parameters
carry them in the provider column, e.g. `triton:both` (A and v). The default cases are 1, 4 and all heads
the LoFiT way plus `4:both`, so A is timed on a few heads as well as on all of them; `--k` / `--params`
(the older spelling) give the cases K:params for every K listed.

Timing: triton.testing.do_bench on a GPU (median, p20, p80 of its timed repetitions); on the CPU a timed
loop after warm-up. peak_mb is the peak extra CUDA memory of one call (empty on the CPU). Rows append to
bench/results/op.csv (or --out) as they are measured, so an interrupted run keeps what it had. A provider
that fails on a case is reported and skipped, and the exit status is then 1. `--device cuda` without a
CUDA device is an error (never a silent fallback to the CPU).

    python bench/op_bench.py                                  # the full GPU grid
    python bench/op_bench.py --preset gpu-check               # what bench/gpu_check.sh times (Llama-2-7B o_proj)
    python bench/op_bench.py --shapes smollm2 --n 16 --cases 1,4:both --providers linear,torch,cpp --out /tmp/op.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lofit_fast  # noqa: E402
from lofit_fast.hooks import HookIntervention  # noqa: E402
from lofit_fast.patch import HeadInterventionLinear  # noqa: E402

HEADER = ["provider", "mode", "dtype", "n_tokens", "d_in", "d_out", "head_dim", "heads_selected", "ms_p50",
          "ms_p20", "ms_p80", "peak_mb", "device", "torch", "triton", "cuda", "commit"]

# name: (d_in, d_out, num_heads, head_dim) of the model's o_proj
SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "llama2-7b": (4096, 4096, 32, 128),
    "llama2-13b": (5120, 5120, 40, 128),
    "gemma-7b": (4096, 3072, 16, 256),
    "smollm2": (576, 576, 9, 64),
    "tiny": (256, 96, 8, 32),  # dry runs (bench/gpu_check.sh --dry-run): CPU, the Triton interpreter
}
N_TOKENS = [1, 16, 512, 4096, 16384]
K_CHOICES = ["1", "4", "all"]
PARAMS = ["lofit", "both", "scale", "offset"]
DEFAULT_CASES = ["1", "4", "all", "4:both"]  # LoFiT's cases, plus A (and v) on a few heads
MODES = ["fwd", "bwd", "full"]
OP_BACKENDS = ["torch", "cpp", "triton", "cuda"]
PROVIDERS = ["linear", "hooks", "hooks_loop", *OP_BACKENDS]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Named argument sets; explicit arguments override them.
PRESETS: Dict[str, Dict[str, str]] = {
    # bench/gpu_check.sh on the device machine: the Llama-2-7B o_proj, v on 4 heads, A and v on 4 heads, A on all
    # 32 heads; forward alone and forward + backward; the limit (F.linear), both GPU backends and the two hooks.
    "gpu-check": dict(shapes="llama2-7b", n="1,8,4096,16384", cases="4,4:both,all", modes="fwd,full",
                      providers="linear,cuda,triton,hooks,hooks_loop", dtype="bf16", device="cuda",
                      rep_ms="60", warmup_ms="15"),
}
DEFAULTS = dict(shapes=",".join(SHAPES), n=",".join(map(str, N_TOKENS)), modes=",".join(MODES))
REP_MS = {"cuda": 100.0, "cpu": 300.0}  # default timed milliseconds per case
WARMUP_MS = 25.0  # do_bench's warm-up (GPU)


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    commit = os.environ.get("COMMIT", "")  # a copy of the tree without .git (the device machine) passes it
    if not commit:
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "commit": commit or "unknown",
    }


def params_for(policy: str, K: int, H: int) -> Tuple[bool, bool]:
    """(scale, offset) for a case."""
    if policy == "lofit":
        return (True, False) if K == H else (False, True)
    return {"both": (True, True), "scale": (True, False), "offset": (False, True)}[policy]


def parse_cases(text: str) -> List[Tuple[str, str]]:
    """`K[:params],...` -> [(K or "all", params)]."""
    cases = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        k, _, policy = item.partition(":")
        policy = policy or "lofit"
        if policy not in PARAMS:
            raise SystemExit(f"case {item!r}: parameters must be one of {PARAMS}")
        if k != "all" and not (k.isdigit() and int(k) >= 1):
            raise SystemExit(f"case {item!r}: K must be a positive head count or 'all'")
        cases.append((k, policy))
    if not cases:
        raise SystemExit("no cases to run")
    return cases


class Inputs:
    """Weight, input and upstream gradient of one (shape, N), shared by every provider and mode."""

    def __init__(self, shape: Tuple[int, int, int, int], N: int, dtype, device):
        d_in, d_out, _, _ = shape
        torch.manual_seed(0)
        self.weight = (torch.randn(d_out, d_in, device=device) / math.sqrt(d_in)).to(dtype)
        self.x = torch.randn(N, d_in, device=device).to(dtype).requires_grad_(True)
        self.dy = torch.randn(N, d_out, device=device).to(dtype)


class Case:
    """One provider's o_proj (a frozen Linear over the shared weight) and its intervention parameters."""

    def __init__(self, provider: str, shape: Tuple[int, int, int, int], inputs: Inputs, K: int,
                 scale: bool, offset: bool):
        d_in, d_out, H, d = shape
        device = inputs.weight.device
        gen = torch.Generator(device="cpu").manual_seed(K)
        heads = sorted(torch.randperm(H, generator=gen)[:K].tolist())
        A = (0.1 * torch.randn(K, d, generator=gen)).to(device) if scale else None
        v = (0.1 * torch.randn(K, d, generator=gen)).to(device) if offset else None
        self.x, self.dy = inputs.x, inputs.dy
        self.linear = nn.Linear(d_in, d_out, bias=False, device="meta")
        self.linear.weight = nn.Parameter(inputs.weight, requires_grad=False)
        self.params: List[torch.Tensor] = []
        if provider == "linear":
            self.module = self.linear
        elif provider in ("hooks", "hooks_loop"):
            hook = HookIntervention(heads, H, d, A, v, loop=provider == "hooks_loop").to(device)
            self.linear.add_module("lofit_hook", hook)
            self.linear.register_forward_pre_hook(hook.pre_hook)
            self.module = self.linear
            self.params = [p for p in (hook.A, hook.v) if p is not None]
        else:
            self.module = HeadInterventionLinear(self.linear, torch.tensor(heads, device=device), d, A, v,
                                                 backend=provider)
            self.params = [p for p in (self.module.A, self.module.v) if p is not None]

    def forward(self) -> torch.Tensor:
        return self.module(self.x)

    def backward(self, y: torch.Tensor, retain: bool) -> None:
        torch.autograd.grad(y, [self.x, *self.params], self.dy, retain_graph=retain)


def runner(case: Case, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                case.forward()
        return fwd
    if mode == "bwd":
        y = case.forward()
        return lambda: case.backward(y, retain=True)
    if mode == "full":
        return lambda: case.backward(case.forward(), retain=False)
    raise ValueError(mode)


def time_gpu(fn: Callable[[], None], rep_ms: float = 100, warmup_ms: float = 25, **_) -> Tuple[float, float, float]:
    import triton.testing

    # Compile and autotune first: do_bench sizes its repetitions from its first calls' times.
    fn()
    fn()
    torch.cuda.synchronize()
    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def time_cpu(fn: Callable[[], None], rep_ms: float = 300, max_reps: int = 200, min_reps: int = 5,
             **_) -> Tuple[float, float, float]:
    """Median, p20, p80 of at least min_reps timed calls (and of as many as fit in rep_ms, up to max_reps)."""
    min_time = rep_ms / 1e3
    for _ in range(min(2, min_reps)):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def peak_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def available_providers(device: torch.device, requested: Optional[List[str]]) -> List[str]:
    here = [p for p in PROVIDERS if p not in OP_BACKENDS or p in lofit_fast.available_backends(device)]
    if requested is None:
        # On the CPU triton is the interpreter: a correctness tool, not something to time by default.
        return [p for p in here if not (device.type == "cpu" and p == "triton")]
    unknown = [p for p in requested if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}: choose from {PROVIDERS}")
    missing = [p for p in requested if p not in here]
    if missing:
        print(f"skipping providers not available on {device}: {missing}", file=sys.stderr)
    return [p for p in requested if p in here]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="a named argument set (explicit arguments override it): " + "; ".join(
                        f"{k}: " + " ".join(f"--{a.replace('_', '-')} {b}" for a, b in v.items())
                        for k, v in PRESETS.items()))
    ap.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    ap.add_argument("--n", default=None, help=f"comma list of token counts (default {','.join(map(str, N_TOKENS))})")
    ap.add_argument("--cases", default=None, help=f"comma list of K[:params] (default {','.join(DEFAULT_CASES)})")
    ap.add_argument("--k", default=None, help="comma list of selected-head counts, or 'all' (cases K:--params)")
    ap.add_argument("--params", default=None, choices=PARAMS, help="parameters of the --k cases (default lofit)")
    ap.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all available)")
    ap.add_argument("--modes", default=None, help=f"comma list of {MODES} (default: all)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees a GPU)")
    ap.add_argument("--rep-ms", dest="rep_ms", default=None, help="timed milliseconds per case (do_bench's rep on a "
                    f"GPU; default {REP_MS['cuda']:g} on a GPU, {REP_MS['cpu']:g} on the CPU)")
    ap.add_argument("--warmup-ms", dest="warmup_ms", default=None, help=f"do_bench's warm-up ms (default {WARMUP_MS:g})")
    ap.add_argument("--min-reps", dest="min_reps", type=int, default=5, help="CPU: at least this many timed calls "
                    "per case (and as many warm-up calls, at most 2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "op.csv"), help="CSV to append rows to")
    ap.add_argument("--no-ratio", action="store_true", help="skip the ratio table vs linear")
    args = ap.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    if args.cases is not None and (args.k is not None or args.params is not None):
        raise SystemExit("give either --cases or --k/--params, not both")
    if args.k is not None or args.params is not None:  # the older spelling: the cases K:params
        ks = (args.k or ",".join(K_CHOICES)).split(",")
        args.cases = ",".join(f"{k.strip()}:{args.params or 'lofit'}" for k in ks if k.strip())
    for key in ("shapes", "n", "cases", "providers", "modes", "dtype", "device", "rep_ms", "warmup_ms"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, DEFAULTS.get(key)))
    args.cases = parse_cases(args.cases or ",".join(DEFAULT_CASES))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def check_device(device: torch.device) -> None:
    """A clear error instead of a silent CPU fallback (or a crash deep in a kernel) when the device is missing."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"op_bench.py: --device {device} but torch sees no CUDA device (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none'}): not timing anything")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"op_bench.py: unsupported device {device} (cuda or cpu)")


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    check_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    shapes = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: choose from {list(SHAPES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown modes {[m for m in modes if m not in MODES]}: choose from {MODES}")
    providers = available_providers(device, args.providers.split(",") if args.providers else None)
    if "linear" not in providers and not args.no_ratio:
        providers = ["linear", *providers]
    env = environment(device)
    timer = time_gpu if device.type == "cuda" else time_cpu
    rep_ms = float(args.rep_ms) if args.rep_ms else REP_MS[device.type]
    warmup_ms = float(args.warmup_ms) if args.warmup_ms else WARMUP_MS
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists() or out.stat().st_size == 0
    rows: List[dict] = []
    failures: List[str] = []
    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        if new_file:
            writer.writeheader()
        for shape_name in shapes:
            d_in, d_out, H, d = SHAPES[shape_name]
            cases = list(dict.fromkeys((H if k == "all" else min(int(k), H), policy) for k, policy in args.cases))
            for N in (int(n) for n in args.n.split(",")):
                inputs = Inputs(SHAPES[shape_name], N, dtype, device)
                for K, policy in cases:
                    scale, offset = params_for(policy, K, H)
                    for mode in modes:
                        for provider in providers:
                            label = provider if policy == "lofit" or provider == "linear" else f"{provider}:{policy}"
                            if provider == "linear" and any(r["provider"] == "linear" and r["mode"] == mode
                                                            and int(r["n_tokens"]) == N and int(r["heads_selected"]) == K
                                                            and r["d_in"] == d_in and r["d_out"] == d_out
                                                            for r in rows):
                                continue  # the limit does not depend on the parameters: once per (mode, N, K)
                            what = f"{label} {mode} {shape_name} N={N} K={K}"
                            try:
                                case = Case(provider, SHAPES[shape_name], inputs, K, scale, offset)
                                fn = runner(case, mode)
                                p50, p20, p80 = timer(fn, rep_ms=rep_ms, warmup_ms=warmup_ms, min_reps=args.min_reps)
                                mem = peak_mb(fn, device)
                            except torch.cuda.OutOfMemoryError:
                                print(f"OOM: {what}", file=sys.stderr)
                                failures.append(f"OOM {what}")
                                torch.cuda.empty_cache()
                                continue
                            except Exception as exc:  # reported, and the run goes on with the other cases
                                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                                print(f"FAILED: {what}: {msg}", file=sys.stderr, flush=True)
                                failures.append(f"{what}: {msg}")
                                continue
                            row = dict(provider=label, mode=mode, dtype=dtype_name, n_tokens=N, d_in=d_in,
                                       d_out=d_out, head_dim=d, heads_selected=K, ms_p50=f"{p50:.5f}",
                                       ms_p20=f"{p20:.5f}", ms_p80=f"{p80:.5f}",
                                       peak_mb="" if mem is None else f"{mem:.2f}", **env)
                            writer.writerow(row)
                            fh.flush()
                            rows.append(row)
                            print(f"{label:>16} {mode:>4} {shape_name:>10} N={N:<6} K={K:<3} {p50:9.4f} ms",
                                  flush=True)
                            del case, fn
                del inputs
    if not args.no_ratio:
        print(ratio_table(rows))
    if failures:
        print(f"{len(failures)} case(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return rows


def ratio_table(rows: List[dict]) -> str:
    """p50 of each provider over the linear provider's p50 for the same (mode, shape, N, K) in this run."""
    key = lambda r: (r["mode"], r["d_in"], r["d_out"], r["head_dim"], int(r["n_tokens"]), int(r["heads_selected"]))  # noqa: E731
    base = {key(r): float(r["ms_p50"]) for r in rows if r["provider"] == "linear"}
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "linear"]
    grid: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["provider"] != "linear" and key(r) in base:
            grid.setdefault(key(r), {})[r["provider"]] = float(r["ms_p50"]) / base[key(r)]
    head = f"{'mode':>4} {'d_in':>5} {'d_out':>5} {'d':>4} {'N':>6} {'K':>3} {'linear ms':>10} " + " ".join(
        f"{p:>12}" for p in providers)
    lines = ["ratio of p50 to linear (same run)", head]
    for k in sorted(grid):
        cells = " ".join(f"{grid[k][p]:>12.3f}" if p in grid[k] else f"{'-':>12}" for p in providers)
        lines.append(f"{k[0]:>4} {k[1]:>5} {k[2]:>5} {k[3]:>4} {k[4]:>6} {k[5]:>3} {base[k]:>10.4f} {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
