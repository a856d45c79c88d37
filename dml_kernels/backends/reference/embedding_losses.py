"""Reference AngularLoss, InstanceLoss, ManifoldLoss and VICRegLoss with PML 2.9 semantics: plain PyTorch,
float64-capable, written for clarity. Canonical arguments as in ``dml_kernels/_ops.py``.

Each loss is the reduction of its ``<loss>_elements`` (PML's loss dict) under PML's default reducer, so the
two can never disagree. ``labels`` is None for the label-free losses (ManifoldLoss, VICRegLoss), as PML
hands its reducer None there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...distances import Distance
from .pair_losses import _pair_lists
from .similarity import masked_log1p_sum_exp, pairwise_similarity


def _zero_losses(*names):
    return {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"} for name in names}


def _mean_or_zero(losses, x):
    return (x * 0).sum() if isinstance(losses, int) else losses.mean()


# --------------------------------------------------------------------------------------------- AngularLoss

def angular_loss_elements(x, labels, ref, ref_labels, *, alpha, pairs=None):
    """Per positive pair (a, p) (``pos_pair``, 1-D): log(1 + Σ_{k: y_k ≠ y_a} e^{f_k}),
    f_k = 4t²(x̂_a + r̂_p)·r_k − 2(1 + t²) x̂_a·r̂_p, t = tan(alpha) (radians); r_k raw, as in PML."""
    a1, p, a2, _ = _pair_lists(labels, ref_labels, pairs, x.device)
    if len(a1) == 0 or len(a2) == 0:
        return _zero_losses("loss")
    r = x if ref is None else ref
    r_labels = labels if ref is None else ref_labels
    anchors, positives = F.normalize(x[a1], p=2, dim=1), F.normalize(r[p], p=2, dim=1)
    t2 = math.tan(alpha) ** 2
    ap = (anchors * positives).sum(1, keepdim=True)
    f = (4 * t2) * ((anchors + positives) @ r.T) - (2 * (1 + t2)) * ap
    negatives = labels[a1].unsqueeze(1) != r_labels.unsqueeze(0)
    losses = masked_log1p_sum_exp(f, negatives)
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}


def angular_loss(x, labels, ref, ref_labels, *, alpha, pairs=None):
    """MeanReducer over the positive pairs of ``angular_loss_elements``."""
    losses = angular_loss_elements(x, labels, ref, ref_labels, alpha=alpha, pairs=pairs)["loss"]["losses"]
    return _mean_or_zero(losses, x)


# -------------------------------------------------------------------------------------------- InstanceLoss

def label_ranks(labels):
    """Rank of each label among the sorted distinct labels (``torch.unique(return_inverse=True)`` without the
    host sync: a cumulative count of new values along the sorted labels)."""
    values, order = labels.sort()
    new = torch.ones_like(values, dtype=torch.long)
    new[1:] = (values[1:] != values[:-1]).long()
    ranks = torch.empty_like(labels)
    ranks[order] = new.cumsum(0) - 1
    return ranks


def instance_loss_elements(x, labels, *, gamma):
    """Per row (``element``): cross-entropy of γ·cos(x_i, x_j) over every j (diagonal included), target rank(y_i)."""
    logits = pairwise_similarity(x, None, distance=Distance("cosine", True)) * gamma
    losses = F.cross_entropy(logits, label_ranks(labels), reduction="none")
    return {"loss": {"losses": losses, "indices": torch.arange(x.shape[0], device=x.device),
                     "reduction_type": "element"}}


def instance_loss(x, labels, *, gamma):
    return instance_loss_elements(x, labels, gamma=gamma)["loss"]["losses"].mean()


# -------------------------------------------------------------------------------------------- ManifoldLoss

def _affinity(z, distance):
    if isinstance(distance, Distance):
        return pairwise_similarity(z, None, distance=distance)
    return distance(z, z)  # a distance object the engines do not express, called as PML calls it


def _hinge_log1p(v, own):
    """Per row: log(1 + Σ_k e^{v_k}) over the entries with v ≥ 0 that are not the row's own proxy ``own``."""
    keep = (v >= 0) & ~own
    return torch.log(1 + v.masked_fill(~keep, -math.inf).exp().sum(1))


def manifold_loss_elements(x, labels, proxies, meta_classes, *, lambdaC, alpha, margin, inverse_dtype=torch.float32,
                           distance):
    """One ``already_reduced`` value: mean intrinsic + λ_C · mean context loss (see ``manifold_loss`` in
    ``dml_kernels/functional/embedding_losses.py``); proxies promote with the embeddings as in ``torch.cat``."""
    n, k = x.shape[0], proxies.shape[0]
    z = torch.cat([x, proxies])
    s = torch.exp(_affinity(z, distance).clamp(0, math.inf) / 0.5)
    eye = torch.eye(n + k, dtype=torch.bool, device=z.device)
    s = s.masked_fill(eye, 0)
    d = s.sum(1).pow(-0.5)
    s_bar = d.unsqueeze(1) * s * d.unsqueeze(0)
    work = s_bar.dtype if inverse_dtype is None else inverse_dtype
    walk = torch.linalg.inv(eye.to(work) - alpha * s_bar.to(work)).to(s_bar.dtype) * (1 - alpha)
    rows = torch.arange(n, device=z.device)
    meta = meta_classes.to(z.device)
    own = torch.zeros(n, k, dtype=torch.bool, device=z.device)
    own[rows, meta] = True

    ctx_fe, ctx_fp = walk[:n], walk[n:]
    dots = ctx_fe @ ctx_fp.T
    norms = (ctx_fe.pow(2).sum(1).unsqueeze(1) * ctx_fp.pow(2).sum(1).unsqueeze(0)).clamp_min(1e-16).sqrt()
    cosines = dots / norms  # torch's cosine_similarity (eps 1e-8) of every (sample row, proxy row) of F
    context = _hinge_log1p(cosines - cosines[rows, meta].unsqueeze(1) + margin, own).mean()
    if math.isinf(lambdaC):
        loss = context
    else:
        f_int = walk[:n, n:]
        intrinsic = _hinge_log1p(f_int - f_int[rows, meta].unsqueeze(1) + margin, own).mean()
        loss = intrinsic + lambdaC * context
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


def manifold_loss(x, labels, proxies, meta_classes, *, lambdaC, alpha, margin, inverse_dtype=torch.float32,
                  distance):
    return manifold_loss_elements(x, labels, proxies, meta_classes, lambdaC=lambdaC, alpha=alpha, margin=margin,
                                  inverse_dtype=inverse_dtype, distance=distance)["loss"]["losses"]


# ---------------------------------------------------------------------------------------------- VICRegLoss

def _off_diagonal_square_sum(z):
    """Σ_{i≠j} C_ij² of the unbiased feature covariance C of z (N×D)."""
    centred = z - z.mean(0)
    cov = centred.T @ centred / (z.shape[0] - 1)
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    return cov.masked_fill(eye, 0).pow(2).sum()


def vicreg_loss_elements(x, labels, ref, *, invariance_lambda, variance_mu, covariance_v, eps):
    """PML's four entries: ``invariance_loss`` (per row, λ·mean_d (z − z')²), ``variance_loss1`` / ``2`` (per
    feature, μ·relu(1 − √(Var + ε))/2) and ``covariance_loss`` (already reduced)."""
    invariance = invariance_lambda * (x - ref).pow(2).mean(1)
    var1 = variance_mu * (F.relu(1 - torch.sqrt(x.var(0) + eps)) / 2)
    var2 = variance_mu * (F.relu(1 - torch.sqrt(ref.var(0) + eps)) / 2)
    dim = x.shape[1]
    covariance = covariance_v * (_off_diagonal_square_sum(x) / dim + _off_diagonal_square_sum(ref) / dim)
    features = torch.arange(dim, device=x.device)
    return {
        "invariance_loss": {"losses": invariance, "indices": torch.arange(x.shape[0], device=x.device),
                            "reduction_type": "element"},
        "variance_loss1": {"losses": var1, "indices": features, "reduction_type": "element"},
        "variance_loss2": {"losses": var2, "indices": features, "reduction_type": "element"},
        "covariance_loss": {"losses": covariance, "indices": None, "reduction_type": "already_reduced"},
    }


def vicreg_loss(x, labels, ref, *, invariance_lambda, variance_mu, covariance_v, eps):
    """The sum of the means of the three element entries plus the covariance (PML's MultipleReducers of
    MeanReducers)."""
    entries = vicreg_loss_elements(x, labels, ref, invariance_lambda=invariance_lambda, variance_mu=variance_mu,
                                   covariance_v=covariance_v, eps=eps)
    return sum(e["losses"].mean() if e["reduction_type"] == "element" else e["losses"] for e in entries.values())


__all__ = ["angular_loss", "angular_loss_elements", "instance_loss", "instance_loss_elements", "manifold_loss",
           "manifold_loss_elements", "vicreg_loss", "vicreg_loss_elements"]
