from __future__ import annotations

import contextlib


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside, the previous train/eval mode restored after (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
