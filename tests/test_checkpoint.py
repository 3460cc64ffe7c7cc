"""Training survives a kill: `train(..., checkpoint_dir=..., checkpoint_every=N)` resumes after a real SIGKILL
(mid-step, and between the two files of a checkpoint write) and ends with the same A, v and losses, bit for bit
on CPU, as the run that was never interrupted.

Run as a script (`python tests/test_checkpoint.py worker DIR MODE`), this file is the training process that
the tests kill.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import lofit_fast  # noqa: E402
import lofit_fast.train as train_module  # noqa: E402
from lofit_fast.data import PreferenceExample, SFTExample  # noqa: E402
from lofit_fast.train import CheckpointError, CheckpointMismatchError, read_checkpoint, train  # noqa: E402
from fixtures.tiny import byte_tokenizer, tiny_llama  # noqa: E402

HEADS = [(0, 1), (0, 3), (1, 2)]
SFT = [SFTExample(f"Q{i}: name {i}?", " " + "ab" * (1 + i % 4)) for i in range(10)]
PAIRS = [PreferenceExample(f"Q{i}: is {i} even?", " yes" if i % 2 == 0 else " no", " maybe" * (1 + i % 3))
         for i in range(8)]
# 10 examples, batch 3: 4 steps per epoch (the last one uneven), 12 steps
KW = dict(kind="sft", lr=3e-2, epochs=3, batch_size=3, l1=1e-3, max_grad_norm=1.0, seed=7, progress=False)
TOTAL_STEPS = 12
MANIFEST = "checkpoint.json"


def _setup():
    """A patched tiny Llama whose forward consumes every global RNG the checkpoint must restore: attention
    dropout (torch), and a tiny noise on o_proj's output from Python's `random` and numpy's."""
    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    lofit_fast.patch(model, HEADS, scale=True, offset=True, init_std=0.02)
    lofit_fast.freeze_base(model)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1

    def noise(module, args, out):
        if not module.training:
            return out
        return out + 1e-3 * (random.random() + float(np.random.rand()))

    model.model.layers[0].self_attn.o_proj.register_forward_hook(noise)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    return model


def _train(checkpoint_dir=None, checkpoint_every=0, data=SFT, **kw):
    model = _setup()
    params = lofit_fast.trainable_parameters(model)
    out = train(model, byte_tokenizer(), data, params=params, checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every, **{**KW, **kw})
    return out, [p.detach().clone() for p in params], model


def _worker(directory: str, mode: str) -> None:
    model = _setup()
    if mode == "slow":  # each forward pass takes a while, so the kill lands in the middle of a step
        model.register_forward_pre_hook(lambda module, args: time.sleep(0.25))
    elif mode == "die_in_write":  # SIGKILL itself between the tensor file and the manifest of step 3's checkpoint
        def die(step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        train_module._between_checkpoint_writes = die
    params = lofit_fast.trainable_parameters(model)
    train(model, byte_tokenizer(), SFT, params=params, checkpoint_dir=directory, checkpoint_every=1, **KW)
    Path(directory, "worker-finished").write_text("the worker was not killed")


def _spawn(directory: Path, mode: str) -> subprocess.Popen:
    path = os.pathsep.join([str(HERE.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=path)
    return subprocess.Popen([sys.executable, __file__, "worker", str(directory), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _manifest_step(directory: Path):
    try:
        return json.loads((directory / MANIFEST).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def uninterrupted():
    out, values, _ = _train()
    assert len(out["history"]) == out["steps"] == TOTAL_STEPS
    return out, values


def _assert_same_run(a, b):
    (out_a, values_a), (out_b, values_b) = a, b
    assert len(out_a["history"]) == len(out_b["history"]) == TOTAL_STEPS
    for ra, rb in zip(out_a["history"], out_b["history"]):
        assert ra == rb, (ra, rb)
    for x, y in zip(values_a, values_b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_the_rngs_matter(uninterrupted):
    """The check below can fail: another dropout / noise draw gives other numbers, so restoring the RNG
    states is what makes the resumed run equal."""
    torch.manual_seed(0)
    model = _setup()
    torch.manual_seed(99)  # only the torch RNG differs
    params = lofit_fast.trainable_parameters(model)
    out = train(model, byte_tokenizer(), SFT, params=params, **KW)
    assert out["history"][0]["loss"] != uninterrupted[0]["history"][0]["loss"]


def test_sigkill_mid_step_then_resume_is_bit_for_bit(tmp_path, uninterrupted):
    directory = tmp_path / "ckpt"
    proc = _spawn(directory, "slow")
    deadline = time.monotonic() + 120
    try:
        while (_manifest_step(directory) or 0) < 3:  # poll for a checkpoint on disk
            if proc.poll() is not None:
                pytest.fail(f"the worker ended before it was killed:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint of step 3 appeared within 120 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _manifest_step(directory)
    assert 3 <= killed_at < TOTAL_STEPS and not (directory / "worker-finished").exists()

    resumed, values, _ = _train(checkpoint_dir=directory, checkpoint_every=1)
    assert resumed["resumed_from_step"] == killed_at
    _assert_same_run(uninterrupted, (resumed, values))
    meta = json.loads((directory / MANIFEST).read_text())
    assert meta["finished"] and meta["step"] == TOTAL_STEPS
    assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST, meta["tensors"]])  # no leftovers


def test_sigkill_between_the_checkpoint_files_leaves_the_previous_one(tmp_path, uninterrupted):
    directory = tmp_path / "ckpt"
    proc = _spawn(directory, "die_in_write")
    try:
        log = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the worker did not kill itself within 180 s")
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    names = sorted(p.name for p in directory.iterdir())
    assert "checkpoint-00000003.safetensors" in names  # it died inside the write: the new tensors were in place
    found = read_checkpoint(directory)
    assert found["meta"]["step"] == 2 and found["meta"]["tensors"] == "checkpoint-00000002.safetensors"
    assert found["tensors"]["param.0"].shape == lofit_fast.trainable_parameters(_setup())[0].shape

    resumed, values, _ = _train(checkpoint_dir=directory, checkpoint_every=1)
    assert resumed["resumed_from_step"] == 2
    _assert_same_run(uninterrupted, (resumed, values))
    assert "checkpoint-00000003.safetensors" not in {p.name for p in directory.iterdir()}


def test_interrupted_dpo_with_a_grad_scaler_resumes_exactly(tmp_path):
    """In process: an exception at step 5 of a DPO run under fp16 (grad scaler state in the checkpoint),
    checkpoints every 2 steps, then a resume from step 4."""
    kw = dict(kind="dpo", data=PAIRS, batch_size=2, epochs=2, beta=0.5, mixed_precision="fp16", l1=0.0)
    ref, ref_values, _ = _train(**kw)
    directory = tmp_path / "dpo"
    model = _setup()
    params = lofit_fast.trainable_parameters(model)
    forwards = {"n": 0}

    def interrupt(module, args):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == 6:  # one forward per step (the reference pass runs in eval mode): step 5
                raise KeyboardInterrupt("simulated interruption")

    handle = model.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, byte_tokenizer(), PAIRS, params=params, checkpoint_dir=directory, checkpoint_every=2,
              **{**KW, **{k: v for k, v in kw.items() if k != "data"}})
    handle.remove()
    meta = json.loads((directory / MANIFEST).read_text())
    assert meta["step"] == 4 and meta["scaler"]["scale"] > 0 and not meta["finished"]
    out, values, _ = _train(checkpoint_dir=directory, checkpoint_every=2, **kw)
    assert out["resumed_from_step"] == 4
    assert out["history"] == ref["history"]
    for a, b in zip(ref_values, values):
        assert torch.equal(a, b)


def test_a_finished_checkpoint_returns_its_run_and_a_mismatch_is_refused(tmp_path, uninterrupted):
    directory = tmp_path / "ckpt"
    first, first_values, _ = _train(checkpoint_dir=directory, checkpoint_every=5)
    _assert_same_run(uninterrupted, (first, first_values))
    assert first["resumed_from_step"] is None
    assert json.loads((directory / MANIFEST).read_text())["step"] == TOTAL_STEPS  # the last step is always saved

    again, again_values, _ = _train(checkpoint_dir=directory, checkpoint_every=5)
    assert again["resumed_from_step"] == TOTAL_STEPS  # nothing trained again
    _assert_same_run(uninterrupted, (again, again_values))

    before = (directory / MANIFEST).read_text()
    with pytest.raises(CheckpointMismatchError, match=r"lr: 0\.03 in the checkpoint, 0\.01 now"):
        _train(checkpoint_dir=directory, lr=1e-2)
    with pytest.raises(CheckpointMismatchError, match="examples"):
        _train(checkpoint_dir=directory, data=SFT[:-1])
    assert (directory / MANIFEST).read_text() == before  # the other run's checkpoint is left alone

    tensors = directory / json.loads(before)["tensors"]
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        _train(checkpoint_dir=directory)
    (directory / MANIFEST).write_text("{ not json")
    with pytest.raises(CheckpointError, match="not a readable checkpoint manifest"):
        _train(checkpoint_dir=directory)


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
        _train(checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 0"):
        _train(checkpoint_dir=tmp_path, checkpoint_every=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        _train(checkpoint_dir=tmp_path / "file", checkpoint_every=1)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
