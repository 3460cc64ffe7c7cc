"""merge and export: plain nn.Linear / plain HF checkpoints with the same logits as the patched model."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import lofit_fast
from lofit_fast.adapter import export, load_adapter, merge, merge_and_unload, merged_linear, save_adapter
from lofit_fast.adapter.export import copy_sharing_tensors
from lofit_fast.patch import HeadInterventionLinear

from models import tiny_model
from reference import OUT_TOL, reference_forward, rel_err
from test_adapter import FAMILIES, HEADS, logits, patched_tiny, random_values, values

# Merged vs patched logits, ‖Δ‖/‖ref‖. bfloat16 rounds the scaled weights and the new bias once more than
# the patched forward does, so it gets a looser bound than float32.
MERGE_TOL = {torch.float32: 5e-6, torch.bfloat16: 3e-2}
EXPORT_TOL = 5e-6  # float32 exports: the same numbers loaded back


def has_lofit_modules(model):
    return any(type(m).__module__.startswith("lofit_fast") for m in model.modules())


# --- merge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_merged_linear_matches_float64_reference(dtype, with_bias):
    d, H, D_out = 16, 4, 48
    base = nn.Linear(H * d, D_out, bias=with_bias).to(dtype)
    heads = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(3)
    A, v = torch.randn(2, d, generator=g) * 0.1, torch.randn(2, d, generator=g) * 0.1
    module = HeadInterventionLinear(base, heads, d, A.clone(), v.clone())
    before = base.weight.detach().clone()

    merged = merged_linear(module)

    assert type(merged) is nn.Linear and merged.weight.dtype == dtype and merged.bias.dtype == dtype
    assert torch.equal(base.weight, before) and merged.weight.data_ptr() != base.weight.data_ptr()
    W64 = before.double()
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
    ref_W = W64.clone()
    ref_W[:, cols] = W64[:, cols] * (1 + A.double().reshape(-1))
    ref_b = W64[:, cols] @ v.double().reshape(-1)
    if with_bias:
        ref_b = ref_b + base.bias.detach().double()
    weight_tol = 1e-7 if dtype == torch.float32 else 2 ** -8
    assert rel_err(merged.weight, ref_W) < weight_tol and rel_err(merged.bias, ref_b) < weight_tol
    untouched = torch.tensor([c for c in range(H * d) if c not in set(cols.tolist())])
    assert torch.equal(merged.weight[:, untouched], before[:, untouched])

    x = torch.randn(5, 7, H * d, generator=g).to(dtype)
    ref = reference_forward(x, before, base.bias, heads, A, v, d)
    with torch.no_grad():
        assert rel_err(merged(x), ref) < OUT_TOL[dtype]
        assert rel_err(module(x), ref) < OUT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_gives_the_patched_logits(family, dtype):
    model = patched_tiny(family, dtype=dtype)
    patched = logits(model)
    base = model.model.layers[1].self_attn.o_proj
    assert rel_err(patched, logits(tiny_model(family, attn="eager", dtype=dtype))) > 0.05  # A and v matter

    assert merge(model) is model
    merged = logits(model)

    assert rel_err(merged, patched) < MERGE_TOL[dtype]
    assert not has_lofit_modules(model)
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    assert all(type(o) is nn.Linear and o.weight.dtype == dtype for o in o_projs)
    assert [o.bias is not None for o in o_projs] == [True, False, True]  # biases only where there are offsets
    assert o_projs[1] is base
    assert model.config.attention_bias is False  # the live model's config is left alone


def test_merge_scale_only_adds_no_bias_and_keeps_base_weights():
    model = patched_tiny("llama", offset=False)
    originals = {l: m.base_layer for l, m in lofit_fast.patched_modules(model).items()}
    saved = {l: o.weight.detach().clone() for l, o in originals.items()}
    patched = logits(model)
    merge_and_unload(model)
    assert rel_err(logits(model), patched) < MERGE_TOL[torch.float32]
    for l, original in originals.items():
        merged = model.model.layers[l].self_attn.o_proj
        assert merged.bias is None and merged is not original
        assert torch.equal(original.weight, saved[l])  # not changed in place
        assert not torch.equal(merged.weight, saved[l])


def test_merge_errors_leave_the_model_as_it_was():
    with pytest.raises(RuntimeError, match="not patched by lofit_fast"):
        merge(tiny_model("llama"))
    model = patched_tiny("gemma")
    with lofit_fast.disabled(model):
        with pytest.raises(RuntimeError, match=r"interventions of layers \[0, 2\] are disabled"):
            merge(model)
    assert len(lofit_fast.patched_modules(model)) == 2


# --- export --------------------------------------------------------------------------------------------

LOADER = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs = json.loads(sys.argv[1])
    out, report = {}, {}
    for name, job in jobs.items():
        model, info = AutoModelForCausalLM.from_pretrained(
            job["dir"], output_loading_info=True, attn_implementation="eager", dtype="auto")
        if job.get("texts"):
            tok = AutoTokenizer.from_pretrained(job["dir"])
            ids = tok(job["texts"], return_tensors="pt", padding=True)
        else:
            ids = {"input_ids": torch.tensor(job["ids"])}
        with torch.no_grad():
            out[name] = model.eval()(**ids).logits.float().contiguous()
        report[name] = {
            "info": {k: sorted(map(str, v)) for k, v in info.items()},
            "class": type(model).__name__,
            "modules": sorted({type(m).__module__ for m in model.modules()}),
            "dtype": str(model.dtype),
        }
    report["lofit_fast_imported"] = any(m.split(".")[0] == "lofit_fast" for m in sys.modules)
    safetensors.torch.save_file(out, sys.argv[2])
    with open(sys.argv[3], "w") as f:
        json.dump(report, f)
    """
)


def load_exports_without_lofit_fast(jobs, workdir):
    """Load each export in a fresh interpreter that imports only transformers, run from `workdir` with no
    PYTHONPATH so lofit_fast is not even importable from the checkout; returns (logits, report)."""
    out, rep = workdir / "logits.safetensors", workdir / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs), str(out), str(rep)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(rep.read_text())
    assert report.pop("lofit_fast_imported") is False
    return safetensors.torch.load_file(out), report


IDS = [[5, 17, 33, 2, 91, 40, 8, 64, 12, 3, 77, 21], [9, 9, 50, 31, 4, 88, 60, 15, 7, 42, 19, 26]]
EXPORTS = {  # name: (family, scale, offset, dtype)
    **{f: (f, True, True, torch.float32) for f in FAMILIES},
    "qwen3": ("qwen3", True, True, torch.float32),
    "llama-bf16": ("llama", True, True, torch.bfloat16),
    "mistral-scale-only": ("mistral", True, False, torch.float32),  # needs no bias, so any family exports
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every EXPORTS entry patched with random A/v, exported, and loaded back in one lofit_fast-free process."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.tensor(IDS)
    expected, models, jobs = {}, {}, {}
    for name, (family, scale, offset, dtype) in EXPORTS.items():
        model = patched_tiny(family, scale=scale, offset=offset, dtype=dtype)
        expected[name] = logits(model, ids).float()
        assert export(model, root / name) == root / name
        models[name] = model
        jobs[name] = {"dir": str(root / name), "ids": IDS}
    loaded, report = load_exports_without_lofit_fast(jobs, root)
    return root, expected, models, loaded, report


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_without_lofit_fast_and_gives_the_same_logits(exported, name):
    root, expected, models, loaded, report = exported
    family, scale, offset, dtype = EXPORTS[name]
    assert report[name]["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert not any(m.startswith("lofit_fast") for m in report[name]["modules"])
    assert report[name]["class"] == type(models[name]).__name__
    assert report[name]["dtype"] == str(dtype)
    tol = EXPORT_TOL if dtype == torch.float32 else MERGE_TOL[dtype]
    assert rel_err(loaded[name], expected[name]) < tol
    assert sorted(p.name for p in (root / name).iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_writes_zero_biases_where_the_config_needs_them(exported, name):
    root = exported[0]
    config = json.loads((root / name / "config.json").read_text())
    assert config["attention_bias"] is True
    tensors = safetensors.torch.load_file(root / name / "model.safetensors")
    for layer in range(3):
        prefix = f"model.layers.{layer}.self_attn."
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert torch.count_nonzero(tensors[prefix + proj + ".bias"]) == 0
        o_bias = tensors[prefix + "o_proj.bias"]
        assert (torch.count_nonzero(o_bias) > 0) == (layer in HEADS)


def test_export_scale_only_keeps_the_config_without_biases(exported):
    root = exported[0]
    config = json.loads((root / "mistral-scale-only" / "config.json").read_text())
    assert not config.get("attention_bias", False)
    assert not any(k.endswith(".bias") for k in safetensors.torch.load_file(root / "mistral-scale-only" / "model.safetensors"))


def test_export_leaves_the_callers_model_as_it_was(exported):
    _, expected, models, _, _ = exported
    model = models["gemma2"]
    assert model.config.attention_bias is False
    assert len(lofit_fast.patched_modules(model)) == 2
    assert all(layer.self_attn.q_proj.bias is None for layer in model.model.layers)
    assert torch.equal(logits(model, torch.tensor(IDS)), expected["gemma2"])


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_export_of_offsets_fails_clearly_where_the_config_cannot_hold_an_o_proj_bias(family, tmp_path):
    model = patched_tiny(family)
    with pytest.raises(RuntimeError, match=r"no way to express the merged o_proj biases .* offset=False"):
        export(model, tmp_path / "out")
    assert len(lofit_fast.patched_modules(model)) == 2
    assert not (tmp_path / "out").exists()


def test_export_refuses_pickle_and_hook_interventions(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        export(patched_tiny("llama"), tmp_path, safe_serialization=False)
    with pytest.raises(RuntimeError, match="lofit_fast.hooks interventions"):
        export(lofit_fast.hooks.patch(tiny_model("llama"), HEADS), tmp_path)


def test_copy_sharing_tensors_shares_every_tensor_and_nothing_else():
    model = patched_tiny("gemma3")
    twin = copy_sharing_tensors(model)
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(twin.named_parameters(remove_duplicate=False))
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)
    assert twin.config is not model.config
    assert all(a is not b for a, b in zip(model.modules(), twin.modules()))


# --- the real SmolLM2-135M -----------------------------------------------------------------------------

SMOL_HEADS = {3: [0, 5], 17: [2], 29: [1, 4, 8]}
TEXTS = ["Q: What is the capital of France? A:", "The quick brown fox"]


@pytest.fixture(scope="session")
def smollm2():
    from lofit_fast.models import load_model

    model, tokenizer = load_model("smollm2")
    return model, tokenizer


@pytest.fixture
def smol_patched(smollm2):
    model, tokenizer = smollm2
    A, v = random_values(model, SMOL_HEADS)
    lofit_fast.patch(model, SMOL_HEADS, A=A, v=v)
    try:
        yield model, tokenizer
    finally:
        lofit_fast.unpatch(model)


@pytest.mark.slow
def test_smollm2_adapter_round_trip(smol_patched, tmp_path):
    model, tokenizer = smol_patched
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**ids).logits
    vals = values(model)
    save_adapter(model, tmp_path, hyperparameters={"task": "demo"})
    lofit_fast.unpatch(model)
    load_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, expected)
    got = values(model)
    assert all(torch.equal(got[k], vals[k]) for k in vals) and got.keys() == vals.keys()


@pytest.mark.slow
def test_smollm2_merge_and_export(smol_patched, tmp_path):
    model, tokenizer = smol_patched
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        patched = model(**ids).logits
        merged_model = merge(copy_sharing_tensors(model))
        assert not has_lofit_modules(merged_model)
        assert rel_err(merged_model(**ids).logits, patched) < MERGE_TOL[torch.float32]
    del merged_model

    export(model, tmp_path / "smol", tokenizer=tokenizer)
    assert (tmp_path / "smol" / "tokenizer.json").is_file() or (tmp_path / "smol" / "tokenizer_config.json").is_file()
    loaded, report = load_exports_without_lofit_fast({"smol": {"dir": str(tmp_path / "smol"), "texts": TEXTS}}, tmp_path)
    assert report["smol"]["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert report["smol"]["class"] == "LlamaForCausalLM"
    assert rel_err(loaded["smol"], patched) < EXPORT_TOL
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert config["attention_bias"] is True and "quantization_config" not in config  # GGUF marker dropped
    assert len(lofit_fast.patched_modules(model)) == 3  # the caller's model is still patched
    shutil.rmtree(tmp_path / "smol")  # 0.5 GB of float32 weights
