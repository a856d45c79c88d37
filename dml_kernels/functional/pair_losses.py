"""The pair family: losses over the N×M pairs of a batch (or of a batch against a reference set).

Every loss takes ``reducer=`` (a reducer of ``dk.reducers`` or PML's; default: PML's default for the loss,
computed by the fused op); ``_extra`` is internal (the loss modules' regularizer terms)."""
from __future__ import annotations

from .._pairs import PackedPairMask, indices_to_pairs, random_triplets
from .._validation import check_indices_tuple
from ..distances import parse_distance
from ._common import _loss, _matrix_pairs, _num_refs, _pair_list, _prepare, _triplet_list


def multi_similarity_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                          alpha=2, beta=50, base=0.5, epsilon=None, distance=None, normalize_embeddings=True,
                          backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's MultiSimilarityLoss; with ``epsilon`` = MultiSimilarityMiner(epsilon) + the loss, fused."""
    if epsilon is not None and indices_tuple is not None:
        raise ValueError("pass either epsilon= (fused mining) or indices_tuple=, not both")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("multi_similarity_loss", backend, embeddings, labels, ref, ref_labels, alpha=float(alpha),
                 beta=float(beta), base=float(base), epsilon=None if epsilon is None else float(epsilon),
                 distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def generalized_lifted_structure_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                                      *, neg_margin=1, pos_margin=0, distance=None, normalize_embeddings=True,
                                      backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's GeneralizedLiftedStructureLoss: (1/N) Σ_i relu(LSE_P(D − m_p) + LSE_N(m_n − D))."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _matrix_pairs(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("generalized_lifted_structure_loss", backend, embeddings, labels, ref, ref_labels,
                 neg_margin=float(neg_margin), pos_margin=float(pos_margin), distance=dist, pairs=pairs,
                 pair_rule=pair_rule, reducer=reducer, extra=_extra, few=few)


def lifted_structure_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                          neg_margin=1, pos_margin=0, distance=None, normalize_embeddings=True, backend="auto",
                          check_inputs=True, reducer=None, _extra=None):
    """PML's LiftedStructureLoss, exact in O(B²) via per-row negative LSEs. With ``ref_emb`` it computes what PML
    computes: for a positive pair (query i, reference k) the negatives are those of query i and of *query* k
    (PML compares the reference index with query anchors; none when k ≥ N) — on the reference backend."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    refs = {} if ref is None else dict(ref=ref, ref_labels=ref_labels)  # the fused backends are self-mode only
    return _loss("lifted_structure_loss", backend, embeddings, labels, neg_margin=float(neg_margin),
                 pos_margin=float(pos_margin), distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer,
                 extra=_extra, few=few, **refs)


def contrastive_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, pos_margin=0,
                     neg_margin=1, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                     reducer=None, _extra=None):
    """PML's ContrastiveLoss: AvgNonZero_pos[D − m_p]₊ + AvgNonZero_neg[m_n − D]₊ (not squared)."""
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, pair_rule, few = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    return _loss("contrastive_loss", backend, embeddings, labels, ref, ref_labels, pos_margin=float(pos_margin),
                 neg_margin=float(neg_margin), distance=dist, pairs=pairs, pair_rule=pair_rule, reducer=reducer,
                 extra=_extra, few=few)


def n_pairs_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, distance=None,
                 normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None, _extra=None):
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
    return _loss("n_pairs_loss", backend, embeddings, labels, distance=dist, pairs=pairs, reducer=reducer,
                 extra=_extra)


def triplet_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=0.05,
                        swap=False, smooth_loss=False, triplets_per_anchor="all", mining=None, distance=None,
                        normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's TripletMarginLoss over all triplets (never the N×M×M set), ``triplets_per_anchor`` random ones per
    anchor (PML's sampling, torch's global RNG), or ``mining="batch_hard"``."""
    if mining not in (None, "batch_hard"):
        raise ValueError(f"mining must be None or 'batch_hard', got {mining!r}")
    if mining is not None and triplets_per_anchor != "all":
        raise ValueError("pass either mining= or triplets_per_anchor=, not both")
    if mining is not None and indices_tuple is not None:
        raise ValueError("pass either mining= or indices_tuple=, not both")
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs,
                                       labels_required=indices_tuple is None)
    dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    triplets = _triplet_list(indices_tuple, embeddings.shape[0], _num_refs(embeddings, ref), embeddings.device,
                             check_inputs)
    if triplets is None and triplets_per_anchor != "all":
        triplets = random_triplets(labels, ref_labels if ref is not None else None, triplets_per_anchor)
    return _loss("triplet_margin_loss", backend, embeddings, labels, ref, ref_labels, margin=float(margin),
                 swap=bool(swap), smooth_loss=bool(smooth_loss), mining=mining, distance=dist, triplets=triplets,
                 reducer=reducer, extra=_extra)
