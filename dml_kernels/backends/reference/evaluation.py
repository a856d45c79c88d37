"""Reference k-nearest-neighbour search: the dense N×M matrix, then a stable sort of every row.

The oracle of the fused ``knn`` op (``dml_kernels/_ops.py``): best first (largest similarity, smallest
distance), equal values ordered by the smaller reference index. ``torch.topk`` leaves the order of equal
values unspecified, so the rows are sorted with ``stable=True`` instead; on rows without ties the result
is exactly ``torch.topk`` of the dense matrix.
"""
from __future__ import annotations

import torch

from ...distances import Distance
from .similarity import pairwise_similarity


def _check_k(k, n, m, exclude_self):
    available = m - 1 if (exclude_self and n > 0) else m
    if not 0 <= k <= available:
        raise ValueError(f"k={k} neighbours requested but only {available} references are available per query")


def knn(x: torch.Tensor, ref: torch.Tensor | None = None, *, k: int, distance: Distance, exclude_self: bool = False):
    """(values N×k, indices N×k int64) of the k nearest references of every query."""
    if ref is None:
        ref, exclude_self = x, True
    n, m = x.shape[0], ref.shape[0]
    _check_k(k, n, m, exclude_self)
    with torch.no_grad():
        values = pairwise_similarity(x, ref, distance=distance)
        # One ordering for both kinds: the score is larger for a closer reference (negation is exact).
        score = values if distance.is_similarity else -values
        if exclude_self:
            d = min(n, m)
            score = score.clone()
            score[torch.arange(d), torch.arange(d)] = float("-inf")
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        return values.gather(1, order), order
