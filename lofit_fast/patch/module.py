"""HeadInterventionLinear: an `o_proj` replacement that applies (1 + A) ⊙ x_h + v_h to selected heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import head_affine_linear
from ..ops.function import dequantized_columns, is_quantized_weight, quantized_head_affine_linear


class HeadInterventionLinear(nn.Module):
    """Shares `weight` and `bias` with the Linear it replaces (no copy); adds only `A` and `v`.

    heads: int64 [K] (sorted, unique) buffer; A, v: nn.Parameter [K, head_dim] or None.
    `enabled = False` turns the intervention off (the module then is exactly the original Linear).
    On a quantized base weight (torchao, see `lofit_fast.models.quantize_base`) the dequantized selected
    columns W_S are cached once (buffer `w_sel`, [D_out, K*head_dim]) for the thin GEMM and the offset row.
    """

    def __init__(
        self,
        base: nn.Linear,
        heads: torch.Tensor,
        head_dim: int,
        A: Optional[torch.Tensor] = None,
        v: Optional[torch.Tensor] = None,
        backend: str = "auto",
        layer_idx: Optional[int] = None,
    ):
        super().__init__()
        self._wrap(base, heads, head_dim, backend, layer_idx)
        self.A = None if A is None else nn.Parameter(A)
        self.v = None if v is None else nn.Parameter(v)
        quantized = is_quantized_weight(base.weight)
        self.register_buffer(
            "w_sel", dequantized_columns(base.weight, self.heads, head_dim) if quantized else None, persistent=False
        )

    def _wrap(self, base: nn.Linear, heads: torch.Tensor, head_dim: int, backend: str, layer_idx: Optional[int]):
        """The base o_proj's weight, bias and shape, and the selected heads: what every patched o_proj holds."""
        self.in_features, self.out_features = base.in_features, base.out_features
        self.head_dim = head_dim
        self.num_heads = base.in_features // head_dim
        self.layer_idx = layer_idx
        self.backend = backend
        self.enabled = True
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("heads", heads.to(device=base.weight.device, dtype=torch.int64), persistent=False)
        self.__dict__["base_layer"] = base  # the original module, restored by unpatch (not a submodule)

    @property
    def head_list(self):
        return self.heads.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.heads.numel() == 0 or (self.A is None and self.v is None):
            return F.linear(x, self.weight, self.bias)
        if self.w_sel is not None:
            return quantized_head_affine_linear(
                x, self.weight, self.bias, self.heads, self.A, self.v, self.head_dim, self.w_sel
            )
        return head_affine_linear(
            x, self.weight, self.bias, self.heads, self.A, self.v, self.head_dim, self.backend, validate=False
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layer={self.layer_idx}, heads={self.head_list}, head_dim={self.head_dim}, "
            f"scale={self.A is not None}, offset={self.v is not None}, backend={self.backend!r}"
            + (f", quantized={type(self.weight).__name__}" if self.w_sel is not None else "")
        )
