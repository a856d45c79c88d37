"""Reference miners: multi-similarity thresholds and pair mask, batch-hard, triplet-margin (PML 2.9)."""
from __future__ import annotations

import torch

from ...distances import Distance
from ..._pairs import PackedPairMask
from .similarity import pair_masks, pairwise_similarity


def hardest_pair_values(mat: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, distance: Distance):
    """Per row: the value of the hardest positive and of the hardest negative.

    Similarity: hardest positive = min over P_i (empty: +inf), hardest negative = max over N_i (empty: -inf).
    Distance:   hardest positive = max over P_i (empty: -inf), hardest negative = min over N_i (empty: +inf).
    """
    inf = float("inf")
    if distance.is_similarity:
        return mat.masked_fill(~pos, inf).amin(1), mat.masked_fill(~neg, -inf).amax(1)
    return mat.masked_fill(~pos, -inf).amax(1), mat.masked_fill(~neg, inf).amin(1)


def multi_similarity_select(mat, pos, neg, epsilon: float, distance: Distance):
    """PML's MultiSimilarityMiner rule on given masks → (kept positives, kept negatives), strict comparisons."""
    hardest_pos, hardest_neg = hardest_pair_values(mat, pos, neg, distance)
    if distance.is_similarity:
        keep_pos = mat - epsilon < hardest_neg.unsqueeze(1)
        keep_neg = mat + epsilon > hardest_pos.unsqueeze(1)
    else:
        keep_pos = mat + epsilon > hardest_neg.unsqueeze(1)
        keep_neg = mat - epsilon < hardest_pos.unsqueeze(1)
    return pos & keep_pos, neg & keep_neg


@torch.no_grad()
def multi_similarity_thresholds(x, labels, ref, ref_labels, *, distance: Distance):
    """(hardest positive value, hardest negative value) per query row, see :func:`hardest_pair_values`."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = pair_masks(labels, ref_labels)
    return hardest_pair_values(mat, pos, neg, distance)


@torch.no_grad()
def multi_similarity_mask(x, labels, ref, ref_labels, *, epsilon: float, distance: Distance) -> PackedPairMask:
    """The pairs PML's ``MultiSimilarityMiner(epsilon)`` keeps, as a bit-packed mask."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = pair_masks(labels, ref_labels)
    return PackedPairMask.from_dense(*multi_similarity_select(mat, pos, neg, epsilon, distance))


def batch_hard_indices(mat, pos, neg, distance: Distance):
    """Per row: index of the hardest positive and hardest negative; -1 for rows lacking either set.

    Ties go to the lowest index.
    """
    inf = float("inf")
    sign = -1.0 if distance.is_similarity else 1.0  # hardest positive = largest distance / smallest similarity
    pos_score = (sign * mat).masked_fill(~pos, -inf)
    neg_score = (sign * mat).masked_fill(~neg, inf)
    hard_pos = _first_arg(pos_score, pos_score.amax(1, keepdim=True))
    hard_neg = _first_arg(neg_score, neg_score.amin(1, keepdim=True))
    valid = pos.any(1) & neg.any(1)
    return torch.where(valid, hard_pos, -1), torch.where(valid, hard_neg, -1)


def _first_arg(scores, best):
    m = scores.shape[1]
    idx = torch.arange(m, device=scores.device).expand_as(scores)
    return torch.where(scores == best, idx, m).amin(1)


@torch.no_grad()
def batch_hard_mining(x, labels, ref, ref_labels, *, distance: Distance):
    """Device-side BatchHardMiner: (hardest positive index, hardest negative index) per row, -1 if none."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = pair_masks(labels, ref_labels)
    return batch_hard_indices(mat, pos, neg, distance)


@torch.no_grad()
def triplet_margin_mining(x, labels, ref, ref_labels, *, margin: float, type_of_triplets: str, distance: Distance):
    """PML's TripletMarginMiner → (a, p, n) index tensors (host sync; sizes depend on the data)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = pair_masks(labels, ref_labels)
    anchors, positives, negatives = [], [], []
    for i in range(mat.shape[0]):  # per anchor: never an N×M×M tensor
        p_idx, n_idx = torch.where(pos[i])[0], torch.where(neg[i])[0]
        ap, an = mat[i, p_idx].unsqueeze(1), mat[i, n_idx].unsqueeze(0)
        t = (ap - an) if distance.is_similarity else (an - ap)
        if type_of_triplets == "all":
            keep = t <= margin
        elif type_of_triplets == "hard":
            keep = (t <= margin) & (t <= 0)
        elif type_of_triplets == "semihard":
            keep = (t > 0) & (t <= margin)
        elif type_of_triplets == "easy":
            keep = t > margin
        else:
            raise ValueError(f"type_of_triplets must be 'all', 'hard', 'semihard' or 'easy', got {type_of_triplets!r}")
        pi, ni = torch.where(keep)
        anchors.append(torch.full_like(pi, i))
        positives.append(p_idx[pi])
        negatives.append(n_idx[ni])
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return cat(anchors), cat(positives), cat(negatives)
