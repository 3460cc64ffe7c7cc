"""Tiny random models of each supported family, built from configs (no download)."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    base.update(kw)
    return base


def tiny_config(family: str):
    if family == "llama":
        return tf.LlamaConfig(**_common())
    if family == "gemma":
        return tf.GemmaConfig(**_common())
    if family == "gemma2":
        return tf.Gemma2Config(**_common(sliding_window=8))
    if family == "gemma3":
        return tf.Gemma3TextConfig(**_common(sliding_window=8))
    if family == "mistral":
        return tf.MistralConfig(**_common())
    if family == "qwen2":
        return tf.Qwen2Config(**_common())
    if family == "qwen3":
        return tf.Qwen3Config(**_common())
    raise ValueError(family)


FAMILIES = ["llama", "gemma", "gemma2", "gemma3", "mistral", "qwen2", "qwen3"]
# Gemma 2 (attention logit soft-capping) has no SDPA path in transformers.
ATTENTION = {f: ("eager",) if f == "gemma2" else ("eager", "sdpa") for f in FAMILIES}


def tiny_model(family: str, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = attn
    if family == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(dtype).eval()


def tiny_gemma3_multimodal(seed: int = 0):
    torch.manual_seed(seed)
    text = tiny_config("gemma3")
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    return tf.Gemma3ForConditionalGeneration(cfg).eval()


def random_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
