"""The recipe factorial (issue 16): its cells, that each cell really trains with its choices, that a finished
cell is not trained again, and that the report's effects are the differences of the cells it shows."""
import json
from pathlib import Path

import transformers as tf

import pytest

from bench_scripts import load_bench
from lofit_fast import load_adapter
from lofit_fast.data import SFTExample
from lofit_fast.eval import truthfulqa_mc
from lofit_fast.experiments import task_items
from lofit_fast.experiments.factorial import FACTORS, Cell, all_cells, report
from lofit_fast.experiments.recipes import RECIPES, with_prompt_style
from lofit_fast.methods import tune
from test_lofit import char_tokenizer, tiny_llama

FIXTURES = str(Path(__file__).parent / "fixtures" / "lofit")


def test_the_cells_are_the_full_factorial_with_the_recipes_first():
    cells = all_cells()
    assert len(cells) == len(set(cells)) == 8
    for name, cell in zip(RECIPES, cells[:2]):
        recipe = RECIPES[name]
        assert (cell.schedule, cell.add_eos, cell.prompt_style) == \
            (recipe["schedule"], recipe["add_eos"], recipe["prompt_style"])
    # cells 2-4 flip one choice of the official recipe, 5-7 one of the plain recipe
    for start, flips in ((cells[0], cells[2:5]), (cells[1], cells[5:8])):
        for flip in flips:
            assert sum(getattr(flip, f) != getattr(start, f) for f in FACTORS) == 1
    assert all(Cell.parse(c.name) == c for c in cells)
    with pytest.raises(ValueError, match="unknown cell 'linear-eos'"):
        Cell.parse("linear-eos")


def test_grad_norm_is_recorded_before_clipping():
    tok = char_tokenizer()
    data = [SFTExample("Q: a? A:", " b"), SFTExample("Q: cc? A:", " dd"), SFTExample("Q: e? A:", " f")]
    norms = {}
    for clip in (None, 1e9, 1e-6):
        model = tiny_llama(seed=1)
        _, record = tune(model, tok, data, [(0, 1), (1, 2)], task="mquake", epochs=2, batch_size=2, lr=1e-2,
                         max_grad_norm=clip, progress=False, return_history=True)
        norms[clip] = [row["grad_norm"] for row in record["history"]]
    assert len(norms[None]) == 4 and all(n > 0 for n in norms[None])
    assert norms[1e9] == pytest.approx(norms[None], rel=1e-6)
    # the first step sees the same gradient whatever the clipping; after that the clipped run has moved less
    assert norms[1e-6][0] == pytest.approx(norms[None][0], rel=1e-6)
    assert norms[1e-6][1:] != pytest.approx(norms[None][1:], rel=1e-6)


def test_factorial_cells_train_with_their_choices_and_resume(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama(seed=2).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    factorial = load_bench("recipe_factorial")
    out = tmp_path / "factorial"
    args = ["--data", FIXTURES, "--model", str(path), "--heads", "0:1,1:3", "--out", str(out), "--epochs", "2",
            "--batch-size", "2",
            "--threads", "1", "--quiet", "--cells", "official,constant-eos-official,linear-eos-newline"]
    assert factorial.main(args) == 0
    files = sorted((out / "cells").glob("*.json"))
    assert [f.name for f in files] == ["constant-eos-official_seed42.json", "linear-eos-newline_seed42.json",
                                      "linear-eos-official_seed42.json"]
    records = {f.name.split("_seed")[0]: json.loads(f.read_text()) for f in files}
    for name, record in records.items():
        cell = Cell.parse(name)
        hyper = record["hyperparameters"]
        assert (hyper["schedule"], hyper["add_eos"], hyper["prompt_style"]) == \
            (cell.schedule, cell.add_eos, cell.prompt_style)
        assert record["heads"] == [[0, 1], [1, 3]] and record["steps"] > 0
        assert 0 <= record["clipped_steps"] <= record["steps"]
    # the saved adapter is the one that was evaluated
    model = tf.AutoModelForCausalLM.from_pretrained(path)
    load_adapter(model, out / "adapters" / "linear-eos-newline_seed42")
    items = with_prompt_style(task_items("truthfulqa", FIXTURES, "eval"), "newline")
    again = truthfulqa_mc(model, char_tokenizer(), items, progress=False)
    assert again == pytest.approx(records["linear-eos-newline"]["metrics"], abs=1e-6)
    losses = {name: tuple(r["epoch_loss"]) for name, r in records.items()}
    assert len(set(losses.values())) == 3  # every choice changes the training
    base = {s: json.loads((out / f"base_{s}.json").read_text())["metrics"] for s in ("official", "newline")}
    assert base["official"] != base["newline"]

    rep = report(str(out))
    cells = rep["cells"]
    schedule = rep["main_effects"]["schedule"]
    assert schedule["pairs"] == 1
    want = cells["constant-eos-official"]["metrics"]["mc2"]["mean"] - cells["linear-eos-official"]["metrics"]["mc2"]["mean"]
    assert schedule["mc2"]["mean"] == pytest.approx(want)
    assert schedule["paired"]["mc2"]["mean_diff"] == pytest.approx(want)  # the metric is the mean over items
    prompt = rep["main_effects"]["prompt_style"]
    gain = (cells["linear-eos-newline"]["metrics"]["mc1"]["mean"] - base["newline"]["mc1"]) - \
        (cells["linear-eos-official"]["metrics"]["mc1"]["mean"] - base["official"]["mc1"])
    assert prompt["mc1_gain"]["mean"] == pytest.approx(gain)
    assert "add_eos" not in rep["main_effects"]  # no cell pair differs in EOS alone
    assert set(cells["linear-eos-official"]["vs_base"]) == {"mc1", "mc2"}
    assert records["linear-eos-official"]["hyperparameters"]["recipe"] == "linear-eos-official"
    assert rep["recipes"] == {}  # the plain recipe's cell is not there

    # a finished cell is not trained again; a tiny clipping norm clips every step of a new cell
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    assert factorial.main(args[:-1] + ["official,linear-noeos-official"]) == 0
    assert all((out / "cells" / name).stat().st_mtime_ns == t for name, t in stamps.items())
    clipped = tmp_path / "clipped"
    assert factorial.main([a if a != str(out) else str(clipped) for a in args[:-1]]
                          + ["linear-noeos-official", "--max-grad-norm", "1e-9"]) == 0
    new = json.loads((clipped / "cells" / "linear-noeos-official_seed42.json").read_text())
    assert new["clipped_steps"] == new["steps"]
    assert report(str(out))["main_effects"]["add_eos"]["pairs"] == 1
    # a finished cell trained with other settings is refused, not reused or overwritten
    with pytest.raises(ValueError, match=r"epochs: 2 there, 3 now"):
        factorial.main(args[:-1] + ["official", "--epochs", "3"])
    with pytest.raises(ValueError, match=r"heads: \[\[0, 1\], \[1, 3\]\] there"):
        factorial.main([a if a != "0:1,1:3" else "0:2,1:3" for a in args[:-1]] + ["official"])
    assert all((out / "cells" / name).stat().st_mtime_ns == t for name, t in stamps.items())
    assert (out / "factorial.md").read_text().count("\n| ") >= 4

    # the base record is reused for new cells on the same model and questions, measured again otherwise
    base_official, base_newline = out / "base_official.json", out / "base_newline.json"
    t0 = base_official.stat().st_mtime_ns
    assert factorial.main(args[:-1] + ["constant-noeos-official"]) == 0
    assert base_official.stat().st_mtime_ns == t0
    record = json.loads(base_newline.read_text())
    digest = record["questions_sha256"]
    base_newline.write_text(json.dumps({**record, "questions_sha256": "0" * 64, "metrics": {"mc1": 9.0, "mc2": 9.0}}))
    assert factorial.main(args[:-1] + ["plain"]) == 0
    again = json.loads(base_newline.read_text())
    assert again["questions_sha256"] == digest and again["metrics"] == record["metrics"]
