"""The pybind11 extension's CPU kernels (csrc/cpu)."""
from __future__ import annotations

import torch


def _ext():
    from lofit_fast import _C

    return _C


class CppBackend:
    name = "cpp"
    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})

    def is_available(self) -> bool:
        _ext()
        return True

    def auto_priority(self, x, weight, K) -> float:
        return 1.0

    def forward(self, x, weight, bias, heads, A, v, head_dim):
        return _ext().forward_cpu(x, weight, bias, heads, A, v, head_dim)

    def backward(self, dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv):
        return _ext().backward_cpu(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv)


BACKEND = CppBackend()
