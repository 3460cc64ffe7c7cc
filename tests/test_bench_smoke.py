"""Smoke test of bench/e2e_bench.py and bench/plot_e2e.py on a tiny random model: one timed step of every provider
and workload, the rows, CSV, markdown and plot they write, the provider swaps, and the memory measurement.
No timing assertions: times on a shared CI machine mean nothing."""
import csv
import json

import pytest
import torch
import torch.nn as nn

from bench_scripts import load_bench



@pytest.fixture(scope="module")
def e2e():
    return load_bench("e2e_bench")


@pytest.fixture(scope="module")
def plots():
    return load_bench("plot_e2e")


@pytest.fixture
def one_thread():
    # Two intra-op threads on a loaded 2-core machine turn microsecond GEMMs into milliseconds of barrier waits.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_provider_and_workload_writes_well_formed_rows(e2e, plots, tmp_path, one_thread):
    argv = ("--device cpu --model tiny --steps 1 --warmup 0 --batch 2 --seq 16 --decode-batch 1 --decode-prompt 4 "
            f"--decode-new 2 --prefill-seq 16 --results {tmp_path}").split()
    rows = e2e.run(e2e.resolve_args(e2e.build_parser().parse_args(argv)), log=lambda *a: None)

    expected = {(w, p, "2", "16") for w in ("step1", "step2") for p in e2e.TRAIN_PROVIDERS}
    expected |= {("decode", p, "1", "2") for p in e2e.INFER_PROVIDERS}
    expected |= {("prefill", p, "1", "16") for p in e2e.INFER_PROVIDERS}
    assert {(r["workload"], r["provider"], r["batch"], r["seq"]) for r in rows} == expected
    assert len(rows) == len(expected)

    model_mb = e2e.model_bytes(e2e.build_model("tiny", torch.device("cpu"), torch.float32)) / 2**20
    for r in rows:
        assert list(r) == e2e.HEADER
        assert (r["model"], r["dtype"], r["device"], r["torch"]) == ("tiny", "fp32", "cpu", torch.__version__)
        assert r["commit"]
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        tokens = int(r["batch"]) * int(r["seq"])
        assert float(r["tokens_per_s"]) == pytest.approx(tokens / (p50 / 1e3), rel=1e-2)
        assert float(r["peak_mb"]) >= model_mb - 0.05  # weights + provider state + the step's peak (0.1 MB steps)

    with open(tmp_path / "e2e.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == e2e.HEADER
        assert list(reader) == rows
    run_meta = [json.loads(line) for line in (tmp_path / "e2e_runs.jsonl").read_text().splitlines()]
    assert len(run_meta) == 1 and run_meta[0]["models"] == ["tiny"] and run_meta[0]["loadavg_after"]

    md = (tmp_path / "e2e_cpu.md").read_text()
    assert "| step1 | 2 × 16 | floor (ref) |" in md and "| decode | 1 × 2 | base (ref) |" in md
    assert md.count("| 1.00× |") >= 4  # each reference against itself, one per (workload, shape)
    png = tmp_path / "e2e_cpu_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def e2e_sites(model):
    from lofit_fast.patch import find_attention_sites

    return find_attention_sites(model)


def _state(model):
    """The projection modules of every layer (by identity and type) and the number of hooks in the model."""
    projections = tuple((id(m), type(m)) for s in e2e_sites(model)
                        for m in (s.attn.q_proj, s.attn.v_proj, s.attn.o_proj))
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return projections, hooks


def test_providers_swap_in_and_leave_the_model_as_it_was(e2e, one_thread):
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    providers = {**{f"s1/{k}": v for k, v in e2e.training_providers(model, "step1", e2e.TRAIN_PROVIDERS).items()},
                 **{f"s2/{k}": v for k, v in e2e.training_providers(model, "step2", e2e.TRAIN_PROVIDERS).items()},
                 **e2e.inference_providers(model, e2e.INFER_PROVIDERS)}
    plain = _state(model)
    assert plain[1] == 0 and all(t is nn.Linear for _, t in plain[0])
    outputs = {}
    for name, provider in providers.items():
        with provider.attached():
            assert (_state(model) == plain) == (name == "base")
            with torch.no_grad():
                outputs[name] = model(input_ids=ids).logits
        assert _state(model) == plain, f"{name} left something behind"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # The inference providers carry the same non-zero step-2 offsets: same logits, different from the base's.
    for name in ("hooks", "merged"):
        torch.testing.assert_close(outputs[name], outputs["fused"], rtol=1e-4, atol=1e-5)
    assert (outputs["fused"] - before).abs().max() > 1e-4
    # step 2 trains v on K of the heads and the floor's scalar sits at the lowest of their layers.
    heads = e2e.step2_heads(model)
    assert len(heads) == 1  # 3 % of 12 heads, at least one
    floor_layer = [m for m, _ in providers["s2/floor"].pre_hooks]
    assert floor_layer == [e2e_sites(model)[heads[0][0]].attn.o_proj]
    assert sum(p.numel() for p in providers["s1/fused"].params) == 12 * 16  # A on every head


def test_cpu_peak_memory_sees_a_temporary(e2e):
    def work():
        a = torch.empty(4 << 20)  # 16 MiB
        b = torch.empty(4 << 20)  # 16 MiB more while a lives
        del a, b
        c = torch.empty(2 << 20)  # 8 MiB after both are gone
        del c

    peak = e2e.transient_peak_bytes(work, torch.device("cpu"))
    assert 32 * 2**20 <= peak < 33 * 2**20


def test_latest_run_of_each_group_gives_the_ratios(plots):
    def row(provider, ms, peak="100", workload="step2", batch="4"):
        return dict(model="m", provider=provider, workload=workload, batch=batch, seq="128", dtype="fp32",
                    tokens_per_s="1", ms_p50=ms, ms_p20=ms, ms_p80=ms, peak_mb=peak, device="cpu", torch="t",
                    commit="c")

    old = [row("floor", "10"), row("fused", "30")]
    new = [row("floor", "20"), row("fused", "25", peak="110"), row("hooks", "50")]
    other = [row("base", "5", workload="decode", batch="1")]
    rows = plots.latest_runs(old + other + new)  # the old block and the new one are separated by another group
    assert [r["ms_p50"] for r in rows if r["workload"] == "step2"] == ["20", "25", "50"]
    back_to_back = plots.latest_runs(old + new)  # a provider repeating starts a new run
    assert [r["ms_p50"] for r in back_to_back] == ["20", "25", "50"]
    group = plots.groups(rows)[("cpu", "m", "fp32", "step2", "4", "128")]
    assert plots.ratios(group, "floor", "ms_p50") == {"floor": 1.0, "fused": 1.25, "hooks": 2.5}
    assert plots.ratios(group, "floor", "peak_mb")["fused"] == pytest.approx(1.1)
    oom = plots.latest_runs(new + [dict(row("hooks_loop", ""), peak_mb="oom")])
    table = plots.markdown_tables(oom)
    assert "| step2 | 4 × 128 | hooks_loop | – | out of memory | – | – | oom | – |" in table
    assert "| step2 | 4 × 128 | fused | 1 | 25.00 [25.00, 25.00] | 1.25× | 0.50× | 110 | 1.100× |" in table


def test_appending_to_a_csv_with_another_header_fails(e2e, tmp_path):
    path = tmp_path / "e2e.csv"
    path.write_text("provider,ms\nfused,1\n")
    with pytest.raises(ValueError, match="header"):
        e2e.append_rows(path, [])
