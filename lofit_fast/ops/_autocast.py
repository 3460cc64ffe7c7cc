"""Autocast off while a backend runs: shared by the op's forward and backward (single-table and per-row)."""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_off(t: torch.Tensor):
    """Autocast off for t's device type while the backends run (a no-op context when it is off already)."""
    dev = t.device.type
    if dev in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
