"""`lofit-fast` end to end on a tiny random model saved as an HF folder and tiny fixtures in the official
formats (tests/fixtures/lofit/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lofit_fast.cli import main
from lofit_fast.experiments import previous_results
from test_lofit import HEAD_DIM, char_tokenizer, tiny_llama

FIXTURES = str(Path(__file__).parent / "fixtures" / "lofit")
QUIET = ["--threads", "1", "--quiet", "--device", "cpu"]
FAST = ["--epochs", "1", "--batch-size", "2", *QUIET]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def run_cli(*argv):
    return main([str(a) for a in argv])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_run_truthfulqa_writes_the_results_the_readme_shows(model_dir, tmp_path, capsys):
    out = tmp_path / "tqa"
    rc = run_cli("run", "--model", model_dir, "--task", "truthfulqa", "--data", FIXTURES, "--k", 2, "--out", out,
                 *FAST)
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "truthfulqa" and results["model"] == model_dir and results["k"] == 2
    assert len(results["heads"]) == 2 and all(len(h) == 2 for h in results["heads"])
    assert results["trainable_params"] == 2 * HEAD_DIM
    assert results["seconds"] > 0
    for name in ("base", "lofit", "random"):
        assert set(results[name]) == {"mc1", "mc2"}
        assert all(0.0 <= v <= 1.0 for v in results[name].values())
    assert results["train_examples"] == 5 and results["eval_examples"] == 3 and results["eval_split"] == "test"
    for arm in ("base", "lofit", "random"):  # per-item scores behind every aggregate, and the paired intervals
        for metric in ("mc1", "mc2"):
            per_item = results["item_scores"][arm][metric]
            assert len(per_item) == 3 and sum(per_item) / 3 == pytest.approx(results[arm][metric])
    assert set(results["paired"]) == {f"lofit - {o} ({m})" for o in ("base", "random") for m in ("mc1", "mc2")}
    gain = results["paired"]["lofit - base (mc2)"]
    assert gain["mean_diff"] == pytest.approx(results["lofit"]["mc2"] - results["base"]["mc2"])
    assert gain["ci_low"] <= gain["mean_diff"] <= gain["ci_high"]
    selection = json.loads((out / "selection.json").read_text())
    assert [[l, h] for l, h, _ in selection["ranked"][:2]] == results["heads"]
    assert (out / "heads.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted([int(l), h] for l, hs in config["heads"].items() for h in hs) == sorted(results["heads"])
    printed = capsys.readouterr().out
    assert "base" in printed and "lofit (top 2)" in printed and "random 2 heads" in printed
    assert "lofit - base (mc1)" in printed and "paired bootstrap 95% interval" in printed


@pytest.mark.parametrize("task", ["clutrr", "mquake"])
def test_run_generation_tasks_report_accuracy_on_val(model_dir, tmp_path, task):
    out = tmp_path / task
    assert run_cli("run", "--model", model_dir, "--task", task, "--data", FIXTURES, "--out", out, *FAST) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["eval_split"] == "val" and results["k"] == 1  # 3 % of 8 heads, at least one
    for name in ("base", "lofit", "random"):
        assert set(results[name]) == {"accuracy"} and 0.0 <= results[name]["accuracy"] <= 1.0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n = results["eval_examples"]
    assert [p["arm"] for p in predictions] == ["the base model"] * n + ["LoFiT"] * n + ["random heads"] * n
    assert all({"prompt", "generated", "prediction", "answers", "correct"} <= set(p) for p in predictions)
    for arm, name in (("the base model", "base"), ("LoFiT", "lofit"), ("random heads", "random")):
        rows = [p for p in predictions if p["arm"] == arm]
        assert sum(p["correct"] for p in rows) / n == pytest.approx(results[name]["accuracy"])
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_tune_eval_merge_export(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lofit_fast.adapter import load_adapter
    from lofit_fast.models import load_model

    sel_dir, adapter, eval_dir, exported = (tmp_path / n for n in ("sel", "adapter", "eval", "export"))
    common = ["--model", model_dir, "--task", "mquake", "--data", FIXTURES, *FAST]
    assert run_cli("select", *common, "--out", sel_dir) == 0
    assert (sel_dir / "selection.json").is_file() and (sel_dir / "heads.png").is_file()
    assert run_cli("tune", *common, "--selection", sel_dir / "selection.json", "--k", 2, "--out", adapter) == 0
    assert run_cli("eval", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, *QUIET, "--adapter", adapter,
                   "--out", eval_dir) == 0
    assert set(json.loads((eval_dir / "eval.json").read_text())["lofit"]) == {"accuracy"}
    capsys.readouterr()
    assert run_cli("merge", "--model", model_dir, "--adapter", adapter, "--quiet") == 0
    diff = float(capsys.readouterr().out.split("probe: ")[1].split()[0])
    assert diff < 1e-4
    assert run_cli("export", "--model", model_dir, "--adapter", adapter, "--out", exported, "--quiet") == 0

    patched, tok = load_model(model_dir)
    load_adapter(patched, adapter)
    plain = AutoModelForCausalLM.from_pretrained(exported)
    ids = tok(["Q: Is ice hot? A: No"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, patched(ids).logits, rtol=1e-4, atol=1e-4)


def test_tune_on_random_heads_and_explicit_heads(model_dir, tmp_path):
    common = ["--model", model_dir, "--task", "mquake", "--data", FIXTURES, *FAST]
    assert run_cli("tune", *common, "--random", "--k", 3, "--out", tmp_path / "r") == 0
    config = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert sum(len(h) for h in config["heads"].values()) == 3
    assert run_cli("tune", *common, "--heads", "1:3,0:2", "--out", tmp_path / "e") == 0
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert {int(l): h for l, h in config["heads"].items()} == {0: [2], 1: [3]}


def test_demo_runs_on_the_builtin_examples(model_dir, tmp_path, capsys):
    rc = run_cli("demo", "--model", model_dir, "--out", tmp_path / "demo", "--max-train", 4, "--max-eval", 3,
                 "--k", 2, *FAST)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "built-in" in printed and "mc1" in printed and str(tmp_path / "demo") in printed
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["train_examples"] == 4 and results["eval_examples"] == 3


def test_demo_defaults_on_the_builtin_task(model_dir, tmp_path):
    """Without --max-train / --batch-size the built-in demo trains on 16 questions in batches of 4; with --data
    the batch stays 8."""
    rc = run_cli("demo", "--model", model_dir, "--out", tmp_path / "demo", "--max-eval", 2, "--k", 2,
                 "--epochs", "1", *QUIET)
    assert rc == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["train_examples"] == 16 and results["hyperparameters"]["batch_size"] == 4
    rc = run_cli("demo", "--model", model_dir, "--data", FIXTURES, "--out", tmp_path / "demo_data", "--max-train", 3,
                 "--max-eval", 2, "--k", 2, "--epochs", "1", *QUIET)
    assert rc == 0
    results = json.loads((tmp_path / "demo_data" / "results.json").read_text())
    assert results["train_examples"] == 3 and results["hyperparameters"]["batch_size"] == 8


def test_errors_are_one_line_without_traceback(model_dir, tmp_path, capsys):
    assert run_cli("run", "--task", "clutrr", "--data", tmp_path / "nowhere", "--model", model_dir) == 1
    assert "data folder not found" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("run", "--task", "clutrr", "--data", empty, "--model", model_dir, *FAST) == 1
    assert "clutrr" in one_error_line(capsys)
    assert run_cli("eval", "--task", "mquake", "--data", FIXTURES, "--model", tmp_path / "no-model", *QUIET) == 1
    assert "no-model" in one_error_line(capsys)
    assert run_cli("tune", "--task", "mquake", "--data", FIXTURES, "--model", model_dir, "--out", tmp_path, *FAST) == 1
    assert "exactly one of" in one_error_line(capsys)
    assert run_cli("eval", "--task", "mquake", "--model", model_dir, "--data", "") == 1
    assert "--data" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("run", "--task", "squad", "--data", FIXTURES)
    assert exit_info.value.code == 2


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lofit_fast", "run", "--task", "mquake", "--data", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"lofit-fast run: error: data folder not found: {tmp_path / 'missing'}"]


def test_run_resume_reuses_finished_stages_with_the_same_settings(model_dir, tmp_path, capsys):
    out = tmp_path / "resume"
    common = ["run", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, "--out", out, "--k", 2,
              "--epochs", "1", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
    assert run_cli(*common) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert run_cli(*common, "--resume") == 0
    log = capsys.readouterr().err
    for stage in ("base model metrics", "head selection", "LoFiT metrics", "random heads metrics"):
        assert f"resuming: {stage}" in log
    again = json.loads((out / "results.json").read_text())
    for key in ("base", "heads", "lofit", "trainable_params", "random"):
        assert again[key] == first[key]
    assert run_cli(*common, "--resume", "--l1", "0.01") == 0  # another step 1: a new selection, same base
    log = capsys.readouterr().err
    assert "resuming: base model metrics" in log and "resuming: head selection" not in log
    assert run_cli(*common, "--resume", "--lr", "0.05") == 0  # another step 2: nothing is reused
    assert "resuming" not in capsys.readouterr().err


def test_step1_defaults_follow_the_official_scripts_per_task(model_dir, tmp_path):
    for task, (lr, l1) in {"truthfulqa": (5e-3, 5e-4), "mquake": (5e-3, 1e-3), "clutrr": (5e-4, 5e-3)}.items():
        out = tmp_path / task
        assert run_cli("select", "--model", model_dir, "--task", task, "--data", FIXTURES, "--out", out,
                       "--max-train", 2, *FAST) == 0
        meta = json.loads((out / "selection.json").read_text())["meta"]
        assert (meta["lr"], meta["l1"]) == (lr, l1)
    out = tmp_path / "explicit"
    assert run_cli("select", "--model", model_dir, "--task", "clutrr", "--data", FIXTURES, "--out", out,
                   "--max-train", 2, "--l1", "0.02", "--select-lr", "0.03", *FAST) == 0
    meta = json.loads((out / "selection.json").read_text())["meta"]
    assert (meta["lr"], meta["l1"]) == (0.03, 0.02)


def test_run_with_a_selection_from_another_task_skips_step_1(model_dir, tmp_path, capsys):
    source = tmp_path / "tqa"
    assert run_cli("select", "--model", model_dir, "--task", "truthfulqa", "--data", FIXTURES, "--out", source,
                   *FAST) == 0
    ranked = json.loads((source / "selection.json").read_text())["ranked"]
    capsys.readouterr()
    out = tmp_path / "cross"
    assert run_cli("run", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, "--k", 2, "--out", out,
                   "--selection", source / "selection.json", *FAST) == 0
    captured = capsys.readouterr()
    assert "heads from truthfulqa" in captured.out and "selection.json" not in captured.out
    results = json.loads((out / "results.json").read_text())
    assert results["heads"] == [[l, h] for l, h, _ in ranked[:2]]
    assert results["selection_from"]["task"] == "truthfulqa" and "select" not in results["seconds_by_stage"]
    assert set(results["lofit"]) == {"accuracy"}
    assert not (out / "selection.json").exists()
    assert run_cli("run", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, "--out", out,
                   "--selection", tmp_path / "nope.json", *FAST) == 1
    assert "selection file not found" in capsys.readouterr().err


def test_seeds_run_takes_each_seeds_own_selection_from_a_seeds_folder(model_dir, tmp_path, capsys):
    """--selection DIR with --seeds: seed S tunes the heads of DIR/seed_S/selection.json (a cross-task run over
    seeds pairs each seed with the heads its own seed selected on the other task); a missing seed is named."""
    from lofit_fast.methods import HeadSelection
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    source = tmp_path / "tqa_seeds"
    chosen = {1: [[0, 1], [layers - 1, 0]], 2: [[layers - 1, heads - 1], [0, 0]]}
    for seed, top in chosen.items():
        scores = torch.zeros(layers, heads)
        for rank, (layer, head) in enumerate(top):
            scores[layer, head] = 2.0 - rank
        HeadSelection(scores, k=2, meta={"task": "truthfulqa"}).save(str(source / f"seed_{seed}" / "selection.json"))
    out = tmp_path / "cross_seeds"
    common = ["run", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, "--k", 2, "--out", out, *FAST]
    assert run_cli(*common, "--seeds", "1,2", "--selection", source) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"] == {"1": chosen[1], "2": chosen[2]}
    for seed in (1, 2):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        assert results["selection_from"]["path"] == str(source / f"seed_{seed}" / "selection.json")
        assert "select" not in results["seconds_by_stage"]
    # a seed without its file is named before any work; a single run takes its --seed's file
    capsys.readouterr()
    assert run_cli(*common, "--seeds", "1,3", "--selection", source) == 1
    err = one_error_line(capsys)
    assert "no seed_3/selection.json for seed 3" in err and "seed_1, seed_2" in err
    assert run_cli(*common, "--seed", "2", "--selection", source) == 0
    assert json.loads((out / "results.json").read_text())["heads"] == chosen[2]
    # bench/cross_task_table.py pairs these seeds with a run that selected its own heads
    own = tmp_path / "own_seeds"
    assert run_cli("run", "--model", model_dir, "--task", "mquake", "--data", FIXTURES, "--k", 2, "--out", own,
                   "--seeds", "1,2", *FAST) == 0
    from bench_scripts import load_bench
    table = load_bench("cross_task_table")
    report = table.compare(str(own), str(out), samples=200)
    assert report["seeds"] == [1, 2] and report["source"] == ["truthfulqa"]
    for seed in (1, 2):
        a, b = (json.loads((d / f"seed_{seed}" / "results.json").read_text()) for d in (own, out))
        row = report["per_seed"][seed]
        assert row["own"] == a["lofit"] and row["cross"] == b["lofit"] and row["random"] == a["random"]
        assert row["paired"]["accuracy"]["mean_diff"] == pytest.approx(a["lofit"]["accuracy"] - b["lofit"]["accuracy"])
        assert row["shared_heads"] == len({tuple(h) for h in a["heads"]} & {tuple(h) for h in chosen[seed]})
    text = table.render(str(own), str(out), samples=200)
    assert "own − cross" in text and "heads selected on truthfulqa" in text
    with pytest.raises(ValueError, match="no heads from another task|without heads from another task"):
        table.compare(str(own), str(own))


@pytest.mark.parametrize("method,task,metrics", [("red", "mquake", {"accuracy"}), ("iti", "truthfulqa", {"mc1", "mc2"})])
def test_run_method_compares_a_relative_with_the_base_model(model_dir, tmp_path, capsys, method, task, metrics):
    out = tmp_path / method
    assert run_cli("run", "--method", method, "--model", model_dir, "--task", task, "--data", FIXTURES,
                   "--out", out, "--k", 2, *FAST) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["task"] == task
    assert set(results["base"]) == metrics and set(results[method]) == metrics
    assert (results["trainable_params"] > 0) == (method == "red")
    assert results["hyperparameters"]["lr"] == (5e-3 if method == "red" else 1e-2)
    assert method in capsys.readouterr().out


@pytest.mark.parametrize("task", ["truthfulqa", "mquake"])
def test_paired_eval_reproduces_a_run_and_writes_intervals(model_dir, tmp_path, task):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired_eval", Path(__file__).parent.parent / "bench" / "paired_eval.py")
    paired_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired_eval)
    out = tmp_path / task
    assert run_cli("run", "--model", model_dir, "--task", task, "--data", FIXTURES, "--k", 2, "--out", out,
                   *FAST) == 0
    assert paired_eval.main(["--run", str(out), "--data", FIXTURES, "--samples", "200"]) == 0
    report = json.loads((out / "paired.json").read_text())
    for name in ("base", "lofit", "random"):  # the same numbers, the random heads re-tuned from scratch
        now, then = report["reproduced"][name]["now"], report["reproduced"][name]["results.json"]
        assert now == pytest.approx(then, abs=1e-9)
    metrics = ["mc1", "mc2"] if task == "truthfulqa" else ["accuracy"]
    assert sorted(report["paired"]) == sorted(f"lofit - {o} ({m})" for o in ("base", "random") for m in metrics)
    for stats in report["paired"].values():
        assert stats["ci_low"] <= stats["mean_diff"] <= stats["ci_high"] and 0.0 <= stats["p_not_better"] <= 1.0


def test_arguments_are_checked_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    """Each mistake fails at once, with no model load, no evaluation, and no file written."""
    import lofit_fast.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lofit_fast.models, "load_model", no_load)
    out = tmp_path / "out"
    cases = [
        (["run", "--backend", "bogus", "--task", "clutrr", "--data", FIXTURES, "--out", out], "--backend bogus"),
        (["run", "--k", "1000", "--task", "clutrr", "--data", FIXTURES, "--out", out], "the model has only 8 heads"),
        (["run", "--fsdp", "--task", "clutrr", "--data", FIXTURES, "--out", out], "--fsdp shards the base"),
        (["tune", "--task", "clutrr", "--data", FIXTURES, "--selection", tmp_path / "none.json", "--out", out],
         "selection file not found"),
        (["export", "--adapter", tmp_path / "nothing", "--out", out], "not an adapter folder"),
        (["eval", "--task", "clutrr", "--data", FIXTURES, "--adapter", tmp_path, "--out", out], "not an adapter folder"),
    ]
    for argv, message in cases:
        assert run_cli(*argv, "--model", model_dir) == 1
        assert message in one_error_line(capsys)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):  # root may write anywhere: nothing to test then
            assert run_cli("run", "--task", "clutrr", "--data", FIXTURES, "--out", readonly / "x",
                           "--model", model_dir) == 1
            assert "not writable" in one_error_line(capsys)
    finally:
        readonly.chmod(0o700)
    assert not out.exists()


def test_export_refuses_a_non_empty_out_and_the_model_folder(model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert run_cli("tune", "--model", model_dir, "--task", "clutrr", "--data", FIXTURES, "--random", "--k", 1,
                   "--out", adapter, *FAST) == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("export", "--model", model_dir, "--adapter", adapter, "--out", out) == 1
    assert "not empty; pass --overwrite" in one_error_line(capsys)
    assert run_cli("export", "--model", model_dir, "--adapter", adapter, "--out", model_dir, "--overwrite") == 1
    assert "is the model folder" in one_error_line(capsys)
    assert run_cli("export", "--model", model_dir, "--adapter", adapter, "--out", out, "--overwrite") == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_resume_says_when_results_json_is_corrupt(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text('{"task": "clutrr", "base": ')
    assert previous_results(str(path), {}) == {}
    assert "is unreadable" in capsys.readouterr().err


def test_run_killed_mid_training_resumes_to_the_same_adapter(model_dir, tmp_path):
    """`run --checkpoint-every 1` SIGKILLed while step 2 trains, then `--resume`: the same selection, adapter
    and metrics, bit for bit, as an uninterrupted run; no checkpoint is left once the run has finished."""
    import signal
    import time

    from safetensors.torch import load_file

    common = ["run", "--model", model_dir, "--task", "truthfulqa", "--data", FIXTURES, "--k", "2",
              "--checkpoint-every", "1", "--epochs", "40", "--batch-size", "2", *QUIET]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(*common, "--out", whole) == 0
    assert not (whole / "checkpoints").exists()

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lofit_fast.cli", *common, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = killed / "checkpoints" / "tune" / "checkpoint.json"
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(manifest.read_text())["step"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    step = json.loads(manifest.read_text())["step"]
    assert 3 <= step < 120, step  # killed while step 2 trains (40 epochs x 3 steps)
    assert not (killed / "adapter").exists()

    assert run_cli(*common, "--out", killed, "--resume") == 0
    assert not (killed / "checkpoints").exists()
    a = load_file(str(whole / "adapter" / "adapter.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    for key in ("heads", "base", "lofit", "random", "random_heads"):
        assert ra[key] == rb[key], key
    assert ra["train_loss"]["lofit"] == rb["train_loss"]["lofit"]
    assert json.loads((whole / "selection.json").read_text())["ranked"] == \
        json.loads((killed / "selection.json").read_text())["ranked"]


def test_checkpoint_every_is_refused_for_the_relatives(model_dir, tmp_path, capsys):
    assert run_cli("run", "--model", model_dir, "--task", "clutrr", "--data", FIXTURES, "--method", "iti",
                   "--checkpoint-every", "2", "--out", tmp_path / "iti", *QUIET) == 1
    assert "--checkpoint-every" in one_error_line(capsys)


def test_run_over_seeds_reports_mean_and_spread(model_dir, tmp_path, capsys):
    """--seeds: one run per seed (own random heads), base evaluated once, summary.json with mean ± std that
    matches the per-seed results."""
    out = tmp_path / "seeds"
    assert run_cli("run", "--model", model_dir, "--task", "truthfulqa", "--data", FIXTURES, "--k", 2,
                   "--seeds", "1,2,3", "--out", out, *FAST) == 0
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (1, 2, 3)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2, 3]
    for arm in ("base", "lofit", "random"):
        for metric in ("mc1", "mc2"):
            values = [r[arm][metric] for r in runs]
            row = summary["summary"][arm][metric]
            assert row["values"] == values and row["mean"] == pytest.approx(sum(values) / 3)
            assert row["std"] == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item())
    assert summary["summary"]["base"]["mc1"]["std"] == 0.0  # the base model is deterministic
    assert [r["seconds_by_stage"]["eval_base"] for r in runs][1:] == [0.0, 0.0]  # ... and evaluated once
    assert len({json.dumps(r["random_heads"]) for r in runs}) > 1  # each seed draws its own random heads
    assert "mean ± standard deviation over 3 seeds" in capsys.readouterr().out
    # bench/seeds_table.py renders the same numbers as markdown
    from bench_scripts import load_bench

    table = load_bench("seeds_table").render(str(out))
    lofit = summary["summary"]["lofit"]["mc1"]
    assert f"| LoFiT (top 2) | {lofit['mean']:.3f} ± {lofit['std']:.3f} |" in table
    for s, r in zip((1, 2, 3), runs):
        assert f"| {s} | {r['lofit']['mc1']:.3f} | {r['lofit']['mc2']:.3f} | {r['random']['mc1']:.3f} |" in table


def test_seeds_run_as_separate_processes_evaluate_the_base_model_once(model_dir, tmp_path, monkeypatch):
    """`run --seeds S --resume` into one folder takes the base model's metrics from a seed that already ran with the
    same settings and data, and evaluates it again when the settings differ."""
    from lofit_fast.experiments import lofit_run

    evaluated = []
    real = lofit_run.evaluate_arm

    def counting(settings, model, tokenizer, items, label, *args, **kw):
        evaluated.append((settings.seed, label))
        return real(settings, model, tokenizer, items, label, *args, **kw)

    monkeypatch.setattr(lofit_run, "evaluate_arm", counting)
    base_runs = lambda: [seed for seed, label in evaluated if label == "the base model"]  # noqa: E731
    out = tmp_path / "seeds"
    common = ["run", "--model", model_dir, "--task", "truthfulqa", "--data", FIXTURES, "--k", 2, "--out", out, *FAST]
    assert run_cli(*common, "--seeds", "1") == 0
    assert run_cli(*common, "--seeds", "2", "--resume") == 0
    assert base_runs() == [1]
    first, second = (json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (1, 2))
    assert second["seconds_by_stage"]["eval_base"] == 0.0
    assert second["base"] == first["base"] and second["item_scores"]["base"] == first["item_scores"]["base"]
    assert second["paired"]  # the intervals against base use the reused per-item scores
    assert run_cli(*common, "--seeds", "3") == 0  # without --resume: evaluated again, to the same numbers
    assert base_runs() == [1, 3]
    assert json.loads((out / "seed_3" / "results.json").read_text())["base"] == first["base"]
    other = [a if a != "2" else "1" for a in map(str, common)]  # another --k: not the same run, no reuse
    assert run_cli(*other, "--seeds", "4", "--resume") == 0
    assert base_runs() == [1, 3, 4]


def test_seeds_argument_is_checked():
    from lofit_fast.cli.common import seeds_arg

    assert seeds_arg("42,43, 44") == [42, 43, 44]
    for bad in ("1,1", "a,b", ""):
        with pytest.raises(Exception, match="seeds must"):
            seeds_arg(bad)


def test_fsdp_reaches_the_training_loop():
    from lofit_fast.experiments import RunSettings, train_kw

    assert train_kw(RunSettings(fsdp=True))["fsdp"] is True
    assert "fsdp" not in train_kw(RunSettings())


@pytest.mark.parametrize("cuda", [False, True])
def test_start_up_noise_from_torchao_is_dropped_and_nothing_else(cuda):
    """The CLI drops torchao's 'Failed to load' warnings for its CUDA libraries where there is no CUDA, and torch's
    deprecation warning about torchao's Enum registrations; any other warning of those loggers still shows."""
    import logging
    from lofit_fast.cli import quiet_foreign_start_up_noise

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.shown = []

        def emit(self, record):
            self.shown.append(record.getMessage())

    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    before = [(lg, list(lg.filters), lg.level) for lg in (torchao, pytree)]
    keep = Keep()
    try:
        for lg in (torchao, pytree):
            lg.addHandler(keep)
            lg.setLevel(logging.WARNING)
            lg.filters[:] = []  # as in a new process (earlier main() calls here added the CPU filters)
        quiet_foreign_start_up_noise(cuda)
        quiet_foreign_start_up_noise(cuda)
        assert len(torchao.filters) == (0 if cuda else 1) and len(pytree.filters) == 1
        torchao.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        torchao.warning("int4 weight-only needs CUDA")
        pytree.warning("<enum 'K'> is an Enum subclass ... Calling register_constant() on Enum subclasses is "
                       "deprecated")
        pytree.warning("another pytree warning")
        assert ("Failed to load /x/_C_mxfp8.so: Could not load this library" in keep.shown) == cuda
        assert "int4 weight-only needs CUDA" in keep.shown and "another pytree warning" in keep.shown
        assert not any("register_constant" in m for m in keep.shown)
    finally:
        for lg, filters, level in before:
            lg.removeHandler(keep)
            lg.filters[:] = filters
            lg.setLevel(level)
