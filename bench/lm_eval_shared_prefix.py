"""lm-eval's TruthfulQA MC1 + MC2 on the `lofit` model, with and without shared contexts, in the same run:
`shared` runs each question's context (lm-eval's six-shot primer + the question) once and scores every choice
from its KV cache (`LofitLM`'s default); `hflm` is lm-eval's own HFLM path, context + choice per request.

    python bench/lm_eval_shared_prefix.py --data ../shared/data --limit 12 --threads 1

Both providers score the same requests (the first `--limit` questions of fold 0 test, base model or
`--adapter`); their metrics are checked equal before the times are written. One CSV row per provider to
`--csv` (default bench/results/lm_eval_shared_prefix_cpu.csv) with seconds, requests and hflm / shared.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e_lib.report import append_rows, git_commit  # noqa: E402
from packed_rows import _cpu  # noqa: E402

FIELDS = ["timestamp", "commit", "device", "torch", "lm_eval", "threads", "model", "adapter", "questions",
          "provider", "seconds", "mc1", "mc2", "hflm_over_shared"]


def main(argv=None) -> int:
    import lm_eval

    from lofit_fast.harness import LofitLM, task_manager

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data folder with truthfulqa/")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", default=None, help="an adapter folder (default: the base model)")
    ap.add_argument("--limit", type=int, default=12, help="questions of fold 0 test")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(ROOT / "bench/results/lm_eval_shared_prefix_cpu.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = LofitLM(pretrained=args.model, adapter=args.adapter, batch_size=args.batch_size)
    manager = task_manager(args.data, limit=args.limit)
    tasks = ["lofit_truthfulqa_mc1", "lofit_truthfulqa_mc2"]
    measured = {}
    for provider in ("shared", "hflm"):
        lm.shared_prefix = provider == "shared"
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
        seconds = time.perf_counter() - start
        scores = [float(out["results"][t]["acc,none"]) for t in tasks]
        measured[provider] = (seconds, scores)
        print(f"{provider}: {seconds:.1f} s, mc1 {scores[0]:.4f}, mc2 {scores[1]:.4f}", flush=True)
    (s_shared, shared), (s_hflm, hflm) = measured["shared"], measured["hflm"]
    if shared[0] != hflm[0] or abs(shared[1] - hflm[1]) > 1e-5:
        raise SystemExit(f"the two paths disagree: shared {shared}, hflm {hflm}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = [{"timestamp": stamp, "commit": git_commit(), "device": _cpu(), "torch": torch.__version__,
             "lm_eval": lm_eval.__version__, "threads": args.threads, "model": args.model,
             "adapter": args.adapter or "none", "questions": args.limit, "provider": provider,
             "seconds": f"{seconds:.2f}", "mc1": f"{scores[0]:.4f}", "mc2": f"{scores[1]:.4f}",
             "hflm_over_shared": f"{s_hflm / s_shared:.2f}"} for provider, (seconds, scores) in measured.items()]
    append_rows(Path(args.csv), rows, FIELDS)
    print(f"hflm / shared: {s_hflm / s_shared:.2f}x; appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
