"""Memory and step time of LoFiT step 1 (A on every head) and step 2 (v on K heads) on SmolLM2-135M with a
float32 base and with a torchao int8 weight-only base (CPU).

    python bench/quantized_base.py --out bench/results/quantized_base.json [--steps 4] [--threads 2]

Each configuration runs in a fresh process so its peak RSS is its own (the peak includes loading: the GGUF is
dequantized to float32 before the int8 quantization, so the int8 peak is the load's). rss_loaded / rss_after:
the resident size once loaded (and quantized) and after the training steps. Weight bytes count every parameter
and buffer of the patched model (a quantized weight by its int8 data and scales; the cached dequantized W_S
columns included). Step time: the median of the steps after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _tensor_bytes(t) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t).__module__.startswith("torchao"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def worker(quantize: str, step: str, steps: int, threads: int) -> dict:
    import torch

    import lofit_fast
    from lofit_fast.data import SFTExample, builtin_truthfulqa
    from lofit_fast.methods import default_k

    torch.set_num_threads(threads)
    model, tok = lofit_fast.load_model("smollm2", quantize=None if quantize == "float32" else quantize)
    import gc

    gc.collect()
    rss_loaded = _rss_mb()
    if step == "select":
        lofit_fast.patch(model, "all", scale=True, offset=False, init_std=1e-3)
    else:
        sites = lofit_fast.find_attention_sites(model)
        k = default_k(model)
        heads = [(i % len(sites), (7 * i) % sites[0].num_heads) for i in range(k)]
        lofit_fast.patch(model, heads, scale=False, offset=True, init_std=1e-3)
    lofit_fast.freeze_base(model)
    weight_bytes = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    items = list(builtin_truthfulqa())
    data = [SFTExample(it.prompt, " " + it.best) for it in items][:8]
    params = lofit_fast.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    from lofit_fast.data import collate_sft
    from lofit_fast.losses import completion_loss

    batch = collate_sft(tok, data)
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
        "base": quantize, "step": step, "trainable_params": sum(p.numel() for p in params),
        "weight_mb": round(weight_bytes / 2**20, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_loaded_mb": rss_loaded, "rss_after_training_mb": _rss_mb(),
        "step_s_median": round(statistics.median(times[1:]), 3), "step_s": [round(t, 3) for t in times],
        "batch": len(data), "tokens": int(batch["attention_mask"].sum()), "threads": threads, "final_loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/quantized_base.json")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("BASE", "STEP"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.threads)))
        return
    rows = []
    for base in ("float32", "int8"):
        for step in ("select", "tune"):
            cmd = [sys.executable, __file__, "--worker", base, step, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model": "SmolLM2-135M-Instruct", "device": "cpu", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
