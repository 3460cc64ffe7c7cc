"""lm-evaluation-harness judging the project: the `lofit` model class with an adapter, the local-data tasks,
and lm-eval's MC2 equal to the same sums computed by lofit_fast's own scorer with lm-eval's prompt."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed")

import lofit_fast  # noqa: E402
from lofit_fast.data import load_split  # noqa: E402
from lofit_fast.eval.truthfulqa import score_answers  # noqa: E402
from lofit_fast.harness import evaluate  # noqa: E402
from lofit_fast.harness.tasks import TRUTHFULQA_PRIMER  # noqa: E402

from fixtures.tiny import DATA, byte_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    tiny_llama(seed=5).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    model, _ = lofit_fast.load_model(str(model_dir))
    lofit_fast.patch(model, [(0, 1), (1, 2)], scale=False, offset=True, init_std=2.0)
    folder = tmp_path_factory.mktemp("adapter")
    lofit_fast.save_adapter(model, folder)
    return folder


def own_mc(model, tok, items):
    """MC1 and MC2 with lm-eval's prompt (primer, `Q: q\\nA:`, each choice after a space), by lofit_fast."""
    mc1 = mc2 = 0.0
    for it in items:
        prompt = TRUTHFULQA_PRIMER + f"\n\nQ: {it.question}\nA:"
        incorrect = list(dict.fromkeys(it.incorrect))
        correct = list(dict.fromkeys(it.correct or [it.best]))
        s1 = score_answers(model, tok, [(prompt, " " + a) for a in [it.best] + incorrect], progress=False)
        mc1 += float(s1[0] > max(s1[1:]))
        s2 = score_answers(model, tok, [(prompt, " " + a) for a in correct + incorrect], progress=False)
        top = max(s2)
        p = [math.exp(s - top) for s in s2]
        mc2 += sum(p[: len(correct)]) / sum(p)
    return mc1 / len(items), mc2 / len(items)


def test_lm_eval_scores_base_and_adapter_like_lofit_fast(model_dir, adapter_dir):
    table = evaluate(DATA, {"base": None, "lofit": str(adapter_dir)}, model=str(model_dir),
                     tasks=["lofit_truthfulqa_mc1", "lofit_truthfulqa_mc2"], batch_size=4)
    items = load_split("truthfulqa", DATA, "test", fold=0)
    tok = byte_tokenizer()
    base, _ = lofit_fast.load_model(str(model_dir))
    tuned, _ = lofit_fast.load_model(str(model_dir))
    lofit_fast.load_adapter(tuned, adapter_dir)
    for name, model in (("base", base), ("lofit", tuned)):
        mc1, mc2 = own_mc(model, tok, items)
        assert table[name]["lofit_truthfulqa_mc1"] == pytest.approx(mc1)
        assert table[name]["lofit_truthfulqa_mc2"] == pytest.approx(mc2, abs=1e-5)
    assert table["lofit"]["lofit_truthfulqa_mc2"] != pytest.approx(table["base"]["lofit_truthfulqa_mc2"], abs=1e-6)


def test_generation_tasks_run_on_the_local_files(model_dir):
    table = evaluate(DATA, {"base": None}, model=str(model_dir), tasks=["lofit_clutrr", "lofit_mquake"], batch_size=2)
    assert set(table["base"]) == {"lofit_clutrr", "lofit_mquake"}
    assert all(0.0 <= v <= 1.0 for v in table["base"].values())


def test_unknown_task_is_named(model_dir):
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate(DATA, {"base": None}, model=str(model_dir), tasks=["truthfulqa_mc3"])


def test_lm_eval_judges_a_finished_run(model_dir, tmp_path):
    """bench/lm_eval_compare.py's library half: a run's three arms scored by lm-eval beside the run's own numbers
    (the same adapters: lm-eval's LoFiT row equals the harness on the run's adapter folder)."""
    from lofit_fast.cli import main
    from lofit_fast.experiments.judge import lm_eval_comparison, markdown

    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--task", "truthfulqa", "--data", str(DATA), "--k", "2",
                 "--epochs", "1", "--batch-size", "2", "--threads", "1", "--quiet", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert (out / "random_adapter" / "adapter_config.json").is_file()
    report = lm_eval_comparison(str(out), str(DATA), batch_size=4)
    results = json.loads((out / "results.json").read_text())
    direct = evaluate(DATA, {"lofit": str(out / "adapter")}, model=str(model_dir), tasks=["lofit_truthfulqa_mc2"],
                      batch_size=4)
    assert report["metrics"]["mc2"]["lm_eval"]["lofit"] == pytest.approx(direct["lofit"]["lofit_truthfulqa_mc2"])
    for metric in ("mc1", "mc2"):
        row = report["metrics"][metric]
        assert row["lofit_fast"] == {arm: results[arm][metric] for arm in ("base", "lofit", "random")}
        for other in ("base", "random"):
            gain = row["gains"][f"lofit - {other}"]
            assert gain["lm_eval"] == pytest.approx(row["lm_eval"]["lofit"] - row["lm_eval"][other])
        order = [sorted(row[k], key=lambda a: -row[k][a]) for k in ("lofit_fast", "lm_eval")]
        assert row["same_ordering"] == (order[0] == order[1])
    assert (out / "lm_eval.json").is_file() and "| mc2 | lofit |" in markdown(report)


def test_lm_eval_judges_every_seed_of_a_seeds_run(model_dir, tmp_path, monkeypatch):
    """bench/lm_eval_compare.py --seeds-run: each seed's arms judged as lm_eval_comparison judges a single run, the
    base model scored once, mean ± std over seeds; an up-to-date seed is reused, a stale one scored again."""
    from lofit_fast.cli import main
    from lofit_fast.experiments import judge

    out = tmp_path / "seeds"
    assert main(["run", "--model", str(model_dir), "--task", "truthfulqa", "--data", str(DATA), "--k", "2",
                 "--epochs", "1", "--batch-size", "2", "--threads", "1", "--quiet", "--device", "cpu",
                 "--seeds", "1,2", "--out", str(out)]) == 0
    calls = []
    real = judge.lm_eval_scores

    def counted(data, adapters, **kw):
        calls.append(sorted(adapters))
        return real(data, adapters, **kw)

    monkeypatch.setattr(judge, "lm_eval_scores", counted)
    summary = judge.lm_eval_seeds(str(out), str(DATA), batch_size=4)
    assert calls == [["base", "lofit_1", "lofit_2", "random_1", "random_2"]] and summary["scored"] == [1, 2]
    single = json.loads((out / "seed_2" / "lm_eval.json").read_text())
    again = judge.lm_eval_comparison(str(out / "seed_2"), str(DATA), batch_size=4)
    for metric in ("mc1", "mc2"):
        assert single["metrics"][metric]["lm_eval"] == pytest.approx(again["metrics"][metric]["lm_eval"])
        row = summary["metrics"][metric]
        per_seed = [json.loads((out / f"seed_{s}" / "lm_eval.json").read_text())["metrics"][metric] for s in (1, 2)]
        values = [r["lm_eval"]["lofit"] for r in per_seed]
        assert row["lm_eval"]["lofit"]["values"] == values
        assert row["lm_eval"]["lofit"]["mean"] == pytest.approx(sum(values) / 2)
        assert row["lm_eval"]["base"]["std"] == 0.0
        gains = [r["gains"]["lofit - random"]["lm_eval"] for r in per_seed]
        assert row["gains"]["lofit - random"]["lm_eval"]["values"] == gains
    calls.clear()
    # seed 1's record no longer matches its results.json: only seed 1 is scored, with seed 2's base
    stale = json.loads((out / "seed_1" / "lm_eval.json").read_text())
    stale["metrics"]["mc1"]["lofit_fast"]["lofit"] += 0.5
    (out / "seed_1" / "lm_eval.json").write_text(json.dumps(stale))
    redo = judge.lm_eval_seeds(str(out), str(DATA), batch_size=4)
    assert calls == [["lofit_1", "random_1"]] and redo["scored"] == [1]
    for metric in ("mc1", "mc2"):
        for judge_name in ("lofit_fast", "lm_eval"):
            for arm in ("base", "lofit", "random"):
                assert redo["metrics"][metric][judge_name][arm]["values"] == pytest.approx(
                    summary["metrics"][metric][judge_name][arm]["values"], abs=1e-6)
    mc2 = summary["metrics"]["mc2"]["lm_eval"]
    assert mc2["lofit"]["values"] != mc2["base"]["values"]
    assert "| mc1 | lofit - random |" in judge.markdown(redo) and (out / "lm_eval_summary.json").is_file()


def test_lm_eval_judges_the_adapters_of_a_recipe_factorial(model_dir, tmp_path):
    """bench/lm_eval_compare.py --factorial: every cell's adapter scored by lm-eval, its gain over lm-eval's base
    beside the factorial's own gain over the base on the cell's prompt."""
    from bench_scripts import load_bench
    from lofit_fast.experiments.judge import lm_eval_factorial, markdown_factorial

    out = tmp_path / "factorial"
    factorial = load_bench("recipe_factorial")
    assert factorial.main(["--data", str(DATA), "--model", str(model_dir), "--heads", "0:1,1:2", "--out", str(out),
                           "--epochs", "1", "--batch-size", "2", "--threads", "1", "--quiet",
                           "--cells", "official,plain"]) == 0
    report = lm_eval_factorial(str(out), str(DATA), batch_size=4)
    direct = evaluate(DATA, {"plain": str(out / "adapters" / "constant-noeos-newline_seed42")}, model=str(model_dir),
                      tasks=["lofit_truthfulqa_mc1"], batch_size=4)
    row = report["metrics"]["mc1"]
    assert set(row["cells"]) == {"linear-eos-official_seed42", "constant-noeos-newline_seed42"}
    plain = row["cells"]["constant-noeos-newline_seed42"]
    assert plain["lm_eval"] == pytest.approx(direct["plain"]["lofit_truthfulqa_mc1"])
    assert plain["lm_eval_gain"] == pytest.approx(plain["lm_eval"] - row["lm_eval_base"])
    base = json.loads((out / "base_newline.json").read_text())["metrics"]["mc1"]
    assert plain["lofit_fast_gain"] == pytest.approx(plain["lofit_fast"] - base)
    assert (out / "lm_eval.json").is_file() and "| mc1 | base |" in markdown_factorial(report)
    with pytest.raises(ValueError, match="no finished factorial cells"):
        lm_eval_factorial(str(out), str(DATA), cells=["linear-noeos-newline"])


def _requests(lm, pairs):
    return [((ctx, cont), *lm._encode_pair(ctx, cont)) for ctx, cont in pairs]


def test_shared_prefix_loglikelihoods_equal_hflms_own(model_dir, adapter_dir):
    """LofitLM's shared-context path against HFLM's per-request path on the same requests: log-likelihoods to
    1e-5, the same greedy flags, in the request order (contexts interleaved, of different lengths, one request
    whose continuation is the model's greedy one)."""
    from lofit_fast.harness import LofitLM

    fast = LofitLM(pretrained=str(model_dir), adapter=str(adapter_dir), batch_size=3)
    slow = LofitLM(pretrained=str(model_dir), adapter=str(adapter_dir), batch_size=3, shared_prefix="false")
    assert fast.shared_prefix and not slow.shared_prefix
    gen = torch.Generator().manual_seed(11)
    letters = "abcdefghijklmnopqrstuvwxyz "
    def text(n):
        return "".join(letters[i] for i in torch.randint(0, len(letters), (n,), generator=gen).tolist())
    contexts = [TRUTHFULQA_PRIMER[:150] + "\nQ: " + text(9) + "\nA:", "Q: " + text(4) + "\nA:", text(31)]
    pairs = [(contexts[i % 3], " " + text(1 + (5 * i) % 13)) for i in range(14)]
    ids = torch.tensor([fast.tok_encode(contexts[1])])
    with torch.no_grad():
        greedy = fast.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    pairs.append((contexts[1], fast.tokenizer.decode(greedy[0, ids.shape[1]:])))
    requests = _requests(fast, pairs)
    assert requests[-1][2] == greedy[0, ids.shape[1]:].tolist()  # the byte tokenizer round-trips
    got, want = fast._loglikelihood_tokens(requests), slow._loglikelihood_tokens(requests)
    assert len(got) == len(want) == len(requests)
    g, w = torch.tensor([x[0] for x in got], dtype=torch.float64), torch.tensor([x[0] for x in want], dtype=torch.float64)
    assert torch.linalg.vector_norm(g - w) / torch.linalg.vector_norm(w) < 1e-5
    assert [x[1] for x in got] == [x[1] for x in want]
    assert got[-1][1] is True


def test_shared_prefix_gives_lm_evals_scores(model_dir, adapter_dir):
    tasks = ["lofit_truthfulqa_mc1", "lofit_truthfulqa_mc2"]
    fast = evaluate(DATA, {"lofit": str(adapter_dir)}, model=str(model_dir), tasks=tasks, batch_size=4)
    slow = evaluate(DATA, {"lofit": str(adapter_dir)}, model=str(model_dir), tasks=tasks, batch_size=4,
                    shared_prefix=False)
    assert fast["lofit"]["lofit_truthfulqa_mc1"] == slow["lofit"]["lofit_truthfulqa_mc1"]
    assert fast["lofit"]["lofit_truthfulqa_mc2"] == pytest.approx(slow["lofit"]["lofit_truthfulqa_mc2"], abs=1e-6)
    with pytest.raises(ValueError, match="shared_prefix must be true or false"):
        from lofit_fast.harness import LofitLM
        LofitLM(pretrained=str(model_dir), shared_prefix="maybe")


def test_shared_prefix_bench_writes_both_providers(model_dir, tmp_path):
    """bench/lm_eval_shared_prefix.py on a tiny model: one CSV row per provider, equal metrics, the ratio."""
    import csv

    from bench_scripts import load_bench

    out = tmp_path / "bench.csv"
    bench = load_bench("lm_eval_shared_prefix")
    assert bench.main(["--data", str(DATA), "--model", str(model_dir), "--limit", "3", "--batch-size", "4",
                       "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["shared", "hflm"]
    assert rows[0]["mc1"] == rows[1]["mc1"] and rows[0]["mc2"] == rows[1]["mc2"]
    assert float(rows[0]["hflm_over_shared"]) > 0 and rows[0]["questions"] == "3"
