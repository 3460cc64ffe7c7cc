"""The head-affine linear op and its backends."""
from .function import check_op_inputs, head_affine_linear
from .registry import available_backends, backend_names, check_backend_name, get_backend, unavailable_reason

__all__ = [
    "head_affine_linear",
    "check_op_inputs",
    "available_backends",
    "backend_names",
    "check_backend_name",
    "get_backend",
    "unavailable_reason",
]
