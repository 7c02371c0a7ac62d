#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU, CUDA's compiler and a Python that
# has PyTorch, Triton, transformers, pytest and pytest-benchmark (no network needed):
#   1. install memoir editable, building the extension with its CUDA kernels (offline);
#   2. the CUDA retrieval and Triton kernel tests, on the GPU (TRITON_INTERPRET unset);
#   3. benchmarks/bench_triton.py and benchmarks/bench_retrieval.py --device cuda;
#   4. the layer benchmarks of the suite (`memoir bench -k layer`) on the GPU.
# Results go to OUT (default benchmarks/results/gpu), each step's log beside them; a failing
# step is reported and the next one still runs.  Each step has its own time limit.
#
#     bash scripts/gpu_check.sh [OUT]
set -u
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MEMOIR_REQUIRE_EXT=1
unset TRITON_INTERPRET
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
        echo "    ok"
    else
        echo "    FAILED (rc $?): tail of $OUT_DIR/$name.log"
        tail -n 25 "$OUT_DIR/$name.log" | sed 's/^/    /'
        status=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PY's torch sees no CUDA GPU; these checks need one" >&2
    exit 2
fi
step install 420 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
step tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_triton_kernels.py
step tests_other_cuda 240 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda and not test_ops_cuda"
step bench_triton 180 "$PY" benchmarks/bench_triton.py --out "$OUT_DIR/triton.json"
step bench_retrieval 180 "$PY" benchmarks/bench_retrieval.py --device cuda --no-plot --out "$OUT_DIR/retrieval_cuda.json"
step bench_layer 180 "$PY" -m memoir.cli bench --quick -k layer --output "$OUT_DIR/bench"
exit $status
