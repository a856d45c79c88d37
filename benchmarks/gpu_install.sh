#!/usr/bin/env bash
# Install the package on the GPU device machine (torch 2.11 + CUDA 13, triton 3.6, no network), building
# the CUDA extension for the local GPU only, within 240 s; else the pure-Python install (the Triton
# backend still works; the cuda backend then reports why it is unavailable). Used by gpu_sweep.sh and
# gpu_tests.sh; run from the repository root.
# --no-deps: the machine has no network and torch/triton are already there (setup.py's requirements
# would make pip look for them). TORCH_CUDA_ARCH_LIST: compile for the local GPU only (faster build).
ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
if ! TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 timeout 240 pip install -q --no-build-isolation --no-deps -e .; then
  echo "== the build did not finish in time or failed: installing without the compiled extension"
  DML_KERNELS_NO_BUILD=1 timeout 60 pip install -q --no-build-isolation --no-deps -e . || true
fi
# Carried wheels (e.g. pytorch-metric-learning for the PML comparisons), if a .whl/ folder came along.
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python -m dml_kernels ops || true
