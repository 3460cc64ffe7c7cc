"""GGUF out: the merged model written into a copy of its source GGUF (bias tensors added, scaled weights
rewritten, everything else byte for byte), read back with gguf and with transformers' GGUF loader; and RepE
vectors as a llama.cpp control-vector GGUF."""
import numpy as np
import pytest
import torch

import lofit_fast
from lofit_fast.adapter.export import copy_sharing_tensors
from lofit_fast.adapter.gguf_export import (
    GGUFExportError,
    export_control_vector_gguf,
    export_gguf,
    gguf_attn_output_biases,
    load_gguf_with_biases,
    read_control_vector_gguf,
)
from lofit_fast.cli import main

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


def write_source_gguf(model, path, qtype=None):
    """A llama GGUF of `model` the way llama.cpp's converter lays it out; matrices in `qtype` (Q8_0 default)."""
    qtype = gguf.GGMLQuantizationType.Q8_0 if qtype is None else qtype
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(qtype))
    # a byte-level BPE vocabulary (gpt2 style) so that transformers can build the tokenizer too
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet[:c.vocab_size - 3] + [alphabet[0] + alphabet[1], "<s>", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    sd = {k: t.detach().float().numpy() for k, t in model.state_dict().items()}

    def mat(name, a):
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)

    mat("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    mat("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        mat(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        mat(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        mat(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        mat(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        mat(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        mat(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        mat(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def merged_logits(model):
    return logits(lofit_fast.merge(copy_sharing_tensors(model)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = write_source_gguf(tiny_llama(), tmp_path_factory.mktemp("src") / "tiny.gguf")
    return path


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_offset_becomes_attn_output_bias_and_every_weight_byte_is_kept(source, tmp_path):
    model = load_gguf(source)
    lofit_fast.patch(model, {0: [1], 2: [0, 3]}, scale=False, offset=True, init_std=0.5)
    want = merged_logits(model)
    out = tmp_path / "merged.gguf"
    info = export_gguf(model, out, source_gguf=source)
    assert info["added"] == ["blk.0.attn_output.bias", "blk.2.attn_output.bias"] and info["rewritten"] == []
    src, got = tensors(source), tensors(out)
    assert set(got) == set(src) | {"blk.0.attn_output.bias", "blk.2.attn_output.bias"}
    for name, t in src.items():  # quantization kept: identical bytes and types
        assert got[name].tensor_type == t.tensor_type and np.array_equal(got[name].data, t.data), name
    assert got["blk.0.attn_output.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    # every KV of the source is kept, plus a record of the adapter
    src_fields = gguf.GGUFReader(source).fields
    out_fields = gguf.GGUFReader(out).fields
    assert set(out_fields) == set(src_fields) | {"lofit_fast.adapter"}
    biases = gguf_attn_output_biases(out)
    mods = lofit_fast.patched_modules(model)
    W_S = mods[2].weight[:, [0 * 16 + i for i in range(16)] + [3 * 16 + i for i in range(16)]]
    torch.testing.assert_close(biases[2], W_S @ mods[2].v.detach().reshape(-1))

    # transformers' GGUF loader builds Llama with attention_bias=False and drops the bias tensors ...
    plain = load_gguf(out)
    assert plain.model.layers[2].self_attn.o_proj.bias is None
    assert (logits(plain) - want).abs().max() > 1e-3
    # ... so read them back with gguf and put them in: then the file gives the merged model's logits
    torch.testing.assert_close(logits(load_gguf_with_biases(out)), want, rtol=1e-5, atol=1e-5)


def test_scale_is_folded_into_attn_output_weight(source, tmp_path):
    model = load_gguf(source)
    lofit_fast.patch(model, {1: [0, 2]}, scale=True, offset=True, init_std=0.3)
    want = merged_logits(model)
    out = tmp_path / "f32.gguf"
    info = export_gguf(model, out, source_gguf=source)
    assert info["rewritten"] == ["blk.1.attn_output.weight"] and info["weight_types"]["blk.1.attn_output.weight"] == "F32"
    assert tensors(out)["blk.1.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors(out)["blk.0.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    torch.testing.assert_close(logits(load_gguf_with_biases(out)), want, rtol=1e-5, atol=1e-5)

    req = tmp_path / "q8.gguf"
    export_gguf(model, req, source_gguf=source, requantize=True)
    assert tensors(req)["blk.1.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    err = (logits(load_gguf_with_biases(req)) - want).abs().max().item()
    assert 0 < err < 2e-2 * want.abs().max().item()  # Q8_0 rounding of one layer's scaled weight


def test_bad_inputs_are_clear_errors(source, tmp_path):
    model = load_gguf(source)
    with pytest.raises(RuntimeError, match="not patched"):
        export_gguf(model, tmp_path / "x.gguf", source_gguf=source)
    lofit_fast.patch(model, {0: [1]}, scale=False, offset=True, init_std=0.5)
    with pytest.raises(GGUFExportError, match="is the source GGUF"):
        export_gguf(model, source, source_gguf=source)
    other = write_source_gguf(tiny_llama(seed=1), tmp_path / "other.gguf")
    with pytest.raises(GGUFExportError, match="not the GGUF this model was loaded from"):
        export_gguf(model, tmp_path / "x.gguf", source_gguf=other)
    with pytest.raises(FileNotFoundError):
        export_gguf(model, tmp_path / "x.gguf", source_gguf=tmp_path / "missing.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_control_vector_gguf_round_trip(tmp_path):
    vecs = {3: torch.randn(64), 5: torch.randn(64)}
    path = export_control_vector_gguf(vecs, tmp_path / "cv.gguf", model_hint="llama", coeff=2.0)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert [t.name for t in reader.tensors] == ["direction.3", "direction.5"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    back = read_control_vector_gguf(path)
    assert back["model_hint"] == "llama" and back["layer_count"] == 2
    for layer, v in vecs.items():
        torch.testing.assert_close(back["vectors"][layer], 2.0 * v)
    # repeng's import_gguf reads the model hint from the last part of the field
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    for bad, message in (({0: torch.randn(64)}, "no direction.0"), ({2: torch.randn(64), 3: torch.randn(8)}, "8 values"),
                         ({2: torch.full((64,), float("inf"))}, "NaN or inf"), ({}, "no steering vectors")):
        with pytest.raises(GGUFExportError, match=message):
            export_control_vector_gguf(bad, tmp_path / "bad.gguf", model_hint="llama")
    assert not (tmp_path / "bad.gguf").exists()


def test_cli_export_gguf_and_control_vector(source, tmp_path, capsys):
    from safetensors.torch import save_file

    model = load_gguf(source)
    lofit_fast.patch(model, {2: [1, 2]}, scale=False, offset=True, init_std=0.5)
    want = merged_logits(model)
    lofit_fast.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "out" / "merged.gguf"
    rc = main(["export", "--format", "gguf", "--model", str(source), "--adapter", str(tmp_path / "adapter"),
               "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    torch.testing.assert_close(logits(load_gguf_with_biases(out)), want, rtol=1e-5, atol=1e-5)

    save_file({"layers.1": torch.randn(64), "layers.2": torch.randn(64)}, str(tmp_path / "control_vectors.safetensors"))
    cv = tmp_path / "cv.gguf"
    rc = main(["export", "--format", "control-vector", "--model", str(source), "--vectors",
               str(tmp_path / "control_vectors.safetensors"), "--coeff", "3", "--out", str(cv), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    back = read_control_vector_gguf(cv)
    assert sorted(back["vectors"]) == [1, 2] and back["model_hint"] == "llama"
    rc = main(["export", "--format", "gguf", "--model", str(source), "--out", str(tmp_path / "y.gguf"),
               "--device", "cpu", "--quiet"])
    assert rc == 1 and "--adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_offset_export_equals_the_merged_model(tmp_path):
    from lofit_fast.models import smollm2_gguf

    model, tok = lofit_fast.load_model("smollm2")
    lofit_fast.patch(model, [(3, 1), (10, 4), (20, 0)], scale=False, offset=True, init_std=0.05)
    ids = tok(["The capital of France is", "LoFiT edits attention heads"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = lofit_fast.merge(copy_sharing_tensors(model))(**ids).logits
    out = tmp_path / "smollm2-lofit.gguf"
    info = export_gguf(model, out, source_gguf=smollm2_gguf())
    assert info["rewritten"] == [] and len(info["added"]) == 3
    assert tensors(out)["blk.10.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    with torch.no_grad():
        got = load_gguf_with_biases(out)(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
