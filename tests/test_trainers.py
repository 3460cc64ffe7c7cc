"""Patched models inside transformers.Trainer and TRL's SFTTrainer / DPOTrainer: training moves the loss,
checkpoints hold the adapter only, the adapter round-trips, resuming restores it, and the DPO reference is the
model with its interventions off."""
import importlib.util
import math
import os

import pytest
import torch

import lofit_fast
from lofit_fast.adapter.schema import CONFIG_NAME, WEIGHTS_NAME
from fixtures.tiny import byte_tokenizer, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from lofit_fast.integrations import AdapterCheckpointCallback, LoFiTTrainer, SFTCollator, adapter_trainer  # noqa: E402
from lofit_fast.integrations.trainer import release_accelerate_preparation  # noqa: E402

HEADS = [(0, 1), (1, 2)]
SFT = [{"prompt": f"Q{i}: what is {i} + 1?", "completion": f" {i + 1}"} for i in range(8)]
PREF = [{"prompt": f"Q{i}: what is {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 7}"} for i in range(8)]
COMMON = dict(per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True,
              disable_tqdm=True, save_strategy="steps", seed=0)


@pytest.fixture(autouse=True)
def _quiet():
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    yield


def _patched(init_std=0.0, seed=0):
    model = tiny_llama(seed=seed)
    lofit_fast.patch(model, HEADS, init_std=init_std)
    lofit_fast.freeze_base(model)
    return model


def _values(model):
    return {f"{layer}.{n}": getattr(m, n).detach().clone() for layer, m in lofit_fast.patched_modules(model).items()
            for n in ("A", "v")}


def _losses(trainer):
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _assert_adapter_only(ckpt):
    files = set(os.listdir(ckpt))
    assert {WEIGHTS_NAME, CONFIG_NAME} <= files, files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), f"the whole model was saved: {files}"


def _lofit_trainer(tmp_path, model, max_steps=4, save_steps=2, **kw):
    args = TrainingArguments(str(tmp_path), max_steps=max_steps, save_steps=save_steps, remove_unused_columns=False,
                             **COMMON, **kw)
    tok = byte_tokenizer()
    return LoFiTTrainer(model=model, args=args, train_dataset=SFT, data_collator=SFTCollator(tok), processing_class=tok)


def test_trainer_trains_and_checkpoints_are_adapters(tmp_path):
    model = _patched()
    trainer = _lofit_trainer(tmp_path, model, max_steps=6, save_steps=3)
    assert {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]} == {
        id(p) for p in lofit_fast.trainable_parameters(model)}
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and min(losses[1:]) < losses[0] - 1e-3, losses
    for step in (3, 6):
        _assert_adapter_only(tmp_path / f"checkpoint-{step}")
    assert os.path.getsize(tmp_path / "checkpoint-6" / WEIGHTS_NAME) < 10_000
    # the last checkpoint restores the trained values into a fresh base model, and the same outputs
    fresh = tiny_llama(seed=0)
    lofit_fast.load_adapter(fresh, tmp_path / "checkpoint-6")
    trained = _values(model)
    assert all(torch.equal(trained[k], v) for k, v in _values(fresh).items())
    assert any(v.abs().max() > 1e-3 for v in trained.values())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    # save_model writes the adapter too
    trainer.save_model(str(tmp_path / "final"))
    _assert_adapter_only(tmp_path / "final")


def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(tmp_path):
    full = _patched()
    _lofit_trainer(tmp_path / "full", full, max_steps=4, save_steps=2).train()
    resumed = _patched()  # fresh A = v = 0: everything trained must come back from the checkpoint
    trainer = _lofit_trainer(tmp_path / "resumed", resumed, max_steps=4, save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    want, got = _values(full), _values(resumed)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), (k, (got[k] - want[k]).abs().max())


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    from safetensors.torch import load_file

    model = _patched()
    tok = byte_tokenizer()
    args = TrainingArguments(str(tmp_path), max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
                             load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                             remove_unused_columns=False, **COMMON)  # "best" = highest loss: the first checkpoint
    trainer = LoFiTTrainer(model=model, args=args, train_dataset=SFT, eval_dataset=SFT[:4],
                           data_collator=SFTCollator(tok), processing_class=tok)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best  # the eval loss goes down from there
    saved = load_file(os.path.join(best, WEIGHTS_NAME))
    last = load_file(tmp_path / "checkpoint-6" / WEIGHTS_NAME)
    for layer, m in lofit_fast.patched_modules(model).items():
        assert torch.equal(m.v.detach(), saved[f"layers.{layer}.v"])
    assert any(not torch.equal(saved[k], last[k]) for k in saved if not k.endswith("heads"))


def test_resume_into_unpatched_model_is_a_clear_error(tmp_path):
    _lofit_trainer(tmp_path, _patched(), max_steps=2, save_steps=2).train()
    trainer = _lofit_trainer(tmp_path, tiny_llama(seed=0), max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="holds a lofit_fast adapter but the trainer.s model is not patched"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_callback_writes_the_adapter_for_a_plain_trainer(tmp_path):
    model = _patched()
    tok = byte_tokenizer()
    callback = AdapterCheckpointCallback()
    args = TrainingArguments(str(tmp_path), max_steps=2, save_steps=2, remove_unused_columns=False,
                             save_only_model=True, **COMMON)
    Trainer(model=model, args=args, train_dataset=SFT, data_collator=SFTCollator(tok), callbacks=[callback]).train()
    assert callback.saved == [tmp_path / "checkpoint-2" / "lofit_adapter"]
    fresh = lofit_fast.load_adapter(tiny_llama(seed=0), callback.saved[0])
    assert all(torch.equal(a, b) for a, b in zip(_values(fresh).values(), _values(model).values()))
    with pytest.raises(ValueError, match="relative folder"):
        AdapterCheckpointCallback("../outside")


def test_adapter_trainer_builds_one_class_per_trainer():
    assert adapter_trainer(Trainer) is LoFiTTrainer and adapter_trainer(LoFiTTrainer) is LoFiTTrainer
    with pytest.raises(TypeError, match="Trainer subclass"):
        adapter_trainer(dict)


def _prepare_in_bf16(model):
    """What a bf16 trainer's Accelerator does to the model, whatever accelerate's process-wide state already holds."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # another test's Accelerator may have fixed another precision
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state()


def test_release_undoes_an_earlier_accelerators_preparation():
    from accelerate import Accelerator

    Accelerator(cpu=True)  # as after an earlier fp32 trainer in the same process
    model = _patched(init_std=1e-3).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert not release_accelerate_preparation(model)  # never prepared: nothing to undo
    _prepare_in_bf16(model)
    assert model._is_accelerate_prepared and "forward" in model.__dict__
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, ref)  # runs under bf16 autocast now
    assert release_accelerate_preparation(model)
    assert "forward" not in vars(model) and "_original_forward" not in vars(model)
    assert not getattr(model, "_is_accelerate_prepared", False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert not release_accelerate_preparation(model)

    own = _patched()
    own_forward = own.forward
    own.forward = lambda *a, **k: own_forward(*a, **k)  # an instance forward set before accelerate came
    mine = own.forward
    _prepare_in_bf16(own)
    assert own.forward is not mine and release_accelerate_preparation(own) and own.forward is mine


def test_unpatched_model_saves_as_trainer_does(tmp_path):
    trainer = _lofit_trainer(tmp_path, tiny_llama(seed=0).train(), max_steps=1, save_steps=1)
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_sft_collator_reads_dicts_and_examples():
    from lofit_fast.data import SFTExample

    tok = byte_tokenizer()
    a = SFTCollator(tok)([SFT[0], SFTExample(SFT[1]["prompt"], SFT[1]["completion"])])
    assert a["input_ids"].shape == a["labels"].shape and (a["labels"] != -100).sum() > 0
    with pytest.raises(KeyError, match="completion"):
        SFTCollator(tok)([{"prompt": "x"}])


# ------------------------------------------------------------------------------------------------ TRL
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install trl)")


@needs_trl
def test_sft_trainer_with_its_defaults_trains_in_bf16(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from lofit_fast.integrations.trl import LoFiTSFTTrainer

    model = _patched()
    cfg = SFTConfig(str(tmp_path), max_steps=6, save_steps=6, **COMMON)
    assert cfg.bf16, "SFTConfig defaults to bf16 mixed precision"
    seen = []
    hook = lofit_fast.patched_modules(model)[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = LoFiTSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(SFT),
                              processing_class=byte_tokenizer())
    trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, "the patched o_proj did not run under bf16 autocast"
    assert all(p.dtype == torch.float32 for p in lofit_fast.trainable_parameters(model))
    losses = _losses(trainer)
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    _assert_adapter_only(tmp_path / "checkpoint-6")
    fresh = lofit_fast.load_adapter(tiny_llama(seed=0), tmp_path / "checkpoint-6")
    assert all(torch.equal(a, b) for a, b in zip(_values(fresh).values(), _values(model).values()))


def _ref_columns(trainer):
    ds = trainer.train_dataset
    return torch.tensor(ds["ref_chosen_logps"]), torch.tensor(ds["ref_rejected_logps"])


@needs_trl
def test_dpo_trainer_without_ref_model_uses_interventions_off(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lofit_fast.integrations.trl import LoFiTDPOTrainer

    tok = byte_tokenizer()
    cfg = DPOConfig(str(tmp_path / "lofit"), max_steps=4, save_steps=4, **COMMON)
    assert not cfg.precompute_ref_log_probs
    model = _patched(init_std=0.3)  # interventions far from identity: a wrong reference would show
    trainer = LoFiTDPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(PREF),
                              processing_class=tok)
    assert not cfg.precompute_ref_log_probs, "the caller's config was modified"
    ours = _ref_columns(trainer)

    # the same reference from TRL's own precompute on the unpatched base model
    base_cfg = DPOConfig(str(tmp_path / "base"), max_steps=1, precompute_ref_log_probs=True, **COMMON)
    base = DPOTrainer(model=tiny_llama(seed=0).train(), ref_model=None, args=base_cfg,
                      train_dataset=Dataset.from_list(PREF), processing_class=tok)
    want = _ref_columns(base)
    # and what a plain DPOTrainer would take as the reference for the patched model (interventions on)
    on_cfg = DPOConfig(str(tmp_path / "on"), max_steps=1, precompute_ref_log_probs=True, **COMMON)
    on = DPOTrainer(model=_patched(init_std=0.3), ref_model=None, args=on_cfg, train_dataset=Dataset.from_list(PREF),
                    processing_class=tok)
    wrong = _ref_columns(on)
    for o, w, x in zip(ours, want, wrong):
        assert torch.allclose(o, w, atol=1e-4), (o - w).abs().max()
        assert (x - w).abs().max() > 1e-2  # the check above can fail

    before = _values(model)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 4 and min(losses[1:]) < losses[0] - 1e-4, losses
    assert any(not torch.equal(before[k], v) for k, v in _values(model).items())
    _assert_adapter_only(tmp_path / "lofit" / "checkpoint-4")
    fresh = lofit_fast.load_adapter(tiny_llama(seed=0), tmp_path / "lofit" / "checkpoint-4")
    assert all(torch.equal(a, b) for a, b in zip(_values(fresh).values(), _values(model).values()))


@needs_trl
def test_dpo_trainer_needs_a_patched_model(tmp_path):
    from trl import DPOConfig

    from lofit_fast.integrations.trl import LoFiTDPOTrainer

    with pytest.raises(RuntimeError, match="patched"):
        LoFiTDPOTrainer(model=tiny_llama(seed=0), args=DPOConfig(str(tmp_path), report_to=[], use_cpu=True))


@pytest.mark.slow
def test_smollm2_from_load_model_trains_in_trainer(tmp_path):
    """load_model("smollm2") (a GGUF, dequantized) is accepted by Trainer; a few LoFiT steps; the adapter round-trips."""
    model, tok = lofit_fast.load_model("smollm2")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    lofit_fast.patch(model, [(9, 3), (17, 0)], init_std=1e-3)
    lofit_fast.freeze_base(model)
    args = TrainingArguments(str(tmp_path), max_steps=3, save_steps=3, remove_unused_columns=False, **COMMON)
    trainer = LoFiTTrainer(model=model, args=args, train_dataset=SFT, data_collator=SFTCollator(tok),
                           processing_class=tok)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(map(lambda x: x == x, losses))
    assert min(losses[1:]) < losses[0], losses
    _assert_adapter_only(tmp_path / "checkpoint-3")
    assert os.path.getsize(tmp_path / "checkpoint-3" / WEIGHTS_NAME) < 100_000
    cfg = lofit_fast.load_adapter_config(tmp_path / "checkpoint-3")
    assert cfg["heads"] == {"9": [3], "17": [0]}


@pytest.mark.slow
@needs_trl
def test_smollm2_in_trl_sft_and_dpo_trainers(tmp_path):
    """SmolLM2 from load_model: SFTTrainer with its defaults (bf16 autocast) and DPOTrainer(ref_model=None), a few
    steps each; the losses move and the checkpoints are adapters."""
    from datasets import Dataset
    from trl import DPOConfig, SFTConfig

    from lofit_fast.integrations.trl import LoFiTDPOTrainer, LoFiTSFTTrainer

    model, tok = lofit_fast.load_model("smollm2")
    short = dict(COMMON, per_device_train_batch_size=6, learning_rate=1e-2)  # the whole set each step
    lofit_fast.patch(model, [(9, 3), (17, 0)], scale=False, init_std=1e-3)
    lofit_fast.freeze_base(model)
    sft = LoFiTSFTTrainer(model=model, args=SFTConfig(str(tmp_path / "sft"), max_steps=3, save_steps=3, **short),
                          train_dataset=Dataset.from_list(SFT[:6]), processing_class=tok)
    sft.train()
    losses = _losses(sft)
    assert len(losses) == 3 and min(losses[1:]) < losses[0], losses
    _assert_adapter_only(tmp_path / "sft" / "checkpoint-3")

    # The same model object in a second trainer. The bf16 SFTTrainer left accelerate's autocast wrapper and prepared
    # flag on it; unreleased, DPO would train it without autocast against reference log-probs taken with autocast,
    # and the first loss would be 0.697, not log 2.
    assert model._is_accelerate_prepared
    with torch.no_grad():
        for module in lofit_fast.patched_modules(model).values():
            module.v.zero_()  # the policy is its reference again: the first DPO loss is log 2
    dpo = LoFiTDPOTrainer(model=model, ref_model=None, args=DPOConfig(str(tmp_path / "dpo"), max_steps=3, save_steps=3,
                                                                    **short),
                          train_dataset=Dataset.from_list(PREF[:6]), processing_class=tok)
    dpo.train()
    losses = _losses(dpo)
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(2), abs=1e-4), losses
    assert losses[-1] < losses[0] - 1e-4, losses
    _assert_adapter_only(tmp_path / "dpo" / "checkpoint-3")
