"""Timing and memory measurement: synchronization, round-robin repetitions, the transient peak of one call."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .common import OOM
from .providers import Provider


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _free(device: torch.device) -> None:
    """Give cached GPU memory back between workloads and after an out-of-memory error (nothing to do on the CPU)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _reset_grads(provider: Provider) -> None:
    if provider.optimizer is not None:
        provider.optimizer.zero_grad(set_to_none=True)


def round_robin(calls: Dict[str, Callable[[], None]], providers: Dict[str, Provider], steps: int, warmup: int,
                device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds of each of `steps` timed calls per provider (after `warmup` uncounted rounds), in rounds that visit
    every provider once, each round starting at the next provider. Returns (times, failures: name -> reason)."""
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    failed: Dict[str, str] = {}
    for r in range(warmup + steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in failed:
                continue
            with providers[name].attached():
                try:
                    seconds = timed(calls[name], device)
                except torch.OutOfMemoryError:
                    failed[name] = OOM
                    _reset_grads(providers[name])
                    _free(device)
                    continue
            if r >= warmup:
                times[name].append(seconds)
    return times, failed


def transient_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak of the memory allocated while fn runs, above what was allocated before it (see the module doc)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
