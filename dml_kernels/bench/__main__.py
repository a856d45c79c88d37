"""``python -m dml_kernels.bench`` (the GPU sweep starts its per-op workers this way)."""
import sys

from .sweep import main

sys.exit(main())
