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
from .adapter import (
    disable_adapter,
    export,
    get_nb_trainable_parameters,
    load_adapter,
    load_adapter_config,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    unload,
)
from .adapter import add_adapter, adapter_ids, adapter_names, delete_adapter, load_adapters, set_adapter
from .methods import HeadSelection, default_k, random_heads, select_heads, tune
from .methods import comparators, iti, rep_tuning, repe
from .models import load_model
from .steer import merge_steering, set_coeff, steer, steering_disabled, unsteer

__all__ = [
    "__version__",
    # the op
    "head_affine_linear",
    "available_backends",
    # model surgery
    "HeadInterventionLinear",
    "patch",
    "unpatch",
    "disabled",
    "patched_modules",
    "trainable_parameters",
    "freeze_base",
    "find_attention_sites",
    "hooks",
    # LoFiT
    "select_heads",
    "tune",
    "HeadSelection",
    "random_heads",
    "default_k",
    # adapters
    "save_adapter",
    "load_adapter",
    "load_adapter_config",
    "load_adapters",
    "add_adapter",
    "delete_adapter",
    "set_adapter",
    "adapter_names",
    "adapter_ids",
    "merge",
    "merge_and_unload",
    "export",
    "disable_adapter",
    "unload",
    "print_trainable_parameters",
    "get_nb_trainable_parameters",
    # relatives
    "iti",
    "repe",
    "rep_tuning",
    "comparators",
    "steer",
    "unsteer",
    "set_coeff",
    "steering_disabled",
    "merge_steering",
    # models
    "load_model",
]
