"""The cached HF conversion of a GGUF model: a later load reads the cached folder and gives the same weights,
tokenizer and outputs as reading the GGUF file; a leftover folder, a changed GGUF file and an unwritable cache
are handled; LOFIT_FAST_CACHE=off reads the file every time."""
import os

import pytest
import torch

from lofit_fast.models import converted_dir, load_model
from test_gguf_export import tiny_llama, write_source_gguf

pytest.importorskip("gguf")

IDS = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def source(tmp_path):
    (tmp_path / "src").mkdir()
    return write_source_gguf(tiny_llama(seed=4), tmp_path / "src" / "tiny.gguf")


def _direct(path, monkeypatch, dtype=torch.float32):
    monkeypatch.setenv("LOFIT_FAST_CACHE", "off")
    try:
        return load_model(str(path), dtype=dtype, progress=False)
    finally:
        monkeypatch.delenv("LOFIT_FAST_CACHE")


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_a_cached_conversion_loads_as_the_gguf_file(source, tmp_path, monkeypatch):
    direct, direct_tok = _direct(source, monkeypatch)
    monkeypatch.setenv("LOFIT_FAST_CACHE", str(tmp_path / "cache"))
    target = converted_dir(source)
    assert target.parent == tmp_path / "cache" and not target.exists()
    first, _ = load_model(str(source), progress=False)  # converts
    assert (target / "model.safetensors").is_file() and (target / "lofit_fast_converted.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary folder left
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    cached, tok = load_model(str(source), progress=False)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten
    _same(first, direct)
    _same(cached, direct)
    assert cached.config._name_or_path == direct.config._name_or_path == str(source.parent)
    assert cached.config.to_diff_dict().get("model_type") == direct.config.to_diff_dict().get("model_type")
    for text in ("hello world", " a  b\n c", "\u00e9\u00e8 x"):
        assert tok(text).input_ids == direct_tok(text).input_ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (direct_tok.bos_token_id, direct_tok.eos_token_id, direct_tok.pad_token_id)
    # bf16 from the float32 cache equals bf16 read from the file
    _same(load_model(str(source), dtype=torch.bfloat16, progress=False)[0], _direct(source, monkeypatch, torch.bfloat16)[0])


def test_leftovers_changed_files_and_an_unwritable_cache(source, tmp_path, monkeypatch):
    direct, _ = _direct(source, monkeypatch)
    monkeypatch.setenv("LOFIT_FAST_CACHE", str(tmp_path / "cache"))
    target = converted_dir(source)
    target.mkdir(parents=True)
    (target / "junk").write_text("not a conversion")  # e.g. a folder someone else left there
    _same(load_model(str(source), progress=False)[0], direct)
    assert not (target / "junk").exists() and (target / "lofit_fast_converted.json").is_file()

    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the file changed
    assert converted_dir(source) != target

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LOFIT_FAST_CACHE", str(blocker / "cache"))  # cannot be created
    with pytest.warns(UserWarning, match="cannot write the model cache"):
        model, _ = load_model(str(source), progress=False)
    _same(model, direct)
    monkeypatch.setenv("LOFIT_FAST_CACHE", "off")
    assert converted_dir(source) is None
