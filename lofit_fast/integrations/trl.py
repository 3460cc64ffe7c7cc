"""TRL's `SFTTrainer` and `DPOTrainer` for patched models (needs `pip install trl`).

    from lofit_fast.integrations.trl import LoFiTDPOTrainer, LoFiTSFTTrainer
    LoFiTSFTTrainer(model=patched, args=SFTConfig(...), train_dataset=ds, processing_class=tok).train()
    LoFiTDPOTrainer(model=patched, ref_model=None, args=DPOConfig(...), train_dataset=ds,
                    processing_class=tok).train()

Both save LoFiT adapters as checkpoints (`AdapterCheckpointMixin`). SFTConfig's default bf16 mixed precision
works because the op is autocast-aware (A and v stay float32).

The DPO reference. With `ref_model=None`, TRL either uses a PEFT model with its adapter disabled (it checks
`isinstance(model, peft.PeftModel)`, which a patched model is not) or, with `precompute_ref_log_probs=True`,
computes the reference log-probs once with the policy model before training; otherwise it reloads a second copy
of the model from `config._name_or_path` (which fails for a GGUF or in-memory model). `LoFiTDPOTrainer` takes
the precompute route, always, and runs it inside `lofit_fast.disabled(model)`: the reference is exactly the
base model (interventions off) whatever A and v start at, and no second copy of the model is ever made. This
is also what `lofit_fast.train` does (and what the official LoFiT scripts configure).
"""
from __future__ import annotations

import copy

import torch.nn as nn

try:
    from trl import DPOConfig, DPOTrainer, SFTTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lofit_fast.integrations.trl needs TRL: pip install trl") from exc

from ..patch import disabled, patched_modules
from .trainer import AdapterCheckpointMixin

_REFERENCE_TAG = ":lofit_fast-interventions-off"


class LoFiTSFTTrainer(AdapterCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer whose checkpoints are lofit_fast adapters."""


class LoFiTDPOTrainer(AdapterCheckpointMixin, DPOTrainer):
    """TRL's DPOTrainer for a patched model: with `ref_model=None` the reference log-probs are precomputed once
    with every intervention off (`lofit_fast.disabled`); checkpoints are lofit_fast adapters."""

    def __init__(self, model, ref_model=None, args=None, *pargs, **kwargs):
        if isinstance(model, str):
            raise TypeError("LoFiTDPOTrainer needs the patched model itself, not a model name")
        if not patched_modules(model):
            raise RuntimeError("LoFiTDPOTrainer needs a model patched by lofit_fast.patch (or load_adapter)")
        if ref_model is None:
            if args is None:
                name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
                args = DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-LoFiT-DPO")
            if not args.precompute_ref_log_probs:
                args = copy.copy(args)  # the caller's config object is left as it was
                args.precompute_ref_log_probs = True
        super().__init__(model, ref_model, args, *pargs, **kwargs)

    def compute_ref_log_probs(self, model: nn.Module, inputs):
        if self.ref_model is not None:
            return super().compute_ref_log_probs(model, inputs)
        with disabled(self.accelerator.unwrap_model(model)):
            return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches the precomputed columns under a hash of the model; make ours differ from a plain
        # DPOTrainer's cache of the same model with its interventions on.
        if self.ref_model is None and self._precompute_model_hash and not str(self._precompute_model_hash).endswith(
            _REFERENCE_TAG
        ):
            self._precompute_model_hash = f"{self._precompute_model_hash}{_REFERENCE_TAG}"
        return super()._precompute_ref_logps(dataset, name, batch_size)


__all__ = ["LoFiTSFTTrainer", "LoFiTDPOTrainer"]
