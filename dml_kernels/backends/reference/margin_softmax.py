"""Reference margin-softmax losses (PML 2.9 semantics, float64-capable): embeddings N×D against a class weight
``W`` of PML's layout, D×C (column c is class c).

Each ``<loss>`` op is the mean over the rows of ``<loss>_elements``' per-row losses (PML's MeanReducer over
``element`` losses); the per-row loss is CE(logits_i, y_i)·w_i with w_i PML's miner weight (1 without a
miner). The logits are formed here as PML forms them (a B×C matrix: this is the oracle); the fused backends
never form them (``backends/cpp/margin_softmax.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...distances import Distance
from .similarity import masked_logsumexp, pairwise_similarity


def _cosine(x, W):
    """PML's CosineSimilarity(x, Wᵀ): rows of x and columns of W L2-normalised (eps 1e-12), N×C."""
    return F.normalize(x, p=2, dim=1) @ F.normalize(W.to(x.dtype).t(), p=2, dim=1).t()


def arcface_target(t, margin):
    """PML's ArcFace target logit (before the scale): cos(θ+m) if θ ≤ π − m else cos θ − m·sin m,
    θ = acos(clamp(t, −1, 1)) (the gradient is infinite at |t| = 1, as PML's)."""
    angles = torch.acos(torch.clamp(t, -1, 1))
    return torch.where(angles <= math.pi - margin, torch.cos(angles + margin),
                       torch.cos(angles) - margin * math.sin(margin))


def cosface_target(t, margin):
    return t - margin


def large_margin_target(t, margin):
    """ψ(θ) = (−1)^k cos(mθ) − 2k, cos(mθ) = Σ_n (−1)^n C(m, 2n) t^{m−2n} (1 − t²)^n (the multiple-angle
    polynomial, differentiable in t) and k = floor(θ / (π/m)) under no_grad (PML's k-sign trick)."""
    m = int(margin)
    cos_m = sum(((-1) ** n) * math.comb(m, 2 * n) * t ** (m - 2 * n) * (1 - t ** 2) ** n for n in range(m // 2 + 1))
    with torch.no_grad():
        k = (torch.acos(torch.clamp(t, -1, 1)) / (math.pi / m)).floor()
    return ((-1) ** k) * cos_m - 2 * k


def _with_target(logits, labels, new_target):
    """logits with column y_i of row i replaced by new_target_i (PML's cos + onehot·(ψ − t))."""
    onehot = torch.zeros_like(logits).scatter_(1, labels.unsqueeze(1), 1)
    t = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    return logits + onehot * (new_target - t).unsqueeze(1)


def _rows(logits, labels, weights):
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses if weights is None else losses * weights.to(losses.dtype)


def _entry(losses, x):
    return {"loss": {"losses": losses, "indices": torch.arange(x.shape[0], device=x.device),
                     "reduction_type": "element"}}


# ------------------------------------------------------------------------------------------ logits (N×C)


def normalized_softmax_logits(x, W, *, temperature, distance: Distance):
    """PML: Ŵ = W with unit columns; distance(x, Ŵᵀ) / T, negated for a (non-inverted) distance."""
    w_hat = F.normalize(W.to(x.dtype), p=2, dim=0)
    mat = pairwise_similarity(x, w_hat.t(), distance=distance) / temperature
    return mat if distance.is_similarity else -mat


def margin_logits(kind, x, labels, W, *, margin, scale):
    """The logits of CosFace / ArcFace / LargeMarginSoftmax / SphereFace as PML forms them (labels=None: no
    margin, PML's ``get_logits``)."""
    cos = _cosine(x, W)
    if labels is not None:
        t = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
        target = {"cosface": cosface_target, "arcface": arcface_target,
                  "large_margin": large_margin_target, "sphereface": large_margin_target}[kind](t, margin)
        cos = _with_target(cos, labels, target)
    if kind == "large_margin":
        return cos * (torch.norm(W.to(x.dtype), p=2, dim=0).unsqueeze(0) * torch.norm(x, p=2, dim=1).unsqueeze(1)) * scale
    if kind == "sphereface":
        return cos * torch.norm(x, p=2, dim=1).unsqueeze(1) * scale
    return cos * scale


# ------------------------------------------------------------------------------------------ loss dicts


def normalized_softmax_loss_elements(x, labels, W, *, temperature, distance: Distance, weights=None):
    logits = normalized_softmax_logits(x, W, temperature=temperature, distance=distance)
    return _entry(_rows(logits, labels, weights), x)


def cosface_loss_elements(x, labels, W, *, margin, scale, weights=None):
    return _entry(_rows(margin_logits("cosface", x, labels, W, margin=margin, scale=scale), labels, weights), x)


def arcface_loss_elements(x, labels, W, *, margin, scale, weights=None):
    """``margin`` in radians (the module converts PML's degrees)."""
    return _entry(_rows(margin_logits("arcface", x, labels, W, margin=margin, scale=scale), labels, weights), x)


def large_margin_softmax_loss_elements(x, labels, W, *, margin, scale, weights=None):
    """``margin``: PML's integer m."""
    return _entry(_rows(margin_logits("large_margin", x, labels, W, margin=margin, scale=scale), labels,
                        weights), x)


def sphereface_loss_elements(x, labels, W, *, margin, scale, weights=None):
    return _entry(_rows(margin_logits("sphereface", x, labels, W, margin=margin, scale=scale), labels,
                        weights), x)


# ------------------------------------------------------------------------------------------ losses (mean)


def normalized_softmax_loss(x, labels, W, **kw):
    return normalized_softmax_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


def cosface_loss(x, labels, W, **kw):
    return cosface_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


def arcface_loss(x, labels, W, **kw):
    return arcface_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


def large_margin_softmax_loss(x, labels, W, **kw):
    return large_margin_softmax_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


def sphereface_loss(x, labels, W, **kw):
    return sphereface_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


# ------------------------------------------------------------------ grouped columns and P2SGrad (reference only)


def subcenter_cosine(x, W, sub_centers):
    """PML's SubCenterArcFace cosine: max over the K sub-centres (columns c·K + k) of x̂·ŵ, N×C."""
    cos = _cosine(x, W)
    return cos.view(x.shape[0], -1, sub_centers).max(dim=2)[0]


def subcenter_arcface_loss_elements(x, labels, W, *, margin, scale, sub_centers, weights=None):
    """ArcFace (``margin`` in radians) on the max-pooled sub-centre cosine; W is D×(C·K)."""
    cos = subcenter_cosine(x, W, sub_centers)
    t = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
    logits = _with_target(cos, labels, arcface_target(t, margin)) * scale
    return _entry(_rows(logits, labels, weights), x)


def soft_triple_logits(x, fc, *, centers_per_class, gamma, distance: Distance):
    """PML's SoftTriple relaxed class similarity: S = distance(x, fcᵀ) viewed (N, C, K); Σ_k softmax_k(S/γ)·S.
    ``gamma`` is PML's argument (PML stores 1/gamma)."""
    sim = pairwise_similarity(x, fc.to(x.dtype).t(), distance=distance).view(x.shape[0], -1, centers_per_class)
    prob = F.softmax(sim * (1.0 / gamma), dim=2)
    return torch.sum(prob * sim, dim=2)


def soft_triple_loss_elements(x, labels, fc, *, centers_per_class, la, gamma, margin, distance: Distance,
                              weights=None):
    """CE(la·(S_c − margin·onehot), y) per row; fc is D×(C·K), column c·K + k."""
    sim = soft_triple_logits(x, fc, centers_per_class=centers_per_class, gamma=gamma, distance=distance)
    m = torch.zeros_like(sim).scatter_(1, labels.unsqueeze(1), margin)
    return _entry(_rows(la * (sim - m), labels, weights), x)


def p2sgrad_loss_elements(x, labels, weight):
    """PML's P2SGrad: MSE between clamp((x·W)/‖x‖, −1, 1) and the one-hot labels, the mean over all N·C
    entries (``already_reduced``). ``weight`` (D×C) is used as given (the module re-normalises its columns)."""
    w = weight.to(x.dtype)
    cos = (x.mm(w) / x.pow(2).sum(1).pow(0.5).view(-1, 1)).clamp(-1, 1)
    onehot = torch.zeros_like(cos).scatter_(1, labels.view(-1, 1), 1)
    return {"loss": {"losses": F.mse_loss(cos, onehot), "indices": None, "reduction_type": "already_reduced"}}


def subcenter_arcface_loss(x, labels, W, **kw):
    return subcenter_arcface_loss_elements(x, labels, W, **kw)["loss"]["losses"].mean()


def soft_triple_loss(x, labels, fc, **kw):
    return soft_triple_loss_elements(x, labels, fc, **kw)["loss"]["losses"].mean()


def p2sgrad_loss(x, labels, weight):
    return p2sgrad_loss_elements(x, labels, weight)["loss"]["losses"]


# ----------------------------------------------------------------- statistics of one class shard (distributed)


def _shard_class_values(loss, x, W, p):
    """(N×C logits of the shard's classes as ``loss`` forms its non-target logits, the N×C values its target
    transform takes: the cosine, the similarity, or SoftTriple's relaxed similarity)."""
    if loss == "normalized_softmax_loss":
        logits = normalized_softmax_logits(x, W, temperature=p["temperature"], distance=p["distance"])
        return logits, logits
    if loss == "soft_triple_loss":
        sim = soft_triple_logits(x, W, centers_per_class=p["centers_per_class"], gamma=p["gamma"],
                                 distance=p["distance"])
        return p["la"] * sim, sim
    if loss == "subcenter_arcface_loss":
        cos = subcenter_cosine(x, W, p["sub_centers"])
        return cos * p["scale"], cos
    return margin_logits(_KINDS[loss], x, None, W, margin=p["margin"], scale=p["scale"]), _cosine(x, W)


_KINDS = {"cosface_loss": "cosface", "arcface_loss": "arcface", "large_margin_softmax_loss": "large_margin",
          "sphereface_loss": "sphereface"}
ROW_STATS_LOSSES = ("normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
                    "sphereface_loss", "subcenter_arcface_loss", "soft_triple_loss")


def margin_target_logit(loss, t, x, w_norm, p):
    """The target logit of ``loss`` from the target's raw value ``t`` (N,) — PML's margin transform and scale.
    ``w_norm``: the target column norms (LargeMarginSoftmax only)."""
    if loss == "normalized_softmax_loss":
        return t
    if loss == "soft_triple_loss":
        return p["la"] * (t - p["margin"])
    if loss == "cosface_loss":
        return p["scale"] * cosface_target(t, p["margin"])
    if loss in ("arcface_loss", "subcenter_arcface_loss"):
        return p["scale"] * arcface_target(t, p["margin"])
    psi = large_margin_target(t, p["margin"]) * torch.linalg.vector_norm(x, dim=1) * p["scale"]
    return psi * w_norm if loss == "large_margin_softmax_loss" else psi


def margin_softmax_row_stats(x, labels, W, *, loss, columns=None, **params):
    """Per row, over the classes of ``W`` (a shard, D×(C·K); labels outside [0, C) have no target here;
    ``columns``: None or a bool (C,) of the classes taking part, as targets too): (the target logit with ``loss``'s margin, or 0;
    has_target; the LSE of the other taking-part classes' logits, or 0; has_rest). ``params``: the keyword
    arguments of the loss op ``loss`` (without ``weights``)."""
    if loss not in ROW_STATS_LOSSES:
        raise ValueError(f"margin_softmax_row_stats: unknown loss {loss!r}; one of {ROW_STATS_LOSSES}")
    if W.shape[1] == 0:  # an empty shard (C < world size): nothing here, still graph-attached
        z = (x * 0).sum(1) + (W * 0).sum()
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return z, none, z, none
    logits, raw = _shard_class_values(loss, x, W, params)
    is_target = torch.arange(logits.shape[1], device=x.device).unsqueeze(0) == labels.unsqueeze(1)
    if columns is not None:  # a class outside the columns takes no part, as a target either
        is_target = is_target & columns.unsqueeze(0)
    has_target = is_target.any(1)
    index = torch.where(has_target, labels, 0)
    # rows without a target here take t = 0 (a finite margin gradient), then are zeroed
    t = torch.where(has_target, raw.gather(1, index.unsqueeze(1)).squeeze(1), 0)
    w_norm = torch.linalg.vector_norm(W.to(x.dtype), dim=0)[index] if loss == "large_margin_softmax_loss" else None
    target = torch.where(has_target, margin_target_logit(loss, t, x, w_norm, params), 0)
    rest_mask = ~is_target if columns is None else ~is_target & columns.unsqueeze(0)
    return target, has_target, masked_logsumexp(logits, rest_mask), rest_mask.any(1)


LOSSES = ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss", "sphereface_loss",
          "subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss"]
__all__ = LOSSES + [f"{name}_elements" for name in LOSSES] + ["margin_softmax_row_stats"]
