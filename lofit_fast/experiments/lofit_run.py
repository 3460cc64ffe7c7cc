"""The LoFiT experiment: base, LoFiT (step 1 on every head, step 2 on the top K) and the random-heads
baseline with the same K, on one task, with every stage's output kept in a run folder so that an
interrupted run resumes where it stopped.

    results = run_experiment(RunSettings(task="truthfulqa", out="runs/tqa"), train_items, eval_items)

The run folder: results.json (grows after every stage), selection.json, heads.png, losses.png,
predictions.jsonl (generation tasks), adapter/ (the LoFiT adapter) and random_adapter/ (the random-heads
baseline's, for paired and lm-eval comparisons). With `checkpoint_every` > 0 each
training stage also checkpoints into checkpoints/<stage>/ (`lofit_fast.train.train`); `resume` then continues a
killed stage from its last checkpoint and ends with the adapter an uninterrupted run ends with (bit for bit on
CPU). The checkpoints are removed once the run has finished, and at the start of a run that does not resume.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..adapter import save_adapter
from ..analysis import plot_head_scores, plot_losses
from ..eval import evaluate, paired_bootstrap
from ..methods import HeadSelection, default_k, random_heads, select_heads, tune
from ..patch import find_attention_sites, trainable_parameters, unpatch
from .recipes import with_prompt_style
from .results import RESULT_KEYS, folder_seed, previous_results, read_predictions, write_json, write_predictions
from .settings import RunSettings, hyperparameters, load_model_for, log, splits


def evaluate_arm(settings, model, tokenizer, items, label: str, predictions: Optional[list] = None,
                 item_scores: Optional[Dict[str, List[float]]] = None) -> Dict[str, float]:
    """Metrics of `model` on `items`. For the generation tasks each generation with its gold answers is
    appended to `predictions` (when given) as {"arm": label, "prompt", "generated", "prediction", "answers",
    "correct"}; `item_scores` (when given) receives every metric's score per item (for paired intervals)."""
    log(settings, f"evaluating {label} on {len(items)} {settings.task} examples ...")
    want_items = predictions is not None or item_scores is not None
    if settings.task == "truthfulqa":
        kw = {"return_items": True} if item_scores is not None else {}
    else:
        kw = {"return_predictions": True} if want_items else {}
    metrics = evaluate(settings.task, model, tokenizer, items, batch_size=settings.eval_batch_size,
                       progress=not settings.quiet, **kw)
    per_item = metrics.pop("items", None)
    records = metrics.pop("predictions", [])
    if predictions is not None:
        predictions.extend({"arm": label, **record} for record in records)
    if item_scores is not None:
        if per_item is not None:
            item_scores.update({m: [float(r[m]) for r in per_item] for m in metrics})
        else:
            item_scores["accuracy"] = [float(r["correct"]) for r in records]
    return {k: float(v) for k, v in metrics.items()}


def paired_intervals(item_scores: Dict[str, Dict[str, List[float]]], samples: int = 10000) -> dict:
    """{"lofit - base (metric)": paired bootstrap of the per-item difference, ...}, against base and random
    heads, for the arms whose per-item scores are there."""
    out = {}
    for other in ("base", "random"):
        if "lofit" not in item_scores or other not in item_scores:
            continue
        for metric, ours in item_scores["lofit"].items():
            theirs = item_scores[other].get(metric)
            if theirs is not None and len(theirs) == len(ours) and ours:
                out[f"lofit - {other} ({metric})"] = paired_bootstrap(ours, theirs, samples=samples)
    return out


def train_kw(settings) -> dict:
    """The keywords of `select_heads` / `tune` (and through them `lofit_fast.train.train`) that the settings
    give."""
    return dict(
        batch_size=settings.batch_size, epochs=settings.epochs, init_std=settings.init_std, seed=settings.seed,
        backend=settings.backend, beta=settings.beta, max_grad_norm=settings.max_grad_norm or None,
        max_length=settings.max_length, progress=not settings.quiet, grad_accum=getattr(settings, "grad_accum", 1),
        mixed_precision=getattr(settings, "mixed_precision", "no"), schedule=settings.schedule,
        add_eos=settings.add_eos, **({"fsdp": True} if getattr(settings, "fsdp", False) else {}),
    )


def select(settings, model, tokenizer, train_items, **extra) -> HeadSelection:
    """LoFiT step 1 with the settings' task, K, λ and learning rate."""
    k = settings.k or default_k(model)
    return select_heads(model, tokenizer, train_items, task=settings.task, k=k, l1=settings.l1,
                        lr=settings.select_lr, **{**train_kw(settings), **extra})


def tune_heads(settings, model, tokenizer, train_items, heads, desc: str, **extra):
    """LoFiT step 2 on `heads` with the settings' task and learning rate: (patched model, training record)."""
    return tune(model, tokenizer, train_items, heads, task=settings.task, lr=settings.lr, return_history=True,
                desc=desc, **{**train_kw(settings), **extra})


def trainable_count(model) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def selection_file(path: str, seed: Optional[int] = None) -> str:
    """The selection.json that `path` names for a run with `seed`: the file itself; a run folder's
    selection.json; or, in a seeds run folder (`run --seeds`), that seed's seed_<seed>/selection.json, so that
    each seed of a cross-task run takes the heads its own seed selected on the other task."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"selection file not found: {path}")
    per_seed = os.path.join(path, f"seed_{seed}", "selection.json") if seed is not None else None
    if per_seed is not None and os.path.isfile(per_seed):
        return per_seed
    whole = os.path.join(path, "selection.json")
    if os.path.isfile(whole):
        return whole
    seeded = sorted(name for name in os.listdir(path)
                    if name.startswith("seed_") and os.path.isfile(os.path.join(path, name, "selection.json")))
    if seeded:
        raise FileNotFoundError(f"selection folder {path} has no seed_{seed}/selection.json for seed {seed} "
                                f"(it has {', '.join(seeded)})")
    raise FileNotFoundError(f"selection file not found: {path} is a folder with neither selection.json nor "
                            f"seed_<seed>/selection.json")


def load_selection(path: str, model, seed: Optional[int] = None) -> HeadSelection:
    """A selection.json from another run (e.g. another task: cross-task head sets), checked against the model.
    `path` may be a run folder or a seeds run folder (`selection_file`)."""
    path = selection_file(path, seed)
    selection = HeadSelection.load(path)
    selection.check_model(model)
    return selection


def previous_selection(path: str, settings, model, train_examples: int) -> Optional[HeadSelection]:
    """The earlier selection.json of a run folder when step 1 ran with the same settings on the same data."""
    if not os.path.isfile(path):
        return None
    try:
        selection = HeadSelection.load(path)
        selection.check_model(model)
    except (OSError, ValueError):
        return None
    meta = selection.meta
    wanted = {"task": settings.task, "l1": settings.l1, "lr": settings.select_lr, "epochs": settings.epochs,
              "batch_size": settings.batch_size, "init_std": settings.init_std, "seed": settings.seed,
              "max_grad_norm": settings.max_grad_norm or None,
              "recipe": {k: getattr(settings, k) for k in ("schedule", "add_eos", "prompt_style")}}
    same = all(meta.get(key) == value for key, value in wanted.items())
    same = same and meta.get("train_examples") == train_examples and meta.get("model") == settings.model
    return selection if same else None


def sibling_seed_base(out: str, info: dict) -> Optional[Tuple[str, dict, Optional[dict]]]:
    """(path, metrics, per-item scores) of the base model from another seed's results.json beside `out` (a
    seed_<seed>/ folder of a seeds run) that has the same settings and data but for the seed: the base model is
    deterministic, so seeds run as separate processes into one folder evaluate it once between them."""
    parent, name = os.path.split(os.path.normpath(out))
    if folder_seed(name) is None or not os.path.isdir(parent):
        return None
    for other in sorted(os.listdir(parent)):
        path = os.path.join(parent, other, "results.json")
        if other == name or folder_seed(other) is None or not os.path.isfile(path):
            continue
        as_other = {**info, "hyperparameters": {**info["hyperparameters"], "seed": folder_seed(other)}}
        found = previous_results(path, as_other)
        if "base" in found:
            return path, found["base"], found.get("item_scores", {}).get("base")
    return None


def run_experiment(settings, train_items: Sequence, eval_items: Sequence, *, model=None, tokenizer=None,
                   known_base: Optional[Tuple[Dict[str, float], Optional[Dict[str, List[float]]]]] = None) -> dict:
    """Base, LoFiT and random heads (same K) on one task; writes results.json, selection.json, heads.png and
    the LoFiT adapter to `settings.out` and returns the results. `settings`: a RunSettings (or any object
    with its fields, e.g. the CLI's argparse namespace). `known_base`: (metrics, per-item scores) of the base
    model on these evaluation items, already measured (the base model is deterministic): not evaluated again.
    With `settings.resume` the base metrics also come from another seed's folder beside `settings.out` when that
    seed ran with the same settings and data (`sibling_seed_base`)."""
    settings = RunSettings.of(settings)
    train_items = with_prompt_style(train_items, settings.prompt_style)
    eval_items = with_prompt_style(eval_items, settings.prompt_style)
    start = time.perf_counter()
    out = settings.out
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.json")
    selection_path = os.path.join(out, "selection.json")
    if model is None:
        model, tokenizer = load_model_for(settings)
    k = settings.k or default_k(model)
    total = sum(site.num_heads for site in find_attention_sites(model))
    if k > total:
        raise ValueError(f"--k {k}: the model has only {total} heads")
    hyper = {**hyperparameters(settings), "task": settings.task, "model": settings.model, "k": k}
    seconds: Dict[str, float] = {}
    results: Dict[str, object] = {"task": settings.task, "model": settings.model, "k": k}
    info = {
        "train_examples": len(train_items),
        "eval_examples": len(eval_items),
        "eval_split": splits(settings.task)[1],
        "device": str(next(model.parameters()).device),
        "hyperparameters": hyper,
        "seconds_by_stage": seconds,
        "train_loss": {},
        "paired": {},
    }
    item_scores: Dict[str, Dict[str, List[float]]] = {}  # arm -> metric -> score per evaluation item
    info["item_scores"] = item_scores
    resume = settings.resume
    previous = previous_results(results_path, info) if resume else {}
    checkpoints = os.path.join(out, "checkpoints")
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)

    def stage_checkpoints(stage: str) -> dict:
        every = getattr(settings, "checkpoint_every", 0) or 0
        return {"checkpoint_dir": os.path.join(checkpoints, stage), "checkpoint_every": every} if every else {}
    # generations with their gold answers, every arm (predictions.jsonl)
    predictions: list = read_predictions(out, {"the base model"} if "base" in previous else set()) if resume else []

    def checkpoint(**fields):
        """results.json grows after every stage, so a long run shows its progress and keeps what it has."""
        results.update(fields)
        results["seconds"] = round(time.perf_counter() - start, 1)
        merged = {**results, **info}
        write_json(results_path, {**{key: merged[key] for key in RESULT_KEYS if key in merged}, **merged})

    if resume and known_base is None and "base" not in previous:
        sibling = sibling_seed_base(out, info)
        if sibling is not None:
            log(settings, f"resuming: base model metrics from another seed of this run, {sibling[0]}")
            known_base = sibling[1:]
    if "base" in previous:
        log(settings, f"resuming: base model metrics from {results_path}")
        base = previous["base"]
        seconds["eval_base"] = previous["seconds_by_stage"].get("eval_base", 0.0)
        if "base" in previous.get("item_scores", {}):
            item_scores["base"] = previous["item_scores"]["base"]
    elif known_base is not None:
        base = dict(known_base[0])
        seconds["eval_base"] = 0.0
        if known_base[1] is not None:
            item_scores["base"] = known_base[1]
    else:
        t = time.perf_counter()
        item_scores["base"] = {}
        base = evaluate_arm(settings, model, tokenizer, eval_items, "the base model", predictions, item_scores["base"])
        seconds["eval_base"] = round(time.perf_counter() - t, 1)
        write_predictions(out, predictions)
    checkpoint(base=base)

    given = settings.selection
    selection = previous_selection(selection_path, settings, model, len(train_items)) if resume and not given else None
    if given:
        given = selection_file(given, settings.seed)
        selection = load_selection(given, model)
        source = selection.meta.get("task", "?")
        log(settings, f"head selection from {given} (selected on {source}); step 1 skipped")
        info["selection_from"] = {"path": os.path.abspath(given), "task": source}
        selection.k = k
    elif selection is not None:
        log(settings, f"resuming: head selection from {selection_path}")
        seconds["select"] = selection.meta.get("seconds", 0.0)
        selection.k = k
    else:
        t = time.perf_counter()
        log(settings, f"LoFiT step 1: selecting heads on {len(train_items)} {settings.task} examples ...")
        selection = select(settings, model, tokenizer, train_items, **stage_checkpoints("select"))
        selection.meta["model"] = settings.model
        selection.meta["recipe"] = {k: getattr(settings, k) for k in ("schedule", "add_eos", "prompt_style")}
        seconds["select"] = round(time.perf_counter() - t, 1)
        selection.save(selection_path)
        info["train_loss"]["select"] = selection.meta.get("final_loss")
    heads = selection.top(k)
    plot_head_scores(selection, os.path.join(out, "heads.png"))
    checkpoint(heads=[[layer, head] for layer, head in heads])
    adapter_dir = os.path.join(out, "adapter")

    def step2(name: str, heads, reuse: bool, announce: str, label: str, stages) -> Tuple[Dict[str, float], int]:
        """Step 2 on `heads` and its evaluation, or the earlier run's numbers when `reuse`."""
        if reuse:
            log(settings, f"resuming: {label} metrics from {results_path}")
            for stage in stages:
                seconds[stage] = previous["seconds_by_stage"].get(stage, 0.0)
            info["train_loss"][name] = previous.get("train_loss", {}).get(name)
            if name in previous.get("item_scores", {}):
                item_scores[name] = previous["item_scores"][name]
            return previous[name], previous["trainable_params"]
        t = time.perf_counter()
        log(settings, announce)
        tuned, record = tune_heads(settings, model, tokenizer, train_items, heads, f"{label}: tune v",
                                   **stage_checkpoints(stages[0]))
        seconds[stages[0]] = round(time.perf_counter() - t, 1)
        info["train_loss"][name] = record["epoch_loss"]
        if name == "lofit":
            save_adapter(tuned, adapter_dir, selection=selection, method="lofit", hyperparameters=hyper)
        else:
            save_adapter(tuned, os.path.join(out, "random_adapter"), method="lofit-random-heads",
                         hyperparameters=hyper)
        t = time.perf_counter()
        item_scores[name] = {}
        metrics = evaluate_arm(settings, tuned, tokenizer, eval_items, label, predictions, item_scores[name])
        seconds[stages[1]] = round(time.perf_counter() - t, 1)
        write_predictions(out, predictions)
        trainable = trainable_count(tuned)
        unpatch(tuned)
        return metrics, trainable

    reuse = "lofit" in previous and previous.get("heads") == results["heads"] and os.path.isdir(adapter_dir)
    lofit, trainable = step2("lofit", heads, reuse, f"LoFiT step 2: tuning v on the top {k} heads ...", "LoFiT",
                             ("tune", "eval_lofit"))
    checkpoint(trainable_params=trainable, lofit=lofit)

    rand_heads = random_heads(model, k, seed=settings.seed)
    info["random_heads"] = [[layer, head] for layer, head in rand_heads]
    reuse = "random" in previous and previous.get("random_heads") == info["random_heads"]
    rand, _ = step2("random", rand_heads, reuse, f"baseline: tuning v on {k} random heads {rand_heads} ...",
                    "random heads", ("tune_random", "eval_random"))
    info["paired"] = paired_intervals(item_scores)
    checkpoint(random=rand)
    if any(isinstance(v, list) and v for v in info["train_loss"].values()):
        plot_losses(info["train_loss"], os.path.join(out, "losses.png"), title=f"LoFiT training loss ({settings.task})")
    shutil.rmtree(checkpoints, ignore_errors=True)
    merged = {**results, **info}
    return {**{key: merged[key] for key in RESULT_KEYS}, **merged}
