"""JSON that names what cannot be serialized (atomic writes live in lofit_fast._files)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and numpy scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def to_json_bytes(config: Dict[str, Any]) -> bytes:
    """Indented, strict JSON (no NaN/inf); each top-level field is checked so an error names the field."""
    for key, value in config.items():
        try:
            json.dumps(value, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"adapter config field {key!r} cannot be written as JSON: {exc}") from exc
    return (json.dumps(config, default=_json_default, allow_nan=False, indent=2) + "\n").encode("utf-8")
