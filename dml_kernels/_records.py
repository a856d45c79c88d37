"""``collect_stats=None``, as PML reads it: PML's global flag (``pytorch_metric_learning.utils.common_functions
.COLLECT_STATS``) when PML is loaded — PML's own classes read it the same way — and off otherwise. PML is never
imported here."""
from __future__ import annotations

import sys


def global_flag() -> bool:
    common = sys.modules.get("pytorch_metric_learning.utils.common_functions")
    return bool(getattr(common, "COLLECT_STATS", False))


def resolve(collect_stats) -> bool:
    return global_flag() if collect_stats is None else bool(collect_stats)
