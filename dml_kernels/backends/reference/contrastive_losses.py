"""Reference contrastive-family losses with PML 2.9 semantics (NT-Xent, SupCon, NCA): plain PyTorch,
float64-capable, written for clarity. Canonical arguments as in ``dml_kernels/_ops.py``.

Each loss is the reduction of its ``<loss>_elements`` (PML's loss dict) under PML's default reducer, so
the two can never disagree. Logits are similarities (negated distances) divided by the temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------ PML 2.9's other pair losses (reference)

def _neg_row_lse(sim, a2, n):
    """Per query row: LSE over its negative pairs of ``sim`` (duplicated pairs count), and whether it has one."""
    count = torch.zeros_like(sim)
    count.index_put_((a2, n), torch.ones_like(a2, dtype=sim.dtype), accumulate=True)
    has = count > 0
    return masked_logsumexp(sim + count.where(has, 1).log(), has), has.any(1)


def circle_loss_elements(x, labels, ref, ref_labels, *, m, gamma, distance: Distance, pairs=None, pair_rule=True):
    """Per row (``element``): softplus(LSE_{P_i}(−γ[1+m−s]₊(s−(1−m))) + LSE_{N_i}(γ[s+m]₊(s−m))), the
    weights [·]₊ detached; 0 for a row without a positive or a negative."""
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    if pair_rule and int(pos.sum()) <= 1 and int(neg.sum()) <= 1:
        return _zero_losses("loss")
    sd = mat.detach()
    lp = masked_logsumexp(-gamma * torch.relu(1 + m - sd) * (mat - (1 - m)), pos)
    ln = masked_logsumexp(gamma * torch.relu(sd + m) * (mat - m), neg)
    losses = torch.nn.functional.softplus(lp + ln) * (pos.any(1) & neg.any(1))
    return {"loss": {"losses": losses, "indices": torch.arange(mat.shape[0], device=x.device),
                     "reduction_type": "element"}}


def circle_loss(x, labels, ref, ref_labels, *, m, gamma, distance: Distance, pairs=None, pair_rule=True):
    losses = circle_loss_elements(x, labels, ref, ref_labels, m=m, gamma=gamma, distance=distance, pairs=pairs,
                                  pair_rule=pair_rule)["loss"]["losses"]
    return (x * 0).sum() if isinstance(losses, int) else _avg_nonzero(losses, x)


def tuplet_margin_loss_elements(x, labels, ref, ref_labels, *, margin, scale, distance: Distance, pairs=None,
                                pair_rule=True):
    """Per positive pair (a, p) (``pos_pair``): log(1 + Σ_{negative pairs (a, n)} e^{scale·(s_an − cos(acos s_ap
    − margin))}); margin in radians."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    if (pair_rule and len(a1) <= 1 and len(a2) <= 1) or len(a1) == 0 or len(a2) == 0:
        return _zero_losses("loss")
    neg_lse, has_neg = _neg_row_lse(scale * mat, a2, n)
    c = torch.cos(torch.acos(mat[a1, p]) - margin)
    losses = torch.where(has_neg[a1], torch.logaddexp(torch.zeros_like(c), neg_lse[a1] - scale * c), 0)
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}


def tuplet_margin_loss(x, labels, ref, ref_labels, *, margin, scale, distance: Distance, pairs=None,
                       pair_rule=True):
    losses = tuplet_margin_loss_elements(x, labels, ref, ref_labels, margin=margin, scale=scale, distance=distance,
                                         pairs=pairs, pair_rule=pair_rule)["loss"]["losses"]
    return (x * 0).sum() if isinstance(losses, int) else losses.mean()


def intra_pair_variance_loss_elements(x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance: Distance,
                                      pairs=None, pair_rule=True):
    """``pos_loss`` per positive pair: relu((1−ε⁺)·mean − s)² (similarity; s − (1+ε⁺)·mean for a distance);
    ``neg_loss`` per negative pair: relu(s − (1+ε⁻)·mean)² (distance: (1−ε⁻)·mean − s). Means not detached."""
    mat = pairwise_similarity(x, ref, distance=distance)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    if pair_rule and len(a1) <= 1 and len(a2) <= 1:
        return _zero_losses("pos_loss", "neg_loss")

    def var(v, eps, increase):
        mean = v.mean()
        return torch.relu((1 - eps) * mean - v if increase else v - (1 + eps) * mean) ** 2

    inv = distance.is_similarity
    pos = var(mat[a1, p], pos_eps, inv) if len(a1) > 0 else 0
    neg = var(mat[a2, n], neg_eps, not inv) if len(a2) > 0 else 0
    return {"pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"}}


def intra_pair_variance_loss(x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance: Distance, pairs=None,
                             pair_rule=True):
    d = intra_pair_variance_loss_elements(x, labels, ref, ref_labels, pos_eps=pos_eps, neg_eps=neg_eps,
                                          distance=distance, pairs=pairs, pair_rule=pair_rule)
    total = (x * 0).sum()
    for entry in d.values():
        if not isinstance(entry["losses"], int):
            total = total + entry["losses"].mean()
    return total


def snr_matrix(x, ref):
    """PML's SNRDistance: var(q_i − r_k) / var(q_i) (unbiased variances over the features)."""
    ref = x if ref is None else ref
    return torch.var(x.unsqueeze(1) - ref.unsqueeze(0), dim=2) / torch.var(x, dim=1).unsqueeze(1)


def snr_contrastive_loss_elements(x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize=True,
                                  pairs=None, pair_rule=True):
    """PML's ContrastiveLoss on the SNR distance (of the L2-normalised rows when ``normalize``): ``pos_loss``
    relu(d − m⁺), ``neg_loss`` relu(m⁻ − d) per pair."""
    if normalize:
        x, ref = F.normalize(x, dim=1), (None if ref is None else F.normalize(ref, dim=1))
    mat = snr_matrix(x, ref)
    a1, p, a2, n = _pair_lists(labels, ref_labels, pairs, x.device)
    if pair_rule and len(a1) <= 1 and len(a2) <= 1:
        return _zero_losses("pos_loss", "neg_loss")
    pos = torch.relu(mat[a1, p] - pos_margin) if len(a1) > 0 else 0
    neg = torch.relu(neg_margin - mat[a2, n]) if len(a2) > 0 else 0
    return {"pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"}}


def snr_contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize=True, pairs=None,
                         pair_rule=True):
    d = snr_contrastive_loss_elements(x, labels, ref, ref_labels, pos_margin=pos_margin, neg_margin=neg_margin,
                                      normalize=normalize, pairs=pairs, pair_rule=pair_rule)
    total = (x * 0).sum()
    for entry in d.values():
        if not isinstance(entry["losses"], int):
            total = total + _avg_nonzero(entry["losses"], x)
    return total


def threshold_consistent_margin_loss(x, labels, *, lambda_plus, lambda_minus, margin_plus, margin_minus,
                                     pairs=None):
    """λ⁺·mean_{P, s ≤ m⁺}(m⁺ − s) + λ⁻·mean_{N, s ≥ m⁻}(s − m⁻) (an empty mean is 0); cosine similarity."""
    a1, p, a2, n = _pair_lists(labels, None, pairs, x.device)
    pos_s = torch.nn.functional.cosine_similarity(x[a1], x[p])
    neg_s = torch.nn.functional.cosine_similarity(x[a2], x[n])
    total = (x * 0).sum()
    lo, hi = pos_s <= margin_plus, neg_s >= margin_minus
    if bool(lo.any()):
        total = total + lambda_plus * ((margin_plus - pos_s) * lo).sum() / lo.sum()
    if bool(hi.any()):
        total = total + lambda_minus * ((neg_s - margin_minus) * hi).sum() / hi.sum()
    return total


def threshold_consistent_margin_loss_elements(x, labels, **kwargs):
    loss = threshold_consistent_margin_loss(x, labels, **kwargs)
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


def margin_loss_elements(x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance: Distance,
                         triplets=None):
    """``margin_loss`` per triplet: relu(margin(d_ap, β) + m) + relu(margin(β, d_an) + m), divisor = the number
    of nonzero hinge terms; ``beta_reg_loss``: ν·β (learn_beta; per anchor with the divisor when β is per
    class); β = beta[labels[a]] when ``beta`` has one entry per class."""
    mat = pairwise_similarity(x, ref, distance=distance)
    if triplets is not None:
        a, p, n = (t.to(x.device) for t in triplets)
    else:
        pos, neg = pair_masks(labels, ref_labels)
        a, p, n = torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))
    if len(a) == 0:
        return _zero_losses("margin_loss", "beta_reg_loss")
    b = (beta if len(beta) == 1 else beta[labels[a]]).to(mat.dtype)
    pos_loss = torch.relu(distance.margin(mat[a, p], b) + margin)
    neg_loss = torch.relu(distance.margin(b, mat[a, n]) + margin)
    divisor = (pos_loss > 0).sum() + (neg_loss > 0).sum()
    out = {"margin_loss": {"losses": pos_loss + neg_loss, "indices": (a, p, n), "reduction_type": "triplet",
                           "divisor": divisor}}
    if not learn_beta:
        out.update(_zero_losses("beta_reg_loss"))
    elif len(beta) == 1:
        out["beta_reg_loss"] = {"losses": b * nu, "indices": None, "reduction_type": "already_reduced"}
    else:
        out["beta_reg_loss"] = {"losses": b * nu, "indices": a, "reduction_type": "element", "divisor": divisor}
    return out


def margin_loss(x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance: Distance, triplets=None):
    """PML's DivisorReducer over ``margin_loss_elements``: Σ losses / divisor (0 if the divisor is 0), plus the
    β regulariser."""
    d = margin_loss_elements(x, labels, ref, ref_labels, beta, margin=margin, nu=nu, learn_beta=learn_beta,
                             distance=distance, triplets=triplets)
    total = (x * 0).sum() + (beta * 0).sum().to(x.dtype)
    for entry in d.values():
        losses = entry["losses"]
        if isinstance(losses, int):
            continue
        if entry["reduction_type"] == "already_reduced":
            total = total + losses.reshape(())
        elif int(entry["divisor"]) != 0:
            total = total + losses.sum() / entry["divisor"]
    return total


__all__ = ["ntxent_loss", "ntxent_loss_elements", "supcon_loss", "supcon_loss_elements", "nca_loss",
           "nca_loss_elements", "circle_loss", "circle_loss_elements", "tuplet_margin_loss",
           "tuplet_margin_loss_elements", "intra_pair_variance_loss", "intra_pair_variance_loss_elements",
           "snr_contrastive_loss", "snr_contrastive_loss_elements", "threshold_consistent_margin_loss",
           "threshold_consistent_margin_loss_elements", "margin_loss", "margin_loss_elements"]
