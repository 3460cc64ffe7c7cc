"""Task data: loaders for the official LoFiT files (TruthfulQA, CLUTRR, MQuAKE), prompt templates, training
examples (SFT and DPO pairs), and collation into padded token batches."""
from .builtin import builtin_fictional, builtin_truthfulqa
from .collate import (
    IGNORE_INDEX,
    adds_bos,
    collate_preference,
    collate_sft,
    encode_prompts,
    pad_left,
    pad_right,
    pad_token_id,
)
from .examples import training_examples, truthfulqa_pairs
from .items import (
    TASKS,
    DataFormatError,
    GenItem,
    MCItem,
    PreferenceExample,
    SFTExample,
    task_kind,
)
from .loaders import SPLITS, load_clutrr, load_mquake, load_split, load_truthfulqa, split_path
from .prompts import (
    clutrr_prompt,
    mquake_edit,
    mquake_prompt,
    truthfulqa_completion,
    truthfulqa_prompt,
)

__all__ = [
    "TASKS",
    "SPLITS",
    "IGNORE_INDEX",
    "MCItem",
    "GenItem",
    "SFTExample",
    "PreferenceExample",
    "DataFormatError",
    "task_kind",
    "load_truthfulqa",
    "load_clutrr",
    "load_mquake",
    "load_split",
    "split_path",
    "training_examples",
    "truthfulqa_pairs",
    "collate_sft",
    "collate_preference",
    "adds_bos",
    "encode_prompts",
    "pad_left",
    "pad_right",
    "pad_token_id",
    "builtin_truthfulqa",
    "builtin_fictional",
    "truthfulqa_prompt",
    "truthfulqa_completion",
    "mquake_prompt",
    "mquake_edit",
    "clutrr_prompt",
]
