"""bench/multi_adapter_bench.py end to end on a tiny model: every provider runs, and the CSV, the table and the
plot are written with a provider column."""
import csv

import pytest
import torch

import lofit_fast

from bench_scripts import load_bench


def test_bench_smoke(tmp_path):
    mb = load_bench("multi_adapter_bench")
    mb.main(["--preset", "tiny", "--reps", "1", "--warmup", "0", "--ns", "1,2", "--results", str(tmp_path),
             "--new-tokens", "2"])
    rows = list(csv.DictReader(open(tmp_path / "multi_adapter_tiny.csv")))
    got = {(r["workload"], r["provider"], r["n_adapters"]) for r in rows}
    for p in ("fused", "hook", "loop", "merge"):
        for n in ("1", "2"):
            assert ("decode", p, n) in got and ("prefill", p, n) in got
    assert ("decode", "one_adapter", "1") in got and ("train", "fused", "2") in got
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    table = (tmp_path / "multi_adapter_tiny.md").read_text()
    assert "| 2 |" in table and "fused" in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "multi_adapter_tiny.png").stat().st_size > 1000


def test_the_hook_provider_equals_the_fused_op(tmp_path):
    """The dense per-row pre-hook baseline computes the same logits as the fused per-row tables (so the benchmark
    compares equal work)."""
    mb = load_bench("multi_adapter_bench")
    model = mb.build_model("tiny", "cpu", torch.float32)
    paths = mb.make_adapters(model, 3, 3, tmp_path)
    ids = torch.randint(3, 97, (4, 6))
    rows = [0, 1, 2, 1]
    hook = mb.DenseRowHook(model, paths)
    hook.ids = torch.tensor(rows)
    with torch.no_grad():
        by_hook = model(input_ids=ids).logits
    hook.remove()
    lofit_fast.load_adapters(model, paths)
    with torch.no_grad():
        fused = model(input_ids=ids, adapter_names=rows).logits
        base = model(input_ids=ids, adapter_names=[-1] * 4).logits
    assert (by_hook - fused).abs().max() < 1e-5
    assert (fused - base).abs().max() > 1e-4
