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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (restored after): on a busy 2-core machine a 2-thread tiny
    GEMM or reduction waits ~20–30 ms on the thread-pool barrier, which the cpu row-block forms and PML's small
    ops would pay per call. Use with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[None, 40], ids=["tile-default", "tile-40"])
def tile(request, monkeypatch):
    """The cpu row-block engine's tile (``backends/cpp/row_blocks.TILE``): the default, and a 40-element one —
    blocks of a few rows and a ragged last block. Returns the tile in force."""
    from dml_kernels.backends.cpp import row_blocks

    if request.param is not None:
        monkeypatch.setattr(row_blocks, "TILE", request.param)
    return row_blocks.TILE
