import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU; it must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lofit_fast  # noqa: E402


def pytest_report_header(config):
    return f"lofit_fast backends here: {lofit_fast.available_backends()} (torch {torch.__version__})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
