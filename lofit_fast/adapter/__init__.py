"""Adapters (save/load), merge, export, and PEFT-style names."""
from .export import export
from .loading import load_adapter, load_adapter_config
from .multi import add_adapter, adapter_ids, adapter_names, delete_adapter, load_adapters, set_adapter
from .merge import merge, merge_and_unload, merged_linear
from .official import OfficialFormatError, import_official
from .peft_names import disable_adapter, get_nb_trainable_parameters, print_trainable_parameters, unload
from .saving import save_adapter
from .schema import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, AdapterFormatError

__all__ = [
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
    "merged_linear",
    "export",
    "import_official",
    "OfficialFormatError",
    "disable_adapter",
    "unload",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "AdapterFormatError",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
]
