"""A quantized frozen base (torchao int8 weight-only): the patched o_proj = quantized base GEMM + a thin GEMM
over the cached dequantized W_S, checked against the same model with the dequantized weights in float."""
import math
import warnings

import pytest
import torch

import lofit_fast
from lofit_fast.ops.function import is_quantized_weight, quantized_head_affine_linear
from fixtures.tiny import tiny_llama
from reference import GRAD_TOL, OUT_TOL, reference_forward, reference_grads, rel_err

torchao = pytest.importorskip("torchao")
from lofit_fast.models import FrozenQuantizedLinear, quantize_base  # noqa: E402
from lofit_fast.ops.function import frozen_quantized_linear  # noqa: E402

HEADS = [(0, 1), (1, 2), (1, 3)]


def _pair(seed=0):
    """(int8-quantized tiny Llama, the same model in float32 with the dequantized weights)."""
    q = quantize_base(tiny_llama(seed=seed), "int8")
    ref = tiny_llama(seed=seed)
    with torch.no_grad():
        for (name, pq), (name2, pr) in zip(q.named_parameters(), ref.named_parameters()):
            assert name == name2
            pr.copy_(pq.dequantize() if is_quantized_weight(pq) else pq)
    return q, ref


def _patch_both(q, ref, **kw):
    for m in (q, ref):
        torch.manual_seed(3)
        lofit_fast.patch(m, HEADS, init_std=0.1, **kw)
        lofit_fast.freeze_base(m)


def test_quantize_base_quantizes_decoder_linears_only():
    model = quantize_base(tiny_llama(), "int8")
    layer = model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert is_quantized_weight(lin.weight) and lin.weight.dtype == torch.float32
    assert not is_quantized_weight(model.lm_head.weight) and not is_quantized_weight(model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_base(tiny_llama(), "int3")
    lofit_fast.patch(model, HEADS)
    with pytest.raises(RuntimeError, match="before lofit_fast.patch"):
        quantize_base(model, "int8")


def test_quantized_layers_keep_no_float_copy_of_their_weights_for_backward():
    q, ref = _pair()
    layers = [m for m in q.modules() if is_quantized_weight(getattr(m, "weight", None))]
    assert layers and all(type(m) is FrozenQuantizedLinear and not m.weight.requires_grad for m in layers)
    shapes = {s for m in layers for s in (tuple(m.weight.shape), tuple(m.weight.shape)[::-1])}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ids = _ids(3)
    _patch_both(q, ref)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = q(input_ids=ids, labels=ids).loss
    cached = {m.w_sel.untyped_storage().data_ptr() for m in lofit_fast.patched_modules(q).values()}
    copies = [tuple(t.shape) for t in saved if not is_quantized_weight(t) and t.dim() == 2
              and tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in cached]  # W_S: kept by reference
    assert not copies, copies
    assert any(is_quantized_weight(t) for t in saved)  # the quantized weights themselves, by reference
    loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(lofit_fast.trainable_parameters(q), lofit_fast.trainable_parameters(ref)):
        assert rel_err(a.grad, b.grad) < 1e-5
    # without the lean backward (torchao's own autograd) the float copies are there: the check above can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.linear(torch.randn(3, 32, requires_grad=True), layers[0].weight)
    assert any(not is_quantized_weight(t) and tuple(t.shape) in shapes for t in saved)


def test_frozen_quantized_linear_gradients_match_the_dequantized_weight():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(48, 20))
    quantize_(lin, Int8WeightOnlyConfig())
    W = lin[0].weight
    W.requires_grad_(False)
    b = lin[0].bias.detach().clone().requires_grad_(True)
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = frozen_quantized_linear(x, W, b)
    x2, b2 = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, W.dequantize(), b2)
    assert rel_err(y, y2) < 1e-6
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert rel_err(x.grad, x2.grad) < 1e-6 and rel_err(b.grad, b2.grad) < 1e-6
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="quantized weight .* cannot be trained"):
        frozen_quantized_linear(x, W, b)


def test_int4_on_cpu_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="int4.*CUDA"):
        quantize_base(tiny_llama(), "int4")


def test_op_on_quantized_weight_matches_float64_reference_of_dequantized_weight():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    C, D, d = 4 * 16, 24, 16
    lin = torch.nn.Sequential(torch.nn.Linear(C, D))
    W0 = lin[0].weight.detach().clone()
    quantize_(lin, Int8WeightOnlyConfig())
    Wq, b = lin[0].weight, lin[0].bias.detach()
    W = Wq.dequantize()
    heads = torch.tensor([0, 2])
    x = torch.randn(3, 5, C, requires_grad=True)
    A = (0.3 * torch.randn(2, d)).requires_grad_(True)
    v = (0.3 * torch.randn(2, d)).requires_grad_(True)
    y = lofit_fast.head_affine_linear(x, Wq, b, heads, A, v, d)  # the public op routes quantized weights
    y2 = quantized_head_affine_linear(x, Wq, b, heads, A, v, d)
    assert torch.equal(y, y2)
    ref = reference_forward(x, W, b, heads, A, v, d)
    assert rel_err(y, ref) < OUT_TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_dx, ref_dA, ref_dv = reference_grads(x, W, heads, A, v, d, dy)
    for name, got, want in (("dx", x.grad, ref_dx), ("dA", A.grad, ref_dA), ("dv", v.grad, ref_dv)):
        assert rel_err(got, want) < GRAD_TOL[torch.float32], (name, rel_err(got, want))
    assert 1e-4 < rel_err(W, W0) < 1e-2  # int8 per-channel: a real, small quantization error


def test_patched_quantized_model_matches_dequantized_float_model():
    q, ref = _pair()
    _patch_both(q, ref)
    mod = lofit_fast.patched_modules(q)[1]
    assert mod.w_sel is not None and mod.w_sel.shape == (32, 2 * 8) and not mod.w_sel.requires_grad
    assert "quantized=Int8Tensor" in repr(mod)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    out_q, out_r = q(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert rel_err(out_q.logits, out_r.logits) < 1e-5
    out_q.loss.backward()
    out_r.loss.backward()
    for a, b in zip(lofit_fast.trainable_parameters(q), lofit_fast.trainable_parameters(ref)):
        assert a.grad.dtype == torch.float32 and rel_err(a.grad, b.grad) < 1e-5
    with lofit_fast.disabled(q), lofit_fast.disabled(ref):
        assert rel_err(q(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    # the int8 model differs from the original float model by the quantization error, not more
    orig = tiny_llama()
    torch.manual_seed(3)
    lofit_fast.patch(orig, HEADS, init_std=0.1)
    err = rel_err(out_q.logits, orig(input_ids=ids).logits)
    assert 0 < err < 2e-2, err


def test_lofit_trains_on_an_int8_base_and_the_adapter_loads_on_float(tmp_path):
    from fixtures.tiny import byte_tokenizer
    from lofit_fast.data import SFTExample
    from lofit_fast.train import train

    q, ref = _pair()
    _patch_both(q, ref, scale=False)
    data = [SFTExample(f"Q{i}: two times {i}?", f" {2 * i}") for i in range(8)]
    kw = dict(kind="sft", lr=5e-2, epochs=3, batch_size=4, progress=False, seed=0)
    out_q = train(q, byte_tokenizer(), data, params=lofit_fast.trainable_parameters(q), **kw)
    out_r = train(ref, byte_tokenizer(), data, params=lofit_fast.trainable_parameters(ref), **kw)
    assert out_q["epoch_loss"][-1] < out_q["epoch_loss"][0]
    for rq, rr in zip(out_q["history"], out_r["history"]):
        assert rq["loss"] == pytest.approx(rr["loss"], rel=1e-4)
    lofit_fast.save_adapter(q, tmp_path / "a")
    with warnings.catch_warnings():  # the float weights are not the int8 ones the adapter was trained on
        warnings.simplefilter("ignore")
        fresh = lofit_fast.load_adapter(tiny_llama(), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(lofit_fast.trainable_parameters(fresh),
                                                 lofit_fast.trainable_parameters(q)))
    lofit_fast.unpatch(q)
    assert is_quantized_weight(q.model.layers[1].self_attn.o_proj.weight)


def test_quantized_base_under_bf16_autocast():
    q, ref = _pair()
    _patch_both(q, ref)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lofit_fast.trainable_parameters(q))
    assert math.isfinite(out.loss.item())


@pytest.mark.slow
def test_smollm2_int8_base_is_smaller_and_trains():
    from lofit_fast.data import SFTExample
    from lofit_fast.train import train

    model, tok = lofit_fast.load_model("smollm2", quantize="int8")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert is_quantized_weight(o_proj.weight)
    lofit_fast.patch(model, [(9, 3), (17, 0)], scale=False, init_std=1e-3)
    lofit_fast.freeze_base(model)
    data = [SFTExample(f"Q: What is {i} plus {i}?\nA:", f" {2 * i}") for i in range(4)]
    out = train(model, tok, data, params=lofit_fast.trainable_parameters(model), lr=1e-2, epochs=3, batch_size=4,
                progress=False)
    assert out["epoch_loss"][-1] < out["epoch_loss"][0]


# --- merge and export on a quantized base ----------------------------------------------------------------

MERGE_Q_TOL = 1e-6  # merged vs patched on the same int8 base: the same W_S, only float32 summation order differs
DEQUANT_TOL = 1e-5  # the int8 model vs the same model with its dequantized weights in float32 (as above)


def _ids(seed=0):
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _o_projs(model):
    return [layer.self_attn.o_proj for layer in model.model.layers]


def test_merge_on_int8_base_folds_v_into_an_o_proj_bias_on_the_same_quantized_weight():
    from lofit_fast.adapter import merge

    q, ref = _pair()
    _patch_both(q, ref, scale=False)
    ids = _ids()
    patched, patched_ref = _logits(q, ids), _logits(ref, ids)
    weights = [m.weight for m in lofit_fast.patched_modules(q).values()]
    assert rel_err(patched, _logits(_pair()[0], ids)) > 1e-3  # v matters

    assert merge(q) is q
    merged = _logits(q, ids)
    assert rel_err(merged, patched) < MERGE_Q_TOL
    assert rel_err(merged, patched_ref) < DEQUANT_TOL
    merge(ref)  # the float merge of the dequantized model: the same numbers
    assert rel_err(merged, _logits(ref, ids)) < DEQUANT_TOL
    assert not lofit_fast.patched_modules(q)
    for o, w in zip(_o_projs(q), weights):
        assert type(o) is FrozenQuantizedLinear and o.weight is w and is_quantized_weight(o.weight)  # shared
        assert o.bias is not None and o.bias.dtype == torch.float32 and not is_quantized_weight(o.bias)


def test_merge_on_int8_base_keeps_a_nonzero_A_unmerged_and_still_applies_it():
    from lofit_fast.adapter import merge
    from lofit_fast.patch import HeadInterventionLinear

    q, ref = _pair()
    _patch_both(q, ref)
    ids = _ids(1)
    patched, patched_ref = _logits(q, ids), _logits(ref, ids)
    before = {l: (m.A.detach().clone(), m.weight) for l, m in lofit_fast.patched_modules(q).items()}

    merge(q)
    assert rel_err(_logits(q, ids), patched) < MERGE_Q_TOL
    assert rel_err(_logits(q, ids), patched_ref) < DEQUANT_TOL
    kept = lofit_fast.patched_modules(q)
    assert kept.keys() == before.keys()
    for layer, m in kept.items():
        A, w = before[layer]
        assert isinstance(m, HeadInterventionLinear) and m.v is None and torch.equal(m.A, A)
        assert m.weight is w and m.bias is not None and type(m.base_layer) is FrozenQuantizedLinear
    # without A the model is the base with v folded in: A really was still applied
    assert rel_err(_logits(q, ids), _logits(lofit_fast.unpatch(q), ids)) > 1e-3
    # ... and the v-folded base equals the dequantized model patched with v only
    _, ref_v = _pair()
    torch.manual_seed(3)
    lofit_fast.patch(ref_v, HEADS, init_std=0.1)
    for m in lofit_fast.patched_modules(ref_v).values():
        m.A.data.zero_()
    assert rel_err(_logits(q, ids), _logits(ref_v, ids)) < DEQUANT_TOL


def test_merge_on_int8_base_drops_an_all_zero_A():
    from lofit_fast.adapter import merge

    q, _ = _pair()
    lofit_fast.patch(q, HEADS, init_std=0.1)
    for m in lofit_fast.patched_modules(q).values():
        m.A.data.zero_()
    ids = _ids(2)
    patched = _logits(q, ids)
    merge(q)
    assert all(type(o) is FrozenQuantizedLinear for o in _o_projs(q)) and not lofit_fast.patched_modules(q)
    assert rel_err(_logits(q, ids), patched) < MERGE_Q_TOL


def test_folding_A_into_a_quantized_weight_is_refused_and_a_failed_merge_changes_nothing():
    from lofit_fast.adapter import merge, merged_linear
    from lofit_fast.adapter.merge import fold_intervention

    q, _ = _pair()
    lofit_fast.patch(q, HEADS, init_std=0.1)
    mod = lofit_fast.patched_modules(q)[1]
    with pytest.raises(ValueError, match="cannot fold A into the columns of a quantized weight.*keeps A unmerged"):
        merged_linear(mod)
    with pytest.raises(ValueError, match="quantized weight"):
        fold_intervention(mod.weight, mod.bias, mod.heads, mod.head_dim, mod.A, mod.v)
    modules = _o_projs(q)
    lofit_fast.patched_modules(q)[1].v.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="v of layer 1 contains NaN"):
        merge(q)
    assert all(a is b for a, b in zip(_o_projs(q), modules))


def _export_jobs(root, names):
    return {name: {"dir": str(root / name), "ids": _ids(5).tolist()} for name in names}


def test_export_of_an_int8_base_is_a_plain_float_checkpoint_with_the_patched_logits(tmp_path):
    from lofit_fast.adapter import export
    from test_merge_export import load_exports_without_lofit_fast
    import json
    import safetensors.torch

    ids = _ids(5)
    expected, models = {}, {}
    for name, kw in {"scale-offset": {}, "offset": {"scale": False}, "scale": {"offset": False}}.items():
        q, ref = _pair()
        _patch_both(q, ref, **kw)
        expected[name] = (_logits(q, ids), _logits(ref, ids))
        models[name] = q
        export(q, tmp_path / name)
    plain_q, plain_ref = _pair()
    export(plain_q, tmp_path / "unpatched")
    loaded, report = load_exports_without_lofit_fast(_export_jobs(tmp_path, [*expected, "unpatched"]), tmp_path)

    for name, (patched, patched_ref) in expected.items():
        assert report[name]["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        assert not any(m.startswith(("lofit_fast", "torchao")) for m in report[name]["modules"])
        assert report[name]["dtype"] == "torch.float32"
        assert rel_err(loaded[name], patched) < DEQUANT_TOL
        assert rel_err(loaded[name], patched_ref) < DEQUANT_TOL
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert "quantization_config" not in config
        assert config.get("attention_bias", False) is (name != "scale")
        # the caller's model is still the patched int8 model
        q = models[name]
        up = q.model.layers[0].mlp.up_proj
        assert len(lofit_fast.patched_modules(q)) == 2 and is_quantized_weight(up.weight)
        assert type(up) is FrozenQuantizedLinear
        assert torch.equal(_logits(q, ids), patched)
    assert rel_err(loaded["unpatched"], _logits(plain_ref, ids)) < DEQUANT_TOL
    # untouched weights are the dequantized int8 values exactly; the A columns are scaled in float32
    tensors = safetensors.torch.load_file(tmp_path / "scale" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    _, deq = _pair()
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"], deq.model.layers[0].mlp.down_proj.weight)
    o = tensors["model.layers.1.self_attn.o_proj.weight"]
    W = deq.model.layers[1].self_attn.o_proj.weight.detach()
    assert torch.equal(o[:, :16], W[:, :16]) and not torch.equal(o[:, 16:], W[:, 16:])  # heads 2, 3 of layer 1


def test_export_of_an_int8_base_keeps_the_overwrite_and_atomic_rules(tmp_path, monkeypatch):
    import transformers

    from lofit_fast.adapter import export

    q, _ = _pair()
    lofit_fast.patch(q, HEADS, init_std=0.1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(q, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export(q, out, overwrite=True)
    first = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in first and not (out / "notes.txt").exists()
    stamp = (out / "model.safetensors").read_bytes()
    real = transformers.PreTrainedModel.save_pretrained

    def disk_full(self, path, **kwargs):
        real(self, path, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    for m in lofit_fast.patched_modules(q).values():
        m.v.data.add_(1.0)  # a different checkpoint, which must not replace the first
    with pytest.raises(OSError, match="No space left"):
        export(q, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == first and (out / "model.safetensors").read_bytes() == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left
    assert len(lofit_fast.patched_modules(q)) == 2 and is_quantized_weight(q.model.layers[1].self_attn.o_proj.weight)


def test_gguf_export_of_an_int8_base_folds_v_with_the_files_own_weights(tmp_path):
    import numpy as np

    from lofit_fast.adapter.gguf_export import GGUFExportError, export_gguf, gguf_attn_output_biases
    from lofit_fast.ops.torch_backend import selected_columns
    from test_gguf_export import load_gguf, tiny_llama as gguf_tiny_llama, write_source_gguf

    source = write_source_gguf(gguf_tiny_llama(), tmp_path / "tiny.gguf")
    model = quantize_base(load_gguf(source), "int8")
    lofit_fast.patch(model, {0: [1], 2: [0, 3]}, scale=False, offset=True, init_std=0.5)
    with pytest.raises(GGUFExportError, match="differs from the model's o_proj weight"):
        export_gguf(model, tmp_path / "strict.gguf", source_gguf=source, check_tol=1e-4)  # int8 ≠ Q8_0 values
    info = export_gguf(model, tmp_path / "out.gguf", source_gguf=source)
    assert info["added"] == ["blk.0.attn_output.bias", "blk.2.attn_output.bias"] and info["rewritten"] == []
    biases = gguf_attn_output_biases(tmp_path / "out.gguf")
    float_model = load_gguf(source)  # the file's own dequantized weights
    for layer, m in lofit_fast.patched_modules(model).items():
        W = float_model.model.layers[layer].self_attn.o_proj.weight.detach().double()
        want = W[:, selected_columns(m.heads, m.head_dim)] @ m.v.detach().double().reshape(-1)
        assert rel_err(biases[layer], want) < 1e-6
    other = write_source_gguf(gguf_tiny_llama(seed=1), tmp_path / "other.gguf")
    with pytest.raises(GGUFExportError, match="not the GGUF this model was loaded from"):
        export_gguf(model, tmp_path / "x.gguf", source_gguf=other)
    assert not (tmp_path / "x.gguf").exists() and not np.any([p.name.endswith(".tmp") for p in tmp_path.iterdir()])


@pytest.mark.slow
def test_smollm2_int8_merge_and_export(tmp_path):
    import shutil

    from lofit_fast.adapter import export, merge
    from lofit_fast.adapter.export import copy_sharing_tensors
    from test_merge_export import SMOL_HEADS, TEXTS, load_exports_without_lofit_fast
    from test_adapter import random_values

    model, tok = lofit_fast.load_model("smollm2", quantize="int8", progress=False)
    A, v = random_values(model, SMOL_HEADS, std=0.05)
    lofit_fast.patch(model, SMOL_HEADS, A=A, v=v)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        patched = model(**batch).logits
        merged = merge(copy_sharing_tensors(model))
        assert rel_err(merged(**batch).logits, patched) < MERGE_Q_TOL * 10
    del merged
    export(model, tmp_path / "smol", tokenizer=tok)
    loaded, report = load_exports_without_lofit_fast({"smol": {"dir": str(tmp_path / "smol"), "texts": TEXTS}}, tmp_path)
    assert report["smol"]["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert report["smol"]["class"] == "LlamaForCausalLM" and report["smol"]["dtype"] == "torch.float32"
    assert rel_err(loaded["smol"], patched) < 1e-5
    shutil.rmtree(tmp_path / "smol")  # 0.5 GB of float32 weights
