"""Many adapters in one batch: the per-row op on every backend against the float64 reference (each row equals
that row run alone with its own adapter, forward and backward), and the model API (load_adapters, adapter_names
in forward and generate, add / delete / set_adapter, merge refused, atomic loads, torch.compile)."""
import math

import pytest
import torch

import lofit_fast
from lofit_fast.ops import get_backend
from lofit_fast.patch import MultiHeadInterventionLinear, get_router, patched_modules

from conftest import device_for
from models import random_ids, tiny_model
from reference import GRAD_TOL, OUT_TOL, poison_allocator, reference_forward, reference_grads, rel_err

ROW_BACKENDS = [b for b in lofit_fast.available_backends()
                if hasattr(get_backend(b, torch.empty(1, device=device_for(b)), torch.empty(1, 1), 1), "forward_rows")]


def test_every_backend_has_per_row_kernels():
    assert set(ROW_BACKENDS) == set(lofit_fast.available_backends())


# ------------------------------------------------------------------------------------------------------------
# The op

# (leading shape, H, head_dim, D_out, heads, n_adapters): odd D_out and row counts, 3-D input, dense (all heads).
OP_CASES = [((9,), 5, 16, 37, [1, 3], 3), ((2, 5), 4, 32, 29, [0, 2, 3], 4), ((7,), 4, 16, 21, [0, 1, 2, 3], 2),
            ((1,), 3, 64, 50, [2], 1), ((40,), 3, 16, 19, [0, 2], 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(lead, H, d, D_out, heads, n, dtype, mode, device, with_bias=True):
    C = H * d
    x = torch.randn(*lead, C, device=device).to(dtype)
    W = (torch.randn(D_out, C, device=device) / math.sqrt(C)).to(dtype)
    b = torch.randn(D_out, device=device).to(dtype) if with_bias else None
    heads = torch.tensor(heads, dtype=torch.int64, device=device)
    K = heads.numel()
    A = 0.5 * torch.randn(n, K, d, device=device) if mode in ("both", "scale") else None
    v = 0.5 * torch.randn(n, K, d, device=device) if mode in ("both", "offset") else None
    N = math.prod(lead)
    ids = torch.randint(-1, n, (N,), device=device)
    ids[0] = n - 1  # every case uses the last adapter, and (N > 1) no adapter at all in some row
    if N > 1:
        ids[-1] = -1
    return x, W, b, heads, A, v, ids.reshape(lead)


def _row_reference(x, W, b, heads, A, v, ids, d):
    """Each row alone with its own adapter: the shared float64 reference, one row at a time."""
    x2, ids2 = x.reshape(-1, x.shape[-1]), ids.reshape(-1).tolist()
    rows = []
    for n, a in enumerate(ids2):
        An = None if (A is None or a < 0) else A[a:a + 1][0]
        vn = None if (v is None or a < 0) else v[a:a + 1][0]
        hs = heads.cpu() if a >= 0 else heads.cpu()[:0]
        rows.append(reference_forward(x2[n:n + 1].cpu(), W.cpu(), None if b is None else b.cpu(), hs,
                                      None if An is None else An.cpu(), None if vn is None else vn.cpu(), d))
    return torch.cat(rows).reshape(*x.shape[:-1], W.shape[0])


def _row_reference_grads(x, W, heads, A, v, ids, d, dy):
    x2, dy2, ids2 = x.reshape(-1, x.shape[-1]).cpu(), dy.reshape(-1, W.shape[0]).cpu(), ids.reshape(-1).tolist()
    n = (A if A is not None else v).shape[0]
    K = heads.numel()
    dx = torch.zeros(x2.shape, dtype=torch.float64)
    dA = torch.zeros(n, K, d, dtype=torch.float64)
    dv = torch.zeros(n, K, d, dtype=torch.float64)
    for r, a in enumerate(ids2):
        An = None if (A is None or a < 0) else A[a].cpu()
        hs = heads.cpu() if a >= 0 else heads.cpu()[:0]
        gx, gA, gv = reference_grads(x2[r:r + 1], W.cpu(), hs, An, None, d, dy2[r:r + 1])
        dx[r] = gx[0]
        if a >= 0:
            dA[a] += gA
            dv[a] += gv
    return dx.reshape(x.shape), dA, dv


MODES = ["both", "scale", "offset"]
FWD_CASES = [(case, dtype, MODES[(i + j) % 3]) for i, case in enumerate(OP_CASES) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("case,dtype,mode", FWD_CASES,
                         ids=lambda c: f"{c[0]}-H{c[1]}-d{c[2]}-K{len(c[4])}-n{c[5]}" if isinstance(c, tuple) else str(c))
def test_rows_forward_each_row_equals_row_alone(backend, case, dtype, mode):
    device = device_for(backend)
    if dtype not in get_backend(backend, torch.empty(1, device=device), torch.empty(1, 1), 1).dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    lead, H, d, D_out, hs, n = case
    x, W, b, heads, A, v, ids = _case(lead, H, d, D_out, hs, n, dtype, mode, device, with_bias=mode != "scale")
    poison_allocator(x.numel() * 8 + D_out * 256, device)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend, row_ids=ids)
    assert y.shape == (*lead, D_out) and y.dtype == dtype
    ref = _row_reference(x, W, b, heads, A, v, ids, d)
    assert rel_err(y, ref) < OUT_TOL[dtype], rel_err(y, ref)
    # Rows of one adapter (or none) equal the single-table op on that row.
    x2, ids2 = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    for r in range(x2.shape[0]):
        a = int(ids2[r])
        alone = lofit_fast.head_affine_linear(x2[r:r + 1], W, b, heads, None if A is None or a < 0 else A[a],
                                              None if v is None or a < 0 else v[a], d, backend="torch")
        assert rel_err(y.reshape(-1, D_out)[r:r + 1], alone) < OUT_TOL[dtype]


BWD_CASES = [(OP_CASES[0], torch.float32, "both"), (OP_CASES[1], torch.bfloat16, "both"),
             (OP_CASES[2], torch.float32, "offset"), (OP_CASES[3], torch.float16, "both")]


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("case,dtype,mode", BWD_CASES,
                         ids=lambda c: f"{c[0]}-K{len(c[4])}-n{c[5]}" if isinstance(c, tuple) else str(c))
def test_rows_backward_each_row_lands_in_its_adapter(backend, case, dtype, mode):
    device = device_for(backend)
    lead, H, d, D_out, hs, n = case
    x, W, b, heads, A, v, ids = _case(lead, H, d, D_out, hs, n, dtype, mode, device)
    x = x.requires_grad_()
    A = None if A is None else A.requires_grad_()
    v = v.requires_grad_()
    dy = torch.randn(*lead, D_out, device=device).to(dtype)
    poison_allocator(x.numel() * 8 + 4096, device)
    y = lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend, row_ids=ids)
    y.backward(dy)
    rdx, rdA, rdv = _row_reference_grads(x, W, heads, A, v, ids, d, dy)
    assert rel_err(x.grad, rdx) < GRAD_TOL[dtype]
    assert v.grad.shape == (n, len(hs), d) and v.grad.dtype == torch.float32
    assert rel_err(v.grad, rdv) < GRAD_TOL[dtype]
    if A is not None:
        assert rel_err(A.grad, rdA) < GRAD_TOL[dtype]
    used = set(ids.reshape(-1).tolist())
    for a in range(n):
        if a not in used:  # an adapter no row uses gets exactly zero gradient
            assert v.grad[a].abs().max() == 0


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_rows_strided_input_and_many_rows(backend):
    """A strided x (every other column) and more rows than the decode kernels take."""
    device = device_for(backend)
    H, d, D_out, n = 3, 16, 23, 4
    x = torch.randn(41, 2 * H * d, device=device)[:, ::2]
    W = torch.randn(D_out, H * d, device=device) / math.sqrt(H * d)
    heads = torch.tensor([0, 2], device=device)
    A, v = 0.5 * torch.randn(n, 2, d, device=device), 0.5 * torch.randn(n, 2, d, device=device)
    ids = torch.randint(-1, n, (41,), device=device)
    x_before = x.clone()
    y = lofit_fast.head_affine_linear(x, W, None, heads, A, v, d, backend=backend, row_ids=ids)
    assert rel_err(y, _row_reference(x, W, None, heads, A, v, ids, d)) < OUT_TOL[torch.float32]
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("backend", [b for b in ROW_BACKENDS if b in ("torch", "cpp")])
@pytest.mark.parametrize("dense", [False, True])
def test_rows_gradcheck_float64(backend, dense):
    H, d, D_out, n = 4, 3, 5, 3
    heads = torch.tensor([0, 1, 2, 3] if dense else [1, 3])
    K = heads.numel()
    x = torch.randn(6, H * d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D_out, H * d, dtype=torch.float64)
    b = torch.randn(D_out, dtype=torch.float64)
    A = torch.randn(n, K, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, K, d, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, 0, -1, 2, 1, 0])
    fn = lambda x, A, v: lofit_fast.head_affine_linear(x, W, b, heads, A, v, d, backend=backend, row_ids=ids)  # noqa
    assert torch.autograd.gradcheck(fn, (x, A, v))


def test_rows_input_errors():
    x = torch.randn(4, 8)
    W, heads = torch.randn(3, 8), torch.tensor([1])
    A = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="out of range: there are 2 adapters"):
        lofit_fast.head_affine_linear(x, W, None, heads, A, None, 4, row_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="one entry per row"):
        lofit_fast.head_affine_linear(x, W, None, heads, A, None, 4, row_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int64"):
        lofit_fast.head_affine_linear(x, W, None, heads, A, None, 4, row_ids=torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[n_adapters, K, head_dim\]"):
        lofit_fast.head_affine_linear(x, W, None, heads, torch.zeros(1, 4), None, 4, row_ids=torch.zeros(4, dtype=torch.long))
    # the C++ kernel checks ids too (what a compiled graph relies on, where the Python check is skipped)
    from lofit_fast.ops.cpp_backend import call_forward_rows
    with pytest.raises(RuntimeError, match=r"row_ids\[2\] = 5 out of range"):
        call_forward_rows(x, W, None, heads, A, None, torch.tensor([0, 1, 5, 0]), 4)


# ------------------------------------------------------------------------------------------------------------
# The model API

SPECS = {
    "tqa": ({0: [1], 2: [0, 3]}, True, True),     # LoFiT-style: A and v
    "iti": ({1: [2], 2: [3]}, False, True),       # ITI-style: offsets only
    "sel": ({0: [0, 1]}, True, False),            # scale only
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for family in ("llama", "gemma"):
        root = tmp_path_factory.mktemp(family)
        paths = {}
        for i, (name, (heads, scale, offset)) in enumerate(SPECS.items()):
            m = tiny_model(family)
            torch.manual_seed(100 + i)
            lofit_fast.patch(m, heads, scale=scale, offset=offset, init_std=1.0)
            paths[name] = lofit_fast.save_adapter(m, root / name)
        out[family] = paths
    return out


def _alone(family, attn, path, **call):
    m = tiny_model(family, attn)
    if path is not None:
        lofit_fast.load_adapter(m, path)
    with torch.no_grad():
        return m(**call).logits


def _left_padded(B=4, T=7):
    ids = random_ids(B, T, seed=3)
    mask = torch.ones_like(ids)
    for r in range(B):
        mask[r, : r % 3] = 0  # rows 1, 2, 4 ... start later
    return ids, mask


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma", "sdpa")])
def test_mixed_batch_rows_equal_each_adapter_alone(saved, family, attn):
    paths = saved[family]
    ids, mask = _left_padded()
    names = ["tqa", "iti", "__base__", "sel"]
    model = tiny_model(family, attn)
    lofit_fast.load_adapters(model, paths)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert get_router(model).ids is None, "adapter_names must be cleared after the call"
    for r, name in enumerate(names):
        alone = _alone(family, attn, paths.get(name), input_ids=ids, attention_mask=mask)
        keep = mask[r].bool()
        assert rel_err(mixed[r][keep], alone[r][keep]) < 1e-5, (name, rel_err(mixed[r][keep], alone[r][keep]))
    base = _alone(family, attn, None, input_ids=ids, attention_mask=mask)
    assert rel_err(mixed[0], base[0]) > 1e-3, "the adapters must change the logits (else the test proves nothing)"
    # integer ids and an int64 tensor of ids mean the same rows
    with torch.no_grad():
        by_int = model(input_ids=ids, attention_mask=mask, adapter_names=[0, 1, -1, 2]).logits
        by_tensor = model(input_ids=ids, attention_mask=mask, adapter_names=lofit_fast.adapter_ids(model, names)).logits
    assert torch.equal(by_int, mixed) and torch.equal(by_tensor, mixed)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gemma", "eager")])
def test_generate_mixed_batch_with_kv_cache(saved, family, attn):
    paths = saved[family]
    ids, mask = _left_padded()
    names = ["sel", "tqa", "iti", "__base__"]
    model = tiny_model(family, attn)
    lofit_fast.load_adapters(model, paths)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
    assert get_router(model).ids is None
    base = tiny_model(family, attn).generate(input_ids=ids, attention_mask=mask, **kw)
    for r, name in enumerate(names):
        m = tiny_model(family, attn)
        if paths.get(name) is not None:
            lofit_fast.load_adapter(m, paths[name])
        alone = m.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(mixed.sequences[r], alone.sequences[r]), name
        for step_mixed, step_alone, step_base in zip(mixed.scores, alone.scores, base.scores):
            assert rel_err(step_mixed[r], step_alone[r]) < 1e-5, name
            if name != "__base__":  # every decode step sees the row's adapter
                assert rel_err(step_alone[r], step_base[r]) > 1e-4, name
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    # set_adapter is the default of calls without names
    lofit_fast.set_adapter(model, "iti")
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw),
                       model.generate(input_ids=ids, attention_mask=mask, adapter_names=["iti"] * 4, **kw))


def test_unknown_names_fail_before_any_compute_and_are_cleared(saved):
    model = tiny_model("llama")
    lofit_fast.load_adapters(model, saved["llama"])
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope': loaded adapters are \['tqa', 'iti', 'sel'\]"):
        model(input_ids=ids, adapter_names=["tqa", "nope"])
    with pytest.raises(ValueError, match="2 rows"):
        model(input_ids=ids, adapter_names=["tqa"])
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, adapter_names=[0, 3])
    with pytest.raises(ValueError, match="unknown adapter"):
        model.generate(input_ids=ids, adapter_names=["x", "tqa"], max_new_tokens=2)
    assert calls == [] and get_router(model).ids is None
    # an error inside the forward still clears the names
    with pytest.raises(Exception):
        model(input_ids=torch.full((2, 5), 10_000), adapter_names=["tqa", "iti"])
    assert get_router(model).ids is None


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, type(model.model.layers[0].self_attn.o_proj)


def test_failed_load_leaves_the_model_as_it_was(saved, tmp_path):
    model = tiny_model("llama")
    before, cls = _state(model)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        lofit_fast.load_adapters(model, {**saved["llama"], "bad": bad})
    assert not patched_modules(model) and get_router(model) is None and "generate" not in model.__dict__
    other = tiny_model("gemma")  # an adapter of another model is refused like load_adapter refuses it
    with pytest.raises(Exception):
        lofit_fast.load_adapters(other, {"tqa": saved["llama"]["tqa"]})
    assert not patched_modules(other)
    with pytest.raises(ValueError, match="reserved"):
        lofit_fast.load_adapters(model, {"__base__": saved["llama"]["tqa"]})
    # and on a loaded model, a bad add_adapter keeps the loaded adapters
    lofit_fast.load_adapters(model, {"tqa": saved["llama"]["tqa"]})
    mods = patched_modules(model)
    with pytest.raises(Exception, match="not valid JSON"):
        lofit_fast.add_adapter(model, "bad", bad)
    assert patched_modules(model) == mods and lofit_fast.adapter_names(model) == ["tqa"]


def test_add_delete_set_and_merge(saved):
    paths = saved["llama"]
    ids = random_ids(3, 6)
    model = tiny_model("llama")
    lofit_fast.load_adapters(model, {"tqa": paths["tqa"]})
    lofit_fast.add_adapter(model, "iti", paths["iti"])
    lofit_fast.add_adapter(model, "sel", paths["sel"])
    assert lofit_fast.adapter_names(model) == ["tqa", "iti", "sel"]
    layer2 = model.model.layers[2].self_attn.o_proj
    assert isinstance(layer2, MultiHeadInterventionLinear) and layer2.head_list == [0, 3]
    assert layer2.A_table.shape == (3, 2, 16)
    assert torch.equal(layer2.A_table[1], torch.zeros(2, 16)), "an adapter without A is identity there"
    with torch.no_grad():
        full = model(input_ids=ids, adapter_names=["tqa", "iti", "sel"]).logits
    with pytest.raises(RuntimeError, match="holds 3 adapters"):
        lofit_fast.merge(model)
    with pytest.raises(RuntimeError, match="holds 3 adapters"):
        lofit_fast.save_adapter(model, "/tmp/never")
    with pytest.raises(ValueError, match="already loaded"):
        lofit_fast.add_adapter(model, "iti", paths["iti"])
    lofit_fast.delete_adapter(model, "tqa")
    assert lofit_fast.adapter_names(model) == ["iti", "sel"]
    assert 0 not in patched_modules(model) or patched_modules(model)[0].head_list == [0, 1]
    with torch.no_grad():
        after = model(input_ids=ids, adapter_names=["__base__", "iti", "sel"]).logits
    assert rel_err(after[1:], full[1:]) < 1e-6
    lofit_fast.set_adapter(model, "sel")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids, adapter_names=["sel"] * 3).logits)
    with pytest.raises(ValueError, match="unknown adapter"):
        lofit_fast.set_adapter(model, "tqa")
    lofit_fast.delete_adapter(model, "iti")
    with torch.no_grad():
        one = model(input_ids=ids).logits
    lofit_fast.merge(model)  # one adapter left: merging is allowed and exact
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, one) < 1e-5
    assert not patched_modules(model)
    m2 = tiny_model("llama")
    lofit_fast.load_adapters(m2, paths)
    for name in list(paths):
        lofit_fast.delete_adapter(m2, name)
    assert not patched_modules(m2) and get_router(m2) is None and "generate" not in m2.__dict__
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


def test_training_several_adapters_in_one_batch(saved):
    """One backward over a mixed batch: each adapter's table slice gets the gradient it gets alone on its rows."""
    paths = saved["llama"]
    ids = random_ids(4, 6)
    names = ["tqa", "iti", "tqa", "sel"]
    model = tiny_model("llama")
    lofit_fast.load_adapters(model, paths)
    lofit_fast.freeze_base(model)
    params = lofit_fast.trainable_parameters(model)
    assert params and all(p.dim() == 3 for p in params)
    loss = model(input_ids=ids, adapter_names=names).logits.float().square().mean() * 4
    loss.backward()
    table = model.model.layers[2].self_attn.o_proj
    for name, rows in (("tqa", [0, 2]), ("iti", [1])):
        m = tiny_model("llama")
        lofit_fast.load_adapter(m, paths[name])
        lofit_fast.freeze_base(m)
        (m(input_ids=ids[rows]).logits.float().square().mean() * len(rows)).backward()
        single = m.model.layers[2].self_attn.o_proj
        i = lofit_fast.adapter_names(model).index(name)
        pos = [table.head_list.index(h) for h in single.head_list]
        assert rel_err(table.v_table.grad[i, pos], single.v.grad) < 1e-5
        if single.A is not None:
            assert rel_err(table.A_table.grad[i, pos], single.A.grad) < 1e-5


def test_torch_compile_fullgraph_no_graph_breaks_and_no_recompile(saved):
    import torch._dynamo as dynamo

    model = tiny_model("llama", "sdpa")
    lofit_fast.load_adapters(model, saved["llama"])
    ids = random_ids(3, 5)
    rows = lofit_fast.adapter_ids(model, ["tqa", "__base__", "sel"])

    def fwd(input_ids, rows):
        return model(input_ids=input_ids, adapter_names=rows, use_cache=False).logits

    explained = dynamo.explain(fwd)(ids, rows)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    # aot_eager: AOTAutograd traces forward and backward through the custom ops' fake implementations
    counter = dynamo.testing.CompileCounterWithBackend("aot_eager")
    cmodel = torch.compile(model, backend=counter, fullgraph=True)

    def compiled(input_ids, rows):
        return cmodel(input_ids=input_ids, adapter_names=rows, use_cache=False).logits

    with torch.no_grad():
        eager = fwd(ids, rows)
        out = compiled(ids, rows)
        frames = counter.frame_count
        assert rel_err(out, eager) < 1e-5
        rows2 = lofit_fast.adapter_ids(model, ["iti", "tqa", "__base__"])
        assert rel_err(compiled(ids, rows2), fwd(ids, rows2)) < 1e-5
        assert rel_err(compiled(ids, rows2), eager) > 1e-4, "other ids must give other logits"
    assert counter.frame_count == frames, "changing the ids must not recompile"
    assert get_router(model).ids is None
    # backward through the compiled graph: the same table gradients as eager
    lofit_fast.freeze_base(model)
    compiled(ids, rows).float().square().mean().backward()
    g_comp = [p.grad.clone() for p in lofit_fast.trainable_parameters(model)]
    model.zero_grad()
    fwd(ids, rows).float().square().mean().backward()
    for gc, p in zip(g_comp, lofit_fast.trainable_parameters(model)):
        assert rel_err(gc, p.grad) < 1e-5
    # a decode step with a KV cache
    from transformers import DynamicCache

    def step(input_ids, rows, cache):
        return model(input_ids=input_ids, adapter_names=rows, past_key_values=cache, use_cache=True).logits

    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids, adapter_names=rows, past_key_values=cache, use_cache=True)
        nxt = random_ids(3, 1, seed=5)
        explained = dynamo.explain(step)(nxt, rows, cache)
        assert explained.graph_break_count == 0, explained.break_reasons
