"""LoRA (peft) and RED as comparators: identity at init, training through lofit_fast.train, merge, undo; and
run_method, which runs every method the same way and hands the model back unchanged."""
import json
import statistics
from pathlib import Path

import pytest
import torch

from lofit_fast.data import GenItem, MCItem, SFTExample
from lofit_fast.methods import comparators as cmp
from lofit_fast.experiments import METHODS, run_method
from lofit_fast.patch import patched_modules
from lofit_fast.steer import steered_layers
from lofit_fast.train import train
from bench_scripts import load_bench
from models import random_ids
from fixtures.tiny import byte_tokenizer
from test_steer import logits, text_model

EXAMPLES = [SFTExample("Q: sky? A:", " blue"), SFTExample("Q: grass? A:", " green"), SFTExample("Q: 1+1? A:", " 2")]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_red_is_identity_at_init_and_merges_exactly(family):
    model = text_model(family)
    ids = random_ids(2, 6) + 4
    base = logits(model, ids)
    cmp.red(model)
    assert sorted(cmp.red_modules(model)) == [0, 1, 2]
    assert cmp.trainable_count(cmp.red_parameters(model)) == 3 * 2 * 48
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    cmp.unred(model)
    cmp.red(model, [0, 2], init_std=0.2)
    edited = logits(model, ids)
    assert (edited - base).abs().max() > 1e-3
    cmp.merge_red(model)
    assert cmp.red_modules(model) == {}
    torch.testing.assert_close(logits(model, ids), edited, rtol=0, atol=1e-10)


def test_red_edit_by_hand():
    model = text_model()
    cmp.red(model, [1], init_std=0.3)
    edit = cmp.red_modules(model)[1]
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    with torch.no_grad():
        plain = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), plain * (1 + edit.scale.double()) + edit.bias.double())


def test_red_checks_layers_and_is_atomic():
    model = text_model()
    with pytest.raises(ValueError, match="out of range"):
        cmp.red(model, [0, 7])
    assert cmp.red_modules(model) == {}
    cmp.red(model, [1])
    with pytest.raises(RuntimeError, match="already has RED"):
        cmp.red(model)


def test_red_trains_with_the_shared_loop():
    model = text_model(dtype=torch.float32)
    tok = byte_tokenizer()
    ids = random_ids(2, 6) + 4
    base = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cmp.red(model)
    out = train(model, tok, EXAMPLES, kind="sft", params=cmp.red_parameters(model), lr=1e-2, epochs=2,
                batch_size=2, progress=False)
    assert out["epoch_loss"][1] < out["epoch_loss"][0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the RED parameters moved
    assert all(cmp.red_modules(model)[layer].bias.abs().max() > 0 for layer in range(3))
    assert (logits(model, ids) - base).abs().max() > 1e-4
    cmp.unred(model)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)


def test_lora_counts_trains_merges_and_unloads():
    base_model = text_model(dtype=torch.float32)
    tok = byte_tokenizer()
    ids = random_ids(2, 6) + 4
    base = logits(base_model, ids)
    model = cmp.lora(base_model, r=8)
    params = cmp.lora_parameters(model)
    # per layer: q_proj 48 -> 64 and v_proj 48 -> 32, each r·(in + out)
    assert cmp.trainable_count(params) == 3 * (8 * (48 + 64) + 8 * (48 + 32))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)  # B = 0 at init
    out = train(model, tok, EXAMPLES, kind="sft", params=params, lr=1e-2, epochs=2, batch_size=2, progress=False)
    assert out["epoch_loss"][1] < out["epoch_loss"][0]
    tuned = logits(model, ids)
    assert (tuned - base).abs().max() > 1e-4
    merged = cmp.unlora(model, merge=True)
    torch.testing.assert_close(logits(merged, ids), tuned, rtol=1e-4, atol=1e-5)


def test_lora_unload_restores_the_base_model():
    base_model = text_model(dtype=torch.float32)
    ids = random_ids(1, 5) + 4
    base = logits(base_model, ids)
    model = cmp.lora(base_model, r=4)
    with torch.no_grad():
        for p in cmp.lora_parameters(model):
            p.normal_(0, 0.5)
    assert (logits(model, ids) - base).abs().max() > 1e-4
    restored = cmp.unlora(model)
    assert not any("lora_" in n for n, _ in restored.named_parameters())
    torch.testing.assert_close(logits(restored, ids), base, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ run_method, all methods

TQA = [
    MCItem(question=q, prompt=f"Q: {q} A:", best=c[0], correct=c, incorrect=w)
    for q, c, w in [
        ("Is ice cold?", ["Yes", "It is cold"], ["No"]),
        ("Do fish fly?", ["No"], ["Yes", "Always"]),
        ("Is 1+1 2?", ["Yes"], ["No, 3"]),
        ("Is the sun hot?", ["Yes, very"], ["No", "It is icy"]),
        ("Can rocks talk?", ["No"], ["Yes"]),
    ]
]
GEN = [GenItem(f"Q: Imagine X{i}. Where? A:", a) for i, a in enumerate(["Paris", "Rome", "Oslo", "Paris", "Bern"])]
HONESTY = Path(__file__).parent / "fixtures" / "honesty"


@pytest.mark.parametrize("method", METHODS)
def test_run_method_leaves_the_model_as_it_came(method):
    model = text_model(dtype=torch.float32)
    tok = byte_tokenizer()
    ids = random_ids(2, 6) + 4
    base = logits(model, ids)
    flags = [p.requires_grad for p in model.parameters()]
    kw = dict(epochs=1, batch_size=4, k=2, coeff="auto", coeff_grid=(0.5, 2.0), coeff_items=2, max_pairs=12,
              honesty_dir=HONESTY, eval_batch_size=4)
    out = run_method(method, model, tok, "truthfulqa", TQA[:4], TQA[4:], **kw)
    assert set(out["metrics"]) == {"mc1", "mc2"} and 0 <= out["metrics"]["mc2"] <= 1
    assert out["trainable_params"] >= 0 and out["seconds"] >= 0
    expected_trainable = {"base": 0, "iti": 0, "repe": 0, "lofit": 2 * 16, "lora": 4608, "red": 288,
                          "rep_tuning": 2 * 3 * 4 * 16}
    assert out["trainable_params"] == expected_trainable[method]
    if method == "iti":
        assert out["fitted_params"] == 2 * 16
    if method == "repe":
        assert out["fitted_params"] == 48 and out["info"]["coeff"] in (0.5, 2.0)
    assert patched_modules(model) == {} and steered_layers(model) == []
    assert not any("lora" in n or "lofit" in n for n, _ in model.named_modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["iti", "repe"])
def test_run_method_on_a_generation_task(method):
    model = text_model(dtype=torch.float32)
    tok = byte_tokenizer()
    out = run_method(method, model, tok, "mquake", GEN, GEN[:2], k=2, coeff=1.0, max_new_tokens=3,
                     eval_batch_size=2)
    assert set(out["metrics"]) == {"accuracy"}


def test_run_method_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method"):
        run_method("prompting", None, None, "truthfulqa", [], [])


@pytest.mark.parametrize("method", ["lofit", "lora", "red"])
def test_run_method_trains_and_evaluates_with_the_recipe(method, monkeypatch):
    import lofit_fast.methods.lofit as lofit_module
    from lofit_fast.experiments import methods_run

    calls, prompts = [], []
    real_train, real_evaluate = methods_run.train, methods_run.evaluate

    def recording_train(*args, **kw):
        calls.append({key: kw.get(key, "default") for key in ("schedule", "add_eos", "max_grad_norm")})
        return real_train(*args, **kw)

    def recording_evaluate(task, model, tokenizer, items, **kw):
        prompts.extend(item.prompt for item in items)
        return real_evaluate(task, model, tokenizer, items, **kw)

    monkeypatch.setattr(methods_run, "train", recording_train)
    monkeypatch.setattr(lofit_module, "train", recording_train)
    monkeypatch.setattr(methods_run, "evaluate", recording_evaluate)
    model, tok = text_model(dtype=torch.float32), byte_tokenizer()
    run_method(method, model, tok, "truthfulqa", TQA[:4], TQA[4:], epochs=1, batch_size=4, k=2, eval_batch_size=4,
               schedule="constant", add_eos=False, prompt_style="newline", max_grad_norm=None)
    assert calls and all(c == {"schedule": "constant", "add_eos": False, "max_grad_norm": None} for c in calls)
    assert prompts == [f"Q: {TQA[4].question}\nA:"]
    calls.clear()
    prompts.clear()
    run_method(method, model, tok, "truthfulqa", TQA[:4], TQA[4:], epochs=1, batch_size=4, k=2, eval_batch_size=4)
    assert calls and all(c["schedule"] == "default" and c["add_eos"] == "default" for c in calls)
    assert prompts == [TQA[4].prompt]  # no recipe given: the items' own prompts


def _write_seed(out: Path, seed: int, rows: dict) -> None:
    folder = out / f"seed_{seed}"
    folder.mkdir(parents=True)
    full = {key: {"metrics": metrics, "seconds": 10.0 * seed, "trainable_params": 512 if "lofit" in key else 0,
                  "fitted_params": 0, "recipe": "plain"} for key, metrics in rows.items()}
    (folder / "results.json").write_text(json.dumps({"rows": full, "meta": {"commands": [f"cmd {seed}"]}}))


def test_methods_table_summarizes_seed_folders(tmp_path):
    table = load_bench("methods_table")
    lofit = {1: (0.30, 0.50), 2: (0.34, 0.56), 3: (0.32, 0.53)}
    iti = {1: (0.28, 0.52), 2: (0.29, 0.51), 3: (0.33, 0.50)}
    for seed in (1, 2, 3):
        rows = {"truthfulqa/lofit": dict(zip(("mc1", "mc2"), lofit[seed])),
                "truthfulqa/iti": dict(zip(("mc1", "mc2"), iti[seed])), "mquake/lofit": {"accuracy": 0.1 * seed}}
        if seed == 1:  # the deterministic base model, run once
            rows["truthfulqa/base"] = {"mc1": 0.22, "mc2": 0.46}
        _write_seed(tmp_path, seed, rows)
    (tmp_path / "seed_x").mkdir()  # not a seed folder: ignored
    text = table.write_seed_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [1, 2, 3] and summary["commands"] == ["cmd 1", "cmd 2", "cmd 3"]
    mc1 = summary["rows"]["truthfulqa/lofit"]["metrics"]["mc1"]
    assert mc1["mean"] == pytest.approx(statistics.mean([0.30, 0.34, 0.32]))
    assert mc1["std"] == pytest.approx(statistics.stdev([0.30, 0.34, 0.32]))
    assert summary["rows"]["truthfulqa/base"]["seeds"] == [1]
    gap = summary["lofit_minus"]["truthfulqa/iti"]["mc2"]
    diffs = [lofit[s][1] - iti[s][1] for s in (1, 2, 3)]
    assert gap["values"] == pytest.approx(diffs) and gap["std"] == pytest.approx(statistics.stdev(diffs))
    assert gap["beyond_spread"] == (abs(statistics.mean(diffs)) > statistics.stdev(diffs))
    base_gap = summary["lofit_minus"]["truthfulqa/base"]["mc1"]  # one base run against every LoFiT seed
    assert base_gap["values"] == pytest.approx([v - 0.22 for v, _ in lofit.values()])
    assert (tmp_path / "table.md").read_text() == text
    assert "| lofit | 0.320 ± 0.020 | 0.530 ± 0.030 | - | 0.200 ± 0.100 | 512 | 3 |" in text
    assert "| base | 0.220 | 0.460 | - | - | 0 | 1 |" in text
    assert "| iti | 0.280 / 0.290 / 0.330 |" in text


def test_methods_table_summarizes_the_honesty_table_over_seeds(tmp_path):
    table = load_bench("methods_table")
    metrics = lambda acc, align: {"facts_acc": acc, "facts_p": 0.5, "choices_acc": 0.5, "choices_p": 0.5,  # noqa: E731
                                  "mc1": 0.25, "mc2": 0.45, "alignment": align}
    heads = {1: (0.52, 0.16), 2: (0.50, 0.18), 3: (0.55, 0.17)}
    token = {1: (0.47, 0.09), 2: (0.49, 0.10), 3: (0.46, 0.08)}
    for seed in (1, 2, 3):
        honesty = {"token-only tuning": {"metrics": metrics(*token[seed]), "trainable_params": 9, "seconds": 5.0},
                   "rep. tuning (heads)": {"metrics": metrics(*heads[seed]), "trainable_params": 9, "seconds": 4.0}}
        if seed == 1:  # deterministic, run once
            honesty["untuned"] = {"metrics": metrics(0.5, 0.087), "trainable_params": 0, "seconds": 0.0,
                                  "recipe": "plain"}
        folder = tmp_path / f"seed_{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"rows": {}, "honesty": honesty, "meta": {"commands": ["c"]}}))
    text = table.write_seed_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    align = summary["honesty"]["rep. tuning (heads)"]["metrics"]["alignment"]
    assert align["mean"] == pytest.approx(statistics.mean([0.16, 0.18, 0.17]))
    assert align["std"] == pytest.approx(statistics.stdev([0.16, 0.18, 0.17]))
    assert summary["honesty"]["untuned"]["seeds"] == [1]
    untuned_gap = summary["honesty_minus"]["untuned"]["alignment"]  # one run against every seed
    assert untuned_gap["values"] == pytest.approx([heads[s][1] - 0.087 for s in (1, 2, 3)])
    gap = summary["honesty_minus"]["token-only tuning"]["alignment"]
    diffs = [heads[s][1] - token[s][1] for s in (1, 2, 3)]
    assert gap["values"] == pytest.approx(diffs) and gap["beyond_spread"]
    assert "rep. tuning (heads)" not in summary["honesty_minus"]
    assert "recipe plain" in text and "| method |" not in text  # no task rows: no task table
    assert ("| rep. tuning (heads) | 0.523 ± 0.025 | 0.500 ± 0.000 | 0.250 ± 0.000 | 0.450 ± 0.000 | 0.170 ± 0.010 "
            "| 9 | 3 |") in text
    assert "| rep. tuning (heads) − token-only tuning | +0.050 ± 0.040 * |" in text


def test_methods_table_runs_the_honesty_table_over_seeds(tmp_path):
    """The real path on a tiny model: the deterministic conditions run once, the tuned ones per seed, then the
    summary over the seed folders."""
    import shutil

    from lofit_fast.methods.rep_tuning import HONEST_LETTERS
    from test_lofit import char_tokenizer, tiny_llama

    table = load_bench("methods_table")
    model_dir, honesty = tmp_path / "model", tmp_path / "honesty"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    shutil.copytree(HONESTY, honesty)
    shutil.copy(HONESTY / "facts_true_false.csv", honesty / "gpt4_facts.csv")
    for name, letters in HONEST_LETTERS.items():  # as many questions as the hand labels
        (honesty / name).write_text("".join(f"Question: choice {i}?\\n (A) yes\\n (B) no\\nAnswer:\n\n"
                                            for i in range(len(letters))))
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--data", str(Path(__file__).parent / "fixtures" / "lofit"),
              "--honesty-dir", str(honesty), "--out", str(out), "--honesty-only", "--epochs", "1", "--batch-size", "2",
              "--eval-batch-size", "4", "--honesty-pairs", "4", "--max-eval", "2", "--threads", "1"]
    assert table.main([*common, "--seeds", "1", "--honesty-rows", "untuned", "rep-heads"]) == 0
    assert table.main([*common, "--seeds", "2", "--honesty-rows", "rep-heads"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == {} and summary["seeds"] == [1, 2]
    assert summary["honesty"]["untuned"]["seeds"] == [1]
    tuned = summary["honesty"]["rep. tuning (heads)"]
    assert tuned["seeds"] == [1, 2] and tuned["trainable_params"] > 0
    assert tuned["metrics"]["alignment"]["values"][0] != tuned["metrics"]["alignment"]["values"][1]  # seeds differ
    assert len(summary["honesty_minus"]["untuned"]["alignment"]["values"]) == 2
    assert "| rep. tuning (heads) |" in (out / "table.md").read_text()


def test_methods_table_seed_arguments(tmp_path):
    table = load_bench("methods_table")
    assert table.parse_args(["--seeds", "42,43"]).seeds == [42, 43]
    assert table.parse_args(["--honesty-only"]).tasks == []
    assert table.parse_args(["--honesty-rows", "token-only", "rep-heads"]).honesty_rows == ["token-only", "rep-heads"]
    with pytest.raises(SystemExit):
        table.parse_args(["--honesty-only", "--no-honesty"])
    for bad in ("42,42", "4x", ","):
        with pytest.raises(SystemExit):
            table.parse_args(["--seeds", bad])
    with pytest.raises(SystemExit, match="no seed_"):
        table.write_seed_report(tmp_path)
