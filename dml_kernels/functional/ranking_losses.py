"""The ranking and histogram family (FastAP, Histogram, PNP, RankedList, DynamicSoftMargin, Smooth-AP) with
PML 2.9's arguments, defaults and reductions. ``reducer=`` and ``_extra`` as in ``pair_losses.py``.

PML refuses ``ref_emb`` for all of them but DynamicSoftMarginLoss, and ``indices_tuple`` for PNP and
RankedList: so do these (``ValueError``, PML's type). FastAP and Smooth-AP read a tuple as PML's per-sample
miner weights; Histogram and DynamicSoftMargin as triplets.
"""
from __future__ import annotations

import math

import torch

from .. import _registry
from .. import reducers as _reducers
from ..distances import parse_distance
from ._common import _call, _loss, _prepare, _triplet_list
from .contrastive_losses import _nca_weights

PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")


def _no_ref(ref, name):
    if ref is not None:
        raise ValueError(f"{name} does not support ref_emb / ref_labels (PML: ref_emb is not supported for this "
                         "loss function)")


def _no_tuple(indices_tuple, name):
    if indices_tuple is not None:
        raise ValueError(f"{name} does not support indices_tuple (PML: indices_tuple is not supported for this "
                         "loss function)")


def _positive_int(value, name):
    if isinstance(value, bool) or not float(value) == int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _normalised_lp(distance, normalize_embeddings, default, name):
    dist = parse_distance(distance, normalize_embeddings, default=default)
    if dist.name not in ("euclidean", "squared_euclidean") or not dist.normalize:
        raise ValueError(f"{name} needs LpDistance(p=2, normalize_embeddings=True) (power 1 or 2; PML asserts "
                         f"it), got {distance!r}")
    return dist


def _cosine(distance, normalize_embeddings, name):
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    if dist.name != "cosine":
        raise ValueError(f"{name} needs the cosine similarity (PML asserts CosineSimilarity), got {distance!r}")
    return dist


def fastap_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, num_bins=10,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's FastAPLoss: mean over rows with a positive of (1 − AP_i)·w_i, AP_i from soft histograms of the row's
    positive and negative distances (``num_bins`` + 1 triangular bins over [0, 2^power]; default squared
    euclidean); a tuple gives PML's miner weights w."""
    num_bins = _positive_int(num_bins, "num_bins")
    labels, ref, _ = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    _no_ref(ref, "FastAPLoss")
    dist = _normalised_lp(distance, normalize_embeddings, "squared_euclidean", "FastAPLoss")
    n = embeddings.shape[0]
    weights = _nca_weights(indices_tuple, n, n, embeddings.device, check_inputs, using_ref=False)
    return _loss("fastap_loss", backend, embeddings, labels, num_bins=num_bins, distance=dist, weights=weights,
                 reducer=reducer, extra=_extra)


def histogram_delta(n_bins=None, delta=None):
    """PML's HistogramLoss arguments → Δ: both given must satisfy Δ = 2/n_bins (``AssertionError`` as PML's),
    neither → n_bins = 100."""
    if delta is not None and n_bins is not None:
        if delta != 2 / n_bins:
            raise AssertionError(f"HistogramLoss: delta and n_bins must satisfy delta = 2/n_bins; got delta={delta} "
                                 f"and n_bins={n_bins}")
    if delta is None and n_bins is None:
        n_bins = 100
    delta = delta if delta is not None else 2 / n_bins
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta <= 2):
        raise ValueError(f"HistogramLoss: delta must lie in (0, 2] (n_bins a positive integer), got {delta!r}")
    return delta


def histogram_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, n_bins=None,
                   delta=None, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                   reducer=None, _extra=None):
    """PML's HistogramLoss: Σ_r p⁻_r Φ⁺_r over linear-interpolation histograms (nodes −1, −1+Δ, ..., 1) of the
    cosine similarities of the unique unordered positive and negative pairs of the triplets (all, or the
    given tuple's). A similarity of exactly 1 falls outside the last node, as in PML (an index error)."""
    delta = histogram_delta(n_bins, delta)
    labels, ref, _ = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                              labels_required=indices_tuple is None)
    _no_ref(ref, "HistogramLoss")
    dist = _cosine(distance, normalize_embeddings, "HistogramLoss")
    n = embeddings.shape[0]
    triplets = _triplet_list(indices_tuple, n, n, embeddings.device, check_inputs)
    return _loss("histogram_loss", backend, embeddings, labels, delta=float(delta), distance=dist,
                 triplets=triplets, reducer=reducer, extra=_extra)


def check_pnp(b, alpha, anneal, variant):
    if variant not in PNP_VARIANTS:
        raise ValueError(f"variant={variant} but must be one of {list(PNP_VARIANTS)}")
    if not anneal > 0:
        raise ValueError(f"PNPLoss: anneal must be > 0, got {anneal!r}")


def pnp_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, b=2, alpha=1, anneal=0.01,
             variant="O", distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
             _extra=None):
    """PML's PNPLoss: mean over rows with a positive of (1/N⁺_i) Σ_{j ∈ P_i ∪ {i}} f(R_ij), R_ij the smoothed
    count of negatives ranked above j (sigmoid at temperature ``anneal``), f by ``variant``; cosine only."""
    check_pnp(b, alpha, anneal, variant)
    _no_tuple(indices_tuple, "PNPLoss")
    labels, ref, _ = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    _no_ref(ref, "PNPLoss")
    dist = _cosine(distance, normalize_embeddings, "PNPLoss")
    return _loss("pnp_loss", backend, embeddings, labels, b=b, alpha=alpha, anneal=float(anneal),
                 variant=variant, distance=dist, reducer=reducer, extra=_extra)


def ranked_list_alpha(margin, alpha):
    return 1 + margin / 2 if alpha is None else alpha


def ranked_list_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin, Tn,
                     imbalance=0.5, alpha=None, Tp=0, distance=None, normalize_embeddings=True, backend="auto",
                     check_inputs=True, reducer=None, _extra=None):
    """PML's RankedListLoss: mean over rows of (1−λ)·L_P + λ·L_N, the exp-weighted violations of the positives
    beyond α − margin and of the negatives inside α (``alpha`` default 1 + margin/2; default euclidean)."""
    if not 0 <= imbalance <= 1:
        raise AssertionError(f"RankedListLoss: imbalance must be between 0 and 1, got {imbalance!r}")
    _no_tuple(indices_tuple, "RankedListLoss")
    labels, ref, _ = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    _no_ref(ref, "RankedListLoss")
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    return _loss("ranked_list_loss", backend, embeddings, labels, margin=float(margin), Tn=float(Tn),
                 imbalance=float(imbalance), alpha=float(ranked_list_alpha(margin, alpha)), Tp=float(Tp),
                 distance=dist, reducer=reducer, extra=_extra)


def dynamic_soft_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                             min_val=-2.0, num_bins=10, momentum=0.01, hist=None, return_hist=False, distance=None,
                             normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                             _extra=None):
    """PML's DynamicSoftMarginLoss: mean_t CDF(d_t)·d_t, d = D_ap − D_an over all triplets (or the tuple's), or
    without labels query i vs reference i against the hardest off-diagonal negative; the CDF is that of the
    running histogram ``hist`` (``num_bins`` bins over [min_val, −min_val); None: the first call's zeros) after
    this batch's momentum update. ``return_hist=True`` returns (loss, new histogram); the new histogram keeps
    this batch's graph (gradients flow through the CDF weights as in PML) — store it detached."""
    num_bins = _positive_int(num_bins, "num_bins")
    if not min_val < 0:
        raise ValueError(f"DynamicSoftMarginLoss: min_val must be < 0, got {min_val!r}")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=False)
    dist = _normalised_lp(distance, normalize_embeddings, "euclidean", "DynamicSoftMarginLoss")
    if hist is None:
        hist = torch.zeros(num_bins)
    if tuple(hist.shape) != (num_bins,):
        raise ValueError(f"hist must have shape ({num_bins},), got {tuple(hist.shape)}")
    n = embeddings.shape[0]
    m = n if ref is None else ref.shape[0]
    if labels is None and n == 1 and m == 1:
        raise ValueError("DynamicSoftMarginLoss without labels needs more than one query or reference (the "
                         "hardest negative of a 1×1 matrix does not exist)")
    triplets = None if labels is None else _triplet_list(indices_tuple, n, m, embeddings.device, check_inputs)
    args = (embeddings, labels, ref, ref_labels, hist)
    kw = dict(min_val=float(min_val), num_bins=num_bins, momentum=float(momentum), distance=dist, triplets=triplets)
    extra = _extra or {}
    if reducer is not None or extra:
        reducer = _reducers.for_loss(reducer, ["loss"] + list(extra), _reducers.MeanReducer)
    if _reducers.reduces_like_default(reducer, ["loss"], list(extra), "MeanReducer"):
        loss, new_hist = _call("dynamic_soft_margin_loss", backend, *args, **kw)
        for value in extra.values():
            loss = loss + value.to(loss.dtype).reshape(())
    else:
        try:
            loss_dict, new_hist = _call("dynamic_soft_margin_loss_elements", backend, *args, **kw)
        except _registry.Unsupported as e:
            raise _registry.Unsupported("dynamic_soft_margin_loss with a non-default reducer runs on the reference "
                                        "backend; use backend='reference' or 'auto'") from e
        for name, value in extra.items():
            loss_dict[name] = {"losses": value, "indices": None, "reduction_type": "already_reduced"}
        loss = reducer(loss_dict, embeddings, labels)
    return (loss, new_hist) if return_hist else loss


def smooth_ap_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.01,
                   distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                   _extra=None):
    """PML 2.9's SmoothAPLoss exactly as PML computes it (see the reference backend: equal class counts
    required, PML's block layout, a float32 loss); cosine only; a tuple gives PML's miner weights."""
    if not temperature > 0:
        raise ValueError(f"SmoothAPLoss: temperature must be > 0, got {temperature!r}")
    labels, ref, _ = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    _no_ref(ref, "SmoothAPLoss")
    if bool((labels < 0).any()):
        raise ValueError("SmoothAPLoss: labels must be non-negative (PML counts them with torch.bincount)")
    dist = _cosine(distance, normalize_embeddings, "SmoothAPLoss")
    n = embeddings.shape[0]
    weights = _nca_weights(indices_tuple, n, n, embeddings.device, check_inputs, using_ref=False)
    loss = _loss("smooth_ap_loss", backend, embeddings, labels, temperature=float(temperature), distance=dist,
                 weights=weights, reducer=reducer)
    for name, value in (_extra or {}).items():  # PML's MultipleReducers sums its entries in the embeddings' dtype
        if isinstance(loss, dict):
            loss[name] = {"losses": value, "indices": None, "reduction_type": "already_reduced"}
        else:
            loss = loss.to(embeddings.dtype) + value.to(embeddings.dtype).reshape(())
    return loss


__all__ = ["fastap_loss", "histogram_loss", "pnp_loss", "ranked_list_loss", "dynamic_soft_margin_loss",
           "smooth_ap_loss"]
