"""Reference miners (PML 2.9): multi-similarity thresholds and pair mask, batch-hard, triplet-margin, pair-margin,
batch easy/hard, distance-weighted, angular, HDC, uniform-histogram and already-packaged triplets.

The miners added with PML's full miner set (``pair_margin_mining`` onwards) compute their matrix exactly as
PML's distance classes do (:func:`pml_matrix`: ``torch.cdist`` for the Lp distances, fp16 through
``F.pairwise_distance``), so their selections, ties and random draws are PML's bit for bit. Their
``distance`` is a :class:`Distance`, or — reference only — a distance object the engines cannot express
(``SNRDistance``, ``LpDistance(p=1)``, ...), called as is. The random miners draw from torch's global RNG
with the same calls, sizes, devices and order as PML, so under one ``torch.manual_seed`` they return
PML's indices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
    """PML's TripletMarginMiner → (a, p, n) index tensors (host sync; sizes depend on the data). The matrix is
    computed as PML computes it (:func:`pml_matrix`), so that exact ties at the margin fall the same way."""
    mat = pml_matrix(x, ref, distance)
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


# --------------------------------------------------------------------------------------------------
# PML 2.9's remaining miners


def pml_matrix(x, ref, distance):
    """The N×M matrix computed as PML's distance classes compute it (``ref=None``: the queries): each side
    ``F.normalize``d when the distance normalises; a similarity ``q @ rᵀ``; a distance ``torch.cdist`` (fp16:
    ``F.pairwise_distance`` of every row pair, eps 1e-6), squared for ``squared_euclidean``. A distance
    object (reference only) is called as is."""
    r = x if ref is None else ref
    if not isinstance(distance, Distance):
        return distance(x, r)
    if distance.normalize:
        x, r = F.normalize(x, p=2, dim=1), F.normalize(r, p=2, dim=1)
    if distance.is_similarity:
        return torch.matmul(x, r.transpose(-1, -2))
    if x.dtype == torch.float16:
        mat = F.pairwise_distance(x.unsqueeze(1), r.unsqueeze(0), 2)
    else:
        mat = torch.cdist(x, r, p=2)
    return mat ** 2 if distance.squared else mat


def _is_similarity(distance) -> bool:
    return distance.is_similarity if isinstance(distance, Distance) else bool(distance.is_inverted)


def _all_pairs(labels, ref_labels):
    """PML's ``get_all_pairs_indices``: (a1, p, a2, n), row-major; the diagonal is no pair in self mode."""
    pos, neg = pair_masks(labels, ref_labels)
    return (*torch.where(pos), *torch.where(neg))


@torch.no_grad()
def pair_margin_mining(x, labels, ref, ref_labels, *, pos_margin: float, neg_margin: float, distance):
    """PML's PairMarginMiner as a bit-packed mask: positives farther than ``pos_margin`` (similarity: less
    similar), negatives closer than ``neg_margin``; both strict. ``to_indices()`` gives PML's row-major tuple."""
    mat = pml_matrix(x, ref, distance)
    pos, neg = pair_masks(labels, ref_labels)
    if _is_similarity(distance):
        far, near = mat < pos_margin, mat > neg_margin
    else:
        far, near = mat > pos_margin, mat < neg_margin
    return PackedPairMask.from_dense(pos & far, neg & near)


def _row_pick(mat, allowed, largest: bool):
    """Per row: (the largest / smallest allowed value, its index), ties to the lowest index; (±inf, -1) for
    a row with nothing allowed."""
    score = mat.masked_fill(~allowed, float("-inf") if largest else float("inf"))
    best = score.amax(1) if largest else score.amin(1)
    idx = _first_arg(score, best.unsqueeze(1))
    return best, torch.where(allowed.any(1), idx, -1)


def _within(mat, allowed, value_range):
    if value_range is None:
        return allowed
    lo, hi = value_range
    return allowed & (mat >= lo) & (mat <= hi)


@torch.no_grad()
def batch_easy_hard_mining(x, labels, ref, ref_labels, *, pos_strategy: str, neg_strategy: str,
                           allowed_pos_range, allowed_neg_range, distance):
    """PML's BatchEasyHardMiner as a per-row selection: (positive index (N,), negative index (N,)), -1 for
    a row with no admissible pair; ``None`` for a side whose strategy is "all" (every pair of that kind).

    Per row: a "hard" / "semihard" positive is the farthest one (smallest similarity), an "easy" one the
    closest; a "hard" / "semihard" negative is the closest one, an "easy" one the farthest; only values in
    the allowed range [lo, hi] count. A semihard side is chosen after the other side and only among values
    strictly on the near side of the other side's pick: semihard positives strictly closer than the row's
    chosen negative, semihard negatives strictly farther than its chosen positive.
    """
    strategies = ("hard", "semihard", "easy", "all")
    if pos_strategy not in strategies or neg_strategy not in strategies:
        raise ValueError(f"pos_strategy and neg_strategy must be one of {strategies}, "
                         f"got {pos_strategy!r}, {neg_strategy!r}")
    if "semihard" in (pos_strategy, neg_strategy) and (pos_strategy == neg_strategy or "all" in (pos_strategy,
                                                                                               neg_strategy)):
        raise ValueError(f"pos_strategy={pos_strategy!r} with neg_strategy={neg_strategy!r} is not allowed")
    mat = pml_matrix(x, ref, distance)
    pos, neg = pair_masks(labels, ref_labels)
    sim = _is_similarity(distance)
    pos_ok, neg_ok = _within(mat, pos, allowed_pos_range), _within(mat, neg, allowed_neg_range)
    # "largest value" means closest for a similarity, farthest for a distance.
    pos_largest = sim if pos_strategy == "easy" else not sim
    neg_largest = not sim if neg_strategy == "easy" else sim

    def beyond(threshold, largest):  # strictly on the near side of the other pick, for the semihard side
        return mat < threshold.unsqueeze(1) if largest else mat > threshold.unsqueeze(1)

    pos_idx = neg_idx = None
    if pos_strategy == "semihard":
        neg_val, neg_idx = _row_pick(mat, neg_ok, neg_largest)
        _, pos_idx = _row_pick(mat, pos_ok & beyond(neg_val, pos_largest), pos_largest)
    elif neg_strategy == "semihard":
        pos_val, pos_idx = _row_pick(mat, pos_ok, pos_largest)
        _, neg_idx = _row_pick(mat, neg_ok & beyond(pos_val, neg_largest), neg_largest)
    else:
        if pos_strategy != "all":
            pos_idx = _row_pick(mat, pos_ok, pos_largest)[1]
        if neg_strategy != "all":
            neg_idx = _row_pick(mat, neg_ok, neg_largest)[1]
    return pos_idx, neg_idx


def _weighted_random_triplets(labels, ref_labels, weights):
    """Per label (ascending), per anchor, as many triplets as the label has references: a positive drawn
    uniformly with replacement (``torch.randint``, CPU generator) and a negative drawn from the anchor's
    row of ``weights`` (``torch.multinomial`` on the weights' device); anchors whose negative weights sum
    to zero (or NaN) are dropped. The calls, their sizes and their order are PML's
    ``get_random_triplet_indices``, so one seed gives PML's triplets. ``ref_labels=None``: self mode."""
    self_mode = ref_labels is None
    ref_labels = labels if self_mode else ref_labels
    parts = []
    for label in torch.unique(labels):
        refs_same = torch.where(ref_labels == label)[0]
        refs_other = torch.where(ref_labels != label)[0]
        anchors = refs_same if self_mode else torch.where(labels == label)[0]
        n_a, n_p = len(anchors), len(refs_same)
        if n_p < (2 if self_mode else 1) or len(refs_other) == 0:
            continue
        candidates = refs_same.expand(n_a, n_p)  # row j: the positives of anchor j
        if self_mode:
            candidates = candidates[~torch.eye(n_a, dtype=torch.bool)].view(n_a, n_a - 1)
        draws = n_a * n_p
        col = torch.randint(0, candidates.shape[1], (draws,))
        row = torch.arange(n_a).repeat_interleave(n_p)
        a, p = anchors[row], candidates[row, col]
        w = weights[:, refs_other][a]
        keep = torch.where(w.sum(1) > 0)[0]
        if len(keep) == 0:
            continue
        w, a, p = w[keep], a[keep], p[keep]
        if w.dtype == torch.float16:
            w = w.float()
        n = refs_other[torch.multinomial(w, 1, replacement=True).flatten()]
        parts.append((a, p, n))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(t).to(device=labels.device, dtype=torch.long) for t in zip(*parts))


@torch.no_grad()
def distance_weighted_mining(x, labels, ref, ref_labels, *, cutoff: float, nonzero_loss_cutoff: float):
    """PML's DistanceWeightedMiner (Wu et al. 2017) → (a, p, n), random (torch's global RNG, PML's draws).

    On normalised euclidean distances D clamped below at ``cutoff``, a negative's weight is the inverse of
    the density of distances on the unit sphere in d dimensions, q(D)⁻¹ ∝ D^(2−d) (1 − D²/4)^((3−d)/2),
    zero for same-label pairs and for D ≥ ``nonzero_loss_cutoff``; each row is normalised.
    """
    d = float(x.shape[1])
    mat = pml_matrix(x, ref, Distance("euclidean", True)).clamp(min=cutoff)
    log_w = (2.0 - d) * torch.log(mat) - ((d - 3) / 2) * torch.log(1.0 - 0.25 * (mat ** 2.0))
    bad = ~torch.isfinite(log_w)
    ref_labels_ = labels if ref_labels is None else ref_labels
    different = (labels.unsqueeze(1) != ref_labels_.unsqueeze(0)).to(log_w.dtype)
    log_w = log_w * different  # same-label entries: log-weight 0 (masked out below), as in PML
    if bool(bad.all()):  # PML fails here (max of an empty tensor); nothing can be drawn
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone(), empty.clone()
    w = torch.exp(log_w - log_w[~bad].max())
    w = w * different * (mat < nonzero_loss_cutoff).to(w.dtype)
    w[bad] = 0
    w = w / w.sum(1, keepdim=True)
    return _weighted_random_triplets(labels, ref_labels, w)


@torch.no_grad()
def angular_mining(x, labels, ref, ref_labels, *, angle: float):
    """PML's AngularMiner → (a, p, n): every triplet whose angle at the negative,
    atan(‖a − p‖ / (2‖n − c‖)) with c = (a + p)/2, exceeds ``angle`` (radians, strict). As in PML the
    norms are ``F.pairwise_distance`` (eps 1e-6) on the raw, unnormalised embeddings. Ordered by anchor,
    positive, negative; one anchor at a time (never an N×M×M tensor)."""
    r = x if ref is None else ref
    pos, neg = pair_masks(labels, ref_labels)
    parts = []
    for i in range(x.shape[0]):
        p_idx, n_idx = torch.where(pos[i])[0], torch.where(neg[i])[0]
        if len(p_idx) == 0 or len(n_idx) == 0:
            continue
        anchor, positives = x[i].expand(len(p_idx), -1), r[p_idx]
        centers = (anchor + positives) / 2
        ap = F.pairwise_distance(anchor, positives, 2)
        nc = F.pairwise_distance(r[n_idx].unsqueeze(0), centers.unsqueeze(1), 2)  # (positives, negatives)
        pi, ni = torch.where(torch.atan(ap.unsqueeze(1) / (2 * nc)) > angle)
        parts.append((torch.full_like(pi, i), p_idx[pi], n_idx[ni]))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(t) for t in zip(*parts))


@torch.no_grad()
def hdc_mining(x, labels, ref, ref_labels, *, filter_percentage: float, distance, pairs=None):
    """PML's HDCMiner → (a1, p, a2, n): of the given pairs (``pairs``, a 4-tuple; None: all pairs), the
    ceil(filter_percentage · count) hardest positives (largest distance / smallest similarity) and hardest
    negatives, chosen globally (not per anchor) with ``torch.topk``, hardest first."""
    mat = pml_matrix(x, ref, distance)
    a1, p, a2, n = _all_pairs(labels, ref_labels) if pairs is None else pairs
    sim = _is_similarity(distance)
    out = []
    for anchors, others, hardest_is_largest in ((a1, p, not sim), (a2, n, sim)):
        if len(anchors) > 0:
            k = int(math.ceil(filter_percentage * len(anchors)))
            idx = torch.topk(mat[anchors, others], k=k, largest=hardest_is_largest).indices
            anchors, others = anchors[idx], others[idx]
        out += [anchors, others]
    return tuple(out)


def _uniform_per_bin(values, num_bins: int, per_bin: int):
    """Positions into ``values``: ``per_bin`` draws with replacement from each non-empty bin of
    ``linspace(min, max, num_bins + 1)`` (bins [e_i, e_i+1), the last one closed), bin by bin; within a bin
    ``torch.multinomial`` over its members in ascending position order (PML's draws)."""
    edges = torch.linspace(values.min(), values.max(), steps=num_bins + 1, device=values.device,
                           dtype=values.dtype)
    picks = []
    for i in range(num_bins):  # one host sync per bin: the draw sizes depend on the data, as in PML
        upper = values <= edges[i + 1] if i == num_bins - 1 else values < edges[i + 1]
        members = torch.where((edges[i] <= values) & upper)[0]
        if len(members) == 0:
            continue
        ones = torch.ones(len(members), dtype=torch.float32, device=members.device)
        picks.append(members[torch.multinomial(ones, per_bin, replacement=True)])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=values.device)


@torch.no_grad()
def uniform_histogram_mining(x, labels, ref, ref_labels, *, num_bins: int, pos_per_bin: int, neg_per_bin: int,
                             distance):
    """PML's UniformHistogramMiner → (a1, p, a2, n), random: positives and negatives separately, the range
    of their values cut into ``num_bins`` equal bins and ``*_per_bin`` pairs drawn from each non-empty bin;
    an empty side is returned empty."""
    mat = pml_matrix(x, ref, distance)
    a1, p, a2, n = _all_pairs(labels, ref_labels)
    if len(a1) > 0:
        idx = _uniform_per_bin(mat[a1, p], num_bins, pos_per_bin)
        a1, p = a1[idx], p[idx]
    if len(a2) > 0:
        idx = _uniform_per_bin(mat[a2, n], num_bins, neg_per_bin)
        a2, n = a2[idx], n[idx]
    return a1, p, a2, n


@torch.no_grad()
def packaged_triplets_mining(x):
    """PML's EmbeddingsAlreadyPackagedAsTriplets → (a, p, n) = rows (0, 3, ...), (1, 4, ...), (2, 5, ...)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return rows[0::3], rows[1::3], rows[2::3]
