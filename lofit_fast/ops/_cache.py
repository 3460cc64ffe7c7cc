"""Caches of values derived from parameters: built once per parameter version instead of once per call.

A patched o_proj calls the op with the same weight, bias, heads and (between optimizer steps, and always at
inference) the same A and v on every forward. Whatever depends only on those tensors (the head -> slot table,
the selected columns W_S of the weight, the folded bias b + v W_Sᵀ) can be built once and reused while none of
them changes. `DerivedCache` keys an entry on its source tensors and validates it on every lookup:

- identity: `id()` of each source, checked against a weak reference (an id can be reused after a free);
- content: each source's `_version` (bumped by every in-place op, including optimizer steps under no_grad)
  and `data_ptr()` (a `.data = ...` swap or `set_()` moves it);
- lifetime: an entry is dropped as soon as any of its sources is freed (weakref callbacks), so the cache never
  keeps memory alive beyond the tensors it derives from.

Nothing is cached, and the value is simply built, when the lookup cannot be made safe:

- inference tensors (`torch.inference_mode()`) have no version counter;
- tensor subclasses (FakeTensor, FunctionalTensor, ...) and torch.compile / jit tracing: a cached real tensor
  must not leak into a traced graph, and a traced build must not be cached;
- CUDA-graph capture on the current stream: a value built during capture lives in the graph's private pool and
  only holds data after replay, and a cached value used by a captured graph could be freed (invalidated) while
  the graph still reads it.

Caveat: an in-place change through `tensor.data` (`p.data.copy_(...)`) does not bump `p._version` (`.data` has
its own version counter), so it is not seen; update parameters with `with torch.no_grad(): p.copy_(...)`, as
torch.optim does, or call `clear()`.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tracing() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover (older torch)
        pass
    return bool(torch.jit.is_tracing())


def cacheable(sources: Sequence[Optional[torch.Tensor]], companions: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether values derived from `sources` (None entries allowed) may be cached and reused here and now.

    `companions` are the call's other tensors (x, dy): they are not part of any key, so they may be inference
    tensors (decode under torch.inference_mode() still caches), but a tensor subclass among them (a FakeTensor
    during tracing) turns caching off."""
    if _tracing():
        return False
    on_cuda = False
    for t in sources:
        if t is None:
            continue
        if type(t) not in _PLAIN_TYPES or t.is_inference():
            return False
        on_cuda = on_cuda or t.is_cuda
    for t in companions:
        if t is not None and type(t) not in _PLAIN_TYPES:
            return False
    if on_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def build_detached(fn: Callable[..., Any], *args) -> Any:
    """fn(*args) with autograd off and outside inference mode: a cached value is a plain tensor, usable in any
    later mode, and records no graph (v may require grad)."""
    with torch.inference_mode(False), torch.no_grad():
        return fn(*args)


class _Entry:
    __slots__ = ("refs", "stamp", "value", "__weakref__")

    def __init__(self, refs, stamp, value):
        self.refs = refs
        self.stamp = stamp
        self.value = value


def _stamp(sources: Sequence[Optional[torch.Tensor]]) -> Tuple:
    return tuple(None if t is None else (t._version, t.data_ptr()) for t in sources)


class DerivedCache:
    """Values derived from a few source tensors (see the module docstring).

    get(sources, extra, build) returns build() the first time and the same object afterwards while every source
    tensor is alive and unchanged; `extra` is any hashable part of the key that is not a tensor (head_dim, H)."""

    def __init__(self, name: str = ""):
        self.name = name
        self._entries: Dict[Hashable, _Entry] = {}
        self.hits = 0
        self.misses = 0  # builds that were cached
        self.uncached = 0  # builds that could not be cached (see cacheable)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, sources: Sequence[Optional[torch.Tensor]], extra: Hashable, build: Callable[[], Any]) -> Any:
        if not cacheable(sources):
            self.uncached += 1
            return build()
        key = (tuple(None if t is None else id(t) for t in sources), extra)
        stamp = _stamp(sources)
        entry = self._entries.get(key)
        if entry is not None and entry.stamp == stamp and all(
            (r is None) if t is None else (r is not None and r() is t) for r, t in zip(entry.refs, sources)
        ):
            self.hits += 1
            return entry.value
        value = build()
        self.misses += 1
        self._store(key, sources, stamp, value)
        return value

    def _store(self, key, sources, stamp, value) -> None:
        entries = self._entries
        holder = _Entry(None, stamp, value)
        token = weakref.ref(holder)

        def drop(_ref, key=key, token=token):
            # Only the entry that registered this callback: a newer entry under the same key stays.
            current = entries.get(key)
            if current is not None and current is token():
                del entries[key]

        holder.refs = tuple(None if t is None else weakref.ref(t, drop) for t in sources)
        entries[key] = holder
