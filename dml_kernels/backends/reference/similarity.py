"""Reference (plain PyTorch, any float dtype incl. float64) similarity / distance matrix and masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance


def normalize_rows(x: torch.Tensor, distance: Distance) -> torch.Tensor:
    """PML's ``F.normalize(x, p=2, dim=1)`` (eps 1e-12) when the distance normalises, else ``x`` (a
    ``CustomDistance``: the object's own ``maybe_normalize``, e.g. its p-norm)."""
    if distance.name == "custom":
        return distance.maybe_normalize(x)
    return F.normalize(x, p=2, dim=1) if distance.normalize else x


def pairwise_similarity(x: torch.Tensor, ref: torch.Tensor | None = None, *, distance: Distance) -> torch.Tensor:
    """N×M matrix of similarities (cosine/dot) or distances (euclidean/squared_euclidean); a
    ``CustomDistance`` (an object the engines cannot express) is called as PML calls it."""
    if distance.name == "custom":
        return distance(x, ref)
    ref = x if ref is None else ref
    q, r = normalize_rows(x, distance), normalize_rows(ref, distance)
    if distance.is_similarity:
        return q @ r.T
    sq = (q * q).sum(1, keepdim=True) + (r * r).sum(1).unsqueeze(0) - 2 * (q @ r.T)
    sq = sq.clamp_min(0)
    if distance.squared:
        return sq
    # sqrt with a zero (not infinite) gradient at coincident points, as torch.cdist has.
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None):
    """(pos, neg) N×M bool masks; ``ref_labels=None`` means self mode (diagonal is not a pair)."""
    self_mode = ref_labels is None
    ref_labels = labels if self_mode else ref_labels
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos = same.clone()
    if self_mode:
        pos.fill_diagonal_(False)
    return pos, ~same


def masked_log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """log(1 + Σ_{mask} e^x) along ``dim``; 0 where the mask is empty (PML's ``add_one=True``)."""
    x = x.masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(x.select(dim, 0)).unsqueeze(dim)
    return torch.logsumexp(torch.cat([x, zero], dim=dim), dim=dim)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """log Σ_{mask} e^x along ``dim``; 0 where the mask is empty (PML's ``add_one=False``)."""
    nonempty = mask.any(dim)
    # Empty rows are replaced by finite values before the LSE so their (discarded) gradient is 0, not NaN.
    safe = x.masked_fill(~mask, float("-inf")).masked_fill(~nonempty.unsqueeze(dim), 0)
    return torch.where(nonempty, torch.logsumexp(safe, dim=dim), 0)
