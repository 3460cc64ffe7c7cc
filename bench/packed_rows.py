"""Packed against padded training passes: LoFiT DPO steps on real TruthfulQA batches, the same rows either
right-padded (`pack=False`) or packed (`lofit_fast.losses`' default), in the same run, round-robin.

    python bench/packed_rows.py --data ../shared/data --batches 8 --threads 1

Each timed call is one forward + backward of the policy log-probs of a batch of `--batch-size` preference pairs
(chosen and rejected rows, as `lofit_fast.train` runs them), for step 1 (A on every head) and step 2 (v on 8
heads). Before timing, the packed and padded log-probs and gradients are checked equal (relative error).
Writes one CSV row per (stage, provider) to `--csv` (default bench/results/packed_rows_cpu.csv) with the
padding fraction, seconds per batch and the padded / packed ratio.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e_lib.report import append_rows, git_commit  # noqa: E402
from lofit_fast.data import collate_preference, load_split, pad_token_id, training_examples  # noqa: E402
from lofit_fast.experiments.recipes import with_prompt_style  # noqa: E402
from lofit_fast.losses import label_token_logprobs, pack_rows  # noqa: E402
from lofit_fast.models import load_model  # noqa: E402
from lofit_fast.patch import patch, trainable_parameters, unpatch  # noqa: E402
from lofit_fast.train import stack_pairs  # noqa: E402

FIELDS = ["timestamp", "commit", "device", "torch", "threads", "model", "stage", "provider", "batches", "rows",
          "real_tokens", "computed_tokens", "s_per_batch", "padded_over_packed"]


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _step(model, params, batch, pack):
    for p in params:
        p.grad = None
    logps, rows = label_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], pack=pack)
    per_row = torch.zeros(batch["input_ids"].shape[0], dtype=logps.dtype).index_add(0, rows, logps)
    (per_row * torch.linspace(1, 2, per_row.numel())).sum().backward()
    return per_row.detach(), [p.grad.clone() for p in params]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", required=True, help="data folder with truthfulqa/")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="timed passes over the batches per provider")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(ROOT / "bench/results/packed_rows_cpu.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    items = with_prompt_style(load_split("truthfulqa", args.data, "train"), "newline")
    examples = training_examples("truthfulqa", items)
    pad = pad_token_id(tok)
    n = args.batch_size
    batches = [stack_pairs(collate_preference(tok, examples[i:i + n], add_eos=False), pad)
               for i in range(0, min(len(examples), n * args.batches), n)]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in batches)
    packed_tokens = 0
    for b in batches:
        groups = pack_rows(b["attention_mask"])
        lengths = b["attention_mask"].sum(1)
        packed_tokens += (b["attention_mask"].numel() if groups is None
                          else len(groups) * max(int(lengths[g].sum()) for g in groups))
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for stage, heads, kw in (("step1", "all", dict(scale=True, offset=False)),
                             ("step2", [(l, h) for l, h in zip(range(6, 30, 3), range(8))], dict(scale=False, offset=True))):
        patch(model, heads, backend="auto", **kw)
        params = trainable_parameters(model)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 1e-2)
        model.train()
        for b in batches:  # equal before timing
            (lp0, g0), (lp1, g1) = _step(model, params, b, False), _step(model, params, b, None)
            err = max([float((lp1 - lp0).norm() / lp0.norm())]
                      + [float((a - c).norm() / c.norm()) for a, c in zip(g1, g0) if c.norm() > 0])
            if err > 1e-4:
                raise SystemExit(f"{stage}: packed and padded passes differ (relative error {err:.2e})")
        times = {"padded": [], "packed": []}
        for rep in range(args.reps):
            for name, pack in ((("padded", False), ("packed", None)) if rep % 2 == 0 else (("packed", None), ("padded", False))):
                for b in batches:
                    t = time.perf_counter()
                    _step(model, params, b, pack)
                    times[name].append(time.perf_counter() - t)
        unpatch(model)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = sum(times["padded"]) / sum(times["packed"])
        for name in ("padded", "packed"):
            rows.append({"timestamp": stamp, "commit": git_commit(), "device": _cpu(),
                         "torch": torch.__version__, "threads": args.threads, "model": args.model, "stage": stage,
                         "provider": name, "batches": len(batches), "rows": 2 * n, "real_tokens": real,
                         "computed_tokens": padded_tokens if name == "padded" else packed_tokens,
                         "s_per_batch": round(sum(times[name]) / len(times[name]), 3),
                         "padded_over_packed": round(ratio, 3)})
        print(f"{stage}: padded {sum(times['padded']) / len(times['padded']):.2f} s/batch, packed "
              f"{sum(times['packed']) / len(times['packed']):.2f} s/batch (medians {med['padded']:.2f} / "
              f"{med['packed']:.2f}); padded / packed = {ratio:.2f}; tokens computed {padded_tokens} → "
              f"{packed_tokens} of {real} real")
    append_rows(Path(args.csv), rows, FIELDS)
    print(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
