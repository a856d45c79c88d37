"""The contrastive family: softmax-over-pairs losses (NT-Xent, SupCon, NCA, ...) with PML 2.9's arguments,
defaults and reductions. ``reducer=`` and ``_extra`` as in ``pair_losses.py``."""
from __future__ import annotations

import math

import torch

from .._pairs import PackedPairMask, random_triplets
from .._validation import check_indices_tuple
from ..distances import parse_distance
from ._common import _loss, _matrix_pairs, _num_refs, _pair_list, _prepare, _triplet_list


def check_temperature(value, name="temperature"):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def ntxent_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.07,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's NTXentLoss: mean over positive pairs (a, p) of −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{N_a} e^{s_an/τ}))."""
    temperature = check_temperature(temperature)
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("ntxent_loss", backend, embeddings, labels, ref, ref_labels, temperature=temperature,
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def supcon_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.1,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's SupConLoss: AvgNonZero over rows i of −(1/|P_i|) Σ_{P_i} log softmax_{P_i ∪ N_i}(s/τ)."""
    temperature = check_temperature(temperature)
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("supcon_loss", backend, embeddings, labels, ref, ref_labels, temperature=temperature,
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def _nca_weights(indices_tuple, n, m, device, check_inputs, *, using_ref):
    """PML's ``convert_to_weights`` for NCA: per query row, its count in the tuple / the largest count (the
    anchors only when a reference set is given); None without a tuple or with an empty one."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    t = check_indices_tuple(indices_tuple, n, m, check_values=check_inputs, device=device)
    if all(len(i) == 0 for i in t):
        return None
    idx = torch.cat(([t[0], t[2]] if len(t) == 4 else [t[0]]) if using_ref else list(t))
    counts = torch.bincount(idx, minlength=n).double()
    return counts / counts.max()


def nca_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, softmax_scale=1,
             distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
             _extra=None):
    """PML's NCALoss: mean over rows with a positive of −log Σ_{P_i} softmax_k(σ·s_ik) (s: similarity or
    negated distance, default squared euclidean); a tuple weights rows as PML's ``convert_to_weights``."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    weights = _nca_weights(indices_tuple, n, m, embeddings.device, check_inputs, using_ref=ref is not None)
    return _loss("nca_loss", backend, embeddings, labels, ref, ref_labels, softmax_scale=float(softmax_scale),
                 distance=dist, weights=weights, reducer=reducer, extra=_extra)


def _cosine_only(distance, normalize_embeddings, name):
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    if dist.name != "cosine" or not dist.normalize:
        raise ValueError(f"{name} needs the cosine similarity (PML asserts CosineSimilarity), got {distance!r}")
    return dist


def circle_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80,
                distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's CircleLoss: AvgNonZero over rows of softplus(LSE_P(−γ α_p (s − Δ_p)) + LSE_N(γ α_n (s − Δ_n)))."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = _cosine_only(distance, normalize_embeddings, "CircleLoss")
    n, m_ = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m_, embeddings.device, check_inputs)
    return _loss("circle_loss", backend, embeddings, labels, ref, ref_labels, m=float(m), gamma=float(gamma),
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def tuplet_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=5.73,
                       scale=64, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                       reducer=None, _extra=None):
    """PML's TupletMarginLoss (``margin`` in degrees): mean over positive pairs of
    log(1 + Σ_{N_a} e^{scale·(s_an − cos(θ_ap − margin))})."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = _cosine_only(distance, normalize_embeddings, "TupletMarginLoss")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("tuplet_margin_loss", backend, embeddings, labels, ref, ref_labels,
                 margin=math.radians(float(margin)), scale=float(scale), distance=dist, pairs=pairs,
                 pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def intra_pair_variance_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                             pos_eps=0.01, neg_eps=0.01, distance=None, normalize_embeddings=True, backend="auto",
                             check_inputs=True, reducer=None, _extra=None):
    """PML's IntraPairVarianceLoss: mean over positive pairs of relu((1−ε⁺)·mean_P s − s)² plus the same over
    negative pairs with relu(s − (1+ε⁻)·mean_N s)² (similarity; reversed for a distance)."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("intra_pair_variance_loss", backend, embeddings, labels, ref, ref_labels, pos_eps=float(pos_eps),
                 neg_eps=float(neg_eps), distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer,
                 extra=_extra, few=few)


def signal_to_noise_ratio_contrastive_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
                                           ref_labels=None, *, pos_margin=0, neg_margin=1, distance=None,
                                           normalize_embeddings=True, backend="auto", check_inputs=True,
                                           reducer=None, _extra=None):
    """PML's SignalToNoiseRatioContrastiveLoss: ContrastiveLoss on the SNR distance var(q − r) / var(q)."""
    if distance is not None:
        if type(distance).__name__ != "SNRDistance":
            raise ValueError(f"SignalToNoiseRatioContrastiveLoss needs the SNR distance (PML asserts SNRDistance), "
                             f"got {distance!r}")
        normalize_embeddings = distance.normalize_embeddings
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("snr_contrastive_loss", backend, embeddings, labels, ref, ref_labels, pos_margin=float(pos_margin),
                 neg_margin=float(neg_margin), normalize=bool(normalize_embeddings), pairs=pairs,
                 pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def threshold_consistent_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                                     lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5,
                                     distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                                     reducer=None, _extra=None):
    """PML's ThresholdConsistentMarginLoss: λ⁺·mean_{P, s ≤ m⁺}(m⁺ − s) + λ⁻·mean_{N, s ≥ m⁻}(s − m⁻) (cosine).
    No ``ref_emb`` (PML gathers the reference indices from the embeddings, ignoring ref_emb)."""
    if ref_emb is not None or ref_labels is not None:
        raise NotImplementedError("ThresholdConsistentMarginLoss does not support ref_emb (PML ignores it and "
                                  "indexes the embeddings with reference indices)")
    _cosine_only(distance, normalize_embeddings, "ThresholdConsistentMarginLoss")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=indices_tuple is None)
    n = embeddings.shape[0]
    pairs, _, _ = _pair_list(indices_tuple, n, n, embeddings.device, check_inputs)
    return _loss("threshold_consistent_margin_loss", backend, embeddings, labels, lambda_plus=float(lambda_plus),
                 lambda_minus=float(lambda_minus), margin_plus=float(margin_plus), margin_minus=float(margin_minus),
                 pairs=pairs, reducer=reducer, extra=_extra)


def margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, beta, margin=0.2,
                nu=0, learn_beta=False, triplets_per_anchor="all", distance=None, normalize_embeddings=True,
                backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's MarginLoss over all triplets (or the given ones): Σ (relu(d_ap − β + m) + relu(β − d_an + m)) /
    (number of nonzero terms), plus ν·β when ``learn_beta``. ``beta``: a (1,) or (num_classes,) tensor."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    triplets = _triplet_list(indices_tuple, embeddings.shape[0], _num_refs(embeddings, ref), embeddings.device,
                             check_inputs)
    if triplets is None and triplets_per_anchor != "all":  # PML's random sampling, torch's global RNG
        triplets = random_triplets(labels, ref_labels if ref is not None else None, triplets_per_anchor)
    return _loss("margin_loss", backend, embeddings, labels, ref, ref_labels, beta, margin=float(margin),
                 nu=float(nu), learn_beta=bool(learn_beta), distance=dist, triplets=triplets, reducer=reducer,
                 extra=_extra)
