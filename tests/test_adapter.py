"""save_adapter / load_adapter: round trips on every family, and clear errors for every kind of mismatch or damage."""
import json
import os

import pytest
import safetensors.torch
import torch
import transformers as tf

import lofit_fast
from lofit_fast.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    disable_adapter,
    get_nb_trainable_parameters,
    load_adapter,
    load_adapter_config,
    print_trainable_parameters,
    save_adapter,
    unload,
)
from lofit_fast import _files as file_writes
from lofit_fast.patch import HeadInterventionLinear

from models import random_ids, tiny_config, tiny_model

FAMILIES = ["llama", "gemma", "gemma2", "gemma3"]
HEADS = {0: [2], 2: [0, 1, 3]}  # layer 1 untouched; layer 0 takes the thin path, layer 2 the dense one


def random_values(model, heads=HEADS, std=0.1, dtype=torch.float32, seed=0):
    """Random N(0, std) A and v ({layer: [K, head_dim]}) so every merge and load is really exercised."""
    g = torch.Generator().manual_seed(seed)
    sites = lofit_fast.find_attention_sites(model)
    A = {l: (torch.randn(len(h), sites[l].head_dim, generator=g) * std).to(dtype) for l, h in heads.items()}
    v = {l: (torch.randn(len(h), sites[l].head_dim, generator=g) * std).to(dtype) for l, h in heads.items()}
    return A, v


def patched_tiny(family, *, scale=True, offset=True, dtype=torch.float32, param_dtype=torch.float32, seed=0):
    model = tiny_model(family, attn="eager", dtype=dtype)
    A, v = random_values(model, dtype=param_dtype, seed=seed)
    return lofit_fast.patch(
        model, HEADS, scale=scale, offset=offset, A=A if scale else None, v=v if offset else None,
        param_dtype=param_dtype,
    )


def logits(model, ids=None):
    with torch.no_grad():
        return model(random_ids(seq=12) if ids is None else ids).logits


def values(model):
    return {
        (layer, name): getattr(m, name).detach().clone()
        for layer, m in lofit_fast.patched_modules(model).items()
        for name in ("A", "v")
        if getattr(m, name) is not None
    }


def model_with(family, **overrides):
    cfg = tiny_config(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return (tf.Gemma3ForCausalLM(cfg) if family == "gemma3" else tf.AutoModelForCausalLM.from_config(cfg)).eval()


@pytest.fixture
def saved(tmp_path):
    """A llama adapter on disk, with its model's logits and values."""
    model = patched_tiny("llama")
    save_adapter(model, tmp_path, selection={"scores": [[0, 2, 0.5]]}, hyperparameters={"lr": 1e-2})
    return tmp_path, logits(model), values(model)


def read_config(directory):
    return json.loads((directory / CONFIG_NAME).read_text())


def write_config(directory, config):
    (directory / CONFIG_NAME).write_text(json.dumps(config))


# --- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_same_logits_and_values(family, tmp_path):
    model = patched_tiny(family)
    expected, vals = logits(model), values(model)
    assert (expected - logits(tiny_model(family, attn="eager"))).norm() > 0.05 * expected.norm()  # A, v matter

    out = save_adapter(model, tmp_path / "ad", method="lofit", hyperparameters={"lr": 5e-3, "dtype": torch.float32})
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    fresh = tiny_model(family, attn="eager")
    assert load_adapter(fresh, out) is fresh
    assert torch.equal(logits(fresh), expected)
    got = values(fresh)
    assert got.keys() == vals.keys() and all(torch.equal(got[k], vals[k]) for k in vals)
    assert {l: m.head_list for l, m in lofit_fast.patched_modules(fresh).items()} == HEADS


def test_config_describes_model_selection_and_hyperparameters(tmp_path):
    class Selection:
        def to_dict(self):
            return {"scores": torch.tensor([[0.5, 0.25]]), "k": 2}

    model = patched_tiny("gemma3")
    save_adapter(model, tmp_path, selection=Selection(), method="lofit", hyperparameters={"lr": 1e-2, "dtype": torch.bfloat16})
    config = load_adapter_config(tmp_path)
    assert config["architecture"] == "Gemma3ForCausalLM" and config["model_type"] == "gemma3_text"
    assert config["num_layers"] == 3 and config["num_heads"] == [4, 4, 4] and config["head_dim"] == 16
    assert config["hidden_size"] == 48
    assert config["heads"] == {"0": [2], "2": [0, 1, 3]}
    assert config["scale"] is True and config["offset"] is True and config["param_dtype"] == "float32"
    assert config["num_parameters"] == 2 * 4 * 16
    assert config["selection"] == {"scores": [[0.5, 0.25]], "k": 2}
    assert config["hyperparameters"] == {"lr": 1e-2, "dtype": "bfloat16"}
    assert config["method"] == "lofit" and config["lofit_fast_version"] == lofit_fast.__version__
    assert config["format_version"] == 1


@pytest.mark.parametrize("scale,offset", [(True, False), (False, True)])
def test_round_trip_scale_only_and_offset_only(scale, offset, tmp_path):
    model = patched_tiny("llama", scale=scale, offset=offset)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model("llama", attn="eager"), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    m = lofit_fast.patched_modules(fresh)[2]
    assert (m.A is not None, m.v is not None) == (scale, offset)
    with safetensors.safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert sorted(f.keys()) == sorted(
            [f"layers.{l}.heads" for l in HEADS]
            + [f"layers.{l}.{n}" for l in HEADS for n, on in (("A", scale), ("v", offset)) if on]
        )


def test_round_trip_keeps_bfloat16_params_and_model(tmp_path):
    model = patched_tiny("gemma2", dtype=torch.bfloat16, param_dtype=torch.bfloat16)
    save_adapter(model, tmp_path)
    assert load_adapter_config(tmp_path)["param_dtype"] == "bfloat16"
    fresh = load_adapter(tiny_model("gemma2", attn="eager", dtype=torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in lofit_fast.trainable_parameters(fresh))
    assert torch.equal(logits(fresh), logits(model))


def test_load_into_model_patched_with_same_heads_copies_in_place(saved):
    directory, expected, vals = saved
    model = lofit_fast.patch(tiny_model("llama", attn="eager"), HEADS, backend="torch")
    before = lofit_fast.patched_modules(model)
    params = {k: getattr(before[k[0]], k[1]) for k in vals}
    load_adapter(model, directory)
    after = lofit_fast.patched_modules(model)
    assert all(after[l] is before[l] and after[l].backend == "torch" for l in before)
    assert all(getattr(after[l], n) is params[(l, n)] and torch.equal(params[(l, n)], vals[(l, n)]) for l, n in vals)
    assert torch.equal(logits(model), expected)


def test_load_into_model_patched_differently_is_an_error(saved):
    directory, _, _ = saved
    other = lofit_fast.patch(tiny_model("llama", attn="eager"), {0: [2], 2: [0, 1]})
    with pytest.raises(RuntimeError, match="already patched with other heads"):
        load_adapter(other, directory)
    no_offset = lofit_fast.patch(tiny_model("llama", attn="eager"), HEADS, offset=False)
    with pytest.raises(RuntimeError, match="patched without v"):
        load_adapter(no_offset, directory)
    assert all(torch.equal(m.A, torch.zeros_like(m.A)) for m in lofit_fast.patched_modules(no_offset).values())


def test_load_rejects_unknown_backend_before_touching_the_model(saved):
    directory, _, _ = saved
    model = tiny_model("llama", attn="eager")
    with pytest.raises(ValueError, match="backend"):
        load_adapter(model, directory, backend="nope")
    assert not lofit_fast.patched_modules(model)


# --- config does not fit the model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(num_hidden_layers=4), "num_layers is 3 in the adapter but 4 in the model"),
        (dict(head_dim=8), "head_dim of layer 0 is 16 in the adapter but 8 in the model"),
        (dict(num_attention_heads=2, num_key_value_heads=1), "layer 0 has 4 heads in the adapter but 2 in the model"),
        (dict(hidden_size=32), "hidden_size is 48 in the adapter but 32 in the model"),
    ],
)
def test_config_mismatch_names_the_difference(saved, other, match):
    directory, _, _ = saved
    model = model_with("llama", **other)
    with pytest.raises(AdapterFormatError, match=match) as info:
        load_adapter(model, directory)
    assert CONFIG_NAME in str(info.value)
    assert not lofit_fast.patched_modules(model)


def test_architecture_mismatch(saved):
    directory, _, _ = saved
    with pytest.raises(AdapterFormatError, match="architecture is 'LlamaForCausalLM' in the adapter but 'GemmaForCausalLM'"):
        load_adapter(tiny_model("gemma", attn="eager"), directory)


def test_heads_out_of_range_for_the_model(saved):
    directory, _, _ = saved
    config = read_config(directory)
    config["heads"]["2"] = [0, 1, 3, 4]
    write_config(directory, config)
    model = tiny_model("llama", attn="eager")
    with pytest.raises(AdapterFormatError, match=r"heads \[4\] of layer 2 are out of range: the model's layer 2 has 4 heads"):
        load_adapter(model, directory)
    config["heads"] = {"3": [0]}
    write_config(directory, config)
    with pytest.raises(AdapterFormatError, match="heads lists layer 3 but the model has 3 layers"):
        load_adapter(model, directory)
    assert not lofit_fast.patched_modules(model)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.pop("head_dim"), "required field 'head_dim' is missing"),
        (lambda c: c.update(num_layers="3"), "field 'num_layers' must be int"),
        (lambda c: c.update(format_version=99), "format_version 99 is newer"),
        (lambda c: c.update(param_dtype="int8"), "param_dtype must be one of"),
        (lambda c: c["heads"].update({"2": [3, 1]}), "must be sorted and unique"),
        (lambda c: c.update(scale=False, offset=False), "holds nothing"),
        (lambda c: c.update(num_heads=[4, 4]), "num_heads must list 3 positive integers"),
    ],
)
def test_malformed_config_fields(saved, edit, match):
    directory, _, _ = saved
    config = read_config(directory)
    edit(config)
    write_config(directory, config)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(tiny_model("llama", attn="eager"), directory)


# --- damaged files -------------------------------------------------------------------------------------


def rewrite_tensors(directory, change):
    tensors = safetensors.torch.load_file(directory / WEIGHTS_NAME)
    change(tensors)
    safetensors.torch.save_file(tensors, directory / WEIGHTS_NAME)


def set_nan(t):
    t["layers.2.v"][1, 3] = float("nan")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.update({"layers.2.A": torch.zeros(3, 17)}), r"layers.2.A has shape \[3, 17\], expected \[3, 16\]"),
        (set_nan, "layers.2.v contains NaN or inf"),
        (lambda t: t.update({"layers.0.A": t["layers.0.A"].double()}), "layers.0.A is float64 but"),
        (lambda t: t.pop("layers.0.v"), r"missing tensors \['layers.0.v'\]"),
        (lambda t: t.update({"layers.1.A": torch.zeros(1, 16)}), r"unexpected tensors \['layers.1.A'\]"),
        (lambda t: t.update({"layers.2.heads": torch.tensor([0, 1, 2])}), r"layers.2.heads is \[0, 1, 2\]"),
        (lambda t: t["layers.0.A"].add_(1e-3), "not the file adapter_config.json was saved with"),
    ],
)
def test_damaged_tensors(saved, change, match):
    directory, _, _ = saved
    rewrite_tensors(directory, change)
    model = tiny_model("llama", attn="eager")
    with pytest.raises(AdapterFormatError, match=match) as info:
        load_adapter(model, directory)
    assert WEIGHTS_NAME in str(info.value)
    assert not lofit_fast.patched_modules(model)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_truncated_safetensors(saved, keep):
    directory, _, _ = saved
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(AdapterFormatError, match="adapter.safetensors is not a readable safetensors file"):
        load_adapter(tiny_model("llama", attn="eager"), directory)


@pytest.mark.parametrize("text", ['{"format": "lofit_fast-adapter", "heads": {', "", "[1, 2]"])
def test_invalid_json(saved, text):
    directory, _, _ = saved
    (directory / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        load_adapter(tiny_model("llama", attn="eager"), directory)


def test_missing_files(saved, tmp_path):
    directory, _, _ = saved
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(tiny_model("llama", attn="eager"), tmp_path / "nowhere")
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors not found"):
        load_adapter(tiny_model("llama", attn="eager"), directory)


# --- atomic saves --------------------------------------------------------------------------------------


def directory_state(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_failed_tensor_serialization_leaves_previous_adapter(saved, monkeypatch):
    directory, _, _ = saved
    before = directory_state(directory)
    model = patched_tiny("llama", seed=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory)
    assert directory_state(directory) == before


def test_failure_midway_through_writing_leaves_previous_adapter(saved, monkeypatch):
    """The tensors' temporary file is written, then writing the config's temporary file fails."""
    directory, expected, _ = saved
    before = directory_state(directory)
    model = patched_tiny("llama", seed=1)
    real_fsync, calls = os.fsync, []

    def fsync_failing_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(file_writes.os, "fsync", fsync_failing_second)
    with pytest.raises(OSError, match="I/O error"):
        save_adapter(model, directory)
    assert len(calls) == 2
    assert directory_state(directory) == before  # no temporary file left behind either
    assert torch.equal(logits(load_adapter(tiny_model("llama", attn="eager"), directory)), expected)


def test_save_overwrites_a_previous_adapter(saved):
    directory, _, _ = saved
    model = patched_tiny("llama", seed=1)
    save_adapter(model, directory)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert torch.equal(logits(load_adapter(tiny_model("llama", attn="eager"), directory)), logits(model))


def test_save_errors_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="not patched by lofit_fast"):
        save_adapter(tiny_model("llama"), tmp_path / "a")
    hooked = lofit_fast.hooks.patch(tiny_model("llama"), HEADS)
    with pytest.raises(RuntimeError, match="lofit_fast.hooks interventions"):
        save_adapter(hooked, tmp_path / "a")
    model = patched_tiny("llama")
    with pytest.raises(TypeError, match="field 'hyperparameters' cannot be written as JSON"):
        save_adapter(model, tmp_path / "a", hyperparameters={"callback": print})
    with pytest.raises(TypeError, match="selection must be"):
        save_adapter(model, tmp_path / "a", selection=3.5)
    with torch.no_grad():
        lofit_fast.patched_modules(model)[2].v[0, 0] = float("inf")
    with pytest.raises(ValueError, match="v of layer 2 contains NaN or inf"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


# --- PEFT names ----------------------------------------------------------------------------------------


def test_disable_adapter_runs_the_base_model():
    base = logits(tiny_model("llama", attn="eager"))
    model = patched_tiny("llama")
    patched = logits(model)
    with disable_adapter(model) as m:
        assert m is model
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), patched)


def test_unload_and_trainable_parameter_counts(capsys):
    model = patched_tiny("llama")
    lofit_fast.freeze_base(model)
    total = sum(p.numel() for p in model.parameters())
    assert get_nb_trainable_parameters(model) == (2 * 4 * 16, total)
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 128 || all params: {total:,d} || trainable%: {100 * 128 / total:.4f}"
    )
    unload(model)
    assert not any(isinstance(m, HeadInterventionLinear) for m in model.modules())


def _kill_during_save(directory, model_seed: int, stop_after_replaces: int):
    """Run save_adapter in a child process that SIGKILLs itself right after the given number of os.replace
    calls (0: before any file is moved into place)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from lofit_fast import _files
        from lofit_fast.adapter import save_adapter
        from test_adapter import patched_tiny
        model = patched_tiny("llama", seed={model_seed})
        real_replace, n = os.replace, [0]
        def replace(a, b):
            if n[0] == {stop_after_replaces}:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(a, b)
            n[0] += 1
        _files.os.replace = replace
        save_adapter(model, {str(directory)!r})
        os.kill(os.getpid(), signal.SIGKILL)  # after a complete save, too
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]


@pytest.mark.parametrize("stop_after", [0, 1, 2], ids=["before-weights", "between-files", "after-config"])
def test_a_killed_save_leaves_the_old_adapter_or_the_new_one(saved, stop_after):
    """SIGKILL at each point of a save over an existing adapter: the folder always loads, as the old adapter
    until the config is replaced and as the new one after; the next save cleans up what was left."""
    directory, expected_old, _ = saved
    _kill_during_save(directory, model_seed=1, stop_after_replaces=stop_after)
    got = logits(load_adapter(tiny_model("llama", attn="eager"), directory))
    expected_new = logits(patched_tiny("llama", seed=1))
    assert torch.equal(got, expected_old if stop_after < 2 else expected_new)
    save_adapter(patched_tiny("llama", seed=2), directory)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter(patched_tiny("llama", seed=0), tmp_path / "a")
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert os.stat(tmp_path / "a" / name).st_mode & 0o777 == 0o644
