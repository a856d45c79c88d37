"""Reference contrastive-family losses with PML 2.9 semantics (NT-Xent, SupCon, NCA): plain PyTorch,
float64-capable, written for clarity. Canonical arguments as in ``dml_kernels/_ops.py``.

Each loss is the reduction of its ``<loss>_elements`` (PML's loss dict) under PML's default reducer, so
the two can never disagree. Logits are similarities (negated distances) divided by the temperature.
"""
from __future__ import annotations

import torch

from ...distances import Distance
from .pair_losses import _avg_nonzero, _masks, _pair_lists
from .similarity import masked_logsumexp, pair_masks, pairwise_similarity


def _zero_losses(*names):
    return {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"} for name in names}


def _logits(x, ref, distance, scale):
    mat = pairwise_similarity(x, ref, distance=distance)
    return (mat if distance.is_similarity else -mat) * scale


def ntxent_loss_elements(x, labels, ref, ref_labels, *, temperature, distance: Distance, pairs=None,
                         pair_rule=True):
    """Per positive pair (a, p): −log(e^{s_ap} / (e^{s_ap} + Σ_{negative pairs (a, n)} e^{s_an})), s = sim/τ
    (duplicated negative pairs count); 0 for a pair whose anchor has no negative pair (``pos_pair``)."""
    sim = _logits(x, ref, distance, 1.0 / temperature)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    if (pair_rule and len(a1) <= 1 and len(a2) <= 1) or len(a1) == 0 or len(a2) == 0:
        return _zero_losses("loss")
    count = torch.zeros_like(sim)  # multiplicity of each negative pair
    count.index_put_((a2, n), torch.ones_like(a2, dtype=sim.dtype), accumulate=True)
    has_neg = count > 0
    neg_lse = masked_logsumexp(sim + count.where(has_neg, 1).log(), has_neg)
    sp = sim[a1, p]
    both = torch.stack([sp, neg_lse[a1]], 1)
    mask = torch.stack([torch.ones_like(a1, dtype=torch.bool), has_neg.any(1)[a1]], 1)
    losses = masked_logsumexp(both, mask) - sp
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}


def ntxent_loss(x, labels, ref, ref_labels, *, temperature, distance: Distance, pairs=None, pair_rule=True):
    """MeanReducer over the positive pairs of ``ntxent_loss_elements``."""
    losses = ntxent_loss_elements(x, labels, ref, ref_labels, temperature=temperature, distance=distance,
                                  pairs=pairs, pair_rule=pair_rule)["loss"]["losses"]
    return (x * 0).sum() if isinstance(losses, int) else losses.mean()


def supcon_row_terms(sim, pos, neg):
    """Per row i: −(1/|P_i|) Σ_{P_i} (s_ij − LSE_{P_i ∪ N_i} s); 0 for a row with no positive."""
    denom = masked_logsumexp(sim, pos | neg)
    npos = pos.sum(1)
    total = (sim - denom.unsqueeze(1)).where(pos, 0).sum(1)
    return -total / npos.clamp_min(1).to(sim.dtype)


def supcon_loss_elements(x, labels, ref, ref_labels, *, temperature, distance: Distance, pairs=None,
                         pair_rule=True):
    """Per query row (``element``): −mean over its positives of log softmax over its positives and negatives."""
    sim = _logits(x, ref, distance, 1.0 / temperature)
    pos, neg = _masks(labels, ref_labels, pairs, *sim.shape, sim.device)
    if (pair_rule and int(pos.sum()) <= 1 and int(neg.sum()) <= 1) or not bool(pos.any()) or not bool(neg.any()):
        return _zero_losses("loss")
    losses = supcon_row_terms(sim, pos, neg)
    return {"loss": {"losses": losses, "indices": torch.arange(sim.shape[0], device=x.device),
                     "reduction_type": "element"}}


def supcon_loss(x, labels, ref, ref_labels, *, temperature, distance: Distance, pairs=None, pair_rule=True):
    """AvgNonZeroReducer over the rows of ``supcon_loss_elements``."""
    losses = supcon_loss_elements(x, labels, ref, ref_labels, temperature=temperature, distance=distance,
                                  pairs=pairs, pair_rule=pair_rule)["loss"]["losses"]
    return (x * 0).sum() if isinstance(losses, int) else _avg_nonzero(losses, x)


def nca_loss_elements(x, labels, ref, ref_labels, *, softmax_scale, distance: Distance, weights=None):
    """Per query row with a positive (``element``): w_i · (LSE_{all k} σ·s_ik − LSE_{P_i} σ·s_ik), i.e.
    −log Σ_{P_i} softmax_k(σ·s_ik) (the (i, i) pair excluded in self mode); no row → PML's zero loss."""
    if x.shape[0] <= 1:
        return _zero_losses("loss")
    sim = _logits(x, ref, distance, softmax_scale)
    pos, neg = pair_masks(labels, ref_labels)
    has_pos = pos.any(1)
    losses = masked_logsumexp(sim, pos | neg) - masked_logsumexp(sim, pos)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    rows = torch.where(has_pos)[0]
    if len(rows) == 0:
        return _zero_losses("loss")
    return {"loss": {"losses": losses[rows], "indices": rows, "reduction_type": "element"}}


def nca_loss(x, labels, ref, ref_labels, *, softmax_scale, distance: Distance, weights=None):
    """MeanReducer over the rows of ``nca_loss_elements`` (a graph-attached 0 when no row has a positive)."""
    losses = nca_loss_elements(x, labels, ref, ref_labels, softmax_scale=softmax_scale, distance=distance,
                               weights=weights)["loss"]["losses"]
    return (x * 0).sum() if isinstance(losses, int) else losses.mean()


__all__ = ["ntxent_loss", "ntxent_loss_elements", "supcon_loss", "supcon_loss_elements", "nca_loss",
           "nca_loss_elements"]
