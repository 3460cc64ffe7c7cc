"""The reports over `run --seeds` folders: bench/recipe_table.py (two recipes, seed by seed) and the spread test
they share, on hand-made seed folders checked against `statistics`."""
import json
import random
import statistics

import pytest

from bench_scripts import load_bench
from lofit_fast.experiments.seeds import beyond_spread, load_seeds_run, mean_std

ITEMS = 37


def _write_run(root, recipe, seeds, rng, *, task="mquake", random_heads=None):
    """A seeds folder whose per-arm accuracies are the means of random 0/1 item scores."""
    heads = {}
    for seed in seeds:
        scores = {arm: {"accuracy": [float(rng.random() < p) for _ in range(ITEMS)]}
                  for arm, p in (("base", 0.1), ("lofit", 0.4), ("random", 0.3))}
        base_rng = random.Random(seed)  # the base model does not depend on the recipe here
        scores["base"] = {"accuracy": [float(base_rng.random() < 0.1) for _ in range(ITEMS)]}
        heads[seed] = [[rng.randrange(4), rng.randrange(4)] for _ in range(3)]
        result = {"task": task, "k": 3, "heads": heads[seed], "eval_examples": ITEMS,
                  "random_heads": (random_heads or {}).get(seed, [[0, seed], [1, seed]]),
                  "hyperparameters": {"seed": seed, "recipe": recipe, "lr": 0.01,
                                      "schedule": "constant" if recipe == "plain" else "linear"},
                  "item_scores": scores, **{arm: {"accuracy": statistics.mean(v["accuracy"])}
                                            for arm, v in scores.items()}}
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
