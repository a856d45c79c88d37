"""What every functional form shares: input preparation, PML index tuples → canonical pairs, dispatch."""
from __future__ import annotations

from .. import _registry
from .._pairs import PackedPairMask, dense_from_indices, indices_to_pairs
from .._validation import check_embeddings, check_indices_tuple, check_labels, check_ref


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
    return _registry.call(op, backend, x.device.type, x, *args, **kwargs)
