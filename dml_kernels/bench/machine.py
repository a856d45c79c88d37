"""Facts about the machine and the software a record was measured with."""
from __future__ import annotations

import os
import platform
import re
import subprocess

import torch

# --------------------------------------------------------------------------- environment


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dml_kernels", "csrc"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _slugify(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def device_slug(device):
    if device == "cuda":
        name = torch.cuda.get_device_name(0)  # e.g. "NVIDIA H100 80GB HBM3"
        words = _slugify(name).split("-")
        return "-".join(words[:2]) if words[0] == "nvidia" else _slugify(name)
    model = _slugify(_cpu_model().replace("(R)", "").replace("(TM)", ""))
    model = re.sub(r"-(\d+-core-)?processor$", "", model)
    return f"cpu-{model}-{_cores()}c"


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else f"{_cpu_model()} ({_cores()} cores)"


def _llc_bytes(device):
    if device == "cuda":
        try:
            return int(torch.cuda.get_device_properties(0).L2_cache_size)
        except Exception:  # noqa: BLE001
            return 50 << 20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            s = open(os.path.join(base, idx, "size")).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def _mem_available():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _status_kb(*fields):
    out = {}
    for line in open("/proc/self/status"):
        k = line.split(":", 1)[0]
        if k in fields:
            out[k] = int(line.split()[1]) * 1024
    return out
