"""Turning a set of interventions off for a block and restoring each one's state afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator


@contextlib.contextmanager
def switched_off(modules: Iterable) -> Iterator[None]:
    """Set `.enabled = False` on every module inside the block; put each one's previous value back after."""
    mods = list(modules)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(mods, before):
            m.enabled = state
