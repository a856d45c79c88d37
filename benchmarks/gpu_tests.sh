#!/usr/bin/env bash
# Correctness on the GPU device machine, one stage per call (each `run` call may take at most 600 s; the
# install persists while the machine stays warm). From the repository root:
#
#     bash benchmarks/gpu_tests.sh install    # build for the local GPU (≤ 240 s)
#     bash benchmarks/gpu_tests.sh verify     # every backend vs the fp64 reference: fp64, fp32, bf16
#     bash benchmarks/gpu_tests.sh pytest     # the whole suite on CUDA (GPU-only tests included)
#     bash benchmarks/gpu_tests.sh memcheck   # compute-sanitizer memcheck over every op (cuda + triton)
#
# Logs go to $OUT (or ./gpu-test-out). Exit status non-zero on any failure. PML is not in the GPU image:
# carry its wheel in .whl/ (see the device README) for the PML comparisons, else they skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-test-out}"
mkdir -p "$OUT"
stage="${1:-all}"
export PYTHONUNBUFFERED=1
# Wheels carried in .whl/ and unpacked by the install stage (a fresh shell per `run` call loses the export).
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

run_stage() {
  case "$1" in
    install) source benchmarks/gpu_install.sh ;;
    verify) python -m dml_kernels verify --dtypes float64 float32 bfloat16 float16 ;;
    pytest) timeout 560 python -m pytest tests/ -q -x -p no:cacheprovider ;;
    memcheck)
      timeout 560 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python -m dml_kernels verify --backends cuda triton --dtypes float32 ;;
    *) echo "unknown stage $1 (install | verify | pytest | memcheck | all)"; return 2 ;;
  esac
}

if [ "$stage" = all ]; then
  rc=0
  for s in install verify pytest memcheck; do
    echo "== $s"
    run_stage "$s" 2>&1 | tee "$OUT/$s.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
  exit $rc
fi
echo "== $stage"
run_stage "$stage" 2>&1 | tee "$OUT/$stage.log"
exit "${PIPESTATUS[0]}"
