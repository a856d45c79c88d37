"""The similarity matrix and the device-side mining results (thresholds, packed masks, per-row indices)."""
from __future__ import annotations

from .._pairs import PackedPairMask
from .._validation import check_embeddings
from ..distances import parse_distance
from ._common import _call, _prepare


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
