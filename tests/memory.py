"""Peak-memory measurement for the memory tests (a helper module, like patterns.py and naive.py)."""
import os

import pytest

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

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    start = read("VmRSS:")
    fn()
    return read("VmHWM:") - start
