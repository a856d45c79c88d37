"""Triton backend: importing this package registers its ops with the backend registry."""
import triton  # noqa: F401  (a clear ImportError if triton is missing)

from . import pairs, proxies  # noqa: F401,E402
