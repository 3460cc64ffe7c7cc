"""End-to-end benchmark: fused LoFiT against hook-based LoFiT, LoRA and the bare frozen model, with memory.

Workloads (rows in bench/results/e2e.csv, one per provider and shape):
  step1    one LoFiT head-selection step: A on every head, loss = completion CE + λ·Σ|A|
  step2    one LoFiT bias-tuning step: v on K ≈ 3 % of the heads (seeded random heads), loss = completion CE
  decode   model.generate with a KV cache, a fixed number of new tokens, greedy (prompt prefill included)
  prefill  one no-grad forward over the prompt that fills the KV cache (logits of the last position only)

A training step is: forward, completion-only cross-entropy on the logits (lofit_fast.losses, the loss of the
LoFiT training loop, on the last --completion-frac of every row), backward, AdamW step on the trainable
parameters (gradients set to None before each step).

Providers:
  floor       the frozen model doing the same forward and backward with one trainable scalar added to the o_proj
              input of the lowest patched layer, so autograd backpropagates exactly as deep as LoFiT and nothing
              more is saved (the reference of the training ratios)
  fused       lofit_fast.patch, backend "auto";  torch: lofit_fast.patch, backend "torch"
  fused-<b>   lofit_fast.patch with the backend forced to <b> (fused-cuda, fused-triton, fused-cpp, fused-torch);
              only when asked for by name in --providers (bench/gpu_check.sh times fused-cuda and fused-triton)
  hooks       lofit_fast.hooks.patch (a dense pre-hook);  hooks_loop: hooks.patch_loop (the official loop)
  lora        peft LoRA r=8 on q_proj, v_proj (lofit_fast.methods.comparators.lora)
  base        the unmodified model (the reference of the decode and prefill ratios)
  merged      lofit_fast.adapter.merge of the step-2 patch: plain nn.Linear modules
For decode and prefill, fused, hooks and merged carry the step-2 intervention (v on the same K heads).

Every provider is built once on one copy of the model and swapped in and out (module swaps and hook
registration: the tree a provider runs is exactly what its public API produced). Timed repetitions go
round-robin over the providers, starting each round at the next provider, so drift in the machine's load
hits all of them alike; warm-up rounds are not counted. Reported: median, p20 and p80 of --steps timed
repetitions; tokens/s from the median. Every ratio compares rows of one run.

peak_mb: what the provider alone needs at its peak = the model's weights and buffers + the provider's own
persistent tensors (trainable parameters, optimizer state, extra weights such as a merged o_proj's new bias)
+ the peak of the memory allocated during one step above what was allocated before it. The transient part is
torch.cuda.max_memory_allocated on a GPU, and on the CPU the running sum of the allocations and frees that
torch.profiler(profile_memory=True) reports for one step (torch's CPU allocator, not the process RSS). It is
taken in a separate untimed pass after the timed ones.

    python bench/e2e_bench.py --device cpu --model smollm2                       # the CPU measurement
    python bench/e2e_bench.py --device cuda --model llama2-7b,llama3-8b,gemma-7b  # see bench/gpu_check.sh
    python bench/e2e_bench.py --model tiny --steps 2 --warmup 1 --results /tmp/e2e  # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):  # lofit_fast from this checkout; plot_e2e next to this file
    if _path not in sys.path:
        sys.path.insert(0, _path)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the triton backend

# The parts, by concern (bench/e2e_lib/); every name stays importable from here (peers_bench.py, the tests).
from e2e_lib.common import (  # noqa: E402
    HEADER, WORKLOADS, TRAIN_PROVIDERS, INFER_PROVIDERS, REFERENCE, FORCED, FORCED_BACKENDS, DTYPES, OOM, L1,
    LR_STEP1, LR_STEP2, INIT_STD, INFER_V_STD, MODEL_CONFIGS, REAL_MODELS, build_model, tensor_bytes, model_bytes,
    total_heads, step2_heads,
)
from e2e_lib.timing import (  # noqa: E402
    synchronize, timed, _free, _reset_grads, round_robin, transient_peak_bytes, percentile,
)
from e2e_lib.providers import (  # noqa: E402
    Provider, _o_proj_swaps, _adamw, ScalarShift, make_floor, _trainable, make_lofit, make_hooks, make_lora,
    make_merged, step2_values, training_providers, inference_providers,
)
from e2e_lib.workloads import (  # noqa: E402
    training_batch, training_step, prompt_ids, decode_call, prefill_call, check_gradients, check_inference,
)
from e2e_lib.report import (  # noqa: E402
    Context, make_row, measure, PROFILE_CATEGORIES, profile_categories, profile_training, git_commit, append_rows,
    loadavg, auto_backend,
)

# what this script defines, and the parts' names it re-exports for peers_bench.py and the tests
__all__ = ["bench_training", "bench_decode", "bench_prefill", "parse_list", "build_parser", "resolve_args",
    "providers_for", "run", "main", "HEADER", "WORKLOADS", "TRAIN_PROVIDERS", "INFER_PROVIDERS", "REFERENCE",
    "FORCED", "FORCED_BACKENDS", "DTYPES", "OOM", "L1", "LR_STEP1", "LR_STEP2", "INIT_STD", "INFER_V_STD",
    "MODEL_CONFIGS", "REAL_MODELS", "build_model", "tensor_bytes", "model_bytes", "total_heads", "step2_heads",
    "synchronize", "timed", "_free", "_reset_grads", "round_robin", "transient_peak_bytes", "percentile", "Provider",
    "_o_proj_swaps", "_adamw", "ScalarShift", "make_floor", "_trainable", "make_lofit", "make_hooks", "make_lora",
    "make_merged", "step2_values", "training_providers", "inference_providers", "training_batch", "training_step",
    "prompt_ids", "decode_call", "prefill_call", "check_gradients", "check_inference", "Context", "make_row",
    "measure", "PROFILE_CATEGORIES", "profile_categories", "profile_training", "git_commit", "append_rows",
    "loadavg", "auto_backend"]


# -------------------------------------------------------------------------------------------------- measuring


def bench_training(model, ctx: Context, workload: str, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = training_providers(model, workload, names)
    batch = training_batch(model.config.vocab_size, args.batch, args.seq, args.completion_frac, ctx.device)
    calls = {n: training_step(model, batch, p) for n, p in providers.items()}
    model.train()
    try:
        rows = measure(ctx, workload, args.batch, args.seq, args.batch * args.seq, providers, calls, args.steps,
                       args.warmup, log=log)
        check_gradients({r["provider"]: providers[r["provider"]] for r in rows if r["ms_p50"]}, workload)
        if args.profile:
            profile_training(ctx, workload, providers, calls, Path(args.profile), log=log)
    finally:
        model.eval()
        for p in providers.values():
            _reset_grads(p)
    return rows


def bench_decode(model, ctx: Context, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = inference_providers(model, names)
    check_inference(model, providers, model.config.vocab_size, ctx.device)
    rows = []
    for b in args.decode_batch:
        ids = prompt_ids(model.config.vocab_size, b, args.decode_prompt, ctx.device)
        calls = {n: decode_call(model, ids, args.decode_new) for n in providers}
        rows += measure(ctx, "decode", b, args.decode_new, b * args.decode_new, providers, calls, args.infer_steps,
                        args.warmup, log=log)
    return rows


def bench_prefill(model, ctx: Context, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = inference_providers(model, names)
    check_inference(model, providers, model.config.vocab_size, ctx.device)
    rows = []
    for s in args.prefill_seq:
        ids = prompt_ids(model.config.vocab_size, 1, s, ctx.device)
        calls = {n: prefill_call(model, ids) for n in providers}
        rows += measure(ctx, "prefill", 1, s, s, providers, calls, args.infer_steps, args.warmup, log=log)
    return rows


# ------------------------------------------------------------------------------------------------------ output


def parse_list(text: str, cast=str) -> List:
    return [cast(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help=f"comma list of {sorted([*REAL_MODELS, *MODEL_CONFIGS])} "
                   "(default: smollm2 on the CPU, llama2-7b on a GPU)")
    p.add_argument("--providers", default=",".join(dict.fromkeys([*TRAIN_PROVIDERS, *INFER_PROVIDERS])),
                   help="comma list; each workload runs those that apply, plus its reference (floor or base)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per provider")
    p.add_argument("--infer-steps", type=int, default=None, help="timed repetitions for decode and prefill "
                   "(default: --steps)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted rounds before timing")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4 on the CPU, 8 on a GPU)")
    p.add_argument("--seq", type=int, default=None, help="training tokens per row (default 128 CPU, 512 GPU)")
    p.add_argument("--completion-frac", type=float, default=0.25, help="share of each row under the loss")
    p.add_argument("--decode-batch", default=None, help="comma list (default 1,8 on the CPU, 1,8,64 on a GPU)")
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--decode-new", type=int, default=32, help="new tokens generated per call")
    p.add_argument("--prefill-seq", default=None, help="comma list (default 512 on the CPU, 512,4096 on a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"),
                   help="folder of e2e.csv (appended), e2e_runs.jsonl, and the regenerated e2e_<device>.md and plots")
    p.add_argument("--no-report", action="store_true", help="only append rows; do not redraw the markdown and plots")
    p.add_argument("--profile", default=None, help="also write torch.profiler tables of the training steps here")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    args.model = parse_list(args.model or ("llama2-7b" if gpu else "smollm2"))
    args.batch = args.batch or (8 if gpu else 4)
    args.seq = args.seq or (512 if gpu else 128)
    args.decode_batch = parse_list(args.decode_batch or ("1,8,64" if gpu else "1,8"), int)
    args.prefill_seq = parse_list(args.prefill_seq or ("512,4096" if gpu else "512"), int)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.workloads = parse_list(args.workloads)
    args.providers = parse_list(args.providers)
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}: choose from {WORKLOADS}")
    for name in args.providers:
        if name not in TRAIN_PROVIDERS + INFER_PROVIDERS and name not in [FORCED + b for b in FORCED_BACKENDS]:
            raise SystemExit(f"unknown provider {name!r}: choose from {sorted(set(TRAIN_PROVIDERS + INFER_PROVIDERS))} "
                             f"or {FORCED}<backend> with a backend of {FORCED_BACKENDS}")
    for m in args.model:
        if m not in REAL_MODELS and m not in MODEL_CONFIGS:
            raise SystemExit(f"unknown model {m!r}: choose from {sorted([*REAL_MODELS, *MODEL_CONFIGS])}")
    args.infer_steps = args.infer_steps or args.steps
    if args.steps < 1 or args.infer_steps < 1 or args.warmup < 0:
        raise SystemExit("--steps and --infer-steps must be >= 1, --warmup >= 0")
    return args


def providers_for(workload: str, wanted: Sequence[str]) -> List[str]:
    """The wanted providers that apply to the workload, reference first (always included)."""
    pool = TRAIN_PROVIDERS if workload in ("step1", "step2") else INFER_PROVIDERS
    ref = REFERENCE[workload]
    return [ref] + [n for n in pool if n in wanted and n != ref] + [n for n in wanted if n.startswith(FORCED)]


def run(args: argparse.Namespace, log=print) -> List[Dict[str, str]]:
    """Every (model, workload) of the resolved arguments; returns the rows (also appended to the CSV)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    results = Path(args.results)
    meta = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=getattr(args, "command", "e2e_bench.run"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, commit=git_commit(), threads=torch.get_num_threads(),
                loadavg_before=loadavg(), models=args.model, workloads=args.workloads, auto_backend={})
    all_rows: List[Dict[str, str]] = []
    try:
        for model_name in args.model:
            log(f"[{model_name}] building ({args.dtype} on {device})")
            model = build_model(model_name, device, dtype)
            ctx = Context(model_name, args.dtype, device, meta["device"], meta["torch"], meta["commit"],
                          model_bytes(model))
            meta["auto_backend"][model_name] = {f"N={n}": auto_backend(model, n)
                                                for n in sorted({args.batch * args.seq, 1, *args.decode_batch})}
            log(f"[{model_name}] {total_heads(model)} heads, {ctx.model_bytes / 2**20:.0f} MB; auto backend: "
                f"{meta['auto_backend'][model_name]}")
            for workload in args.workloads:
                names = providers_for(workload, args.providers)
                if workload in ("step1", "step2"):
                    rows = bench_training(model, ctx, workload, names, args, log=log)
                elif workload == "decode":
                    rows = bench_decode(model, ctx, names, args, log=log)
                else:
                    rows = bench_prefill(model, ctx, names, args, log=log)
                append_rows(results / "e2e.csv", rows)  # per workload: a run cut short keeps what it finished
                all_rows += rows
                _free(device)
            del model
            _free(device)
    except BaseException as exc:
        meta["interrupted"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        meta["loadavg_after"] = loadavg()
        meta["rows"] = len(all_rows)
        results.mkdir(parents=True, exist_ok=True)
        with open(results / "e2e_runs.jsonl", "a") as f:
            f.write(json.dumps(meta) + "\n")
    if not args.no_report:
        from plot_e2e import report  # bench/plot_e2e.py

        for path in report(results, device_kind=args.device):
            log(f"wrote {path}")
    return all_rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    args.command = " ".join(["python bench/e2e_bench.py", *argv])
    rows = run(args)
    from plot_e2e import summary_table

    print(summary_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
