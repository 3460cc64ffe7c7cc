"""Faults a new user runs into, each reproduced: inputs that used to be taken silently or failed late with an
opaque error now fail early with a message naming the problem, and nothing is half-changed."""
import warnings

import pytest
import torch

import lofit_fast
from lofit_fast.adapter import load_adapter, save_adapter
from lofit_fast.data import load_split
from lofit_fast.data.items import DataFormatError, MCItem
from lofit_fast.eval.truthfulqa import truthfulqa_mc

from fixtures.tiny import byte_tokenizer, tiny_llama
from models import tiny_model


@pytest.mark.parametrize("heads", [[(0, True)], [(True, 1)], {0: [False]}, [(0, 1.5)], [(0, "1")]])
def test_a_non_integer_head_index_is_refused(heads):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="index must be an integer"):
        lofit_fast.patch(model, heads)
    assert not lofit_fast.patched_modules(model)


def test_integral_indices_of_other_types_are_taken():
    model = tiny_model("llama")
    lofit_fast.patch(model, [(torch.tensor(0), 1.0), (1, torch.tensor(2))])
    assert {l: m.head_list for l, m in lofit_fast.patched_modules(model).items()} == {0: [1], 1: [2]}


def test_merge_refuses_nan_parameters():
    model = lofit_fast.patch(tiny_model("llama"), [(0, 1)], scale=True, offset=True)
    with torch.no_grad():
        lofit_fast.patched_modules(model)[0].A[0, 3] = float("nan")
    with pytest.raises(ValueError, match="A of layer 0 contains NaN"):
        lofit_fast.merge(model)
    assert lofit_fast.patched_modules(model)  # still patched, nothing folded


def test_an_adapter_on_another_models_weights_warns(tmp_path):
    save_adapter(lofit_fast.patch(tiny_model("llama", seed=0), [(0, 1)]), tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_model("llama", seed=0), tmp_path / "a")  # the same weights: silent
    with pytest.warns(UserWarning, match="trained on other o_proj weights"):
        load_adapter(tiny_model("llama", seed=1), tmp_path / "a")


def test_an_empty_answer_cannot_win_mc1():
    model, tok = tiny_llama(), byte_tokenizer()
    items = [MCItem(question="q?", prompt="Q: q? A:", best="", correct=[""], incorrect=["no"])]
    with pytest.raises(ValueError, match="empty answer"):
        truthfulqa_mc(model, tok, items, progress=False)


def test_a_non_utf8_file_is_named(tmp_path):
    folder = tmp_path / "truthfulqa"
    folder.mkdir()
    text = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    (folder / "fold_0_train_seed_42.csv").write_bytes(text.encode() + "A,B,Caf\xe9?,yes,yes,no,s\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"fold_0_train_seed_42\.csv.*line 2.*not UTF-8"):
        load_split("truthfulqa", tmp_path, "train", fold=0)


def test_an_empty_prompt_is_named():
    from lofit_fast.eval.generation import generate_greedy

    with pytest.raises(ValueError, match=r"prompt 1 \(''\) is empty"):
        generate_greedy(tiny_llama(), byte_tokenizer(), ["Q: a A:", ""], max_new_tokens=2)


def test_export_refuses_a_non_empty_folder_and_the_models_own(tmp_path):
    model = lofit_fast.patch(tiny_model("llama"), [(0, 1)], init_std=0.1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        lofit_fast.export(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    lofit_fast.export(model, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left
    model.config._name_or_path = str(out)
    with pytest.raises(FileExistsError, match="the folder the model was loaded from"):
        lofit_fast.export(model, out, overwrite=True)


def test_a_failed_export_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    import transformers

    model = lofit_fast.patch(tiny_model("llama"), [(0, 1)], init_std=0.1)
    out = tmp_path / "out"
    lofit_fast.export(model, out)
    before = sorted(p.name for p in out.iterdir())
    real = transformers.PreTrainedModel.save_pretrained

    def disk_full(self, path, **kwargs):
        real(self, path, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lofit_fast.export(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_quiet_loading_prints_no_gguf_bar(capfd):
    lofit_fast.load_model("smollm2", progress=False)
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "Loading weights" not in err
