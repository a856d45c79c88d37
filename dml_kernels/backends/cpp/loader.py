"""Finds, builds and loads the compiled library (``csrc/``) of the ``cpu`` and ``cuda`` backends.

The library declares its ops once with ``TORCH_LIBRARY(dml_kernels, m)`` and implements them per device
(``TORCH_LIBRARY_IMPL(dml_kernels, CPU | CUDA, m)``). :func:`load` finds the library ``setup.py`` built
ahead of time (``dml_kernels/_C*.so``), or else JIT-compiles it with ninja
(``torch.utils.cpp_extension.load``) into a cache directory on first use (``$DML_KERNELS_CACHE``,
default ``~/.cache/dml_kernels``). Nothing is compiled at import time: the first call of
:func:`unavailable_reason` (which the registry makes before running an op) loads it, then
``library.py`` adds the ops' fake kernels and autograd.

Environment: ``DML_KERNELS_NO_EXTENSION=1`` disables the extension (the backends report why);
``DML_KERNELS_JIT=1`` ignores an ahead-of-time build and JIT-compiles.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
from pathlib import Path

import torch

from .library import register_python_side

_PKG = Path(__file__).resolve().parents[2]  # the dml_kernels package directory
_LOCK = threading.Lock()
_STATE: dict = {}  # "error": None | str, "how": str


def _sources(src: Path, with_cuda: bool) -> list[Path]:
    """The files the extension is built from (setup.py globs the same way)."""
    found = [src / "registration.cpp"] + sorted(src.glob("cpu/*.cpp"))
    return found + sorted(src.glob("cuda/*.cu")) if with_cuda else found


# --------------------------------------------------------------------------------------- loading


def source_dir() -> Path | None:
    """Where the C++ sources are: the checkout's ``csrc/`` or the copy installed as ``dml_kernels/_csrc``."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (cand / "registration.cpp").is_file():
            return cand
    return None


def _prebuilt() -> str | None:
    found = sorted(glob.glob(str(_PKG / "_C*.so")) + glob.glob(str(_PKG / "_C*.pyd")))
    return found[0] if found else None


def _stale(lib: str, src: Path | None) -> bool:
    """True if the checkout's sources were edited after an in-place (editable) build of ``lib``."""
    if src is None or src != _PKG.parent / "csrc":
        return False  # an installed copy of the sources is as old as the library installed with it
    newest = max((p.stat().st_mtime for p in src.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")),
                 default=0.0)
    return newest > os.path.getmtime(lib)


def _nvidia_includes():
    """include/ folders of torch's nvidia-* wheels (headers a bare CUDA toolkit may lack)."""
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        return []
    return [str(p) for base in getattr(nvidia, "__path__", []) for p in sorted(Path(base).glob("*/include"))]


def _jit_load(src: Path) -> str:
    """JIT build: CPU + CUDA sources when a GPU, a CUDA torch and nvcc are present, else (or if the CUDA
    build fails) the CPU sources only."""
    from torch.utils import cpp_extension

    with_cuda = (torch.version.cuda is not None and torch.cuda.is_available()
                 and cpp_extension.CUDA_HOME is not None and any(src.glob("cuda/*.cu")))
    if with_cuda:
        try:
            return _jit_build(src, True)
        except Exception as e:  # noqa: BLE001 - keep the CPU kernels usable
            _STATE["cuda_error"] = f"{type(e).__name__}: {str(e)[-400:]}"
    return _jit_build(src, False)


def _jit_build(src: Path, with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    sources = _sources(src, with_cuda)
    digest = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(p.name.encode() + p.read_bytes())
    digest.update(torch.__version__.encode() + str(with_cuda).encode())
    name = f"dml_kernels_ext_{digest.hexdigest()[:12]}"
    cache = Path(os.environ.get("DML_KERNELS_CACHE", Path.home() / ".cache" / "dml_kernels")) / name
    cache.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[str(s) for s in sources], build_directory=str(cache), is_python_module=False,
        extra_cflags=["-O3", "-fopenmp"], verbose=False, with_cuda=with_cuda,
        extra_cuda_cflags=["-O3"] + [f for d in _nvidia_includes()
                                     for f in ("-Xcompiler", "-idirafter", "-Xcompiler", d)])
    return f"JIT-compiled into {cache}" + (" (with CUDA)" if with_cuda else "")


def load() -> str | None:
    """Load the compiled library once; None if it loaded, else why not (a sentence with the fix)."""
    with _LOCK:
        if "error" in _STATE:
            return _STATE["error"]
        _STATE["error"] = _STATE["how"] = None
        if os.environ.get("DML_KERNELS_NO_EXTENSION") == "1":
            _STATE["error"] = "the C++ extension is disabled by DML_KERNELS_NO_EXTENSION=1"
            return _STATE["error"]
        src = source_dir()
        reasons = []
        lib = _prebuilt()
        if lib is not None and os.environ.get("DML_KERNELS_JIT") != "1" and not _stale(lib, src):
            try:
                torch.ops.load_library(lib)
                _STATE["how"] = f"ahead-of-time build {lib}"
            except Exception as e:  # noqa: BLE001 - e.g. built against another torch
                reasons.append(f"the installed library {lib} failed to load ({type(e).__name__}: {e})")
        if _STATE["how"] is None:
            if src is None:
                reasons.append("the C++ sources are not installed, so it cannot be JIT-compiled")
            else:
                try:
                    _STATE["how"] = _jit_load(src)
                except Exception as e:  # noqa: BLE001 - no compiler, no ninja, compile error...
                    msg = str(e).strip().splitlines()
                    reasons.append("JIT compilation failed (" + type(e).__name__ + ": "
                                   + " | ".join(msg[-6:])[-800:] + ")")
        if _STATE["how"] is None:
            _STATE["error"] = ("the dml_kernels C++ extension is not available: " + "; ".join(reasons)
                               + ". Fix: install a C++ compiler and ninja (pip install ninja) so it can be "
                               "JIT-compiled, or reinstall with one present (pip install --no-build-isolation .)")
            return _STATE["error"]
        register_python_side()
        return None


def how_loaded() -> str | None:
    """How the library was loaded (ahead-of-time build or JIT cache), None before or on failure."""
    return _STATE.get("how")


def has_kernel(name: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dml_kernels::{name}", key)


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` ("cpu" or "cuda") has its compiled kernels loaded here, else why not."""
    why = load()
    if why is not None:
        return why
    if backend == "cpu" and not has_kernel("pair_reduce", "cpu"):
        return "the dml_kernels library was loaded without its CPU kernels; rebuild it"
    if backend == "cuda" and not has_kernel("pair_reduce", "cuda"):
        extra = f"; the CUDA JIT build failed: {_STATE['cuda_error']}" if _STATE.get("cuda_error") else ""
        return ("the dml_kernels library was built without CUDA kernels (" + str(how_loaded()) + extra + "); "
                "reinstall "
                "on a machine with nvcc and a CUDA build of torch: pip install --no-build-isolation . "
                "(FORCE_CUDA=1 builds them without a GPU)")
    return None
