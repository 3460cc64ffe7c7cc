"""GGUF out: the merged model for llama.cpp / Ollama, and steering vectors as a llama.cpp control vector.

export_gguf(model, path, source_gguf=...) starts from the GGUF the model was loaded from and copies every KV
pair and every tensor byte for byte (quantization kept), except for the `o_proj` of the patched layers:

- offset v: a new `blk.N.attn_output.bias` tensor (float32, [hidden]) = W_S v (+ the old bias, if any), computed
  from the dequantized GGUF weight exactly as `merge` computes it. llama.cpp's Llama loader reads this optional
  tensor (`bo`) and adds it after the attention output projection.
- scale A: `blk.N.attn_output.weight` with the selected heads' columns scaled by 1 + A, written as float32
  (exact), or with requantize=True re-quantized to the source type where gguf-py can quantize it (Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0, BF16, F16; not the K-quants), which adds that type's rounding error.
  An offset-only adapter (LoFiT step 2, the usual case) leaves every weight byte untouched.

export_control_vector_gguf(vectors, path) writes the file that repeng's `ControlVector.export_gguf` writes and
llama.cpp's `--control-vector` reads: arch "controlvector", KV `controlvector.model_hint` (the model_type) and
`controlvector.layer_count`, one float32 tensor `direction.{layer}` per layer, added to the output of decoder
layer `layer` (0-based, as in lofit_fast.steer and repeng; llama.cpp has no direction.0).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from ..models import resolve_model_path
from ..ops.function import is_quantized_weight
from ..patch import find_attention_sites
from .merge import fold_intervention
from .saving import require_patched

# GGUF architectures whose llama.cpp loader reads an optional attention output bias (LLM_ARCH_LLAMA covers
# Llama 2/3, SmolLM2 and Mistral files).
BIAS_ARCHS = ("llama",)
# The source-weight check's default tolerance when the model's o_proj is quantized: torchao re-rounds the
# dequantized GGUF values (int8 per-channel: 0.8-1.2% relative on SmolLM2's o_proj layers; int4 with groups of 128
# several times that), while the o_proj of another model is ~100% away.
QUANTIZED_CHECK_TOL = 0.15
REQUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


class GGUFExportError(ValueError):
    """The model, its adapter or the source GGUF cannot be written as the GGUF asked for."""


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is pinned in scripts/install.sh
        raise ImportError("GGUF export needs the `gguf` package (pip install gguf)") from exc
    return gguf


def _write_atomically(path: Path, write) -> Path:
    """Call write(tmp_path) for a temporary file next to `path`, then move it into place (the pattern of
    lofit_fast._files, for files written by a library that wants a path rather than bytes)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _field_value(field):
    gguf = _gguf()
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def _dequantized(tensor) -> np.ndarray:
    """A reader tensor as float32 in PyTorch's [out, in] layout."""
    gguf = _gguf()
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(tensor.shape)))


def export_gguf(
    model: nn.Module,
    path: Union[str, Path],
    *,
    source_gguf: Union[str, Path],
    requantize: bool = False,
    check_tol: Optional[float] = None,
) -> Dict[str, object]:
    """Write `model`'s LoFiT adapter merged into a copy of `source_gguf` (the GGUF the model was loaded from) at
    `path`; returns a summary {"path", "added", "rewritten", "copied", "weight_types"}.

    The model must be patched (lofit_fast.patch / load_adapter / import_official). Before writing, the
    dequantized `attn_output.weight` of every patched layer is compared with the model's o_proj weight
    (relative error ≤ check_tol; default 1e-3 for a float32 model, 1e-2 for 16-bit ones, QUANTIZED_CHECK_TOL for a
    quantized base, whose weights are the file's re-rounded), so a GGUF of another model is an error rather than
    a silently wrong file. The merge uses the file's own dequantized weights, also on a quantized base (LoFiT
    trained there against the int8-rounded weights: the offsets then meet the GGUF's own rounding instead).
    """
    gguf = _gguf()
    mods = require_patched(model, "export a GGUF")
    sites = find_attention_sites(model)
    source_gguf = Path(source_gguf)
    if not source_gguf.is_file():
        raise FileNotFoundError(f"{source_gguf} not found (the GGUF the model was loaded from)")
    path = Path(path)
    if path.absolute() == source_gguf.absolute():
        raise GGUFExportError(f"{path} is the source GGUF; write the merged model to another file")
    reader = gguf.GGUFReader(source_gguf)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise GGUFExportError(f"{source_gguf} has no general.architecture: not a model GGUF")
    arch = arch_field.contents()
    blocks = reader.get_field(f"{arch}.block_count")
    if blocks is None or int(blocks.contents()) != len(sites):
        raise GGUFExportError(
            f"{source_gguf} has {blocks.contents() if blocks else '?'} blocks but the model has {len(sites)} layers: "
            "not the GGUF this model was loaded from"
        )
    has_offset = any(m.v is not None for m in mods.values())
    if has_offset and arch not in BIAS_ARCHS:
        raise GGUFExportError(
            f"{source_gguf} is a {arch!r} GGUF; llama.cpp reads an attention output bias (blk.N.attn_output.bias) "
            f"only for {', '.join(BIAS_ARCHS)} files, so the offsets cannot be written. A scale-only adapter "
            "(offset=False) merges into the weights and can be exported."
        )
    tensors = {t.name: t for t in reader.tensors}
    if check_tol is None:
        first = next(iter(mods.values())).weight
        check_tol = (QUANTIZED_CHECK_TOL if is_quantized_weight(first)
                     else 1e-3 if first.dtype == torch.float32 else 1e-2)

    replace: Dict[str, tuple] = {}  # name -> (array, raw_dtype or None)
    added, rewritten, weight_types = [], [], {}
    for layer, m in mods.items():
        wname, bname = f"blk.{layer}.attn_output.weight", f"blk.{layer}.attn_output.bias"
        if wname not in tensors:
            raise GGUFExportError(f"{source_gguf} has no tensor {wname}")
        src = tensors[wname]
        W = _dequantized(src)
        quantized = is_quantized_weight(m.weight)
        base = (m.weight.dequantize() if quantized else m.weight).detach().float().cpu().numpy()
        if W.shape != base.shape:
            raise GGUFExportError(f"{wname} is {list(W.shape)} in {source_gguf} but o_proj of layer {layer} is {list(base.shape)}")
        rel = float(np.linalg.norm(W - base) / max(np.linalg.norm(base), 1e-30))
        if rel > check_tol:
            raise GGUFExportError(
                f"{wname} of {source_gguf} differs from the model's o_proj weight of layer {layer} (relative error "
                f"{rel:.3g} > {check_tol}): not the GGUF this model was loaded from"
            )
        # merge with the GGUF's own dequantized weight (the math of merge.merged_linear, in float32), so the
        # untouched columns are exactly the file's
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        scaled, bias = fold_intervention(torch.from_numpy(W.copy()), cpu(m.bias), m.heads.cpu(), m.head_dim,
                                         cpu(m.A), cpu(m.v))
        if m.A is not None:
            qname = src.tensor_type.name
            weight = scaled.numpy()
            if requantize:
                if qname not in REQUANTIZABLE:
                    raise GGUFExportError(
                        f"{wname} is {qname}, which gguf-py cannot quantize; export with requantize=False (float32)"
                    )
                qtype = src.tensor_type
                replace[wname] = (gguf.quants.quantize(weight, qtype), qtype)
                weight_types[wname] = qname
            else:
                replace[wname] = (weight, None)
                weight_types[wname] = "F32"
            rewritten.append(wname)
        if bias is not None:
            replace[bname] = (bias.numpy(), None)
            weight_types[bname] = "F32"
            (rewritten if bname in tensors else added).append(bname)

    adapter_info = {
        "lofit_fast_version": __version__,
        "heads": {str(layer): m.head_list for layer, m in mods.items()},
        "scale": any(m.A is not None for m in mods.values()),
        "offset": has_offset,
        "source": source_gguf.name,
    }

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        alignment = reader.get_field("general.alignment")
        if alignment is not None:  # the KV is copied below; the writer must pad to it too
            writer.data_alignment = int(alignment.contents())
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            value, vtype, sub = _field_value(field)
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        writer.add_key_value("lofit_fast.adapter", json.dumps(adapter_info), gguf.GGUFValueType.STRING)
        order = []
        for t in reader.tensors:
            order.append(t.name)
            if t.name.endswith(".attn_output.weight") and t.name.replace(".weight", ".bias") in replace \
                    and t.name.replace(".weight", ".bias") not in tensors:
                order.append(t.name.replace(".weight", ".bias"))
        for name in order:
            if name in replace:
                data, raw = replace[name]
                if raw is None:
                    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
                else:
                    writer.add_tensor(name, data, raw_dtype=raw)
            else:
                t = tensors[name]
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in order:
            if name in replace:
                data, raw = replace[name]
                writer.write_tensor_data(np.ascontiguousarray(data, dtype=None if raw is not None else np.float32))
            else:
                writer.write_tensor_data(tensors[name].data, tensor_endianess=reader.endianess)
        writer.close()

    out = _write_atomically(path, write)
    return {
        "path": str(out),
        "added": added,
        "rewritten": rewritten,
        "copied": len(reader.tensors) - len([n for n in rewritten if n in tensors]),
        "weight_types": weight_types,
    }


def gguf_attn_output_biases(path: Union[str, Path]) -> Dict[int, torch.Tensor]:
    """{layer: float32 bias} of the `blk.N.attn_output.bias` tensors of a GGUF file (read back with gguf)."""
    gguf = _gguf()
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] == "attn_output" and parts[3] == "bias":
            out[int(parts[1])] = torch.from_numpy(_dequantized(t).reshape(-1).copy())
    return out


def load_gguf_with_biases(path: Union[str, Path], *, dtype: torch.dtype = torch.float32):
    """The exported GGUF as an HF model: transformers' GGUF loader for every tensor it maps, plus the
    `attn_output.bias` tensors read back with gguf and set as o_proj biases.

    transformers 5.23 builds a Llama from a GGUF with `attention_bias=False` (its GGUF config mapping has no
    entry for a bias) and so drops `blk.N.attn_output.bias` without an error; this puts them back, so the result
    is what llama.cpp computes from the file (up to its kernels' rounding).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    biases = gguf_attn_output_biases(path)
    sites = find_attention_sites(model)
    for layer, b in biases.items():
        o = sites[layer].attn.o_proj
        if o.bias is not None:
            with torch.no_grad():
                o.bias.copy_(b.to(o.bias.dtype))
        else:
            o.bias = nn.Parameter(b.to(o.weight.dtype), requires_grad=False)
    return model.eval()


def export_control_vector_gguf(
    vectors: Mapping[int, torch.Tensor],
    path: Union[str, Path],
    *,
    model_hint: str,
    coeff: float = 1.0,
    num_layers: Optional[int] = None,
) -> Path:
    """Write steering vectors {decoder layer: [hidden]} as a llama.cpp control-vector GGUF (repeng's format).

    Each tensor `direction.{layer}` is `coeff · vector`, so `llama-cli --control-vector FILE` (scale 1) applies
    what `lofit_fast.steer(model, vectors, coeff)` applies: added to the output of decoder layer `layer`
    (0-based, the same numbering as lofit_fast and repeng). llama.cpp has no slot for layer 0's output
    (its control vectors start at layer 1), so layer 0 is an error. model_hint: the model's `config.model_type`
    (e.g. "llama"), which llama.cpp shows but does not check.
    """
    gguf = _gguf()
    if not vectors:
        raise GGUFExportError("no steering vectors to export")
    if not (isinstance(coeff, (int, float)) and np.isfinite(coeff)):
        raise GGUFExportError(f"coeff must be a finite number, got {coeff!r}")
    if not isinstance(model_hint, str) or not model_hint:
        raise GGUFExportError("model_hint must be the model's model_type, e.g. 'llama'")
    arrays, size = {}, None
    for layer, vec in sorted(vectors.items()):
        if not (isinstance(layer, int) and layer >= 1):
            raise GGUFExportError(
                f"layer {layer!r}: llama.cpp control vectors steer the outputs of layers 1 … n-1 (there is no "
                "direction.0); steer other layers"
            )
        if num_layers is not None and layer >= num_layers:
            raise GGUFExportError(f"layer {layer} is out of range for a model with {num_layers} layers")
        t = torch.as_tensor(vec).detach().float().cpu().reshape(-1)
        if size is None:
            size = t.numel()
        if t.numel() != size:
            raise GGUFExportError(f"direction of layer {layer} has {t.numel()} values, others have {size}")
        if not torch.isfinite(t).all():
            raise GGUFExportError(f"direction of layer {layer} contains NaN or inf")
        arrays[layer] = (coeff * t).numpy().astype(np.float32)

    def write(tmp: str) -> None:
        arch = "controlvector"
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string(f"{arch}.model_hint", model_hint)
        writer.add_uint32(f"{arch}.layer_count", len(arrays))
        for layer, a in arrays.items():
            writer.add_tensor(f"direction.{layer}", a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomically(Path(path), write)


def read_control_vector_gguf(path: Union[str, Path]) -> Dict[str, object]:
    """{"model_hint", "layer_count", "vectors": {layer: float32 tensor}} of a control-vector GGUF."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise GGUFExportError(f"{path} is not a control-vector GGUF (general.architecture is not 'controlvector')")
    hint = reader.get_field("controlvector.model_hint")
    count = reader.get_field("controlvector.layer_count")
    vectors = {}
    for t in reader.tensors:
        if t.name.startswith("direction."):
            vectors[int(t.name.split(".", 1)[1])] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    return {
        "model_hint": hint.contents() if hint is not None else None,
        "layer_count": int(count.contents()) if count is not None else None,
        "vectors": dict(sorted(vectors.items())),
    }


def read_vectors_file(path: Union[str, Path]) -> Tuple[Dict[int, torch.Tensor], Optional[float]]:
    """({layer: vector}, coeff or None) from a safetensors file of steering vectors: keys `layers.{l}` (what
    `lofit-fast steer` and `run --method repe` write; the latter keeps its coeff in the metadata) or
    `direction.{l}`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a safetensors file of steering vectors)")
    if path.suffix != ".safetensors":
        raise GGUFExportError(f"{path}: steering vectors are read from .safetensors files only")
    vectors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            head, _, tail = key.partition(".")
            if head not in ("layers", "direction") or not tail.isdigit():
                raise GGUFExportError(f"{path}: unexpected key {key!r} (expected layers.N or direction.N)")
            vectors[int(tail)] = f.get_tensor(key)
    coeff = None
    if "coeff" in meta:
        try:
            coeff = float(meta["coeff"])
        except ValueError:
            raise GGUFExportError(f"{path}: metadata coeff {meta['coeff']!r} is not a number") from None
    return vectors, coeff


def model_type_and_layers(name: str) -> Tuple[str, int]:
    """(model_type, number of layers) of a model name / .gguf / HF folder, read from its metadata only."""
    directory, gguf_file = resolve_model_path(name)
    if gguf_file is not None:
        reader = _gguf().GGUFReader(Path(directory) / gguf_file)
        arch = reader.get_field("general.architecture").contents()
        return arch, int(reader.get_field(f"{arch}.block_count").contents())
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config) if "num_hidden_layers" not in config else config
    return config["model_type"], int(text["num_hidden_layers"])


__all__ = [
    "export_gguf",
    "export_control_vector_gguf",
    "read_control_vector_gguf",
    "gguf_attn_output_biases",
    "load_gguf_with_biases",
    "GGUFExportError",
    "read_vectors_file",
    "model_type_and_layers",
]
