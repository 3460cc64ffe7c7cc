"""Backends of the head-affine linear op, and how `auto` picks one.

A backend is an object with
    name: str
    device_types: frozenset of torch device types it runs on ("cpu", "cuda")
    dtypes: frozenset of the input dtypes it takes (float64 is optional: it serves gradcheck)
    is_available() -> bool
    forward(x, weight, bias, heads, A, v, head_dim) -> y
        x [N, H*d] (2-D, any strides), weight [D_out, H*d], bias [D_out] or None (x's dtype),
        heads int64 [K >= 1] sorted unique on x's device, A / v [K, d] (float32 or x's dtype) or None,
        at least one of A, v given.  Returns y [N, D_out] in x's dtype.
    backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv) -> (dx, dA, dv)
        dy [N, D_out] contiguous; x_sel [N, K*d] the selected heads' columns of x (None unless need_dA);
        A as in forward or None.  dx [N, H*d] in x's dtype, dA / dv [K, d] float32 (float64 for float64
        inputs), each None unless needed.
    auto_priority(x, weight, K) -> float   (optional; higher wins under "auto", default 0)
    forward_rows(x, weight, bias, heads, A, v, row_ids, head_dim) -> y
    backward_rows(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx, need_dA, need_dv)
        the per-row tables of many adapters in one batch (A / v [n_adapters, K, d], row_ids int64 [N], -1 =
        none): the contract is in lofit_fast/ops/rows.py. Every backend here has them.

Backends live in their own modules and are imported on first use, so a missing optional dependency
(triton, a CUDA build of the extension) only removes that backend.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

import torch

_MODULES: Dict[str, str] = {
    "torch": "lofit_fast.ops.torch_backend",
    "cpp": "lofit_fast.ops.cpp_backend",
    "triton": "lofit_fast.ops.triton_backend",
    "cuda": "lofit_fast.ops.cuda_backend",
}
_LOADED: Dict[str, object] = {}
_ERRORS: Dict[str, str] = {}


def backend_names() -> List[str]:
    return list(_MODULES)


def _load(name: str) -> Optional[object]:
    if name in _LOADED:
        return _LOADED[name]
    if name in _ERRORS:
        return None
    try:
        backend = importlib.import_module(_MODULES[name]).BACKEND
        if not backend.is_available():
            raise RuntimeError(getattr(backend, "unavailable_reason", lambda: "not available here")())
    except Exception as exc:  # an optional backend that cannot load is simply absent
        _ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None
    _LOADED[name] = backend
    return backend


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends that work here (for `device`'s type, if given)."""
    dtype = None if device is None else torch.device(device).type
    out = []
    for name in _MODULES:
        b = _load(name)
        if b is not None and (dtype is None or dtype in b.device_types):
            out.append(name)
    return out


def unavailable_reason(name: str) -> str:
    _load(name)
    return _ERRORS.get(name, "")


def get_backend(name: str, x: torch.Tensor, weight: torch.Tensor, K: int):
    """The backend object for `name` ("auto" or a backend name) on x's device; a clear error otherwise."""
    dev = x.device.type
    if name == "auto":
        candidates = [
            b for b in (_load(n) for n in _MODULES)
            if b is not None and dev in b.device_types and x.dtype in b.dtypes
        ]
        if not candidates:
            raise RuntimeError(f"no lofit_fast backend runs on {dev} tensors of dtype {x.dtype}")
        best, best_priority = None, float("-inf")
        for b in candidates:  # a plain loop (not max(key=...)) so torch.compile can trace it
            priority = b.auto_priority(x, weight, K) if hasattr(b, "auto_priority") else 0.0
            if priority > best_priority:
                best, best_priority = b, priority
        return best
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose one of {['auto', *_MODULES]}")
    b = _load(name)
    if b is None:
        raise RuntimeError(f"backend {name!r} is not available here ({_ERRORS.get(name, 'unknown reason')})")
    if dev not in b.device_types:
        raise RuntimeError(f"backend {name!r} does not run on {dev} tensors (it runs on {sorted(b.device_types)})")
    if x.dtype not in b.dtypes:
        raise TypeError(f"backend {name!r} does not take {x.dtype} inputs (it takes {sorted(map(str, b.dtypes))})")
    return b


def check_backend_name(name: str) -> None:
    """Fail early (e.g. at patch time) on a name that is unknown or unavailable here."""
    if name == "auto":
        available_backends()  # load every backend now, outside any compiled region
        return
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose one of {['auto', *_MODULES]}")
    if _load(name) is None:
        raise RuntimeError(f"backend {name!r} is not available here ({_ERRORS.get(name, 'unknown reason')})")
