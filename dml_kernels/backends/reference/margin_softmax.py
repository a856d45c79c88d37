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
from .similarity import pairwise_similarity


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


LOSSES = ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss", "sphereface_loss",
          "subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss"]
__all__ = LOSSES + [f"{name}_elements" for name in LOSSES]
