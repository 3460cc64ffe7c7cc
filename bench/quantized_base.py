"""Memory and step time of LoFiT step 1 (A on every head) and step 2 (v on K heads) on SmolLM2-135M with a
float32 base, a torchao int8 weight-only base and (where it runs) an int4 one, on CPU.

    python bench/quantized_base.py --out bench/results/quantized_base.json [--steps 6] [--threads 1]

Writes the JSON (rows + the run's device, versions, commit, command and machine load) and a Markdown table
beside it (same name, .md). Each configuration runs in a fresh process so its memory is its own; the order is
float32/int8 alternating per step, so each pair is measured close in time, and the table gives int8 / float32
ratios from the same run. A base that cannot run here (int4 on CPU) is a row with runnable=false and the
error it raised, not a silent skip.

Columns: weight MB counts every parameter and buffer of the patched model (a quantized weight by its int8 data
and scales; the cached dequantized W_S columns included). rss_loaded: the resident size once loaded (and
quantized), after gc and glibc's malloc_trim (the float32 weights freed by quantization returned to the OS).
train_peak_rss: the peak resident size during the training steps only (the kernel's high-water mark reset
after loading, /proc/self/clear_refs). peak_rss_incl_load: the whole process's peak (ru_maxrss), which for
int8 is the load's: the GGUF is dequantized to float32 before it is quantized. Step time: the median of the
steps after the first (forward, backward, AdamW step on the batch).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASES = ("float32", "int8", "int4")
STEPS = ("select", "tune")


def _tensor_bytes(t) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t).__module__.startswith("torchao"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release_freed_memory() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then keeps the freed heap
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(quantize: str, step: str, steps: int, threads: int) -> dict:
    import torch

    import lofit_fast
    from lofit_fast.data import SFTExample, builtin_truthfulqa, collate_sft
    from lofit_fast.losses import completion_loss
    from lofit_fast.methods import default_k

    torch.set_num_threads(threads)
    try:
        model, tok = lofit_fast.load_model("smollm2", quantize=None if quantize == "float32" else quantize,
                                           progress=False)
    except NotImplementedError as exc:  # int4 on CPU: not runnable here, recorded with its reason
        return {"base": quantize, "step": step, "runnable": False, "reason": f"{type(exc).__name__}: {exc}"}
    _release_freed_memory()
    rss_loaded = _status_mb("VmRSS")
    if step == "select":
        lofit_fast.patch(model, "all", scale=True, offset=False, init_std=1e-3)
    else:
        sites = lofit_fast.find_attention_sites(model)
        k = default_k(model)
        heads = [(i % len(sites), (7 * i) % sites[0].num_heads) for i in range(k)]
        lofit_fast.patch(model, heads, scale=False, offset=True, init_std=1e-3)
    lofit_fast.freeze_base(model)
    weight_bytes = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    data = [SFTExample(it.prompt, " " + it.best) for it in builtin_truthfulqa()][:8]
    params = lofit_fast.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = collate_sft(tok, data)
    peak_reset = _reset_peak_rss()
    times = []
    model.train()
    for _ in range(steps):
        t = time.perf_counter()
        loss = completion_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {
        "base": quantize, "step": step, "runnable": True, "trainable_params": sum(p.numel() for p in params),
        "weight_mb": round(weight_bytes / 2**20, 1),
        "rss_loaded_mb": rss_loaded,
        "train_peak_rss_mb": _status_mb("VmHWM") if peak_reset else None,
        "peak_rss_incl_load_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_training_mb": _status_mb("VmRSS"),
        "step_s_median": round(statistics.median(times[1:]), 3), "step_s": [round(t, 3) for t in times],
        "batch": len(data), "tokens": int(batch["attention_mask"].sum()), "threads": threads, "final_loss": float(loss),
    }


def _load() -> list:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _git(*args) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else f"unavailable ({out.stderr.strip()[:200]})"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv) -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "device": f"cpu: {_cpu()}, {os.cpu_count()} logical cores visible",
        "torch": torch.__version__, "torchao": version("torchao"), "transformers": version("transformers"),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        # what differs from the commit in the paths this benchmark runs (others' work in progress included)
        "uncommitted": _git("status", "--porcelain", "--", "lofit_fast", "bench/quantized_base.py").splitlines(),
        "command": " ".join(["python", os.path.relpath(__file__, ROOT), *argv]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _ratio(a, b):
    return None if a is None or b is None or not b else round(a / b, 2)


def table(result: dict) -> str:
    env = result["env"]
    rows = {(r["base"], r["step"]): r for r in result["rows"]}
    lines = [
        f"SmolLM2-135M-Instruct, {env['device']}; torch {env['torch']}, torchao {env['torchao']}, "
        f"transformers {env['transformers']}; commit {env['commit'][:12]}.",
        f"`{env['command']}`; load average (1 min) {result['load_min']:.1f}–{result['load_max']:.1f} over the run.",
        "",
        "| base | step | weights MB | RSS loaded MB | train peak RSS MB | peak RSS incl. load MB | s/step | "
        "int8/float32 (weights, RSS loaded, train peak, s/step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"select": "1 (select: A on all heads)", "tune": "2 (tune: v on K heads)"}
    for base in BASES:
        for step in STEPS:
            r = rows.get((base, step))
            if r is None:
                continue
            if not r["runnable"]:
                lines.append(f"| {base} | {names[step]} | not runnable here: {r['reason']} | | | | | |")
                continue
            f = rows.get(("float32", step))
            ratio = ""
            if base != "float32" and f and f["runnable"]:
                ratio = " / ".join(str(_ratio(r[k], f[k])) for k in
                                   ("weight_mb", "rss_loaded_mb", "train_peak_rss_mb", "step_s_median"))
            lines.append(f"| {base} | {names[step]} | {r['weight_mb']} | {r['rss_loaded_mb']} | {r['train_peak_rss_mb']} | "
                         f"{r['peak_rss_incl_load_mb']} | {r['step_s_median']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/quantized_base.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("BASE", "STEP"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.threads)))
        return
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is warm-up, excluded from the median)")
    env = environment(sys.argv[1:])
    rows, loads = [], [_load()[0]]
    for step in STEPS:
        for base in BASES:
            if base == "int4" and rows and any(r["base"] == "int4" and not r["runnable"] for r in rows):
                # the same refusal as for the other step: recorded again without loading the model again
                first = next(r for r in rows if r["base"] == "int4")
                rows.append(dict(first, step=step, same_refusal_as_step=first["step"]))
                continue
            cmd = [sys.executable, __file__, "--worker", base, step, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's lofit_fast
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
            if out.returncode != 0:
                raise SystemExit(f"worker {base} {step} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows[-1]["load_avg_1_5_15_after"] = _load()
            loads.append(rows[-1]["load_avg_1_5_15_after"][0])
            print(rows[-1], flush=True)
    result = {"model": "SmolLM2-135M-Instruct", "env": env, "load_min": min(loads), "load_max": max(loads),
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table(result), encoding="utf-8")
    print(table(result))


if __name__ == "__main__":
    main()
