"""pytest configuration for the benchmarks under bench/ (run them with `pytest bench/ --benchmark-only`; the main
test run, `python -m pytest`, collects tests/ only)."""
import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
for path in (str(BENCH.parent), str(BENCH)):  # lofit_fast from this checkout, and e2e_bench next to this file
    if path not in sys.path:
        sys.path.insert(0, path)

# Triton kernels run under the interpreter where there is no GPU; it must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
