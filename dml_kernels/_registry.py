"""Backend registry: every op has a ``reference`` implementation; fused backends plug in per op.

A backend package (``dml_kernels/backends/<name>/``) registers its implementations with :func:`register`
when it is imported; the registry imports it only through :func:`_load` (by name, never statically), and
asks it whether it can run here through its optional ``unavailable_reason(backend)`` hook. All
implementations of one op take the same canonical arguments (``dml_kernels/_ops.py``). An
implementation raises :class:`Unsupported` for an argument combination it does not handle (say an
explicit pair tuple); ``backend="auto"`` then moves to the next candidate, an explicit backend raises.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")

_IMPLS: dict[tuple[str, str], object] = {}
_LOADED: dict[str, str | None] = {}  # backend -> None if loaded, else why it failed
_WARNED: set = set()

_MODULES = {
    "reference": "dml_kernels.backends.reference",
    "triton": "dml_kernels.backends.triton",
    "cpu": "dml_kernels.backends.cpp",
    "cuda": "dml_kernels.backends.cpp",
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not installed, not built, wrong device)."""


class Unsupported(NotImplementedError):
    """This backend has no implementation for this op or argument combination."""


def register(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


@torch.compiler.assume_constant_result  # evaluated eagerly while torch.compile traces (no import in graph)
def _load(backend: str) -> str | None:
    """Import the backend's module once; return None if it loaded, else the reason it did not."""
    if backend not in _LOADED:
        try:
            importlib.import_module(_MODULES[backend])
            _LOADED[backend] = None
        except Exception as e:  # noqa: BLE001 - any import failure means "unavailable, here is why"
            _LOADED[backend] = f"{type(e).__name__}: {e}"
    return _LOADED[backend]


@torch.compiler.assume_constant_result
def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type`` here, else a sentence saying why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device_type == "cpu" and not interpret:
            return ("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors, "
                    "which is slow and meant for tests)")
        if device_type not in ("cuda", "cpu"):
            return f"the triton backend does not support {device_type} tensors"
    if backend == "cuda" and device_type != "cuda":
        return "the cuda backend needs CUDA tensors"
    if backend == "cpu" and device_type != "cpu":
        return "the cpu backend needs CPU tensors"
    why = _load(backend)
    if why is not None:
        hint = {
            "triton": "install triton (pip install triton)",
            "cpu": "reinstall with a C++ compiler present (pip install --no-build-isolation .) or install ninja "
                   "so the extension can be JIT-compiled",
            "cuda": "reinstall on a machine with nvcc and a CUDA build of torch",
        }.get(backend, "")
        return f"backend {backend!r} failed to load ({why}); {hint}".rstrip("; ")
    hook = getattr(importlib.import_module(_MODULES[backend]), "unavailable_reason", None)
    return None if hook is None else hook(backend)


def auto_candidates(device_type: str):
    if device_type == "cuda":
        return ("triton", "cuda", "reference")
    if device_type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def get_impl(op: str, backend: str, device_type: str):
    """The implementation of ``op`` for an explicit backend, or a clear error."""
    why = unavailable_reason(backend, device_type)
    if why is not None:
        raise BackendUnavailable(why)
    fn = _IMPLS.get((op, backend))
    if fn is None:
        raise Unsupported(f"op {op!r} has no {backend!r} implementation yet; use backend='reference' or 'auto'")
    return fn


def _reference_only(kwargs):
    """Why only the reference backend can run a call with these arguments (None: any backend can): a
    ``distance`` the engines cannot express (``dk.distances.CustomDistance``: p != 2, SNR, a user subclass)."""
    distance = kwargs.get("distance")
    if getattr(distance, "name", None) == "custom":
        return f"the distance {distance.module!r} is computed on the reference backend only"
    return None


def call(op: str, backend: str, device_type: str, *args, **kwargs):
    """Run ``op`` on ``backend`` (or the best available one for ``backend='auto'``)."""
    only_reference = _reference_only(kwargs)
    if backend != "auto":
        if only_reference and backend != "reference":
            raise Unsupported(f"{op} on backend={backend!r}: {only_reference}; use backend='reference' or 'auto'")
        return get_impl(op, backend, device_type)(*args, **kwargs)
    skipped = []
    for candidate in auto_candidates(device_type):
        why = unavailable_reason(candidate, device_type)
        if why is None and only_reference and candidate != "reference":
            why = only_reference
        fn = _IMPLS.get((op, candidate))
        if why is None and fn is None:
            why = "no implementation of this op"
        if why is None:
            try:
                result = fn(*args, **kwargs)
            except Unsupported as e:
                why = str(e)
            else:
                if candidate == "reference" and skipped:
                    _warn_once((device_type, tuple(skipped)),
                               f"dml_kernels: falling back to the reference backend on {device_type} "
                               f"(first seen in {op}): "
                               + "; ".join(skipped))
                return result
        skipped.append(f"{candidate}: {why}")
    raise BackendUnavailable(f"no backend can run {op} on {device_type}: " + "; ".join(skipped))


def implemented(op: str):
    """Backends that register an implementation of ``op`` (loading every backend that loads)."""
    for b in BACKENDS:
        _load(b)
    return [b for b in BACKENDS if (op, b) in _IMPLS]
