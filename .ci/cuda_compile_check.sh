#!/usr/bin/env bash
# CUDA compile check (no GPU needed): in a fresh venv with a CUDA build of torch, build the extension
# with FORCE_CUDA=1 (CPU + CUDA sources) into a temporary directory, then load it and check that the
# CUDA kernels registered. Any compile or link error exits non-zero. ~3-6 min on 2 cores.
# Env: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), CUDA_TORCH (default torch==2.14.1), KEEP_WORK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WORK="$(mktemp -d)"
if [ "${KEEP_WORK:-0}" != "1" ]; then trap 'rm -rf "$WORK"' EXIT; fi

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "cuda_compile_check: nvcc not found; cannot compile-check the CUDA kernels" >&2
  exit 1
fi
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -x "$c/bin/nvcc" ]; then export CUDA_HOME="$c"; break; fi
  done
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "cuda_compile_check: CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -1))"

start=$(date +%s)
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "${CUDA_TORCH:-torch==2.14.1}" numpy ninja setuptools wheel
echo "cuda_compile_check: venv ready ($(( $(date +%s) - start )) s)"

# Build from a copy so nothing lands in the checkout.
mkdir -p "$WORK/src"
cp -r "$ROOT/setup.py" "$ROOT/csrc" "$ROOT/dml_kernels" "$WORK/src/"
cd "$WORK/src"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
"$WORK/venv/bin/python" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
echo "cuda_compile_check: build done ($(( $(date +%s) - start )) s)"

lib=$(ls "$WORK"/lib/dml_kernels/_C*.so)
"$WORK/venv/bin/python" - "$lib" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
for op in ("pair_values", "pair_values_backward", "pair_reduce", "pair_reduce_backward", "ms_thresholds", "ms_mask",
           "batch_hard",
           "pair_terms", "pair_terms_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dml_kernels::{op}", key), (op, key)
for op in ("grouped_class_rows", "grouped_class_rows_backward"):  # grouped columns (SubCenterArcFace, SoftTriple)
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dml_kernels::{op}", key), (op, key)
print("cuda_compile_check: OK, CPU and CUDA kernels registered in", sys.argv[1])
PY
