"""Reference ``<loss>_row_stats``: per anchor row, the statistics a reducer needs of a loss's pair or triplet
elements (SPEC §7 "Reductions are statistics"), computed here from the materialised elements — the oracle of
the fused backends, which never form them.

For each sub-loss with elements l grouped by anchor row i (the query row of a pair, the anchor of a triplet):
``sums[2j:2j+2] = (Σ_i l, Σ_i l·[low < l < high])``, ``counts[2j:2j+2] = (#_i, #_i[low < l < high])`` (int64),
``bands[j] = (low, high)``, None = unbounded (PML's ThresholdReducer: strict). Duplicated explicit pairs or
triplets count as often as given (PML's elements). PML's ≤1-pair rule is not applied (the caller applies it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance
from .mining import batch_hard_indices
from .pair_losses import _pair_lists, triplet_violation
from .similarity import pair_masks, pairwise_similarity


def in_band(losses, band):
    low, high = band
    keep = torch.ones_like(losses, dtype=torch.bool)
    if low is not None:
        keep &= losses > low
    if high is not None:
        keep &= losses < high
    return keep


def _grouped(losses, anchors, n, band):
    """(sums (2, n), counts (2, n)) of element losses grouped by their anchor rows."""
    keep = in_band(losses, band)
    sums = losses.new_zeros(2, n)
    sums = torch.stack([sums[0].index_add(0, anchors, losses), sums[1].index_add(0, anchors, losses.where(keep, 0))])
    counts = torch.zeros(2, n, dtype=torch.long, device=losses.device)
    counts = torch.stack([counts[0].index_add(0, anchors, torch.ones_like(anchors)),
                          counts[1].index_add(0, anchors, keep.long())])
    return sums, counts


def contrastive_loss_row_stats(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance: Distance,
                               pairs=None, bands=((None, None), (None, None))):
    """Rows (pos Σ, pos Σ band, neg Σ, neg Σ band) of relu(margin(D, m_p)) per positive pair and
    relu(margin(m_n, D)) per negative pair."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    pos = F.relu(distance.margin(mat[a1, p], pos_margin))
    neg = F.relu(distance.margin(neg_margin, mat[a2, n]))
    ps, pc = _grouped(pos, a1, mat.shape[0], bands[0])
    ns, nc = _grouped(neg, a2, mat.shape[0], bands[1])
    return torch.cat([ps, ns]), torch.cat([pc, nc])


def triplet_margin_loss_row_stats(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                                  distance: Distance, triplets=None, bands=((None, None),), anchor_chunk=None):
    """Per anchor: Σ and band Σ / counts of relu(margin(D_ap, D_an) + m) (softplus if smooth_loss; swap as the
    loss) over its triplets: all valid ones (in anchor chunks), the batch-hard ones, or the given ones."""
    band = bands[0]
    mat = pairwise_similarity(x, ref, distance=distance)
    n_rows, m = mat.shape
    ref_mat = (mat if ref is None else pairwise_similarity(ref, ref, distance=distance)) if swap else None

    def element(ap, an, pn=None):
        return triplet_violation(ap, an, pn, margin=margin, smooth_loss=smooth_loss, distance=distance)

    if triplets is not None or mining == "batch_hard":
        if triplets is not None:
            a, p, n = (t.to(x.device) for t in triplets)
        else:
            pos, neg = pair_masks(labels, ref_labels)
            hard_pos, hard_neg = batch_hard_indices(mat.detach(), pos, neg, distance)
            a = torch.where(hard_pos >= 0)[0]
            p, n = hard_pos[a], hard_neg[a]
        losses = element(mat[a, p], mat[a, n], ref_mat[p, n] if swap else None)
        return _grouped(losses, a, n_rows, band)
    pos, neg = pair_masks(labels, ref_labels)
    chunk = anchor_chunk or max(1, (1 << 24) // max(1, m * m))
    sums, counts = [], []
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        losses = element(mat[rows].unsqueeze(2), mat[rows].unsqueeze(1), ref_mat.unsqueeze(0) if swap else None)
        valid = pos[rows].unsqueeze(2) & neg[rows].unsqueeze(1)
        banded = valid & in_band(losses, band)
        sums.append(torch.stack([losses.where(valid, 0).sum((1, 2)), losses.where(banded, 0).sum((1, 2))]))
        counts.append(torch.stack([valid.sum((1, 2)), banded.sum((1, 2))]))
    if not sums:
        return mat.new_zeros(2, 0), torch.zeros(2, 0, dtype=torch.long, device=x.device)
    return torch.cat(sums, 1), torch.cat(counts, 1)


__all__ = ["contrastive_loss_row_stats", "triplet_margin_loss_row_stats"]
