#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with the installed nvcc for sm_80 and sm_90.
# No GPU is needed.  Exits 0 with a skip message when nvcc is absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${nvcc_bin}" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "${nvcc_bin}" ]]; then
  echo "nvcc_check: SKIP (nvcc not found)"
  exit 0
fi
shopt -s nullglob
files=("${root}"/csrc/cuda/*.cu)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "nvcc_check: no csrc/cuda/*.cu files"
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
echo "nvcc_check: $("${nvcc_bin}" --version | tail -n 1)"
status=0
for arch in sm_80 sm_90; do
  for f in "${files[@]}"; do
    out="${tmp}/$(basename "${f%.cu}").${arch}.o"
    if "${nvcc_bin}" -c -std=c++17 -O3 -arch="${arch}" -Werror all-warnings -I"${root}/csrc" \
        "${f}" -o "${out}"; then
      echo "nvcc_check: OK   ${arch} ${f#"${root}"/}"
    else
      echo "nvcc_check: FAIL ${arch} ${f#"${root}"/}"
      status=1
    fi
  done
done
exit "${status}"
