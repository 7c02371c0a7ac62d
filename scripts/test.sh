#!/usr/bin/env bash
# The test suite (CPU; GPU tests skip without CUDA; Triton kernels run in the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q "$@"
