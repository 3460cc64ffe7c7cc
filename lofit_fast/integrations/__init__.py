"""Training a patched model with the libraries the field trains with.

- `lofit_fast.integrations.trainer`: `transformers.Trainer` whose checkpoints hold the LoFiT adapter only
  (`LoFiTTrainer`, or `adapter_trainer(AnyTrainerSubclass)`), `AdapterCheckpointCallback` for plain
  trainers, `SFTCollator` / `PreferenceCollator` for lofit_fast examples.
- `lofit_fast.integrations.trl` (needs `trl`): `LoFiTSFTTrainer` and `LoFiTDPOTrainer`; the latter takes
  `ref_model=None` and uses the same model with every intervention off as the DPO reference.
"""
from .trainer import AdapterCheckpointCallback, AdapterCheckpointMixin, LoFiTTrainer, SFTCollator, adapter_trainer

__all__ = ["AdapterCheckpointCallback", "AdapterCheckpointMixin", "LoFiTTrainer", "SFTCollator", "adapter_trainer"]
