"""The one training loop: it reproduces the loop it replaced (one process, no accumulation, float32), gradient
accumulation equals a larger batch, two processes over gloo equal one process on the same global batch, and
mixed precision trains with float32 A and v.

Run as a script (`python tests/test_distributed.py worker OUT`), this file is the per-rank worker of the
2-process test.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import lofit_fast  # noqa: E402
from lofit_fast.data import PreferenceExample, SFTExample  # noqa: E402
from lofit_fast.train import read_checkpoint, train  # noqa: E402
from fixtures import legacy_loops  # noqa: E402
from fixtures.tiny import byte_tokenizer, tiny_llama  # noqa: E402

HEADS = [(0, 1), (0, 3), (1, 2)]
# completions of different lengths: micro-batches hold different numbers of completion tokens
SFT = [SFTExample(f"Q{i}: name {i}?", " " + "ab" * (1 + i % 4)) for i in range(10)]
PAIRS = [PreferenceExample(f"Q{i}: is {i} even?", " yes" if i % 2 == 0 else " no", " maybe" * (1 + i % 3))
         for i in range(10)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(scale=True, offset=True, init_std=0.02, dtype=torch.float32):
    model = tiny_llama(seed=0, dtype=dtype)
    torch.manual_seed(1)
    lofit_fast.patch(model, HEADS, scale=scale, offset=offset, init_std=init_std)
    lofit_fast.freeze_base(model)
    return model


def _values(model):
    return [p.detach().clone() for p in lofit_fast.trainable_parameters(model)]


def _run(loop, kind="sft", data=SFT, **kw):
    model = _model()
    params = lofit_fast.trainable_parameters(model)
    out = loop(model, byte_tokenizer(), data, kind=kind, params=params, progress=False, **kw)
    return out, _values(model)


PIN_CASES = {
    "sft_l1_clip": dict(kind="sft", data=SFT, lr=3e-2, epochs=2, batch_size=3, l1=1e-3, max_grad_norm=1.0, seed=5),
    "sft_constant_wd": dict(kind="sft", data=SFT, lr=2e-2, epochs=2, batch_size=4, schedule="constant",
                            weight_decay=0.1, max_length=12, seed=1),
    "dpo": dict(kind="dpo", data=PAIRS, lr=3e-2, epochs=2, batch_size=4, beta=0.5, max_grad_norm=1.0, seed=2),
}


@pytest.mark.parametrize("case", sorted(PIN_CASES))
def test_one_process_reproduces_the_loop_it_replaced(case, monkeypatch):
    """Pinned against the pre-accelerate loop (tests/fixtures/legacy_loops.py): the same losses and the same A
    and v, bit for bit (the new loop runs the same operations in the same order on one process). The DPO
    reference pass now batches by tokens (other batches: equal to ~1e-7, tests/test_losses.py); here it is
    given the old row batches, so that everything else is pinned exactly."""
    import lofit_fast.train as train_module

    kw = PIN_CASES[case]
    rows = train_module.reference_logprobs
    monkeypatch.setattr(train_module, "reference_logprobs",
                        lambda model, tok, examples, *, max_length, max_tokens, add_eos:
                        rows(model, tok, examples, batch_size=kw["batch_size"], max_length=max_length, add_eos=add_eos))
    old, old_values = _run(legacy_loops.train, **kw)
    new, new_values = _run(train, **kw)
    assert len(new["history"]) == len(old["history"]) == old["steps"] == new["steps"]
    for r_old, r_new in zip(old["history"], new["history"]):
        for key, value in r_old.items():
            assert r_new[key] == value, (key, r_old, r_new)
    for a, b in zip(old_values, new_values):
        assert torch.equal(a, b), (a - b).abs().max()
    assert any((v - _values(_model())[i]).abs().max() > 1e-4 for i, v in enumerate(new_values))


def test_rep_tuning_reproduces_its_old_loop():
    from lofit_fast.methods import rep_tuning as rt

    from test_steer import text_model

    directions = {1: torch.randn(48, generator=torch.Generator().manual_seed(3))}
    examples = rt.fact_ab_examples([("Snow is white.", 1), ("Fire is cold.", 0), ("Fish swim.", 1),
                                    ("Cats fly.", 0), ("Ice is cold.", 1)])
    kw = dict(layers=[1], w=1.0, mode="in", trainable="heads", heads="all", lr=1e-2, epochs=2, batch_size=2,
              init_std=1e-3, seed=0, progress=False)
    tok = byte_tokenizer()
    old = legacy_loops.rep_train(text_model(), tok, examples, directions, **kw)  # float64 models
    new = rt.train(text_model(), tok, examples, directions, **kw)
    assert len(old["history"]) == len(new["history"])
    for r_old, r_new in zip(old["history"], new["history"]):
        for key, value in r_old.items():
            assert r_new[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, r_old, r_new)
    for a, b in zip(old["params"], new["params"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind,data", [("sft", SFT), ("dpo", PAIRS)])
def test_grad_accum_equals_a_larger_batch(kind, data):
    kw = dict(kind=kind, data=data, lr=3e-2, epochs=2, l1=1e-3, max_grad_norm=1.0, seed=3)
    big, big_values = _run(train, batch_size=6, **kw)
    acc, acc_values = _run(train, batch_size=2, grad_accum=3, **kw)
    assert acc["global_batch"] == 6 and acc["steps"] == big["steps"] == 4  # 10 examples: 6 + 4 per epoch
    for a, b in zip(big["history"], acc["history"]):
        for key in ("loss", "task_loss", "l1", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)
    for a, b in zip(big_values, acc_values):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
    # the check can fail: three separate batches of 2 (three optimizer steps each) end elsewhere
    small, small_values = _run(train, batch_size=2, **kw)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(big_values, small_values))


@pytest.mark.parametrize("task", ["truthfulqa", "mquake"])  # DPO and SFT
def test_cli_grad_accum_equals_a_larger_batch(tmp_path, task):
    import safetensors.torch

    from lofit_fast.cli import main
    from test_lofit import char_tokenizer
    from test_lofit import tiny_llama as char_llama

    model_dir = tmp_path / "model"
    char_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    common = ["tune", "--model", str(model_dir), "--task", task, "--data", str(HERE / "fixtures" / "lofit"),
              "--heads", "0:1,1:2,1:3", "--epochs", "2", "--threads", "1", "--device", "cpu", "--quiet",
              "--lr", "5e-2"]
    assert main(common + ["--batch-size", "4", "--out", str(tmp_path / "big")]) == 0
    assert main(common + ["--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "acc")]) == 0
    assert main(common + ["--batch-size", "2", "--out", str(tmp_path / "small")]) == 0
    big, acc, small = (safetensors.torch.load_file(tmp_path / name / "adapter.safetensors")
                       for name in ("big", "acc", "small"))
    for key in big:
        assert torch.allclose(acc[key].double(), big[key].double(), rtol=1e-5, atol=1e-7), key
    assert any(not torch.allclose(small[k].double(), big[k].double(), rtol=1e-3, atol=1e-5)
               for k in big if not k.endswith("heads"))
    config = json.loads((tmp_path / "acc" / "adapter_config.json").read_text())
    assert config["hyperparameters"]["grad_accum"] == 2


def test_train_rejects_bad_new_arguments():
    model = _model()
    params = lofit_fast.trainable_parameters(model)
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="grad_accum"):
        train(model, tok, SFT, params=params, lr=1e-2, epochs=1, batch_size=2, grad_accum=0, progress=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        train(model, tok, SFT, params=params, lr=1e-2, epochs=1, batch_size=2, mixed_precision="fp8", progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        train(model, tok, PAIRS, kind="dpo", params=params, lr=1e-2, epochs=1, batch_size=2, progress=False,
              loss_fn=lambda m, b: (torch.zeros(()), {}))
    with pytest.raises(ValueError, match="fsdp=True shards the model over the processes of a launch"):
        train(model, tok, SFT, params=params, lr=1e-2, epochs=1, batch_size=2, fsdp=True, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_float32_parameters(precision):
    kw = dict(kind="sft", data=SFT, lr=3e-2, epochs=3, batch_size=5, seed=0)
    ref, ref_values = _run(train, **kw)
    out, values = _run(train, mixed_precision=precision, **kw)
    assert all(v.dtype == torch.float32 for v in values)
    losses = [r["loss"] for r in out["history"]]
    assert out["epoch_loss"][-1] < out["epoch_loss"][0]
    for a, b in zip(ref["history"], out["history"]):  # close to the float32 run, but not the same numbers
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert any(r["loss"] != a["loss"] for r, a in zip(out["history"], ref["history"])), losses


# -------------------------------------------------------------------------------------- two processes
WORKER_KW = dict(lr=3e-2, epochs=2, l1=1e-3, max_grad_norm=1.0, seed=4)


def _worker(out_path: str) -> None:
    """One rank: same model, same data and seed; per-process batch 2 (global 2 × 2 ranks = 4); A and v
    all-reduced over a replicated base, then the same with the base sharded by FSDP2 (and a checkpoint folder,
    written by rank 0)."""
    torch.set_num_threads(1)
    results = {}
    for mode in ("replicated", "fsdp"):
        for kind, data in (("sft", SFT), ("dpo", PAIRS)):
            model = _model()
            params = lofit_fast.trainable_parameters(model)
            torch.manual_seed(100 + int(os.environ["RANK"]))  # rank-dependent global RNG must not matter
            extra, seen = {}, []
            if mode == "fsdp":
                extra = dict(fsdp=True, checkpoint_dir=str(Path(out_path).parent / f"ckpt-{kind}"),
                             checkpoint_every=2)
                layer = model.model.layers[0]

                def look(module, args):  # inside training: what a decoder layer holds between its passes
                    if not module.training:  # the DPO reference pass, before the sharding
                        return
                    w, o_proj = layer.mlp.gate_proj.weight, layer.self_attn.o_proj
                    seen.append([type(w).__name__, list(w.to_local().shape), list(w.shape),
                                 o_proj.base_layer.weight is o_proj.weight, type(o_proj.A).__name__])

                hook = model.register_forward_pre_hook(look)
            out = train(model, byte_tokenizer(), data, kind=kind, params=params, batch_size=2, progress=False,
                        **WORKER_KW, **extra)
            row = {"history": out["history"], "processes": out["processes"],
                   "values": [v.tolist() for v in _values(model)]}
            if mode == "fsdp":  # the plain model is back: own classes, full tensors, the base untouched
                hook.remove()
                row["seen"] = seen
                fresh = _model().state_dict()
                row["plain"] = (type(model).__name__ == "LlamaForCausalLM"
                                and all(type(t) is torch.Tensor for t in model.state_dict().values())
                                and all(torch.equal(t, fresh[k]) for k, t in model.state_dict().items()
                                        if not k.endswith((".A", ".v"))))
                lofit_fast.unpatch(model)
                row["unpatched_is_base"] = all(torch.equal(t, fresh[k]) for k, t in model.state_dict().items())
                # again with the finished checkpoint: rank 0 reads it and sends it over; nothing is trained
                model = _model()
                again = train(model, byte_tokenizer(), data, kind=kind, params=lofit_fast.trainable_parameters(model),
                              batch_size=2, progress=False, **WORKER_KW, **extra)
                row["again"] = {"resumed_from_step": again["resumed_from_step"], "history": again["history"],
                                "values": [v.tolist() for v in _values(model)]}
            results.setdefault(mode, {})[kind] = row
    Path(out_path).write_text(json.dumps(results))


def _kill_worker(directory: str) -> None:
    """A rank of an FSDP run that checkpoints every step, each step slowed down, to be killed mid-run."""
    torch.set_num_threads(1)
    model = _model()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    params = lofit_fast.trainable_parameters(model)
    train(model, byte_tokenizer(), SFT, kind="sft", params=params, batch_size=2, progress=False, fsdp=True,
          checkpoint_dir=directory, checkpoint_every=1, **WORKER_KW)


def _pythonpath() -> str:
    """The checkout first, so the workers import this lofit_fast even where the package is not installed."""
    return os.pathsep.join([str(HERE.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, **env_extra):
    """Two ranks of this file as a script over gloo on this machine."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1",
                   PYTHONPATH=_pythonpath(), **env_extra)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        procs.append(subprocess.Popen([sys.executable, __file__] + [a.format(rank=rank) for a in args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_processes_over_gloo_match_one_process(tmp_path):
    """Both with the base replicated (A and v all-reduced) and with it sharded by FSDP2 (A and v kept out of
    FSDP, all-reduced the same way): the same losses and A, v as one process on the global batch, within
    1e-5 (the ranks' partial sums are added in another order); FSDP2 gathers the very same base weights, so
    it is held to the same tolerance. The last global batch (2 of 4) leaves rank 1 without examples: under
    FSDP2 it runs a weight-0 stand-in pass so that the collectives match."""
    procs = _launch(["worker", str(tmp_path / "rank{rank}.json")])
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for kind, data in (("sft", SFT), ("dpo", PAIRS)):
        one, one_values = _run(train, kind=kind, data=data, batch_size=4, **WORKER_KW)
        for mode in ("replicated", "fsdp"):
            assert ranks[0][mode][kind]["processes"] == 2
            assert ranks[0][mode][kind]["values"] == ranks[1][mode][kind]["values"], "ranks ended with other A / v"
            two = ranks[0][mode][kind]
            assert len(two["history"]) == len(one["history"]) == 6  # ceil(10 / 4) × 2 epochs, last batch uneven
            for a, b in zip(one["history"], two["history"]):
                for key in ("loss", "task_loss", "l1", "lr") + (("rewards/margins",) if kind == "dpo" else ()):
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (mode, kind, key, a, b)
            for a, b in zip(one_values, two["values"]):
                assert torch.allclose(a, torch.tensor(b), rtol=1e-5, atol=1e-7), (mode, kind,
                                                                                  (a - torch.tensor(b)).abs().max())
        for r in range(2):
            fsdp = ranks[r]["fsdp"][kind]
            assert fsdp["plain"] and fsdp["unpatched_is_base"], (r, kind)
            # while training, each rank held half of every base weight (gate_proj: [64, 32] → [32, 32]), the
            # Linear kept for unpatch held the shard, not a full copy, and A / v were plain tensors
            assert fsdp["seen"] and all(s == ["DTensor", [32, 32], [64, 32], True, "Parameter"] for s in fsdp["seen"])
            assert fsdp["again"]["resumed_from_step"] == 6
            assert fsdp["again"]["history"] == fsdp["history"] and fsdp["again"]["values"] == fsdp["values"]
        # the FSDP runs' checkpoints: rank 0's files only, complete, with both ranks' RNG states
        folder = tmp_path / f"ckpt-{kind}"
        found = read_checkpoint(folder)
        assert found["meta"]["finished"] and found["meta"]["step"] == 6 and len(found["meta"]["rng"]) == 2
        assert sorted(p.name for p in folder.iterdir()) == sorted(["checkpoint.json", found["meta"]["tensors"]])
        assert found["meta"]["history"] == ranks[0]["fsdp"][kind]["history"]


def test_killing_one_rank_ends_the_run_with_a_clear_error_and_no_half_written_file(tmp_path):
    """SIGKILL rank 1 of a 2-process FSDP2 run once a checkpoint is on disk: rank 0 stops within a bounded
    time (its next collective fails; LOFIT_FAST_DIST_TIMEOUT=20 bounds a hang) with an error that says what
    happened, and the checkpoint folder holds one complete checkpoint and nothing else."""
    folder = tmp_path / "ckpt"
    procs = _launch(["kill-worker", str(folder)], LOFIT_FAST_DIST_TIMEOUT="20")
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if json.loads((folder / "checkpoint.json").read_text())["step"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if any(p.poll() is not None for p in procs):
                pytest.fail("a rank ended before the kill:\n" + "\n".join(p.stdout.read()[-2000:] for p in procs))
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared within 120 s")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        log = procs[0].communicate(timeout=60)[0]
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None), log[-3000:]
    assert "training stopped on rank 0 of 2: a collective operation failed" in log, log[-3000:]
    assert waited < 60  # measured: about 3 s (gloo sees the connection reset)
    found = read_checkpoint(folder)
    assert 1 <= found["meta"]["step"] < 6 and not found["meta"]["finished"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["checkpoint.json", found["meta"]["tensors"]])


@pytest.mark.slow  # about 45 s on 2 busy cores: two interpreters load torch + transformers, then a full run
def test_cli_run_under_torchrun_writes_rank0_files_and_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m lofit_fast.cli run` (TruthfulQA: DPO, 5 examples, so the last global
    batch leaves rank 1 empty) gives one process's heads and adapter; every file is rank 0's, one progress log."""
    import safetensors.torch

    from lofit_fast.cli import main
    from test_lofit import char_tokenizer
    from test_lofit import tiny_llama as char_llama

    model_dir = tmp_path / "model"
    char_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    common = ["run", "--model", str(model_dir), "--task", "truthfulqa", "--data", str(HERE / "fixtures" / "lofit"),
              "--k", "2", "--epochs", "2", "--threads", "1", "--device", "cpu", "--l1", "1e-3"]
    assert main(common + ["--batch-size", "4", "--quiet", "--out", str(tmp_path / "one")]) == 0

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(scratch), TQDM_DISABLE="1", PYTHONPATH=_pythonpath())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "lofit_fast.cli"] + common + ["--batch-size", "2", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("LoFiT step 1: selecting heads") == 1, proc.stderr[-3000:]
    assert proc.stdout.count("lofit (top 2)") == 1
    assert not [p for p in scratch.iterdir() if p.name.startswith("lofit-fast-rank")], "a rank left its scratch folder"
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["heads"] == one["heads"] and two["random_heads"] == one["random_heads"]
    assert two["hyperparameters"]["batch_size"] == 2
    for name in ("base", "lofit", "random"):
        for metric, value in one[name].items():
            assert two[name][metric] == pytest.approx(value, abs=1e-5), (name, metric)
    a = safetensors.torch.load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    b = safetensors.torch.load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-5, atol=1e-7), key
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "kill-worker":
    _kill_worker(sys.argv[2])
