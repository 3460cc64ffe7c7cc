"""Triton kernels for the head-affine o_proj GEMM (installed as `lofit_fast.kernels`).

- `head_affine_forward`: y = x' Wᵀ (+ b): v folded into a float32 bias, A through a thin loop over the
  selected columns after the plain main loop (or through W · diag(1 + A) when A covers many heads).
- `offset_bias`: b + W_S v in float32; `scaled_weight`: W · diag(1 + A).
- `head_affine_backward`: dx = dy · W with the selected heads' columns scaled by (1 + A), and dA, dv
  reduced only over column tiles of selected heads (or, without dx, a thin GEMM over those columns).

Heads are addressed through `slot` (int32 [H]: a head's row in A and v, or -1 when unselected), which
`head_slots` builds. Many adapters in one batch (per-row tables): `rows_forward`, `offset_rows`,
`rows_head_grads` (rows.py). Under TRITON_INTERPRET=1 the kernels run on CPU tensors (`INTERPRETED` is True).
"""
import torch

from ._common import INTERPRETED, pick_config
from .backward import head_affine_backward
from .forward import head_affine_forward, offset_bias, scaled_columns, scaled_weight
from .rows import offset_rows, rows_forward, rows_head_grads


def head_slots(heads: torch.Tensor, num_heads: int) -> torch.Tensor:
    """int32 [num_heads]: k for heads[k], -1 for every other head."""
    slot = torch.full((num_heads,), -1, dtype=torch.int32, device=heads.device)
    slot[heads] = torch.arange(heads.numel(), dtype=torch.int32, device=heads.device)
    return slot


__all__ = ["INTERPRETED", "pick_config", "head_affine_forward", "head_affine_backward", "offset_bias",
           "scaled_columns", "scaled_weight", "head_slots", "rows_forward", "offset_rows", "rows_head_grads"]
