"""Direction regularisation (Mohan et al., CVPR 2020; the seed overview §6.2, eq. 31–35) on three losses.

Each function is its base loss (same arguments, defaults, distance, reducer) with the regulariser −γ·Cos of
difference vectors added where the seed puts it (``direction_gamma`` = γ, keyword-only and required here):

* :func:`direction_triplet_margin_loss` (eq. 33): per triplet h(margin(D_ap, D_an) + m − γ Cos(f_n − f_a,
  f_p − f_a)); all valid triplets or ``mining="batch_hard"`` (or an ``indices_tuple``, reference backend);
* :func:`direction_multi_similarity_loss` (eq. 34): the negative exponent β(S_an − λ − γ Cos(f_n − f_a,
  f_p* − f_a)), p* the anchor's hardest positive among the pairs used;
* :func:`direction_proxy_nca_loss` (eq. 35): each denominator term e^{σ s(a, p_c) − γ Cos(p_c − f_a,
  p_y − f_a)}, the numerator e^{σ s(a, p_y)}.

The vectors f are the ones the distance sees (L2-normalised by default). The seed writes eq. 33 with squared
euclidean distances: ``distance="squared_euclidean"`` is eq. 33 exactly; the default keeps the base loss's
distance (PML's euclidean), the form the "Moving in the Right Direction" reproduction (alpoler/mohan2020) uses.
γ = 0 gives the base loss's value. The modules route here only for ``direction_gamma != 0``.
"""
from __future__ import annotations

import math

from ..distances import parse_distance
from ._common import _loss, _matrix_pairs, _num_refs, _prepare, _triplet_list
from .class_losses import _miner_weights, _prepare_proxy


def _gamma(direction_gamma):
    try:
        gamma = float(direction_gamma)
    except (TypeError, ValueError):
        raise TypeError(f"direction_gamma must be a real number, got {type(direction_gamma).__name__}") from None
    if not math.isfinite(gamma):
        raise ValueError(f"direction_gamma must be finite, got {direction_gamma}")
    return gamma


def direction_triplet_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                                  direction_gamma, margin=0.05, swap=False, smooth_loss=False,
                                  triplets_per_anchor="all", mining=None, distance=None, normalize_embeddings=True,
                                  backend="auto", check_inputs=True, reducer=None, _extra=None):
    """TripletMarginLoss with the direction regulariser (eq. 33)."""
    gamma = _gamma(direction_gamma)
    if triplets_per_anchor != "all":
        raise NotImplementedError("triplets_per_anchor other than 'all' (random triplet sampling) is not "
                                  "implemented; use mining='batch_hard' or pass an indices_tuple")
    if mining not in (None, "batch_hard"):
        raise ValueError(f"mining must be None or 'batch_hard', got {mining!r}")
    if mining is not None and indices_tuple is not None:
        raise ValueError("pass either mining= or indices_tuple=, not both")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    triplets = _triplet_list(indices_tuple, embeddings.shape[0], _num_refs(embeddings, ref), embeddings.device,
                             check_inputs)
    return _loss("direction_triplet_margin_loss", backend, embeddings, labels, ref, ref_labels, margin=float(margin),
                 gamma=gamma, swap=bool(swap), smooth_loss=bool(smooth_loss), mining=mining, distance=dist,
                 triplets=triplets, reducer=reducer, extra=_extra)


def direction_multi_similarity_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                                    direction_gamma, alpha=2, beta=50, base=0.5, epsilon=None, distance=None,
                                    normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                                    _extra=None):
    """MultiSimilarityLoss with the direction regulariser on the negative term (eq. 34)."""
    gamma = _gamma(direction_gamma)
    if epsilon is not None and indices_tuple is not None:
        raise ValueError("pass either epsilon= (fused mining) or indices_tuple=, not both")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("direction_multi_similarity_loss", backend, embeddings, labels, ref, ref_labels, alpha=float(alpha),
                 beta=float(beta), base=float(base), gamma=gamma, epsilon=None if epsilon is None else float(epsilon),
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def direction_proxy_nca_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                             direction_gamma, softmax_scale=1, exclude_positive=False, distance=None,
                             normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                             _extra=None):
    """ProxyNCALoss with the direction regulariser on the denominator terms (eq. 35)."""
    gamma = _gamma(direction_gamma)
    labels = _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, "ProxyNCALoss")
    if exclude_positive and proxies.shape[0] < 2:
        raise ValueError("exclude_positive=True needs at least 2 classes")
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    weights = _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=True)
    return _loss("direction_proxy_nca_loss", backend, embeddings, labels, proxies, softmax_scale=float(softmax_scale),
                 gamma=gamma, exclude_positive=bool(exclude_positive), distance=dist, weights=weights,
                 reducer=reducer, extra=_extra)


__all__ = ["direction_triplet_margin_loss", "direction_multi_similarity_loss", "direction_proxy_nca_loss"]
