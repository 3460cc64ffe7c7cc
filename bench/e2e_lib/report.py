"""Rows and records: one measurement per provider into CSV rows, the run's context, and profiles."""
from __future__ import annotations

import csv
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from lofit_fast.patch import find_attention_sites

from .common import HEADER, OOM, step2_heads
from .timing import _free, _reset_grads, percentile, round_robin, synchronize, transient_peak_bytes
from .providers import Provider

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository


@dataclass
class Context:
    model_name: str
    dtype: str
    device: torch.device
    device_name: str
    torch_version: str
    commit: str
    model_bytes: int


def make_row(ctx: Context, provider: str, workload: str, batch: int, seq: int, tokens: int,
             seconds: Sequence[float], peak_bytes: Optional[int]) -> Dict[str, str]:
    row = dict(model=ctx.model_name, provider=provider, workload=workload, batch=str(batch), seq=str(seq),
               dtype=ctx.dtype, device=ctx.device_name, torch=ctx.torch_version, commit=ctx.commit)
    if not seconds:
        row.update(tokens_per_s="", ms_p50="", ms_p20="", ms_p80="", peak_mb=OOM)
        return {k: row[k] for k in HEADER}
    p50 = percentile(seconds, 50)
    row.update(tokens_per_s=f"{tokens / p50:.1f}", ms_p50=f"{1e3 * p50:.3f}",
               ms_p20=f"{1e3 * percentile(seconds, 20):.3f}", ms_p80=f"{1e3 * percentile(seconds, 80):.3f}",
               peak_mb="" if peak_bytes is None else f"{peak_bytes / 2**20:.1f}")
    return {k: row[k] for k in HEADER}


def measure(ctx: Context, workload: str, batch: int, seq: int, tokens: int, providers: Dict[str, Provider],
            calls: Dict[str, Callable[[], None]], steps: int, warmup: int, memory: bool = True,
            log=print) -> List[Dict[str, str]]:
    """Timed round-robin, then (untimed) one call per provider for its peak memory; one row per provider."""
    times, failed = round_robin(calls, providers, steps, warmup, ctx.device)
    rows = []
    for name, provider in providers.items():
        peak = None
        if name not in failed and memory:
            with provider.attached():
                try:
                    transient = transient_peak_bytes(calls[name], ctx.device)
                    peak = ctx.model_bytes + provider.persistent_bytes() + transient
                except torch.OutOfMemoryError:
                    failed[name] = OOM
                    _reset_grads(provider)
                    _free(ctx.device)
        row = make_row(ctx, name, workload, batch, seq, tokens, [] if name in failed else times[name], peak)
        rows.append(row)
        log(f"  {ctx.model_name:13s} {workload:8s} b={batch:<3d} s={seq:<5d} {name:11s} "
            + (f"{row['ms_p50']:>10s} ms  [{row['ms_p20']}, {row['ms_p80']}]  {row['tokens_per_s']:>10s} tok/s  "
               f"peak {row['peak_mb']} MB" if name not in failed else "OUT OF MEMORY"))
    return rows


PROFILE_CATEGORIES = (  # (category, substrings of op names), first match wins; self times, so nothing counts twice
    ("lofit_fast op", ("lofit_fast", "head_affine", "headaffine")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm", "gemm")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "fmha")),
    ("optimizer", ("_foreach", "adam")),
)


def profile_categories(events, device_type: str) -> Dict[str, float]:
    """Self time in ms per category (PROFILE_CATEGORIES, then "other") of a profiler's key_averages()."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    out = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    out["other"] = 0.0
    for e in events:
        us = float(getattr(e, attr, 0.0) or 0.0)
        key = e.key.lower()
        category = next((name for name, parts in PROFILE_CATEGORIES if any(p in key for p in parts)), "other")
        out[category] += us / 1e3
    return out


def profile_training(ctx: Context, workload: str, providers: Dict[str, Provider], calls: Dict[str, Callable[[], None]],
                     out_dir: Path, steps: int = 1, log=print) -> None:
    """torch.profiler of `steps` steps per provider: the top ops by self time (<model>_<workload>_<provider>.txt)
    and the self time per category for every provider (<model>_<workload>_summary.md), in out_dir."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    sort_by = "self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    summary = {}
    for name, provider in providers.items():
        with provider.attached():
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    calls[name]()
                synchronize(ctx.device)
        averages = prof.key_averages()
        path = out_dir / f"{ctx.model_name}_{workload}_{name}.txt"
        path.write_text(averages.table(sort_by=sort_by, row_limit=30) + "\n")
        summary[name] = profile_categories(averages, ctx.device.type)
        log(f"  profile of {name} -> {path}")
    categories = list(next(iter(summary.values())))
    clock = "GPU" if ctx.device.type == "cuda" else "CPU"
    lines = [f"Self {clock} time of {steps} {workload} step(s) of {ctx.model_name} per category, ms (and % of the "
             f"provider's total). `other` holds elementwise ops, norms, the loss and the hooks' own ops.", "",
             "| provider | total | " + " | ".join(categories) + " |", "|---|---:|" + "---:|" * len(categories)]
    for name, cats in summary.items():
        total = sum(cats.values())
        cells = [f"{cats[c]:.1f} ({100 * cats[c] / total:.1f} %)" if total else "0" for c in categories]
        lines.append(f"| {name} | {total:.1f} | " + " | ".join(cells) + " |")
    path = out_dir / f"{ctx.model_name}_{workload}_summary.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"  profile summary -> {path}")


def git_commit() -> str:
    if os.environ.get("COMMIT"):  # a copy of the tree without .git (the device machine) passes it
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_rows(path: Path, rows: List[Dict[str, str]], header: Sequence[str] = HEADER) -> None:
    """Append to a CSV with `header` (written when the file is new; an existing file must have the same header)."""
    header = list(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            found = next(csv.reader(f), [])
        if found != header:
            raise ValueError(f"{path} has the header {found}, expected {header}: write to another file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def auto_backend(model: nn.Module, tokens: int) -> str:
    """The backend `auto` picks for this model's o_proj at `tokens` rows (step-2 K)."""
    from lofit_fast.ops import get_backend

    site = find_attention_sites(model)[0]
    w = site.attn.o_proj.weight
    x = torch.zeros(tokens, w.shape[1], dtype=w.dtype, device=w.device)
    try:
        return get_backend("auto", x, w, max(1, len(step2_heads(model)) // len(find_attention_sites(model)))).name
    except Exception as exc:  # reported, not fatal: the fused rows would show the failure anyway
        return f"none ({exc})"
