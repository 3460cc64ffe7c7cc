"""Many adapters in one patched model: per-layer tables A, v [n_adapters, K_union, d] and per-row adapter ids.

`MultiHeadInterventionLinear` replaces `o_proj` like `HeadInterventionLinear` (it is one, for `patched_modules`,
`disabled`, `unpatch`), with the union of the heads its adapters touch and one table row per adapter (a head an
adapter does not touch is identity in its row: A = 0, v = 0). Which row each batch row uses comes from the
model's `AdapterRouter`, shared by every patched layer:

- `model(**batch, adapter_names=[...])`: a forward pre-hook on the model pops `adapter_names` (one name per
  batch row, "__base__" for none, or integer ids / an int64 tensor of ids, -1 for none), checks them before any
  compute, and a forward hook clears them after the call (also when it raises);
- `model.generate(**batch, adapter_names=[...])`: the same for the whole generation (every decode step);
- without names, every row uses the router's default (`lofit_fast.set_adapter`).

Under torch.compile pass an int64 tensor of ids (`lofit_fast.adapter_ids(model, names)`): it is a graph input, so
changing the ids does not recompile (a list of names is a Python constant the compiled graph is guarded on).
The loading and managing functions are in lofit_fast/adapter/multi.py.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import head_affine_linear
from .module import HeadInterventionLinear

BASE_NAME = "__base__"
ROUTER_ATTR = "_lofit_adapter_router"
AdapterNames = Union[Sequence[Union[str, int]], torch.Tensor]


class AdapterRouter:
    """The adapter names of a multi-adapter model and the per-row ids of the call in progress."""

    def __init__(self, names: Sequence[str], default: int = 0):
        self.names: List[str] = list(names)
        self.default: int = default  # -1 = no adapter
        self.ids: Optional[torch.Tensor] = None  # [B] int64 while a call with adapter_names runs
        self.uniform: Optional[int] = None  # the one id of every row of that call, when known without a sync
        self.set_by_forward = False
        self.handles: list = []
        self.touched: Dict[str, Dict[int, List[int]]] = {}  # name -> {layer: the heads that adapter touches}

    def index(self, name: Union[str, int]) -> int:
        if isinstance(name, bool):
            raise TypeError(f"adapter ids must be names or integers, got the boolean {name!r}")
        if isinstance(name, int):
            if not -1 <= name < len(self.names):
                raise ValueError(f"adapter id {name} out of range: {len(self.names)} adapters loaded "
                                 f"(ids 0..{len(self.names) - 1}, -1 = none) {self.names}")
            return name
        if not isinstance(name, str):
            raise TypeError(f"adapter names must be str or int, got {type(name).__name__} ({name!r})")
        if name == BASE_NAME:
            return -1
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown adapter {name!r}: loaded adapters are {self.names} (or {BASE_NAME!r} for "
                             "none)") from None

    def resolve(self, names: AdapterNames, device: torch.device, batch: Optional[int]):
        """(ids int64 [B] on device, the common id when every row has the same one and that is known, else None)."""
        if isinstance(names, torch.Tensor):
            if names.dtype != torch.int64 or names.dim() != 1:
                raise TypeError(f"adapter_names as a tensor must be 1-D int64 ids, got {names.dim()}-D {names.dtype}")
            if batch is not None and names.shape[0] != batch:
                raise ValueError(f"adapter_names has {names.shape[0]} entries but the batch has {batch} rows")
            if names.device.type == "cpu" and names.numel() and not torch.compiler.is_compiling():
                lo, hi = int(names.min()), int(names.max())
                if lo < -1 or hi >= len(self.names):
                    raise ValueError(f"adapter id {lo if lo < -1 else hi} out of range: {len(self.names)} adapters "
                                     f"loaded (ids 0..{len(self.names) - 1}, -1 = none) {self.names}")
            return names.to(device), None
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError("adapter_names must be a list with one adapter name (or id) per batch row, or an int64 "
                            f"tensor of ids; got {type(names).__name__}")
        if batch is not None and len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows")
        ids = [self.index(n) for n in names]
        uniform = ids[0] if ids and all(i == ids[0] for i in ids) else None
        return torch.tensor(ids, dtype=torch.int64, device=device), uniform

    def current(self):
        """(ids or None, the common id or None): what the patched layers use for this call."""
        if self.ids is None:
            return None, self.default
        return self.ids, self.uniform

    def set(self, ids: torch.Tensor, uniform: Optional[int]) -> None:
        self.ids, self.uniform = ids, uniform

    def clear(self) -> None:
        self.ids, self.uniform, self.set_by_forward = None, None, False


def rows_for(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row ids [B] broadcast to x's rows x.shape[:-1]. A batch that generation expanded by repeating each row
    k times (beams, num_return_sequences) gets each id repeated k times."""
    B = x.shape[0]
    if ids.shape[0] != B:
        if ids.shape[0] == 0 or B % ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} adapter ids for a batch of {B} rows")
        ids = ids.repeat_interleave(B // ids.shape[0])
    return ids.view(B, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


class MultiHeadInterventionLinear(HeadInterventionLinear):
    """o_proj with per-adapter tables: `A_table`, `v_table` nn.Parameter [n_adapters, K, head_dim] (or None),
    `heads` the union of the adapters' heads; the router (shared by the model's layers) says which row each batch
    row uses. `A` / `v` (what single-adapter code reads) exist only while one adapter is loaded."""

    def __init__(self, base: nn.Linear, heads: torch.Tensor, head_dim: int, A_table: Optional[torch.Tensor],
                 v_table: Optional[torch.Tensor], router: AdapterRouter, backend: str = "auto",
                 layer_idx: Optional[int] = None):
        nn.Module.__init__(self)
        self._wrap(base, heads, head_dim, backend, layer_idx)
        self.A_table = None if A_table is None else nn.Parameter(A_table)
        self.v_table = None if v_table is None else nn.Parameter(v_table)
        self.register_buffer("w_sel", None, persistent=False)
        self.__dict__["router"] = router  # shared, not a submodule

    @property
    def n_adapters(self) -> int:
        t = self.A_table if self.A_table is not None else self.v_table
        return 0 if t is None else t.shape[0]

    def _single(self, name: str):
        table = getattr(self, f"{name}_table")
        if self.n_adapters != 1:
            raise RuntimeError(
                f"layer {self.layer_idx} holds {self.n_adapters} adapters {self.router.names} in per-row tables "
                f"({name}_table [{self.n_adapters}, K, d]), so there is no single {name}: merging, saving or exporting "
                "works on one adapter (delete the others with lofit_fast.delete_adapter, or load the one you want "
                "with lofit_fast.load_adapter into an unpatched model)")
        return None if table is None else table[0]

    @property
    def A(self):
        return self._single("A")

    @property
    def v(self):
        return self._single("v")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.heads.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        ids, uniform = self.router.current()
        if uniform is not None:
            if uniform < 0:
                return F.linear(x, self.weight, self.bias)
            A = None if self.A_table is None else self.A_table[uniform]
            v = None if self.v_table is None else self.v_table[uniform]
            return head_affine_linear(x, self.weight, self.bias, self.heads, A, v, self.head_dim, self.backend,
                                      validate=False)
        return head_affine_linear(x, self.weight, self.bias, self.heads, self.A_table, self.v_table, self.head_dim,
                                  self.backend, validate=False, row_ids=rows_for(ids, x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layer={self.layer_idx}, heads={self.head_list}, head_dim={self.head_dim}, "
                f"adapters={self.router.names}, scale={self.A_table is not None}, offset={self.v_table is not None}, "
                f"backend={self.backend!r}")


def get_router(model: nn.Module) -> Optional[AdapterRouter]:
    return model.__dict__.get(ROUTER_ATTR)


def _batch_size(args, kwargs) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pre_hook(router: AdapterRouter, module, args, kwargs):
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is not None:
        ids, uniform = router.resolve(names, _device(module), _batch_size(args, kwargs))
        router.set(ids, uniform)
        router.set_by_forward = True
    return args, kwargs


def _post_hook(router: AdapterRouter, module, args, kwargs, output):
    if router.set_by_forward:
        router.clear()
    return None


def _generate(router: AdapterRouter, original, *args, adapter_names: Optional[AdapterNames] = None, **kwargs):
    if adapter_names is None:
        return original(*args, **kwargs)
    if router.ids is not None:
        raise RuntimeError("generate with adapter_names was called while another call with adapter_names is running")
    ids, uniform = router.resolve(adapter_names, _device(original.__self__), _batch_size(args, kwargs))
    router.set(ids, uniform)
    try:
        return original(*args, **kwargs)
    finally:
        router.clear()


def install_router(model: nn.Module, router: AdapterRouter) -> None:
    """The hooks that carry `adapter_names` from model(...) / model.generate(...) to the layers."""
    if get_router(model) is not None:
        raise RuntimeError("the model already has an adapter router")
    router.handles = [
        model.register_forward_pre_hook(functools.partial(_pre_hook, router), with_kwargs=True),
        model.register_forward_hook(functools.partial(_post_hook, router), with_kwargs=True, always_call=True),
    ]
    original = getattr(model, "generate", None)
    if callable(original):
        wrapped = functools.wraps(original)(functools.partial(_generate, router, original))
        model.__dict__["generate"] = wrapped
        router.handles.append("generate")
    model.__dict__[ROUTER_ATTR] = router


def remove_router(model: nn.Module) -> None:
    router = get_router(model)
    if router is None:
        return
    for h in router.handles:
        if h == "generate":
            model.__dict__.pop("generate", None)
        else:
            h.remove()
    router.handles = []
    router.clear()
    del model.__dict__[ROUTER_ATTR]


def multi_modules(model_mods: Dict[int, HeadInterventionLinear]) -> Dict[int, MultiHeadInterventionLinear]:
    return {layer: m for layer, m in model_mods.items() if isinstance(m, MultiHeadInterventionLinear)}
