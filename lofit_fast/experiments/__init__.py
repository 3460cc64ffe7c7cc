"""The pipelines, as library functions that take data and settings and return results: the LoFiT run (base,
step 1, step 2, random heads, with resume), the comparison with LoFiT's relatives, and the paired evaluation
of a finished run. The CLI and `bench/` call them; nothing here imports either."""
from .factorial import Cell, all_cells, run_factorial
from .lofit_run import evaluate_arm, load_selection, run_experiment, select, selection_file, train_kw, tune_heads
from .multi_eval import evaluate_adapters
from .methods_run import METHODS, rep_tuning_examples, run_method, run_method_experiment
from .paired import paired_evaluation, per_item_scores
from .seeds import run_seeds, summarize
from .results import RESULT_KEYS, previous_results, write_json
from .settings import (
    CLUTRR_TRAIN_SIZE,
    DEFAULT_LR,
    DEFAULT_SEED,
    RunSettings,
    hyperparameters,
    load_model_for,
    splits,
    task_items,
)

__all__ = [
    "RunSettings", "run_experiment", "run_method", "run_method_experiment", "paired_evaluation", "per_item_scores",
    "evaluate_arm", "select", "tune_heads", "train_kw", "load_selection", "selection_file", "METHODS", "DEFAULT_LR",
    "DEFAULT_SEED", "CLUTRR_TRAIN_SIZE", "RESULT_KEYS", "previous_results", "write_json", "hyperparameters", "load_model_for",
    "splits", "task_items", "rep_tuning_examples", "run_seeds", "summarize", "evaluate_adapters", "Cell", "all_cells",
    "run_factorial",
]
