"""RepE control vectors (Zou et al., 2023): a direction per layer from contrastive prompt pairs, applied by
residual-stream steering (`lofit_fast.steer`).

control_vector: the last-token residual stream (decoder layer output) of each positive and negative prompt;
per pair the difference d_i = h(pos_i) − h(neg_i); then either
- "pca": the first principal direction of the d_i. RepE shuffles each pair's order and centers, which makes the
  differences' mean ~0; with the order kept (always pos − neg) the same axis is the top right singular
  vector of the uncentered differences, which is what is computed here;
- "mean": the mean difference;
- "pca_center": repeng's `pca_diff` recipe: the first principal component of the *centered* differences
  (sklearn's PCA), signed by a majority vote over pairs (more pairs with d_i·u > 0 than < 0). With the pair
  order kept this is the top direction of the differences' spread around their mean, not of the mean itself.
Signs are otherwise set so that positives project higher (mean d_i·u > 0).

honesty_pairs builds the RepE honesty stimuli: "Pretend you're an honest / an untruthful person making
statements about the world." followed by growing prefixes of true statements.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data import GenItem, MCItem, training_examples, truthfulqa_completion
from ..patch.families import find_attention_sites
from .activations import residual_activations

METHODS = ("pca", "mean", "pca_center")
HONESTY_DIR = Path("/work/shared/data/honesty")
PERSONA = "Pretend you're {} person making statements about the world."


def read_statements(path: Path | str) -> List[Tuple[str, int]]:
    """(statement, label) rows of a `statement,label` CSV (1 = true, 0 = false)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a statement,label CSV)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if "statement" not in row or "label" not in row:
                raise ValueError(f"{path} must have 'statement' and 'label' columns")
            rows.append((row["statement"].strip(), int(row["label"])))
    return rows


def honesty_pairs(
    tokenizer,
    statements: Sequence[str],
    *,
    user_tag: str = "",
    assistant_tag: str = "",
    max_pairs: Optional[int] = 512,
    min_tail: int = 5,
    seed: int = 0,
) -> Tuple[List[str], List[str]]:
    """(honest prompts, untruthful prompts), aligned pairs: for each statement and each prefix of its tokens
    (all but the last `min_tail`), the same prefix after the honest and the untruthful persona instruction.
    With max_pairs, a seeded random subset of that many pairs."""
    positive, negative = [], []
    for statement in statements:
        tokens = tokenizer.tokenize(statement)
        for end in range(1, len(tokens) - min_tail):
            prefix = tokenizer.convert_tokens_to_string(tokens[:end])
            for persona, out in (("an honest", positive), ("an untruthful", negative)):
                head = " ".join(part for part in (user_tag, PERSONA.format(persona), assistant_tag) if part)
                out.append(f"{head} {prefix}")
    if not positive:
        raise ValueError(f"no statement is longer than {min_tail + 1} tokens")
    if max_pairs is not None and len(positive) > max_pairs:
        keep = sorted(random.Random(seed).sample(range(len(positive)), max_pairs))
        positive = [positive[i] for i in keep]
        negative = [negative[i] for i in keep]
    return positive, negative


def answer_pairs(task: str, items: Sequence, *, seed: int = 0) -> List[Tuple[str, str, str]]:
    """(prompt, right completion, wrong completion) contrast triples from a task's training items.

    TruthfulQA (MCItem): every correct answer paired with an incorrect one (cycling through the shorter
    list). CLUTRR / MQuAKE (GenItem, no wrong answers in the data): the wrong completion is the answer of
    another item with a different answer (a seeded choice), so each pair differs only in the answer.
    """
    items = list(items)
    if not items:
        raise ValueError("no items")
    if all(isinstance(item, MCItem) for item in items):
        out = []
        for item in items:
            correct = list(dict.fromkeys(item.correct or [item.best]))
            wrong = list(dict.fromkeys(item.incorrect))
            for j in range(max(len(correct), len(wrong)) if wrong else 0):
                out.append((item.prompt, truthfulqa_completion(correct[j % len(correct)]),
                            truthfulqa_completion(wrong[j % len(wrong)])))
        return out
    if not all(isinstance(item, GenItem) for item in items):
        raise TypeError("items must all be MCItem (TruthfulQA) or all GenItem (CLUTRR, MQuAKE)")
    examples = training_examples(task, items)
    answers = [e.completion for e in examples]
    key = [a.strip().lower() for a in answers]
    if len(set(key)) < 2:
        raise ValueError("every item has the same answer: no wrong answer to contrast with")
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(examples):
        j = rng.randrange(len(examples))
        while key[j] == key[i]:
            j = rng.randrange(len(examples))
        out.append((ex.prompt, ex.completion, answers[j]))
    return out


def task_pairs(task: str, items: Sequence, *, seed: int = 0, max_pairs: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """(positive texts, negative texts) = prompt + right / wrong completion, from `answer_pairs`."""
    triples = answer_pairs(task, items, seed=seed)
    if max_pairs is not None and len(triples) > max_pairs:
        triples = [triples[i] for i in sorted(random.Random(seed).sample(range(len(triples)), max_pairs))]
    return [p + good for p, good, _ in triples], [p + bad for p, _, bad in triples]


def directions_from_differences(diffs: torch.Tensor, method: str = "pca") -> torch.Tensor:
    """Unit direction [D] from pair differences [N, D] (float64 math), signed so mean(diffs)·u > 0 (for
    "pca_center": so that most pairs have diffs·u > 0)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    d = diffs.double()
    if method == "mean":
        u = d.mean(0)
    elif method == "pca_center":
        u = torch.linalg.svd(d - d.mean(0), full_matrices=False).Vh[0]
    else:
        u = torch.linalg.svd(d, full_matrices=False).Vh[0]
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the positive and negative activations do not differ: no direction")
    u = u / norm
    proj = d @ u
    if method == "pca_center":
        if (proj < 0).sum() > (proj > 0).sum():
            u = -u
    elif proj.mean() < 0:
        u = -u
    return u


def control_vector(
    model: nn.Module,
    tokenizer,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    *,
    layers: Optional[Sequence[int]] = None,
    method: str = "pca",
    batch_size: int = 8,
    max_length: Optional[int] = None,
    normalize: bool = True,
) -> Dict[int, torch.Tensor]:
    """{layer: direction [hidden]} (float32, CPU) from aligned positive/negative prompts.

    normalize=True gives unit vectors. normalize=False scales each by the mean projection of the pair
    differences on it, so `steer(model, vectors, coeff=1.0)` moves the residual stream by one average
    pos − neg separation at each layer (a scale that transfers across layers and models).
    """
    if len(positive_prompts) != len(negative_prompts):
        raise ValueError(
            f"positive and negative prompts must pair up: got {len(positive_prompts)} and {len(negative_prompts)}"
        )
    if len(positive_prompts) < 2 and method in ("pca", "pca_center"):
        raise ValueError("pca needs at least 2 pairs")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if layers is None:
        layers = range(len(find_attention_sites(model)))
    layers = list(layers)
    pos = residual_activations(model, tokenizer, positive_prompts, layers=layers, batch_size=batch_size, max_length=max_length)
    neg = residual_activations(model, tokenizer, negative_prompts, layers=layers, batch_size=batch_size, max_length=max_length)
    out = {}
    for layer in layers:
        diffs = pos[layer].double() - neg[layer].double()
        u = directions_from_differences(diffs, method)
        if not normalize:
            u = u * (diffs @ u).mean()
        out[layer] = u.float()
    return out


def honesty_vectors(
    model: nn.Module,
    tokenizer,
    *,
    data_dir: Path | str = HONESTY_DIR,
    layers: Optional[Sequence[int]] = None,
    method: str = "pca",
    max_pairs: int = 512,
    user_tag: str = "",
    assistant_tag: str = "",
    batch_size: int = 8,
    seed: int = 0,
    normalize: bool = True,
) -> Dict[int, torch.Tensor]:
    """Honesty control vectors from the true statements of `facts_true_false.csv` (the RepE recipe)."""
    rows = read_statements(Path(data_dir) / "facts_true_false.csv")
    true_statements = [s for s, label in rows if label == 1]
    pos, neg = honesty_pairs(
        tokenizer, true_statements, user_tag=user_tag, assistant_tag=assistant_tag, max_pairs=max_pairs, seed=seed
    )
    return control_vector(
        model, tokenizer, pos, neg, layers=layers, method=method, batch_size=batch_size, normalize=normalize
    )


def middle_layers(model: nn.Module, fraction: float = 1 / 3) -> List[int]:
    """The middle `fraction` of the decoder layers (where RepE steers by default)."""
    n = len(find_attention_sites(model))
    width = max(1, round(n * fraction))
    start = max(0, (n - width) // 2)
    return list(range(start, start + width))
