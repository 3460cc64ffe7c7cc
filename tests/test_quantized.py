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
from lofit_fast.models import quantize_base  # noqa: E402

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
