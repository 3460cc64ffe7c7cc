"""Model surgery: find the decoder layers of each family, swap o_proj, unpatch, disable."""
from .families import SUPPORTED_DECODER_LAYERS, AttentionSite, find_attention_sites
from .module import HeadInterventionLinear
from .multi import BASE_NAME, AdapterRouter, MultiHeadInterventionLinear, get_router
from .surgery import (
    disabled,
    freeze_base,
    intervention_parameters,
    normalize_heads,
    patch,
    patched_modules,
    trainable_parameters,
    unpatch,
)

__all__ = [
    "SUPPORTED_DECODER_LAYERS",
    "AttentionSite",
    "find_attention_sites",
    "HeadInterventionLinear",
    "MultiHeadInterventionLinear",
    "AdapterRouter",
    "BASE_NAME",
    "get_router",
    "patch",
    "unpatch",
    "disabled",
    "patched_modules",
    "trainable_parameters",
    "intervention_parameters",
    "freeze_base",
    "normalize_heads",
]
