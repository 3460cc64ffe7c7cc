"""import_official: state dicts built the way fc2869/lo-fit builds them (per-head attn_A / attn_v ParameterLists
inside the attention module), imported into lofit_fast, against a hand-written forward of their formula."""
import json

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import lofit_fast
from lofit_fast.adapter import import_official, load_adapter, save_adapter
from lofit_fast.adapter.official import OfficialFormatError, convert_official, read_official_state
from lofit_fast.cli import main
from models import random_ids, tiny_model
from test_lofit import char_tokenizer


def official_model(family="llama", seed=0):
    """A tiny HF model with the official modeling file's parameters: `self.attn_A` / `self.attn_v` as
    nn.ParameterList of zeros, one [head_dim] parameter per head, in every attention module."""
    model = tiny_model(family, attn="eager", seed=seed)
    for layer in model.model.layers:
        attn = layer.self_attn
        n, d = model.config.num_attention_heads, model.config.head_dim
        attn.attn_A = nn.ParameterList([nn.Parameter(torch.zeros(d, requires_grad=True), requires_grad=True) for _ in range(n)])
        attn.attn_v = nn.ParameterList([nn.Parameter(torch.zeros(d, requires_grad=True), requires_grad=True) for _ in range(n)])
    return model


def official_init(model, component, heads=None, seed=1):
    """lofit_trainer.py: `nn.init.normal_(module, mean=0, std=1e-3)` on every attn_A (step 1) or on the attn_v of
    the selected (layer, head) tuples (step 2); scaled up here so the effect is far above rounding."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            plist = layer.self_attn.attn_A if component == "A" else layer.self_attn.attn_v
            for j, module in enumerate(plist):
                if heads is None or (i, j) in heads:
                    nn.init.normal_(module, mean=0, std=0.3)


def their_logits(model, ids):
    """Their forward: `attn_output[:,:,i*d:(i+1)*d] = torch.mul(A+1, attn_output[...].clone()) + v` for every
    head, on the o_proj input (copied from models/modeling_llama.py, applied through a pre-hook)."""
    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        d = model.config.head_dim

        def hook(module, args, attn=attn, d=d):
            attn_output = args[0].clone()
            for i, (A, v) in enumerate(zip(attn.attn_A, attn.attn_v)):
                attn_output[:, :, i * d:(i + 1) * d] = torch.mul(A + 1, attn_output[:, :, i * d:(i + 1) * d].clone()) + v
            return (attn_output,)

        handles.append(attn.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = random_ids(2, 9)
STEP2_HEADS = [(0, 1), (0, 3), (2, 2)]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_step2_checkpoint_selects_the_tuned_heads_and_matches_their_forward(family):
    theirs = official_model(family)
    official_init(theirs, "v", STEP2_HEADS)
    state = theirs.state_dict()
    assert "model.layers.0.self_attn.attn_v.1" in state and "model.layers.2.self_attn.attn_A.3" in state
    want = their_logits(theirs, IDS)

    ours = tiny_model(family, attn="eager")
    base = logits(ours, IDS)
    import_official(state, ours)
    mods = lofit_fast.patched_modules(ours)
    assert {l: m.head_list for l, m in mods.items()} == {0: [1, 3], 2: [2]}
    assert all(m.A is None and m.v is not None for m in mods.values())
    torch.testing.assert_close(mods[0].v[1], state["model.layers.0.self_attn.attn_v.3"])
    got = logits(ours, IDS)
    assert (want - base).abs().max() > 1e-2  # the intervention does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_step1_checkpoint_scales_every_head(tmp_path):
    theirs = official_model()
    official_init(theirs, "A")
    want = their_logits(theirs, IDS)
    ours = tiny_model("llama", attn="eager")
    import_official(theirs.state_dict(), ours)
    mods = lofit_fast.patched_modules(ours)
    assert {l: m.head_list for l, m in mods.items()} == {l: [0, 1, 2, 3] for l in range(3)}
    assert all(m.A is not None and m.v is None for m in mods.values())
    torch.testing.assert_close(logits(ours, IDS), want, rtol=1e-5, atol=1e-5)
    # the adapter round trip: save, load into a fresh model, same logits
    save_adapter(ours, tmp_path / "adapter", method="lofit")
    fresh = load_adapter(tiny_model("llama", attn="eager"), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, IDS), want, rtol=1e-5, atol=1e-5)


def test_mixed_A_and_v_on_different_heads_take_the_union_with_zeros_filled_in():
    theirs = official_model()
    official_init(theirs, "A", [(1, 0), (1, 2)], seed=3)
    official_init(theirs, "v", [(1, 2), (2, 1)], seed=4)
    want = their_logits(theirs, IDS)
    conv = convert_official(theirs.state_dict(), tiny_model("llama"))
    assert conv.heads == {1: [0, 2], 2: [1]} and conv.scale and conv.offset
    assert torch.equal(conv.A[2], torch.zeros(1, 16)) and torch.equal(conv.v[1][0], torch.zeros(16))
    assert conv.skipped_identity == 12 - 3
    ours = tiny_model("llama", attn="eager")
    import_official(theirs.state_dict(), ours)
    torch.testing.assert_close(logits(ours, IDS), want, rtol=1e-5, atol=1e-5)


def test_head_order_is_the_parameter_list_index():
    """Swapping two heads' parameters in the state dict must change which heads the adapter holds."""
    theirs = official_model()
    official_init(theirs, "v", [(0, 0)])
    state = dict(theirs.state_dict())
    state["model.layers.0.self_attn.attn_v.0"], state["model.layers.0.self_attn.attn_v.2"] = (
        state["model.layers.0.self_attn.attn_v.2"], state["model.layers.0.self_attn.attn_v.0"])
    conv = convert_official(state, tiny_model("llama"))
    assert conv.heads == {0: [2]}


def test_files_single_sharded_and_prefixed(tmp_path):
    theirs = official_model()
    official_init(theirs, "v", STEP2_HEADS)
    state = {k: t.contiguous() for k, t in theirs.state_dict().items()}
    want = convert_official(state, tiny_model("llama"))

    single = tmp_path / "single"
    single.mkdir()
    safetensors.torch.save_file(state, single / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        safetensors.torch.save_file({k: state[k] for k in ks}, sharded / name)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    peft_like = {f"base_model.model.{k}": t for k, t in state.items() if "attn_" in k}
    for src in (single, single / "model.safetensors", sharded, sharded / "model.safetensors.index.json", peft_like):
        got = convert_official(read_official_state(src), tiny_model("llama"))
        assert got.heads == want.heads
        for layer in want.heads:
            assert torch.equal(got.v[layer], want.v[layer])
    assert set(read_official_state(single)) == {k for k in state if ".attn_" in k}


def _state(**edits):
    theirs = official_model()
    official_init(theirs, "v", STEP2_HEADS)
    state = dict(theirs.state_dict())
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("edits, message", [
    ({"model__layers__0__self_attn__attn_v__2": None}, r"missing \[2\]"),
    ({"model__layers__0__self_attn__attn_v__4": torch.zeros(16)}, r"unexpected \[4\]"),
    ({"model__layers__5__self_attn__attn_v__0": torch.zeros(16)}, "only 3 layers"),
    ({"model__layers__1__self_attn__attn_A__0": torch.zeros(12)}, r"shape \[12\], expected \[16\]"),
    ({"model__layers__0__self_attn__attn_v__1": torch.full((16,), float("nan"))}, "NaN"),
    ({"other__layers__0__self_attn__attn_A__0": torch.zeros(16)}, "mixes key prefixes"),
])
def test_bad_checkpoints_are_clear_errors_and_leave_the_model_alone(edits, message):
    ours = tiny_model("llama")
    with pytest.raises(OfficialFormatError, match=message):
        import_official(_state(**edits), ours)
    assert not lofit_fast.patched_modules(ours)


def test_no_or_all_zero_lofit_parameters_and_pickle_are_refused(tmp_path):
    base = tiny_model("llama")
    with pytest.raises(OfficialFormatError, match="no LoFiT parameters found"):
        import_official(base.state_dict(), tiny_model("llama"))
    with pytest.raises(OfficialFormatError, match="every attn_A and attn_v in the checkpoint is zero"):
        import_official(official_model().state_dict(), tiny_model("llama"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OfficialFormatError, match="pickle"):
        import_official(tmp_path / "pytorch_model.bin", tiny_model("llama"))
    with pytest.raises(OfficialFormatError, match="only pickle files"):
        import_official(tmp_path, tiny_model("llama"))
    # atol: tiny values count as the identity
    state = _state()
    with pytest.raises(OfficialFormatError, match="within atol"):
        convert_official(state, tiny_model("llama"), atol=10.0)


def test_cli_import_writes_an_adapter(tmp_path, capsys):
    model_dir = tmp_path / "base"
    tiny_model("llama", attn="sdpa").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)  # the CLI loads a tokenizer with the model
    theirs = official_model()
    official_init(theirs, "v", STEP2_HEADS)
    want = their_logits(theirs, IDS)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    safetensors.torch.save_file({k: t.contiguous() for k, t in theirs.state_dict().items()}, ckpt / "model.safetensors")
    out = tmp_path / "adapter"
    rc = main(["import", "--from", "lofit", "--checkpoint", str(ckpt), "--model", str(model_dir), "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "3 heads" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["heads"] == {"0": [1, 3], "2": [2]} and config["offset"] and not config["scale"]
    assert config["hyperparameters"]["imported_from"] == "fc2869/lo-fit"
    fresh = load_adapter(tiny_model("llama", attn="eager"), out)
    torch.testing.assert_close(logits(fresh, IDS), want, rtol=1e-5, atol=1e-5)
    rc = main(["import", "--from", "lofit", "--checkpoint", str(tmp_path / "nope"), "--model", str(model_dir),
               "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 1 and "not found" in capsys.readouterr().err
