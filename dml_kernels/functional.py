"""Functional API: ``dk.functional.<snake_case_name>(embeddings, labels, ..., backend=...)``.

Each function validates its inputs (see ``_validation.py``), turns PML-style arguments into the
canonical form every backend takes (``_ops.py``), and dispatches through the backend registry.
"""
from __future__ import annotations

import torch

from . import _backends
from ._distance import parse_distance
from ._pairs import PackedPairMask, dense_from_indices, indices_to_pairs, indices_to_triplets
from ._validation import (
    check_embeddings,
    check_indices_tuple,
    check_labels,
    check_proxies,
    check_proxy_labels,
    check_ref,
)

__all__ = [
    "pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
    "multi_similarity_loss", "lifted_structure_loss", "generalized_lifted_structure_loss", "n_pairs_loss",
    "contrastive_loss", "triplet_margin_loss", "proxy_nca_loss", "proxy_nca_plus_plus_loss",
    "proxy_anchor_loss", "PackedPairMask",
]


def _zero(x, *others):
    """PML's graph-attached zero loss: ``sum(embeddings * 0)`` (plus any parameters, so they get a 0 grad)."""
    z = (x * 0).sum()
    for o in others:
        z = z + (o * 0).sum()
    return z


def _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, *, labels_required):
    check_embeddings(embeddings, check_values=check_inputs)
    labels = check_labels(labels, embeddings.shape[0], embeddings.device, required=labels_required)
    ref, ref_labels, _ = check_ref(embeddings, labels, ref_emb, ref_labels, check_values=check_inputs)
    return labels, ref, ref_labels


def _num_refs(embeddings, ref):
    return embeddings.shape[0] if ref is None else ref.shape[0]


def _matrix_pairs(indices_tuple, n, m, device, check_inputs):
    """indices_tuple for a matrix-based loss → (PackedPairMask or None, pair_rule, few_pairs).

    PML de-duplicates pairs in these losses, so a packed mask loses nothing. PML's ≤1-pair rule is
    decided here from the tuple's lengths (metadata only); for a mask or no tuple the kernel counts.
    """
    if indices_tuple is None:
        return None, True, False
    if isinstance(indices_tuple, PackedPairMask):
        if tuple(indices_tuple.shape) != (n, m):
            raise ValueError(f"the PackedPairMask has shape {tuple(indices_tuple.shape)}, expected {(n, m)}")
        return indices_tuple.to(device), True, False
    pairs = indices_to_pairs(check_indices_tuple(indices_tuple, n, m, check_values=check_inputs, device=device))
    if all(len(t) <= 1 for t in pairs):
        return None, False, True
    pos, neg = dense_from_indices(pairs, n, m, device)
    if check_inputs and bool((pos & neg).any()):  # PML 2.9 asserts the same (GenericPairLoss)
        raise ValueError("indices_tuple has a pair that is both positive and negative")
    return PackedPairMask.from_dense(pos, neg), False, False


def _pair_list(indices_tuple, n, m, device, check_inputs):
    """indices_tuple for a pair-based loss → (PML 4-tuple or None, pair_rule, few_pairs); duplicates kept."""
    if indices_tuple is None:
        return None, True, False
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    pairs = indices_to_pairs(check_indices_tuple(indices_tuple, n, m, check_values=check_inputs, device=device))
    return pairs, False, all(len(t) <= 1 for t in pairs)


def _call(op, backend, x, *args, **kwargs):
    if backend != "auto" and not isinstance(backend, str):
        raise TypeError("backend must be a string")
    return _backends.call(op, backend, x.device.type, x, *args, **kwargs)


# --------------------------------------------------------------------------- similarity and mining


def pairwise_similarity(x, ref=None, distance="cosine", *, normalize_embeddings=True, backend="auto",
                        check_inputs=True):
    """The N×M similarity (cosine, dot) or distance (euclidean, squared_euclidean) matrix."""
    check_embeddings(x, "x", check_values=check_inputs)
    if ref is not None:
        check_embeddings(ref, "ref", check_values=check_inputs)
        if ref.device != x.device or ref.dtype != x.dtype or ref.shape[1] != x.shape[1]:
            raise ValueError("ref must have the same device, dtype and embedding size as x")
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    return _call("pairwise_similarity", backend, x, ref, distance=dist)


def multi_similarity_thresholds(embeddings, labels, ref_emb=None, ref_labels=None, *, distance=None,
                                normalize_embeddings=True, backend="auto", check_inputs=True):
    """Per row: (value of the hardest positive, value of the hardest negative) — MS mining's pass 1."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    return _call("multi_similarity_thresholds", backend, embeddings, labels, ref, ref_labels, distance=dist)


def multi_similarity_mask(embeddings, labels, ref_emb=None, ref_labels=None, *, epsilon=0.1, distance=None,
                          normalize_embeddings=True, backend="auto", check_inputs=True) -> PackedPairMask:
    """The pairs PML's MultiSimilarityMiner(epsilon) keeps, as a device-side bit-packed mask."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    return _call("multi_similarity_mask", backend, embeddings, labels, ref, ref_labels, epsilon=float(epsilon),
                 distance=dist)


def batch_hard_mining(embeddings, labels, ref_emb=None, ref_labels=None, *, distance=None,
                      normalize_embeddings=True, backend="auto", check_inputs=True):
    """Per row: (index of the hardest positive, index of the hardest negative), -1 where a set is empty."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    return _call("batch_hard_mining", backend, embeddings, labels, ref, ref_labels, distance=dist)


# --------------------------------------------------------------------------- pair losses


def multi_similarity_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                          alpha=2, beta=50, base=0.5, epsilon=None, distance=None, normalize_embeddings=True,
                          backend="auto", check_inputs=True):
    """PML's MultiSimilarityLoss; with ``epsilon`` = MultiSimilarityMiner(epsilon) + the loss, fused."""
    if epsilon is not None and indices_tuple is not None:
        raise ValueError("pass either epsilon= (fused mining) or indices_tuple=, not both")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    if few:
        return _zero(embeddings)
    return _call("multi_similarity_loss", backend, embeddings, labels, ref, ref_labels, alpha=float(alpha),
                 beta=float(beta), base=float(base), epsilon=None if epsilon is None else float(epsilon),
                 distance=dist, pairs=pairs, pair_rule=pair_rule)


def generalized_lifted_structure_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                                      *, neg_margin=1, pos_margin=0, distance=None, normalize_embeddings=True,
                                      backend="auto", check_inputs=True):
    """PML's GeneralizedLiftedStructureLoss: (1/N) Σ_i relu(LSE_P(D − m_p) + LSE_N(m_n − D))."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    if few:
        return _zero(embeddings)
    return _call("generalized_lifted_structure_loss", backend, embeddings, labels, ref, ref_labels,
                 neg_margin=float(neg_margin), pos_margin=float(pos_margin), distance=dist, pairs=pairs,
                 pair_rule=pair_rule)


def lifted_structure_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                          neg_margin=1, pos_margin=0, distance=None, normalize_embeddings=True, backend="auto",
                          check_inputs=True):
    """PML's LiftedStructureLoss, exact in O(B²) via per-row negative LSEs. No ``ref_emb``."""
    if ref_emb is not None or ref_labels is not None:
        raise NotImplementedError("LiftedStructureLoss does not support ref_emb (PML mixes query and reference "
                                  "indices there); use GeneralizedLiftedStructureLoss")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n = embeddings.shape[0]
    pairs, pair_rule, few = _pair_list(indices_tuple, n, n, embeddings.device, check_inputs)
    if few:
        return _zero(embeddings)
    return _call("lifted_structure_loss", backend, embeddings, labels, neg_margin=float(neg_margin),
                 pos_margin=float(pos_margin), distance=dist, pairs=pairs, pair_rule=pair_rule)


def contrastive_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, pos_margin=0,
                     neg_margin=1, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True):
    """PML's ContrastiveLoss: AvgNonZero_pos[D − m_p]₊ + AvgNonZero_neg[m_n − D]₊ (not squared)."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    if few:
        return _zero(embeddings)
    return _call("contrastive_loss", backend, embeddings, labels, ref, ref_labels, pos_margin=float(pos_margin),
                 neg_margin=float(neg_margin), distance=dist, pairs=pairs, pair_rule=pair_rule)


def n_pairs_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, distance=None,
                 normalize_embeddings=True, backend="auto", check_inputs=True):
    """PML's NPairsLoss: one (lowest, second-lowest index) pair per label, CE over anchor×positive."""
    if ref_emb is not None or ref_labels is not None:
        raise ValueError("NPairsLoss does not support ref_emb / ref_labels")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    dist = parse_distance(distance, normalize_embeddings, default="dot")
    pairs = None
    if indices_tuple is not None:
        n = embeddings.shape[0]
        if isinstance(indices_tuple, PackedPairMask):
            indices_tuple = indices_tuple.to(embeddings.device).to_indices()
        a, p, _, _ = indices_to_pairs(check_indices_tuple(indices_tuple, n, n, check_values=check_inputs,
                                                          device=embeddings.device))
        pairs = (a, p)
    return _call("n_pairs_loss", backend, embeddings, labels, distance=dist, pairs=pairs)


def triplet_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=0.05,
                        swap=False, smooth_loss=False, triplets_per_anchor="all", mining=None, distance=None,
                        normalize_embeddings=True, backend="auto", check_inputs=True):
    """PML's TripletMarginLoss over all triplets (never the N×M×M set), or ``mining="batch_hard"``."""
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
    triplets = None
    if indices_tuple is not None:
        n, m = embeddings.shape[0], _num_refs(embeddings, ref)
        if isinstance(indices_tuple, PackedPairMask):
            indices_tuple = indices_tuple.to(embeddings.device).to_indices()
        triplets = indices_to_triplets(check_indices_tuple(indices_tuple, n, m, check_values=check_inputs,
                                                           device=embeddings.device))
    return _call("triplet_margin_loss", backend, embeddings, labels, ref, ref_labels, margin=float(margin),
                 swap=bool(swap), smooth_loss=bool(smooth_loss), mining=mining, distance=dist, triplets=triplets)


# --------------------------------------------------------------------------- proxy losses


def _miner_weights(indices_tuple, n, device, check_inputs, *, anchors_only):
    """PML's ``convert_to_weights``: count / max count per sample, 0 if absent; None without a tuple."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    t = check_indices_tuple(indices_tuple, n, n, check_values=check_inputs, device=device)
    if all(len(i) == 0 for i in t):
        return None
    idx = torch.cat([t[0], t[2]] if (anchors_only and len(t) == 4) else ([t[0]] if anchors_only else list(t)))
    counts = torch.bincount(idx, minlength=n).double()
    return counts / counts.max()


def _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, name):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{name} does not support ref_emb / ref_labels")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    check_proxies(embeddings, proxies, check_values=check_inputs)
    check_proxy_labels(labels, proxies.shape[0], check_values=check_inputs)
    return labels


def proxy_nca_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                   softmax_scale=1, exclude_positive=False, distance=None, normalize_embeddings=True,
                   backend="auto", check_inputs=True):
    """PML's ProxyNCALoss = cross-entropy over logits −σ‖x̂ − p̂_c‖² (the positive proxy in the denominator,
    unless ``exclude_positive=True``: the original "No Fuss" form)."""
    labels = _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, "ProxyNCALoss")
    if exclude_positive and proxies.shape[0] < 2:
        raise ValueError("exclude_positive=True needs at least 2 classes")
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    weights = _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=True)
    return _call("proxy_nca_loss", backend, embeddings, labels, proxies, softmax_scale=float(softmax_scale),
                 exclude_positive=bool(exclude_positive), distance=dist, weights=weights)


def proxy_nca_plus_plus_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                             temperature=1 / 9, **kwargs):
    """ProxyNCA++ (Teh et al.): ProxyNCA with softmax_scale = 1 / temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return proxy_nca_loss(embeddings, labels, proxies, indices_tuple, ref_emb, ref_labels,
                          softmax_scale=1.0 / temperature, **kwargs)


def proxy_anchor_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                      margin=0.1, alpha=32, distance=None, normalize_embeddings=True, backend="auto",
                      check_inputs=True):
    """PML's ProxyAnchorLoss; |C⁺| (proxies with a positive in the batch) is counted on the device."""
    labels = _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, "ProxyAnchorLoss")
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    weights = _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=False)
    return _call("proxy_anchor_loss", backend, embeddings, labels, proxies, margin=float(margin),
                 alpha=float(alpha), distance=dist, weights=weights)
