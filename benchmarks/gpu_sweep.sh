#!/usr/bin/env bash
# The GPU benchmark in one command, for a session that has the device machine (one H100 or H200; torch
# 2.11 + CUDA 13, triton 3.6, no network). Run from the repository root on that machine:
#
#     bash benchmarks/gpu_sweep.sh
#
# It installs the package (building the CUDA extension for the local GPU when it can, within a time
# limit; otherwise the pure-Python install, so the Triton backend is still measured and the CUDA backend
# is recorded as "skipped" with the reason), then runs the `gpu` preset of `python -m dml_kernels bench`
# with a time budget so that everything ends within 10 minutes. Results land under $OUT (or
# ./gpu-bench-out): $OUT/results/<device-slug>/gpu.json, table.md, plots/, and $OUT/RESULTS.md; copy
# $OUT/results/<device-slug>/ into benchmarks/results/ and run `python -m dml_kernels bench --report-only`
# to regenerate benchmarks/RESULTS.md with them.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${BENCH_TOTAL_S:-570}          # the device machine allows 600 s per command
OUT="${OUT:-$PWD/gpu-bench-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_sweep.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }

echo "== $(date -u +%FT%TZ) gpu_sweep on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"

echo "== install (build for this GPU only, at most 240 s)"
# shellcheck source=benchmarks/gpu_install.sh
source benchmarks/gpu_install.sh
echo "== install done at $(elapsed) s"

BUDGET=$(( TOTAL - $(elapsed) - 45 ))   # 45 s for the last cells' teardown, tables and plots
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
echo "== bench: gpu preset, time budget ${BUDGET} s"
timeout $(( BUDGET + 40 )) python -m dml_kernels bench --device cuda --preset gpu --time-budget "$BUDGET" \
  --out "$OUT/results"
rc=$?
echo "== done in $(elapsed) s (bench exit $rc); results under $OUT/results"
ls -R "$OUT/results" | head -50
exit $rc
