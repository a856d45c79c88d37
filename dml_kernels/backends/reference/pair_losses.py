"""Reference pair losses with PML 2.9 semantics: plain PyTorch, float64-capable, written for clarity.

Canonical arguments shared with every backend (``dml_kernels/_ops.py`` lists them):
``ref is None`` means self mode — references are the queries and the (i, i) pair is excluded;
``pairs`` is an explicit pair set (a PackedPairMask for matrix-based losses, a PML 4-tuple for
pair-based ones); ``pair_rule`` applies PML's "at most one positive and one negative pair → 0" on
the pairs actually used (the functional layer decides it on the host when a tuple was given).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance
from .mining import batch_hard_indices, multi_similarity_select
from .similarity import masked_log1p_sum_exp, masked_logsumexp, pair_masks, pairwise_similarity


def _masks(labels, ref_labels, pairs, n, m, device):
    if pairs is None:
        return pair_masks(labels, ref_labels)
    pos, neg = pairs.to_dense()
    return pos.to(device), neg.to(device)


def _few_pairs(pos, neg):
    """PML's GenericPairLoss rule as a device tensor: True iff ≤1 positive and ≤1 negative pair."""
    return (pos.sum() <= 1) & (neg.sum() <= 1)


def _zero_if(cond, loss, x):
    """``loss`` or a graph-attached 0 (PML's ``sum(embeddings * 0)``), chosen on the device."""
    return torch.where(cond, (x * 0).sum().to(loss.dtype), loss)


def multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, epsilon=None,
                          distance: Distance, pairs=None, pair_rule=True):
    """(1/N) Σ_i [(1/α) log(1+Σ_{P_i} e^{α·margin(S,λ)}) + (1/β) log(1+Σ_{N_i} e^{β·margin(λ,S)})].

    With ``epsilon``, the pairs are first mined by PML's MultiSimilarityMiner rule (gradient does not
    flow through the selection).
    """
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    if epsilon is not None:
        pos, neg = multi_similarity_select(mat.detach(), pos, neg, epsilon, distance)
    pos_term = masked_log1p_sum_exp(alpha * distance.margin(mat, base), pos) / alpha
    neg_term = masked_log1p_sum_exp(beta * distance.margin(base, mat), neg) / beta
    loss = (pos_term + neg_term).mean()
    return _zero_if(_few_pairs(pos, neg), loss, x) if pair_rule else loss


def generalized_lifted_structure_loss(x, labels, ref, ref_labels, *, neg_margin, pos_margin,
                                      distance: Distance, pairs=None, pair_rule=True):
    """(1/N) Σ_i relu(LSE_{P_i}(margin(D, m_p)) + LSE_{N_i}(margin(m_n, D))), empty LSE = 0."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    per_row = masked_logsumexp(distance.margin(mat, pos_margin), pos) + masked_logsumexp(
        distance.margin(neg_margin, mat), neg)
    loss = F.relu(per_row).mean()
    return _zero_if(_few_pairs(pos, neg), loss, x) if pair_rule else loss


def _pair_lists(labels, ref_labels, pairs, device):
    """Positive and negative pair index lists (a1, p, a2, n); duplicates in a given tuple are kept."""
    if pairs is not None:
        return tuple(t.to(device) for t in pairs)
    pos, neg = pair_masks(labels, ref_labels)
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return a1, p, a2, n


def lifted_structure_loss(x, labels, *, neg_margin, pos_margin, distance: Distance, pairs=None, pair_rule=True,
                          ref=None, ref_labels=None):
    """Mean over ordered positive pairs (i,j) of ½ relu(log(Σ_{N_i} e^{v} + Σ_{N_j} e^{v}) + margin(D_ij, m_p))²,
    v = margin(m_n, D); the log term is 0 when both negative sets are empty. With ``ref``, j is a reference
    index and N_j the negative pairs of *query* j (PML compares the reference index with query anchors): none
    when j ≥ N.
    """
    per_pair, a1, p, a2 = lifted_pair_losses(x, labels, neg_margin=neg_margin, pos_margin=pos_margin,
                                             distance=distance, pairs=pairs, ref=ref, ref_labels=ref_labels)
    if len(a1) == 0 or len(a2) == 0 or (pair_rule and len(a1) <= 1 and len(a2) <= 1):
        return (x * 0).sum()
    return per_pair.mean()


def lifted_pair_losses(x, labels, *, neg_margin, pos_margin, distance: Distance, pairs=None, ref=None,
                       ref_labels=None):
    """(loss of every ordered positive pair, its anchors a1, its positives p, the negative pairs' anchors a2):
    the elements of :func:`lifted_structure_loss` (also the ``pos_pair`` entries of its loss dict)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels if ref is not None else None, pairs, x.device)
    count = torch.zeros_like(mat)  # multiplicity of each negative pair (PML counts duplicates)
    count.index_put_((a2, n), torch.ones_like(a2, dtype=mat.dtype), accumulate=True)
    has_neg = count > 0
    v = distance.margin(neg_margin, mat) + count.where(has_neg, 1).log()
    row_lse = masked_logsumexp(v, has_neg)  # A_i (0 if no negatives; masked in the pair term)
    per_pair = F.relu(lifted_pair_term(row_lse, has_neg.any(1), a1, p) + distance.margin(mat[a1, p], pos_margin))
    return per_pair ** 2 / 2, a1, p, a2


def lifted_pair_term(row_lse, row_has, a1, p):
    """LSE over the union of the negative pairs anchored at query a1 and at query p = logaddexp(A_a1, A_p) —
    one set if p == a1; no second set where p is not a query index (p ≥ N, with a reference set)."""
    nq = row_lse.shape[0]
    pq = p.clamp(max=nq - 1)
    two = torch.stack([row_lse[a1], row_lse[pq]], 1)
    two_mask = torch.stack([row_has[a1], row_has[pq] & (p < nq) & (p != a1)], 1)
    return masked_logsumexp(two, two_mask)


def _avg_nonzero(losses, x):
    """PML's AvgNonZeroReducer: mean of the strictly positive entries, graph-attached 0 if none."""
    positive = losses > 0
    count = positive.sum()
    total = losses.where(positive, 0).sum()
    return torch.where(count > 0, total / count.clamp_min(1), (x * 0).sum().to(losses.dtype))


def contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance: Distance,
                     pairs=None, pair_rule=True):
    """AvgNonZero_{pos}[margin(D, m_p)]₊ + AvgNonZero_{neg}[margin(m_n, D)]₊ (not squared)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    pos_loss = _avg_nonzero(F.relu(distance.margin(mat[a1, p], pos_margin)), x)
    neg_loss = _avg_nonzero(F.relu(distance.margin(neg_margin, mat[a2, n])), x)
    loss = pos_loss + neg_loss
    if pair_rule and len(a1) <= 1 and len(a2) <= 1:
        return (x * 0).sum()
    return loss


def _unique_label_pairs(labels):
    """NPairs' pair choice without a host sync: per label with ≥2 samples, anchor = lowest index,
    positive = second-lowest. Returns (anchor mask (N,), positive mask (N,), same-label matrix)."""
    n = labels.shape[0]
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    earlier = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril(-1)  # j < i
    rank = (same & earlier).sum(1)  # how many same-label samples come before i
    later = (same & earlier.T).any(1)
    return (rank == 0) & later, rank == 1, same


def n_pairs_loss(x, labels, *, distance: Distance, pairs=None):
    """(1/K) Σ_t CE(s(a_t, p_·), t): K one-per-label pairs, s = similarity (negated distance)."""
    mat = pairwise_similarity(x, None, distance=distance)
    sim = mat if distance.is_similarity else -mat
    if pairs is not None:
        return _n_pairs_from_tuple(sim, labels, pairs, x)
    is_anchor, is_positive, same = _unique_label_pairs(labels)
    lse = masked_logsumexp(sim, is_positive.unsqueeze(0).expand_as(sim))
    target = (sim * (same & is_positive.unsqueeze(0))).sum(1)
    k = is_anchor.sum()
    total = ((lse - target) * is_anchor).sum()
    return torch.where(k > 0, total / k.clamp_min(1), (x * 0).sum())


def _n_pairs_from_tuple(sim, labels, pairs, x):
    a, p = pairs[0], pairs[1]
    if len(a) == 0:
        return (x * 0).sum()
    # np.unique(labels[a], return_index=True): first occurrence of each anchor label, sorted by label.
    anchor_labels = labels[a]
    order = torch.argsort(anchor_labels, stable=True)
    sorted_labels = anchor_labels[order]
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    keep = order[first]
    a, p = a[keep], p[keep]
    logits = sim[a][:, p]
    return F.cross_entropy(logits, torch.arange(len(a), device=logits.device))


def triplet_violation(ap, an, pn=None, *, margin, smooth_loss, distance: Distance):
    """PML's triplet element: relu (softplus if ``smooth_loss``) of margin(D_ap, D_an) + m, D_an replaced by the
    closer of D_an and D_pn when ``pn`` (swap) is given."""
    if pn is not None:
        an = torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)
    return (F.softplus if smooth_loss else F.relu)(distance.margin(ap, an) + margin)


def triplet_margin_loss(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                        distance: Distance, triplets=None, anchor_chunk=None):
    """AvgNonZero over triplets (a,p,n) of relu(margin(D_ap, D_an) + m) (softplus if smooth_loss).

    ``mining=None`` uses every valid triplet, in anchor chunks (never the whole N×M×M set);
    ``mining="batch_hard"`` uses one triplet per anchor (hardest positive, hardest negative).
    ``swap`` replaces D_an by the closer of D_an and D_pn (D_pn between reference rows).
    """
    mat = pairwise_similarity(x, ref, distance=distance)
    if swap:
        ref_mat = mat if ref is None else pairwise_similarity(ref, ref, distance=distance)

    def violation(ap, an, pn=None):
        return triplet_violation(ap, an, pn, margin=margin, smooth_loss=smooth_loss, distance=distance)

    if triplets is not None or mining == "batch_hard":
        if triplets is not None:
            a, p, n = (t.to(x.device) for t in triplets)
        else:
            pos, neg = pair_masks(labels, ref_labels)
            hard_pos, hard_neg = batch_hard_indices(mat.detach(), pos, neg, distance)
            a = torch.arange(mat.shape[0], device=x.device)
            valid = hard_pos >= 0
            a, p, n = a, hard_pos.clamp_min(0), hard_neg.clamp_min(0)
            losses = violation(mat[a, p], mat[a, n], ref_mat[p, n] if swap else None) * valid
            return _avg_nonzero(losses, x)
        if len(a) == 0:
            return (x * 0).sum()
        return _avg_nonzero(violation(mat[a, p], mat[a, n], ref_mat[p, n] if swap else None), x)

    pos, neg = pair_masks(labels, ref_labels)
    n_rows, m = mat.shape
    chunk = anchor_chunk or max(1, (1 << 24) // max(1, m * m))
    total = mat.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        ap = mat[rows].unsqueeze(2)  # (c, M, 1): positive k
        an = mat[rows].unsqueeze(1)  # (c, 1, M): negative l
        pn = ref_mat.unsqueeze(0) if swap else None
        losses = violation(ap, an, pn)
        valid = pos[rows].unsqueeze(2) & neg[rows].unsqueeze(1)
        counted = valid & (losses > 0)
        total = total + losses.where(counted, 0).sum()
        count = count + counted.sum()
    return torch.where(count > 0, total / count.clamp_min(1), (x * 0).sum().to(total.dtype))
