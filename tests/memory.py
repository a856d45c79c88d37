"""Peak-memory measurement for the memory tests (a helper module, like patterns.py and naive.py).

The measure is the process's peak resident memory, so freed memory must leave the process: glibc's malloc
raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which large blocks come
from the heap and are reused without touching RSS — late in a long test session a reference that allocates an
N×N matrix could then measure as 0 extra bytes. :func:`pin_malloc` (called by conftest) fixes the threshold at
128 KiB, and each measurement starts with ``malloc_trim(0)``.
"""
import ctypes
import ctypes.util
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_M_MMAP_THRESHOLD = -3
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.mallopt, _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
    _LIBC = None


def pin_malloc():
    """Blocks ≥ 128 KiB are always mmapped (returned to the OS when freed): a fixed threshold, no adaptation."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _trim():
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

HAS_CLEAR_REFS = os.path.exists("/proc/self/clear_refs")
requires_clear_refs = pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc/self/clear_refs")


def peak_extra_bytes(fn):
    """Peak resident memory above the level at the start of fn() (Linux: VmHWM reset via clear_refs)."""
    def read(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    start = read("VmRSS:")
    fn()
    return read("VmHWM:") - start


class TensorWatch(TorchDispatchMode):
    """While active: the largest tensor (bytes) any aten op returns (``largest``, ``largest_op``) and every op that
    syncs with the host (``syncs``). Under the Triton interpreter the kernels' arguments are copied as byte
    buffers: those count too. The memory / no-sync watch of the fused-op tests."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
               "aten.item", "aten.is_nonzero", "aten.bincount")

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op, self.syncs = 0, None, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(self.SYNCING):
            self.syncs.append(name)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t) and t.numel() * t.element_size() > self.largest:
                self.largest, self.largest_op = t.numel() * t.element_size(), name
        return out
