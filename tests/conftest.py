"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be set
before triton is first imported, so it is set here (conftest is imported before any test module).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from memory import pin_malloc  # noqa: E402

pin_malloc()  # the memory tests read RSS: large blocks must go back to the OS when freed

# Tests run on CUDA when there is a GPU, else on the CPU (Triton through the interpreter).
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
