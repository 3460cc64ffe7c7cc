"""lm-evaluation-harness as the independent judge: the `lofit` model (the project's model loading, packaged
GGUF names included, with a lofit_fast adapter) and tasks over the local LoFiT data.

    import lofit_fast.harness                      # registers the "lofit" model with lm-eval
    import lm_eval
    lm_eval.simple_evaluate(model="lofit", model_args="pretrained=smollm2,adapter=runs/tqa/adapter",
                            tasks=["lofit_truthfulqa_mc1"], task_manager=lofit_fast.harness.task_manager("../shared/data"))

or, for several adapters at once (one row each, the base model as "base"):

    python -m lofit_fast.harness --data ../shared/data --tasks lofit_truthfulqa_mc1,lofit_truthfulqa_mc2 \\
        --adapter lofit=runs/tqa/adapter --adapter random=runs/tqa/random_adapter --out runs/lm_eval.json
"""
from __future__ import annotations

import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..adapter import load_adapter
from ..eval import score_token_continuations, takes_kv_cache
from ..models import load_model
from .tasks import TASKS, write_task_configs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("lofit")
class LofitLM(HFLM):
    """lm-eval's Hugging Face model on a model loaded by `lofit_fast.load_model` (a packaged name such as
    "smollm2", a .gguf file or an HF folder, never the hub), with `adapter` (a save_adapter folder, or none)
    loaded through the fused op (`backend`).

    `shared_prefix` (default on): log-likelihood requests that share a context (a multiple-choice question's
    choices) run the context once and score every continuation from its KV cache
    (`lofit_fast.eval.score_token_continuations`), instead of HFLM running context + continuation per choice.
    lm-eval still builds the requests (prompt, tokenization, truncation rule) and computes the metrics; the
    log-likelihoods and greedy flags equal HFLM's own to float rounding (tests/test_harness.py). With a few-shot
    primer the context is most of each request, so this is several times faster. `shared_prefix=false` gives
    HFLM's path."""

    def __init__(self, pretrained: str = "smollm2", adapter: Optional[str] = None, backend: str = "auto",
                 dtype: str = "float32", device: str = "cpu", batch_size=1, shared_prefix=True,
                 prefix_batch_tokens: int = 4096, **kwargs):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        model, tokenizer = load_model(pretrained, dtype=_DTYPES[dtype], device=device)
        if adapter and str(adapter).lower() != "none":
            load_adapter(model, adapter, backend=backend)
        self.adapter_path = adapter
        self.shared_prefix = _flag(shared_prefix, "shared_prefix")
        self.prefix_batch_tokens = int(prefix_batch_tokens)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self._can_share_prefix(requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups: Dict[tuple, List[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        rows = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 64
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            scored = score_token_continuations(
                self.model, [list(c) for c in groups], [[requests[i][2] for i in idx] for idx in groups.values()],
                pad_id=self.tokenizer.pad_token_id or 0, batch_tokens=self.prefix_batch_tokens, max_rows=rows,
                progress=not disable_tqdm and self.rank == 0, desc="loglikelihood (shared contexts)")
        results: List[Optional[tuple]] = [None] * len(requests)
        for idx, answers in zip(groups.values(), scored):
            for i, (logp, greedy) in zip(idx, answers):
                results[i] = (logp, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _can_share_prefix(self, requests) -> bool:
        """HFLM's path unless every request fits the model's window untruncated, on a causal model with a KV
        cache interface (truncation from the left would change the shared context per request)."""
        if not self.shared_prefix or self.backend != "causal" or not requests:
            return False
        if not takes_kv_cache(self.model):
            return False
        return all(context and continuation and len(context) + len(continuation) <= self.max_length + 1
                   for _, context, continuation in requests)


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def task_manager(data_dir, *, fold: int = 0, limit: Optional[int] = None, folder=None):
    """An lm-eval TaskManager that knows the lofit_* tasks over `data_dir` (configs written to `folder`, or a
    temporary one)."""
    from lm_eval.tasks import TaskManager

    folder = folder or tempfile.mkdtemp(prefix="lofit_lm_eval_tasks_")
    write_task_configs(data_dir, folder, fold=fold, limit=limit)
    return TaskManager(include_path=str(folder))


def evaluate(data_dir, adapters: Mapping[str, Optional[str]], *, tasks: Sequence[str] = TASKS[:2],
             model: str = "smollm2", fold: int = 0, limit: Optional[int] = None, batch_size=8,
             backend: str = "auto", dtype: str = "float32", device: str = "cpu",
             shared_prefix: bool = True) -> Dict[str, Dict[str, float]]:
    """{adapter name: {task: score}} from lm-eval's simple_evaluate, one model load per adapter (None: the base
    model; `shared_prefix`: see `LofitLM`)."""
    import lm_eval

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: choose from {list(TASKS)}")
    manager = task_manager(data_dir, fold=fold, limit=limit)
    table: Dict[str, Dict[str, float]] = {}
    for name, path in adapters.items():
        lm = LofitLM(pretrained=model, adapter=path, backend=backend, dtype=dtype, device=device,
                     batch_size=batch_size, shared_prefix=shared_prefix)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
        row = {}
        for task in tasks:
            metrics = out["results"][task]
            key = next(k for k in metrics if k.split(",")[0] in ("acc", "exact_match"))
            row[task] = float(metrics[key])
        table[name] = row
    return table


__all__ = ["LofitLM", "TASKS", "evaluate", "task_manager", "write_task_configs"]
