"""The reports over `run --seeds` folders: bench/recipe_table.py (two recipes, seed by seed) and the spread test
they share, on hand-made seed folders checked against `statistics`."""
import json
import random
import statistics

import pytest

from bench_scripts import load_bench
from lofit_fast.experiments.seeds import beyond_spread, load_seeds_run, mean_std, report_seed_folders

ITEMS = 37


def _write_run(root, recipe, seeds, rng, *, task="mquake", random_heads=None, stopped_after_lofit=()):
    """A seeds folder whose per-arm accuracies are the means of random 0/1 item scores."""
    heads = {}
    for seed in seeds:
        scores = {arm: {"accuracy": [float(rng.random() < p) for _ in range(ITEMS)]}
                  for arm, p in (("base", 0.1), ("lofit", 0.4), ("random", 0.3))}
        base_rng = random.Random(seed)  # the base model does not depend on the recipe here
        scores["base"] = {"accuracy": [float(base_rng.random() < 0.1) for _ in range(ITEMS)]}
        heads[seed] = [[rng.randrange(4), rng.randrange(4)] for _ in range(3)]
        result = {"task": task, "model": "tiny", "k": 3, "heads": heads[seed], "eval_examples": ITEMS,
                  "seconds_by_stage": {"eval_base": 1.0, "select": 2.0, "tune": 3.0},
                  "random_heads": (random_heads or {}).get(seed, [[0, seed], [1, seed]]),
                  "hyperparameters": {"seed": seed, "recipe": recipe, "lr": 0.01,
                                      "schedule": "constant" if recipe == "plain" else "linear"},
                  "item_scores": scores, **{arm: {"accuracy": statistics.mean(v["accuracy"])}
                                            for arm, v in scores.items()}}
        if seed in stopped_after_lofit:  # killed in the random-heads stage
            for key in ("random", "random_heads"):
                result.pop(key)
            result["item_scores"].pop("random")
        (root / f"seed_{seed}").mkdir(parents=True)
        (root / f"seed_{seed}" / "results.json").write_text(json.dumps(result))
    summary = {"task": task, "seeds": list(seeds),
               "summary": {"lofit": {"accuracy": {"mean": 0.0, "std": 0.0, "values": []}}}}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_recipe_table_pairs_each_seed_of_two_recipes(tmp_path):
    table = load_bench("recipe_table")
    rng = random.Random(7)
    a = _write_run(tmp_path / "plain", "plain", (1, 2, 3), rng)
    b = _write_run(tmp_path / "official", "official", (2, 3, 4), rng)  # seed 1 and 4 unpaired: left out
    report = table.compare(str(a), str(b), samples=300)
    assert report["seeds"] == [2, 3] and report["labels"] == ["plain", "official"]
    assert report["settings"] == {"recipe": ["plain", "official"], "schedule": ["constant", "linear"]}
    runs_a, runs_b = load_seeds_run(str(a))["runs"], load_seeds_run(str(b))["runs"]
    for arm in ("base", "lofit", "random"):
        col_a = [runs_a[s][arm]["accuracy"] for s in (2, 3)]
        col_b = [runs_b[s][arm]["accuracy"] for s in (2, 3)]
        row = report["over_seeds"][arm]["accuracy"]
        assert row["a"]["mean"] == pytest.approx(statistics.mean(col_a))
        assert row["b"]["std"] == pytest.approx(statistics.stdev(col_b))
        diffs = [y - x for x, y in zip(col_a, col_b)]
        assert row["b - a"]["mean"] == pytest.approx(statistics.mean(diffs))
        assert row["b - a"]["beyond_spread"] == (abs(statistics.mean(diffs)) > max(statistics.stdev(diffs), 1e-12))
        for s, x, y in zip((2, 3), col_a, col_b):
            paired = report["per_seed"][s][arm]["accuracy"]["paired"]
            assert paired["mean_diff"] == pytest.approx(y - x) and paired["items"] == ITEMS
            assert paired["ci_low"] <= paired["mean_diff"] <= paired["ci_high"]
    # the base model scored alike under both recipes: a zero difference, never "beyond the spread"
    assert report["over_seeds"]["base"]["accuracy"]["b - a"] == {"mean": 0.0, "std": 0.0, "values": [0.0, 0.0],
                                                                 "beyond_spread": False}
    gain = report["lofit_minus_random"]["accuracy"]["b"]
    assert gain["values"] == pytest.approx([runs_b[s]["lofit"]["accuracy"] - runs_b[s]["random"]["accuracy"]
                                            for s in (2, 3)])
    text = table.render(report)
    assert "Settings that differ (A / B): recipe plain / official, schedule constant / linear" in text
    lofit = report["over_seeds"]["lofit"]["accuracy"]
    assert f"| LoFiT | accuracy | {lofit['a']['mean']:.3f} ± {lofit['a']['std']:.3f} |" in text
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    assert table.main([str(a), str(b), "--samples", "300", "--out", str(out), "--json", str(js)]) == 0
    assert out.read_text() == text and json.loads(js.read_text())["seeds"] == [2, 3]


def test_recipe_table_refuses_runs_that_do_not_pair(tmp_path, capsys):
    table = load_bench("recipe_table")
    rng = random.Random(3)
    a = _write_run(tmp_path / "plain", "plain", (1, 2), rng)
    with pytest.raises(ValueError, match="same settings"):
        table.compare(str(a), str(a))
    other = _write_run(tmp_path / "other", "official", (1, 2), rng, random_heads={2: [[3, 3], [2, 2]]})
    with pytest.raises(ValueError, match="seed 2: the two runs tuned different random heads"):
        table.compare(str(a), str(other))
    clutrr = _write_run(tmp_path / "clutrr", "official", (1, 2), rng, task="clutrr")
    with pytest.raises(ValueError, match="a clutrr run"):
        table.compare(str(a), str(clutrr))
    assert table.main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "has no summary.json" in capsys.readouterr().err


def test_beyond_spread_needs_seeds_and_a_mean_above_the_spread():
    assert not beyond_spread(mean_std([0.0, 0.0, 0.0]))
    assert not beyond_spread(mean_std([-1e-17, -1e-17]), two_sided=True)  # float noise of a zero gap
    assert not beyond_spread(mean_std([0.5]))  # one seed has no spread to clear
    assert beyond_spread(mean_std([0.10, 0.12, 0.11]))
    assert not beyond_spread(mean_std([-0.10, -0.12, -0.11]))  # a gain: one-sided
    assert beyond_spread(mean_std([-0.10, -0.12, -0.11]), two_sided=True)
    assert not beyond_spread(mean_std([0.1, -0.1, 0.05]), two_sided=True)


def test_seed_folders_are_summarized_and_a_missing_random_arm_is_left_out(tmp_path, capsys):
    """Seeds run as separate processes each write a summary of their own seed; report_seed_folders (and
    `seeds_table.py --summarize`) rebuild it from every seed folder. Runs stopped after LoFiT's evaluation
    report base and LoFiT only, and recipe_table compares the arms both runs have."""
    rng = random.Random(11)
    full = _write_run(tmp_path / "plain", "plain", (1, 2, 3), rng)
    cut = _write_run(tmp_path / "official", "official", (1, 2, 3), rng, stopped_after_lofit=(1, 2, 3))
    (full / "seed_x").mkdir()  # not a seed folder
    report = report_seed_folders(str(full))
    assert report["seeds"] == [1, 2, 3] and json.loads((full / "summary.json").read_text()) == report
    runs = load_seeds_run(str(full))["runs"]
    for arm in ("base", "lofit", "random"):
        values = [runs[s][arm]["accuracy"] for s in (1, 2, 3)]
        assert report["summary"][arm]["accuracy"]["mean"] == pytest.approx(statistics.mean(values))
        assert report["summary"][arm]["accuracy"]["std"] == pytest.approx(statistics.stdev(values))
    gain = [runs[s]["lofit"]["accuracy"] - runs[s]["random"]["accuracy"] for s in (1, 2, 3)]
    assert report["lofit_minus_random"]["accuracy"]["values"] == pytest.approx(gain)
    assert report["seconds"] == pytest.approx(3 * 6.0)
    partial = report_seed_folders(str(cut))
    assert set(partial["summary"]) == {"base", "lofit"} and "lofit_minus_random" not in partial
    assert partial["random_heads"] == {} and "lofit_minus_base" in partial
    seeds_table = load_bench("seeds_table")
    text = seeds_table.render(str(cut))
    assert "random 3 heads" not in text and "| LoFiT (top 3) |" in text
    assert seeds_table.main([str(cut), "--summarize"]) == 0 and capsys.readouterr().out == text
    table = load_bench("recipe_table")
    both = table.compare(str(full), str(cut), samples=200)
    assert both["arms"] == ["base", "lofit"] and both["lofit_minus_random"]["accuracy"].keys() == {"a"}
    rendered = table.render(both)
    assert "| random heads |" not in rendered and "| LoFiT − random heads | accuracy | " in rendered
    with pytest.raises(FileNotFoundError, match="no seed_<seed>/results.json"):
        report_seed_folders(str(tmp_path / "nowhere"))
