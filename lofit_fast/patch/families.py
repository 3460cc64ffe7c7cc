"""Which models can be patched, and where their attention `o_proj` modules are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn

# Decoder layers whose attention output goes through a plain `self_attn.o_proj` Linear over the
# concatenated heads (columns h*d .. (h+1)*d belong to head h).
SUPPORTED_DECODER_LAYERS = (
    "LlamaDecoderLayer",
    "GemmaDecoderLayer",
    "Gemma2DecoderLayer",
    "Gemma3DecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
)


@dataclass(frozen=True)
class AttentionSite:
    layer: int
    path: str  # dotted name of the decoder layer in the model
    attn: nn.Module
    num_heads: int
    head_dim: int


def is_decoder_layer(module: nn.Module) -> bool:
    """A supported decoder layer, also behind a subclass (FSDP2's `fully_shard` makes an `FSDP<Name>` one)."""
    return any(cls.__name__ in SUPPORTED_DECODER_LAYERS for cls in type(module).__mro__)


def find_attention_sites(model: nn.Module) -> List[AttentionSite]:
    """The model's decoder layers in order, with their head count and head size; a clear error otherwise."""
    sites: List[AttentionSite] = []
    for path, module in model.named_modules():
        if not is_decoder_layer(module):
            continue
        attn = getattr(module, "self_attn", None)
        o_proj = getattr(attn, "o_proj", None)
        head_dim = getattr(attn, "head_dim", None)
        if o_proj is None or head_dim is None:
            raise TypeError(f"{type(module).__name__} at {path!r} has no self_attn.o_proj/head_dim")
        in_features = o_proj.in_features
        if in_features % head_dim:
            raise TypeError(f"{path}.self_attn.o_proj has {in_features} inputs, not a multiple of head_dim {head_dim}")
        sites.append(AttentionSite(len(sites), path, attn, in_features // head_dim, head_dim))
    if not sites:
        raise TypeError(
            f"unsupported model class {type(model).__name__}: lofit_fast patches decoder layers of type "
            f"{', '.join(SUPPORTED_DECODER_LAYERS)} (Llama, Gemma 1/2/3, Mistral, Qwen2/3)"
        )
    return sites
