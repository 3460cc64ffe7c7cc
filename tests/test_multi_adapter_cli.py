"""Several adapters from the command line: `eval --adapter A=... --adapter B=...` in one batched pass equals
each adapter evaluated alone, and `generate` gives every prompt line its own adapter's continuation, in order."""
import json
from pathlib import Path

import pytest
import torch

import lofit_fast
from lofit_fast.cli import main
from lofit_fast.data import load_split
from lofit_fast.eval import evaluate, generate_greedy
from test_lofit import char_tokenizer, tiny_llama

FIXTURES = str(Path(__file__).parent / "fixtures" / "lofit")
QUIET = ["--threads", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    model_dir = root / "model"
    tiny_llama(seed=4).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    adapters = {}
    for name, heads, seed in (("a", [(0, 1), (1, 0)], 1), ("b", [(1, 0), (1, 3)], 2)):
        model, _ = lofit_fast.load_model(str(model_dir))
        torch.manual_seed(seed)
        lofit_fast.patch(model, heads, scale=True, offset=True, init_std=0.5)
        adapters[name] = root / name
        lofit_fast.save_adapter(model, adapters[name])
    return model_dir, adapters


@pytest.mark.parametrize("task", ["truthfulqa", "clutrr"])
def test_eval_of_several_adapters_equals_each_alone(setup, tmp_path, task):
    model_dir, adapters = setup
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--task", task, "--data", FIXTURES, *QUIET, "--out", str(out),
                 "--eval-batch-size", "3", *sum((["--adapter", f"{n}={p}"] for n, p in adapters.items()), [])]) == 0
    record = json.loads((out / "eval.json").read_text())
    items = load_split(task, FIXTURES, "test" if task == "truthfulqa" else "val")
    assert set(record) >= {"base", "a", "b"} and record["adapter"] == {n: str(p) for n, p in adapters.items()}
    for name in ("base", "a", "b"):
        model, tok = lofit_fast.load_model(str(model_dir))
        if name != "base":
            lofit_fast.load_adapter(model, adapters[name])
        alone = evaluate(task, model, tok, items, batch_size=3, progress=False)
        for metric, value in alone.items():
            assert record[name][metric] == pytest.approx(value, abs=1e-5), (name, metric)
    if task == "truthfulqa":  # MC2 is continuous: the adapters do differ, so rows were not mixed up
        assert record["a"]["mc2"] != record["b"]["mc2"] != record["base"]["mc2"]


def test_generate_gives_each_line_its_adapter(setup, tmp_path):
    model_dir, adapters = setup
    lines = [{"prompt": "Q: ab A:", "adapter": "a", "id": 0}, {"prompt": "Q: hello there A:", "adapter": None},
             {"prompt": "Q: ab A:", "adapter": "b"}, {"prompt": "Q: xyz A:", "adapter": "a"},
             {"prompt": "Q: ab A:", "adapter": "__base__"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), *QUIET, "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", "6",
                 *sum((["--adapter", f"{n}={p}"] for n, p in adapters.items()), [])]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [line["prompt"] for line in lines] and got[0]["id"] == 0
    assert len({got[i]["generated"] for i in (0, 2, 4)}) == 3  # one prompt, three adapters: three continuations
    for line, row in zip(lines, got):
        model, tok = lofit_fast.load_model(str(model_dir))
        if line["adapter"] in adapters:
            lofit_fast.load_adapter(model, adapters[line["adapter"]])
        assert row["generated"] == generate_greedy(model, tok, [line["prompt"]], max_new_tokens=6, progress=False)[0]


def test_generate_checks_the_prompt_file_before_loading(setup, tmp_path, capsys):
    model_dir, adapters = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "adapter": "a"}\n{"prompt": "y", "adapter": "zzz"}\n')
    assert main(["generate", "--model", str(tmp_path / "no-model"), *QUIET, "--prompts", str(bad),
                 "--out", str(tmp_path / "o.jsonl"), "--adapter", f"a={adapters['a']}"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2: unknown adapter 'zzz'" in err and "Traceback" not in err
    assert main(["eval", "--model", str(model_dir), "--task", "clutrr", "--data", FIXTURES, *QUIET,
                 "--adapter", str(adapters["a"]), "--adapter", f"b={adapters['b']}"]) == 1
    assert "name each one" in capsys.readouterr().err
