"""Several adapters in one patched model, a different one per batch row (PEFT's mixed-batch convention).

    lofit_fast.load_adapters(model, {"tqa": "runs/tqa/adapter", "clutrr": "runs/clutrr/adapter"})
    model(**batch, adapter_names=["tqa", "clutrr", "__base__", ...])           # one name per row
    model.generate(**batch, adapter_names=["tqa", "clutrr", ...], max_new_tokens=32)
    lofit_fast.add_adapter(model, "mquake", path); lofit_fast.delete_adapter(model, "tqa")
    lofit_fast.set_adapter(model, "clutrr")    # what calls without adapter_names use

Each patched layer holds the union of the heads its adapters touch and tables A, v [n_adapters, K_union, d]
(lofit_fast.patch.multi); the op runs them as per-row tables (lofit_fast.ops.rows). Every adapter is checked
against the model exactly like `load_adapter` before the model changes; on any error the model is as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops import check_backend_name
from ..patch import find_attention_sites, patched_modules, unpatch
from ..patch.multi import (
    BASE_NAME,
    AdapterNames,
    AdapterRouter,
    MultiHeadInterventionLinear,
    get_router,
    install_router,
    remove_router,
)
from .loading import read_adapter
from .schema import PARAM_DTYPES

# One adapter in memory: {layer: (heads, A [K, d] or None, v [K, d] or None)}.
AdapterValues = Dict[int, Tuple[List[int], Optional[torch.Tensor], Optional[torch.Tensor]]]


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    if name == BASE_NAME:
        raise ValueError(f"{BASE_NAME!r} is reserved (it means: no adapter for that row)")
    return name


def _read(model: nn.Module, name: str, path) -> Tuple[AdapterValues, torch.dtype]:
    """One adapter's values, checked against the model like load_adapter (its errors name the file)."""
    config, heads, values = read_adapter(model, path)
    out = {layer: (hs, values["A"].get(layer), values["v"].get(layer)) for layer, hs in heads.items()}
    return out, PARAM_DTYPES[config["param_dtype"]]


def _current(model: nn.Module) -> Tuple[Optional[AdapterRouter], Dict[str, AdapterValues], torch.dtype, str]:
    """(router, {name: values}, table dtype, backend) of a multi-adapter model; (None, {}, float32, "auto") when the
    model is not patched. A model patched with one adapter by `patch` / `load_adapter` is an error."""
    mods = patched_modules(model)
    router = get_router(model)
    if not mods and router is None:
        return None, {}, torch.float32, "auto"
    if router is None or not all(isinstance(m, MultiHeadInterventionLinear) for m in mods.values()):
        raise RuntimeError("the model is already patched with a single intervention (lofit_fast.patch / load_adapter); "
                           "call lofit_fast.unpatch(model) first to load several adapters")
    adapters: Dict[str, AdapterValues] = {}
    dtype, backend = torch.float32, "auto"
    for i, name in enumerate(router.names):
        vals: AdapterValues = {}
        for layer, m in mods.items():
            touched = router.touched[name].get(layer)
            if not touched:
                continue
            pos = torch.tensor([m.head_list.index(h) for h in touched], device=m.heads.device)
            A = None if m.A_table is None else m.A_table.detach()[i].index_select(0, pos).clone()
            v = None if m.v_table is None else m.v_table.detach()[i].index_select(0, pos).clone()
            vals[layer] = (list(touched), A, v)
            dtype = (m.A_table if m.A_table is not None else m.v_table).dtype
            backend = m.backend
        adapters[name] = vals
    return router, adapters, dtype, backend


def _table_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return dtypes[0] if len(set(dtypes)) == 1 else torch.float32


def _build(model: nn.Module, adapters: Dict[str, AdapterValues], dtype: torch.dtype, backend: str,
           default: int) -> Tuple[AdapterRouter, List[Tuple[nn.Module, nn.Module]]]:
    """A new router and the (attention module, new o_proj) replacements for these adapters (the model is not
    changed)."""
    sites = find_attention_sites(model)
    mods = patched_modules(model)
    names = list(adapters)
    router = AdapterRouter(names, default)
    router.touched = {name: {layer: hs for layer, (hs, _, _) in vals.items()} for name, vals in adapters.items()}
    has_A = any(A is not None for vals in adapters.values() for _, A, _ in vals.values())
    has_v = any(v is not None for vals in adapters.values() for _, _, v in vals.values())
    layers = sorted({layer for vals in adapters.values() for layer in vals})
    replacements = []
    for layer in layers:
        site = sites[layer]
        base = mods[layer].base_layer if layer in mods else site.attn.o_proj
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{site.path}.self_attn.o_proj is {type(base).__name__}, expected nn.Linear")
        union = sorted({h for vals in adapters.values() if layer in vals for h in vals[layer][0]})
        slot = {h: k for k, h in enumerate(union)}
        shape = (len(names), len(union), site.head_dim)
        A_t = torch.zeros(shape, dtype=dtype, device=base.weight.device) if has_A else None
        v_t = torch.zeros(shape, dtype=dtype, device=base.weight.device) if has_v else None
        for i, name in enumerate(names):
            if layer not in adapters[name]:
                continue
            hs, A, v = adapters[name][layer]
            pos = torch.tensor([slot[h] for h in hs], device=base.weight.device)
            if A is not None:
                A_t[i].index_copy_(0, pos, A.to(dtype))
            if v is not None:
                v_t[i].index_copy_(0, pos, v.to(dtype))
        new = MultiHeadInterventionLinear(base, torch.tensor(union, dtype=torch.int64), site.head_dim, A_t, v_t,
                                          router, backend, layer)
        replacements.append((site.attn, new))
    return router, replacements


def _swap(model: nn.Module, router: AdapterRouter, replacements) -> None:
    """Put the new modules and router in place, all or nothing (layers no adapter touches any more get their
    original o_proj back)."""
    sites = find_attention_sites(model)
    old_mods = patched_modules(model)
    old_router = get_router(model)
    new_layers = {new.layer_idx for _, new in replacements}
    before = [(s.attn, s.attn.o_proj) for s in sites]
    try:
        for layer, m in old_mods.items():
            if layer not in new_layers:
                sites[layer].attn.o_proj = m.base_layer
        for attn, new in replacements:
            attn.o_proj = new
        if old_router is not None:
            remove_router(model)
        install_router(model, router)
    except BaseException:
        for attn, old in before:
            attn.o_proj = old
        if get_router(model) is not router and get_router(model) is not old_router:
            remove_router(model)
        if old_router is not None and get_router(model) is None:
            install_router(model, old_router)
        raise


def load_adapters(model: nn.Module, adapters: Mapping[str, Union[str, Path]], *, backend: str = "auto",
                  default: Optional[str] = None) -> nn.Module:
    """Load several adapters written by `save_adapter` (LoFiT, ITI, ...) into one unpatched model; returns it.

    adapters: {name: adapter directory}, in the order that gives the integer ids 0, 1, ... Each layer holds the
    union of the heads the adapters touch and tables A, v [n_adapters, K_union, d] (identity where an adapter
    does not touch a head). Every adapter is checked against the model exactly like `load_adapter`, before the
    model changes: a bad adapter in the set leaves the model as it was. default: the adapter for calls without
    `adapter_names` ("__base__" for none; the first adapter when not given), see `set_adapter`.
    Then `model(**batch, adapter_names=[...])` / `model.generate(**batch, adapter_names=[...])` take one adapter
    name (or integer id, -1 / "__base__" for none) per batch row."""
    check_backend_name(backend)
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty {name: path} mapping")
    for name in adapters:
        _check_name(name)
    router, current, _, _ = _current(model)
    if router is not None:
        raise RuntimeError(f"the model already holds adapters {router.names}; add more with lofit_fast.add_adapter, "
                           "or unpatch it first")
    read, dtypes = {}, []
    for name, path in adapters.items():
        read[name], dt = _read(model, name, path)
        dtypes.append(dt)
    names = list(read)
    default_id = 0 if default is None else (-1 if default == BASE_NAME else _index_of(names, default))
    router, replacements = _build(model, read, _table_dtype(dtypes), backend, default_id)
    _swap(model, router, replacements)
    return model


def _index_of(names: List[str], name: str) -> int:
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}: loaded adapters are {names} (or {BASE_NAME!r} for none)")
    return names.index(name)


def add_adapter(model: nn.Module, name: str, path: Union[str, Path], *, backend: Optional[str] = None) -> nn.Module:
    """Add one saved adapter to a model that holds adapters from `load_adapters` (or to an unpatched model); its id
    is the next integer. The tables are rebuilt with the new union of heads (new Parameters: an optimizer holding
    the old ones must be rebuilt). On error the model is as it was."""
    _check_name(name)
    router, current, dtype, have_backend = _current(model)
    if router is None:
        return load_adapters(model, {name: path}, backend=backend or "auto")
    if name in current:
        raise ValueError(f"adapter {name!r} is already loaded ({router.names}); delete it first to replace it")
    if backend is not None:
        check_backend_name(backend)
    values, dt = _read(model, name, path)
    current[name] = values
    new_router, replacements = _build(model, current, _table_dtype([dtype, dt]), backend or have_backend,
                                      router.default)
    _swap(model, new_router, replacements)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove one adapter; the ids of the later ones move down by one. Deleting the last one unpatches the model.
    The default (set_adapter) falls back to the first adapter when it was the deleted one."""
    router, current, dtype, backend = _current(model)
    if router is None:
        raise RuntimeError("the model holds no adapters from lofit_fast.load_adapters")
    if name not in current:
        raise ValueError(f"unknown adapter {name!r}: loaded adapters are {router.names}")
    if len(current) == 1:
        return unpatch(model)
    gone = router.names.index(name)
    del current[name]
    default = router.default
    default = 0 if default == gone else (default - 1 if default > gone else default)
    new_router, replacements = _build(model, current, dtype, backend, default)
    _swap(model, new_router, replacements)
    return model


def set_adapter(model: nn.Module, name: Union[str, int]) -> nn.Module:
    """The adapter that calls without `adapter_names` use for every row: a loaded name or id, or "__base__" / -1
    for none."""
    router = get_router(model)
    if router is None:
        raise RuntimeError("the model holds no adapters from lofit_fast.load_adapters")
    router.default = router.index(name)
    return model


def adapter_names(model: nn.Module) -> List[str]:
    """The loaded adapters in id order (the names `adapter_names=` takes)."""
    router = get_router(model)
    if router is None:
        raise RuntimeError("the model holds no adapters from lofit_fast.load_adapters")
    return list(router.names)


def adapter_ids(model: nn.Module, names: AdapterNames, device=None) -> torch.Tensor:
    """int64 ids [B] for one adapter name (or id; "__base__" = -1) per row: what a torch.compile'd model should get
    as `adapter_names`, so that changing the adapters does not recompile. Unknown names are an error here."""
    router = get_router(model)
    if router is None:
        raise RuntimeError("the model holds no adapters from lofit_fast.load_adapters")
    device = device if device is not None else next(model.parameters()).device
    return router.resolve(names, torch.device(device), None)[0]
