"""The comparison of LoFiT with its relatives: `run_method` fits/trains one method on a task, evaluates it, and
puts the model back as it was; `run_method_experiment` does that beside the base model into a run folder.

    run_method(method, model, tokenizer, task, train_items, eval_items, **kw)
        -> {"method", "metrics", "trainable_params", "fitted_params", "seconds", "eval_seconds", "info"}

methods: base, iti, repe, lofit, lora, red, rep_tuning. Training methods share `lofit_fast.train.train`
(LoFiT's loop: TruthfulQA by DPO, CLUTRR/MQuAKE by completion cross-entropy), the same data and the same
evaluation (`lofit_fast.eval.evaluate`). "trainable_params" counts parameters learned by gradient descent;
"fitted_params" counts the values ITI and RepE compute in closed form (their offsets / steering vectors).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, List, Sequence

import torch.nn as nn
from safetensors.torch import save_file

from ..adapter import save_adapter
from ..data import MCItem, SFTExample, task_kind, truthfulqa_completion
from ..eval import evaluate
from ..methods import iti, rep_tuning, repe
from ..methods.comparators import lora, lora_parameters, red, red_parameters, red_state, unlora, unred
from ..methods.lofit import as_training_examples, select_defaults, select_heads, tune
from ..patch import patched_modules, trainable_parameters, unpatch
from ..steer import decoder_layers, set_coeff, steer, unsteer
from ..train import train
from .lofit_run import evaluate_arm
from .recipes import with_prompt_style
from .results import write_json
from .settings import DEFAULT_LR, RunSettings, hyperparameters, load_model_for, log, splits

METHODS = ("base", "iti", "repe", "lofit", "lora", "red", "rep_tuning")
REPE_COEFF_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)


# ------------------------------------------------------------------------------------------------ helpers
def _evaluate(task, model, tokenizer, items, kw) -> Dict[str, float]:
    extra = {"batch_size": kw.get("eval_batch_size", 16), "progress": kw.get("progress", False)}
    if task != "truthfulqa" and kw.get("max_new_tokens"):
        extra["max_new_tokens"] = kw["max_new_tokens"]
    return {k: float(v) for k, v in evaluate(task, model, tokenizer, items, **extra).items() if not isinstance(v, list)}


def _train_kw(kw, method: str) -> dict:
    return dict(
        lr=kw.get("lr") or DEFAULT_LR[method], epochs=kw.get("epochs", 5), batch_size=kw.get("batch_size", 8),
        seed=kw.get("seed", 0), max_grad_norm=kw.get("max_grad_norm", 1.0), max_length=kw.get("max_length"),
        progress=kw.get("progress", False), **_recipe_kw(kw),
    )


def _recipe_kw(kw) -> dict:
    """The recipe's schedule and EOS choice, where given (`lofit_fast.train.train`'s defaults otherwise)."""
    return {key: kw[key] for key in ("schedule", "add_eos") if kw.get(key) is not None}


@contextmanager
def _restoring(model: nn.Module):
    """Put back every parameter's requires_grad flag and the train/eval mode, whatever the method did."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    mode = model.training
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)


def _middle_layers(model, kw) -> List[int]:
    return list(kw["layers"]) if kw.get("layers") else repe.middle_layers(model)


def _score(task: str, metrics: Dict[str, float]) -> float:
    return metrics["mc2"] if task == "truthfulqa" else metrics["accuracy"]


# ------------------------------------------------------------------------------------------------ methods
def _iti(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    result = iti.fit(model, tokenizer, train_items, k=kw.get("k"), alpha=kw.get("alpha", 15.0),
                     seed=kw.get("seed", 0), batch_size=kw.get("batch_size", 8), task=task)
    iti.apply(model, result)
    seconds = time.perf_counter() - t
    try:
        if kw.get("out"):
            save_adapter(model, os.path.join(kw["out"], "iti"), method="iti",
                         hyperparameters={"task": task, "k": len(result.heads), "alpha": result.alpha})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unpatch(model)
    d = result.directions.shape[1]
    info = {"heads": [list(h) for h in result.heads], "alpha": result.alpha,
            "best_probe_accuracy": float(result.probe_accuracies.max())}
    return metrics, 0, len(result.heads) * d, seconds, eval_seconds, info


def _repe(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    layers = _middle_layers(model, kw)
    if kw.get("pairs", "task") == "honesty":
        vectors = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=kw.get("honesty_dir", repe.HONESTY_DIR),
                                       normalize=False, batch_size=kw.get("batch_size", 8))
    else:
        pos, neg = repe.task_pairs(task, train_items, seed=kw.get("seed", 0), max_pairs=kw.get("max_pairs", 256))
        vectors = repe.control_vector(model, tokenizer, pos, neg, layers=layers, method=kw.get("repe_method", "pca"),
                                      normalize=False, batch_size=kw.get("batch_size", 8))
    # per layer: one average pos − neg separation split over the steered layers (the shifts add up)
    vectors = {layer: v / len(layers) for layer, v in vectors.items()}
    coeff = kw.get("coeff", "auto")
    steer(model, vectors, coeff=1.0)
    tried = {}
    try:
        if coeff == "auto":
            tune_items = list(train_items)[: kw.get("coeff_items", 24)]
            for c in kw.get("coeff_grid", REPE_COEFF_GRID):
                set_coeff(model, c)
                tried[c] = _score(task, _evaluate(task, model, tokenizer, tune_items, kw))
            coeff = max(tried, key=lambda c: (tried[c], -abs(c)))
        set_coeff(model, float(coeff))
        seconds = time.perf_counter() - t
        if kw.get("out"):
            os.makedirs(kw["out"], exist_ok=True)
            save_file({f"layers.{layer}": v.contiguous() for layer, v in vectors.items()},
                      os.path.join(kw["out"], "repe_vectors.safetensors"), metadata={"coeff": str(coeff)})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unsteer(model)
    hidden = next(iter(vectors.values())).numel()
    return metrics, 0, len(layers) * hidden, seconds, eval_seconds, {"layers": layers, "coeff": coeff,
                                                                     "coeff_search": {str(c): s for c, s in tried.items()}}


def _lofit(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    common = _train_kw(kw, "lofit")
    lr = common.pop("lr")  # step 2's; step 1 takes select_lr
    common["init_std"] = kw.get("init_std", 1e-3)
    if task_kind(task) == "dpo":
        common["beta"] = kw.get("beta", 0.5)
    official = select_defaults(task)
    selection = select_heads(model, tokenizer, train_items, task=task, k=kw.get("k"), l1=kw.get("l1", official["l1"]),
                             lr=kw.get("select_lr", official["lr"]), **common)
    heads = selection.top()
    tune(model, tokenizer, train_items, heads, task=task, lr=lr, **common)
    seconds = time.perf_counter() - t
    try:
        trainable = sum(p.numel() for p in trainable_parameters(model))
        if kw.get("out"):
            save_adapter(model, os.path.join(kw["out"], "lofit"), selection=selection, method="lofit",
                         hyperparameters={"task": task, "k": len(heads)})
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unpatch(model)
    return metrics, trainable, 0, seconds, eval_seconds, {"heads": [list(h) for h in heads]}


def _train_shared(model, tokenizer, task, train_items, params, kw, method):
    extra = {"beta": kw.get("beta", 0.5)} if task_kind(task) == "dpo" else {}
    return train(model, tokenizer, as_training_examples(task, train_items), kind=task_kind(task), params=params,
                 desc=method, **_train_kw(kw, method), **extra)


def _lora(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    peft_model = lora(model, r=kw.get("r", 8), target_modules=kw.get("target_modules", ("q_proj", "v_proj")))
    try:
        params = lora_parameters(peft_model)
        record = _train_shared(peft_model, tokenizer, task, train_items, params, kw, "lora")
        seconds = time.perf_counter() - t
        if kw.get("out"):
            peft_model.save_pretrained(os.path.join(kw["out"], "lora"))
        t = time.perf_counter()
        metrics = _evaluate(task, peft_model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unlora(peft_model)
    return metrics, sum(p.numel() for p in params), 0, seconds, eval_seconds, {"final_loss": record["epoch_loss"][-1]}


def _red(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    red(model, kw.get("red_layers", "all"))
    try:
        params = red_parameters(model)
        record = _train_shared(model, tokenizer, task, train_items, params, kw, "red")
        seconds = time.perf_counter() - t
        if kw.get("out"):
            os.makedirs(kw["out"], exist_ok=True)
            state = {f"layers.{layer}.{name}": t_ for layer, d in red_state(model).items() for name, t_ in d.items()}
            save_file(state, os.path.join(kw["out"], "red.safetensors"))
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        unred(model)
    return metrics, sum(p.numel() for p in params), 0, seconds, eval_seconds, {"final_loss": record["epoch_loss"][-1]}


def rep_tuning_examples(task: str, items: Sequence) -> list:
    """SFT examples for representation tuning: TruthfulQA's best answers, or the task's own SFT examples."""
    items = list(items)
    if items and isinstance(items[0], MCItem):
        return [SFTExample(item.prompt, truthfulqa_completion(item.best)) for item in items]
    return as_training_examples(task, items)


def _rep_tuning(model, tokenizer, task, train_items, eval_items, kw):
    t = time.perf_counter()
    layers = _middle_layers(model, kw)
    directions = repe.honesty_vectors(model, tokenizer, layers=layers, data_dir=kw.get("honesty_dir", repe.HONESTY_DIR),
                                      max_pairs=kw.get("max_pairs", 256), batch_size=kw.get("batch_size", 8))
    trainable = kw.get("trainable", "heads")
    snapshot = None
    if trainable == "layers":
        blocks = decoder_layers(model)
        snapshot = {layer: {k: v.detach().clone() for k, v in blocks[layer].state_dict().items()} for layer in layers}
    try:
        record = rep_tuning.train(model, tokenizer, rep_tuning_examples(task, train_items), directions, layers=layers,
                                  w=kw.get("w", 1.0), mode=kw.get("mode", "in"), trainable=trainable,
                                  **_train_kw(kw, "rep_tuning"))
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        metrics = _evaluate(task, model, tokenizer, eval_items, kw)
        eval_seconds = time.perf_counter() - t
    finally:
        if patched_modules(model):
            unpatch(model)
        if snapshot is not None:
            for layer, state in snapshot.items():
                blocks[layer].load_state_dict(state)
    return metrics, record["trainable_params"], 0, seconds, eval_seconds, {"layers": layers, "w": kw.get("w", 1.0)}


_RUNNERS = {"iti": _iti, "repe": _repe, "lofit": _lofit, "lora": _lora, "red": _red, "rep_tuning": _rep_tuning}


def run_method(method: str, model: nn.Module, tokenizer, task: str, train_items: Sequence, eval_items: Sequence,
               **kw) -> Dict[str, object]:
    """Fit/train `method` on `train_items`, evaluate on `eval_items`, and leave `model` as it came (no
    patch, steering, LoRA or RED attached; weights, requires_grad flags and mode unchanged).

    Keywords: epochs, batch_size, lr, seed, beta, max_grad_norm, max_length, eval_batch_size, max_new_tokens,
    progress, out (a folder for the method's artifacts); the recipe's schedule, add_eos and prompt_style
    (`lofit_fast.experiments.recipes`; left out: the training functions' defaults, i.e. the official recipe's
    linear decay and EOS, and the items' own prompts); per method: k, alpha (iti); layers, coeff ("auto" or a
    number), coeff_grid, coeff_items, pairs ("task" or "honesty"), repe_method (repe); k, l1, select_lr,
    init_std (lofit); r, target_modules (lora); red_layers (red); layers, w, mode, trainable, honesty_dir
    (rep_tuning).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if kw.get("prompt_style"):
        train_items = with_prompt_style(train_items, kw["prompt_style"])
        eval_items = with_prompt_style(eval_items, kw["prompt_style"])
    with _restoring(model):
        if method == "base":
            t = time.perf_counter()
            metrics = _evaluate(task, model, tokenizer, eval_items, kw)
            result = (metrics, 0, 0, 0.0, time.perf_counter() - t, {})
        else:
            result = _RUNNERS[method](model, tokenizer, task, list(train_items), list(eval_items), kw)
    metrics, trainable, fitted, seconds, eval_seconds, info = result
    return {"method": method, "task": task, "metrics": metrics, "trainable_params": int(trainable),
            "fitted_params": int(fitted), "seconds": round(seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "train_examples": len(train_items), "eval_examples": len(eval_items), "info": info}


def run_method_experiment(settings, train_items: Sequence, eval_items: Sequence) -> dict:
    """Base and one relative of LoFiT (settings.method: ITI, RepE, LoRA or RED) on one task, through the same
    data, training loop and evaluation; writes results.json ({"base": ..., METHOD: ...}) to settings.out and
    returns it. `settings`: a RunSettings (or any object with its fields)."""
    settings = RunSettings.of(settings)
    train_items = with_prompt_style(train_items, settings.prompt_style)
    eval_items = with_prompt_style(eval_items, settings.prompt_style)
    start = time.perf_counter()
    model, tokenizer = load_model_for(settings)
    t = time.perf_counter()
    base = evaluate_arm(settings, model, tokenizer, eval_items, "the base model")
    eval_base = round(time.perf_counter() - t, 1)
    log(settings, f"{settings.method}: fitting on {len(train_items)} {settings.task} examples ...")
    kw = {key: getattr(settings, key) for key in ("epochs", "batch_size", "lr", "seed", "beta", "max_length",
                                                  "eval_batch_size", "k", "init_std", "schedule", "add_eos")}
    kw["max_grad_norm"] = settings.max_grad_norm or None  # 0: no clipping (the plain recipe)
    row = run_method(settings.method, model, tokenizer, settings.task, train_items, eval_items,
                     progress=not settings.quiet, out=os.path.join(settings.out, "artifacts"), **kw)
    results = {
        "task": settings.task, "model": settings.model, "method": settings.method,
        "trainable_params": row["trainable_params"], "fitted_params": row["fitted_params"],
        "seconds": round(time.perf_counter() - start, 1), "base": base, settings.method: row["metrics"],
        "train_examples": len(train_items), "eval_examples": len(eval_items), "eval_split": splits(settings.task)[1],
        "device": str(next(model.parameters()).device),
        "hyperparameters": {**hyperparameters(settings), "k": settings.k},
        "seconds_by_stage": {"eval_base": eval_base, "fit": row["seconds"], "eval": row["eval_seconds"]},
        "info": row["info"],
    }
    os.makedirs(settings.out, exist_ok=True)
    write_json(os.path.join(settings.out, "results.json"), results)
    return results
