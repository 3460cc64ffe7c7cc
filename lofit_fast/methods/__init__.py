"""Intervention methods built on the head-affine op: LoFiT (head selection + bias tuning)."""
from .lofit import HeadSelection, default_k, random_heads, select_heads, tune

__all__ = ["HeadSelection", "default_k", "random_heads", "select_heads", "tune"]
