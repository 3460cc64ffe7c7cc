"""Constants, the benchmark's models (random-weight shapes from published configs, or the real SmolLM2) and
memory sizes."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from lofit_fast.patch import find_attention_sites


HEADER = ["model", "provider", "workload", "batch", "seq", "dtype", "tokens_per_s", "ms_p50", "ms_p20", "ms_p80",
          "peak_mb", "device", "torch", "commit"]


WORKLOADS = ("step1", "step2", "decode", "prefill")


TRAIN_PROVIDERS = ("floor", "fused", "torch", "hooks", "hooks_loop", "lora")


INFER_PROVIDERS = ("base", "fused", "hooks", "merged")


REFERENCE = {"step1": "floor", "step2": "floor", "decode": "base", "prefill": "base"}


FORCED = "fused-"  # fused-<backend>: lofit_fast.patch with that backend instead of "auto" (training and inference)


FORCED_BACKENDS = ("torch", "cpp", "triton", "cuda")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


OOM = "oom"


# LoFiT hyper-parameters (official 7B values, lofit_fast.methods.lofit): they do not change the cost of a step.
L1 = 5e-4


LR_STEP1, LR_STEP2 = 5e-3, 1e-2


INIT_STD = 1e-3


INFER_V_STD = 1.0  # the step-2 offsets the decode / prefill providers carry (any values; large ones make
#                   the check that fused, hooks and merged agree meaningful in 16-bit dtypes)


# Random-weight shapes from the models' published configs. RoPE settings do not change the cost and keep their
# defaults; everything that sets a tensor's shape is here.
MODEL_CONFIGS: Dict[str, Tuple[str, Dict]] = {
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5)),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rms_norm_eps=1e-5)),
    "gemma-7b": ("gemma", dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                               max_position_embeddings=8192)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                   max_position_embeddings=32768, query_pre_attn_scalar=256)),
    "tiny": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)),
}


REAL_MODELS = {"smollm2": "the real SmolLM2-135M-Instruct (lofit_fast.models.load_model)"}


def build_model(name: str, device: torch.device, dtype: torch.dtype, **overrides) -> nn.Module:
    """A model in eval mode with every parameter frozen: a real one by short name, or random weights (whose
    config entries `overrides` may change, e.g. num_hidden_layers=4 for a shallow copy of a shape)."""
    if name in REAL_MODELS:
        if overrides:
            raise ValueError(f"{name} is a real model: its config cannot be overridden ({sorted(overrides)})")
        from lofit_fast.models import load_model

        model, _ = load_model(name, dtype=dtype, device=device)
    elif name in MODEL_CONFIGS:
        import transformers as tf

        family, shape = MODEL_CONFIGS[name]
        config_class = {"llama": tf.LlamaConfig, "gemma": tf.GemmaConfig, "gemma3": tf.Gemma3TextConfig}[family]
        config = config_class(**{**shape, **overrides})
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device itself: seconds for 7B shapes on a GPU
            model_class = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
            model = model_class.from_config(config, dtype=dtype) if family != "gemma3" else model_class(config)
        model.to(device=device, dtype=dtype)
    else:
        known = sorted([*REAL_MODELS, *MODEL_CONFIGS])
        raise ValueError(f"unknown model {name!r}: choose one of {known}")
    model.eval()
    model.requires_grad_(False)
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def total_heads(model: nn.Module) -> int:
    return sum(site.num_heads for site in find_attention_sites(model))


def step2_heads(model: nn.Module, seed: int = 0) -> List[Tuple[int, int]]:
    """K ≈ 3 % of the heads (lofit_fast.methods.lofit.default_k), drawn with a fixed seed."""
    from lofit_fast.methods.lofit import default_k, random_heads

    return random_heads(model, default_k(model), seed=seed)
