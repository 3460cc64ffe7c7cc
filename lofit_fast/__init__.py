"""lofit_fast: kernel-optimized LoFiT and head/representation-level interventions for Llama and Gemma."""
from ._version import __version__
from .ops import available_backends, head_affine_linear
from .patch import (
    HeadInterventionLinear,
    disabled,
    find_attention_sites,
    freeze_base,
    patch,
    patched_modules,
    trainable_parameters,
    unpatch,
)
from . import hooks

__all__ = [
    "__version__",
    "head_affine_linear",
    "available_backends",
    "HeadInterventionLinear",
    "patch",
    "unpatch",
    "disabled",
    "patched_modules",
    "trainable_parameters",
    "freeze_base",
    "find_attention_sites",
    "hooks",
]
