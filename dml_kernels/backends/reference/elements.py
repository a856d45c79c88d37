"""Reference loss *dicts*: each loss's PML 2.9 loss dict (its unreduced elements) for a non-default reducer.

``<loss>_elements`` takes exactly the canonical arguments of the op ``<loss>`` (``dml_kernels/_ops.py``)
and returns ``{sub_loss_name: {"losses", "indices", "reduction_type", ["divisor"]}}`` as PML's
``compute_loss`` does (regularizer entries are added by the caller); the reducer is applied by the
functional layer. Where PML returns its zero losses (≤1-pair rule, no pair, no triplet) the entries are
``{"losses": 0, "indices": None, "reduction_type": "already_reduced"}``. Element types:

* per-anchor ``element`` (indices: anchor rows): multi-similarity, generalized lifted, N-pairs, ProxyNCA;
* ``pos_pair``: lifted structure (ordered positive pairs); ``pos_pair`` + ``neg_pair``: contrastive;
* ``triplet``: triplet margin (every valid triplet in (a, p, n) order, the batch-hard ones, or the given ones);
* per-proxy ``element`` with a ``divisor``: Proxy Anchor.

The loss values equal the reference losses' (``pair_losses.py``, ``class_losses.py``), including their
deliberate differences from PML (ProxyNCA as a log-softmax keeps every row; triplet swap with ``ref_emb``).
Forming the elements syncs with the host (their number depends on the data); that is inherent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance
from .class_losses import proxy_logits
from .mining import batch_hard_indices, multi_similarity_select
from .pair_losses import _masks, _pair_lists, lifted_pair_losses, triplet_violation
from .similarity import masked_log1p_sum_exp, masked_logsumexp, pair_masks, pairwise_similarity


def zero_losses(*names):
    """PML's ``zero_losses()`` for the given sub-loss names."""
    return {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"} for name in names}


def _entry(losses, indices, reduction_type, **extra):
    return {"losses": losses, "indices": indices, "reduction_type": reduction_type, **extra}


def _rows(x, n):
    return torch.arange(n, device=x.device)


def _few(pos_count, neg_count):
    return int(pos_count) <= 1 and int(neg_count) <= 1


def multi_similarity_loss_elements(x, labels, ref, ref_labels, *, alpha, beta, base, epsilon=None,
                                   distance: Distance, pairs=None, pair_rule=True):
    """Per query row i: (1/α) log(1+Σ_{P_i} e^{α·margin(S,λ)}) + (1/β) log(1+Σ_{N_i} e^{β·margin(λ,S)})."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    if epsilon is not None:
        pos, neg = multi_similarity_select(mat.detach(), pos, neg, epsilon, distance)
    if pair_rule and _few(pos.sum(), neg.sum()):
        return zero_losses("loss")
    losses = (masked_log1p_sum_exp(alpha * distance.margin(mat, base), pos) / alpha
              + masked_log1p_sum_exp(beta * distance.margin(base, mat), neg) / beta)
    return {"loss": _entry(losses, _rows(x, mat.shape[0]), "element")}


def generalized_lifted_structure_loss_elements(x, labels, ref, ref_labels, *, neg_margin, pos_margin,
                                               distance: Distance, pairs=None, pair_rule=True):
    """Per query row i: relu(LSE_{P_i}(margin(D, m_p)) + LSE_{N_i}(margin(m_n, D))), empty LSE = 0."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    if pair_rule and _few(pos.sum(), neg.sum()):
        return zero_losses("loss")
    losses = F.relu(masked_logsumexp(distance.margin(mat, pos_margin), pos)
                    + masked_logsumexp(distance.margin(neg_margin, mat), neg))
    return {"loss": _entry(losses, _rows(x, mat.shape[0]), "element")}


def lifted_structure_loss_elements(x, labels, *, neg_margin, pos_margin, distance: Distance, pairs=None,
                                   pair_rule=True, ref=None, ref_labels=None):
    """Per ordered positive pair (i, j): ½ relu(LSE over the negative pairs anchored at i or j of
    margin(m_n, D) + margin(D_ij, m_p))² (duplicated negative pairs count), as ``pos_pair`` elements; j is a
    reference index with ``ref`` (see ``pair_losses.lifted_structure_loss``)."""
    losses, a1, p, a2 = lifted_pair_losses(x, labels, neg_margin=neg_margin, pos_margin=pos_margin,
                                           distance=distance, pairs=pairs, ref=ref, ref_labels=ref_labels)
    if (pair_rule and _few(len(a1), len(a2))) or len(a1) == 0 or len(a2) == 0:
        return zero_losses("loss")
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def contrastive_loss_elements(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance: Distance,
                              pairs=None, pair_rule=True):
    """``pos_loss``: relu(margin(D, m_p)) per positive pair; ``neg_loss``: relu(margin(m_n, D)) per negative
    pair (the zero loss 0 for an empty set, as PML)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    if pair_rule and _few(len(a1), len(a2)):
        return zero_losses("pos_loss", "neg_loss")
    pos_losses = F.relu(distance.margin(mat[a1, p], pos_margin)) if len(a1) > 0 else 0
    neg_losses = F.relu(distance.margin(neg_margin, mat[a2, n])) if len(a2) > 0 else 0
    return {"pos_loss": _entry(pos_losses, (a1, p), "pos_pair"),
            "neg_loss": _entry(neg_losses, (a2, n), "neg_pair")}


def _first_pair_per_label(a, p, labels):
    """``np.unique(labels[a], return_index=True)``: the first pair of each anchor label, sorted by label."""
    anchor_labels = labels[a]
    order = torch.argsort(anchor_labels, stable=True)
    sorted_labels = anchor_labels[order]
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    keep = order[first]
    return a[keep], p[keep]


def n_pairs_loss_elements(x, labels, *, distance: Distance, pairs=None):
    """Per label with a pair (sorted by label): CE of the anchor's row of s(anchors, positives) at its own
    positive; ``element`` losses indexed by the anchor rows."""
    if pairs is not None:
        a, p = (t.to(x.device) for t in pairs[:2])
    else:
        a, p = torch.where(pair_masks(labels, None)[0])
    if len(a) == 0:
        return zero_losses("loss")
    a, p = _first_pair_per_label(a, p, labels)
    mat = pairwise_similarity(x, None, distance=distance)
    sim = mat if distance.is_similarity else -mat
    logits = sim[a][:, p]
    losses = F.cross_entropy(logits, torch.arange(len(a), device=x.device), reduction="none")
    return {"loss": _entry(losses, a, "element")}


def triplet_margin_loss_elements(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False,
                                 mining=None, distance: Distance, triplets=None):
    """Per triplet (a, p, n): relu(margin(D_ap, D_an) + m) (softplus if smooth_loss; with swap, D_an → the
    closer of D_an and D_pn, D_pn between reference rows)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    if triplets is not None:
        a, p, n = (t.to(x.device) for t in triplets)
    else:
        pos, neg = pair_masks(labels, ref_labels)
        if mining == "batch_hard":
            hard_pos, hard_neg = batch_hard_indices(mat.detach(), pos, neg, distance)
            a = torch.where(hard_pos >= 0)[0]
            p, n = hard_pos[a], hard_neg[a]
        else:
            a, p, n = torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))  # PML's order: a, then p, then n
    if len(a) == 0:
        return zero_losses("loss")
    pn = None
    if swap:
        ref_mat = mat if ref is None else pairwise_similarity(ref, ref, distance=distance)
        pn = ref_mat[p, n]
    losses = triplet_violation(mat[a, p], mat[a, n], pn, margin=margin, smooth_loss=smooth_loss, distance=distance)
    return {"loss": _entry(losses, (a, p, n), "triplet")}


def proxy_nca_loss_elements(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance: Distance,
                            weights=None):
    """Per query row: w_i · −log softmax_c(σ·s(x_i, p_c))[y_i] (every row, computed as a log-softmax)."""
    logits = proxy_logits(x, proxies, scale=softmax_scale, distance=distance)
    target = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    if exclude_positive:
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
        logits = logits.masked_fill(is_target, float("-inf"))
    losses = torch.logsumexp(logits, dim=1) - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return {"loss": _entry(losses, _rows(x, x.shape[0]), "element")}


def proxy_anchor_loss_elements(x, labels, proxies, *, margin, alpha, distance: Distance, weights=None):
    """Per proxy c: ``pos_loss`` log(1+Σ_{y_i=c} e^{α·margin(s,δ)+w_i}) with divisor |C⁺| and ``neg_loss``
    log(1+Σ_{y_i≠c} e^{α·margin(−δ,s)+w_i}) with divisor C (``element`` losses indexed by proxy)."""
    num_classes = proxies.shape[0]
    mat = pairwise_similarity(x, proxies.to(x.dtype), distance=distance)
    offset = 0 if weights is None else (weights.to(mat.dtype) - 1).unsqueeze(1)
    pos = torch.zeros_like(mat, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    pos_term = masked_log1p_sum_exp(alpha * distance.margin(mat, margin) + offset, pos, dim=0)
    neg_term = masked_log1p_sum_exp(alpha * distance.margin(-margin, mat) + offset, ~pos, dim=0)
    indices = torch.arange(num_classes, device=x.device)
    return {"pos_loss": _entry(pos_term, indices, "element", divisor=int(pos.any(0).sum())),
            "neg_loss": _entry(neg_term, indices, "element", divisor=num_classes)}


__all__ = ["multi_similarity_loss_elements", "generalized_lifted_structure_loss_elements",
           "lifted_structure_loss_elements", "contrastive_loss_elements", "n_pairs_loss_elements",
           "triplet_margin_loss_elements", "proxy_nca_loss_elements", "proxy_anchor_loss_elements"]
