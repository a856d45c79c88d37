"""The fused k-nearest-neighbour search: :func:`knn` and :class:`FusedKNN` (PML's ``knn_func`` protocol).

Both dispatch the ``knn`` op through the registry (``dml_kernels/_ops.py``): the ``cpu`` backend (query
blocks × reference chunks, ``torch.mm`` + a running top-k, O(block × chunk) memory) and the ``triton``
backend (similarity tile + a running per-row top-k in registers) never form the N×M matrix; the
``reference`` backend does (dense, then a stable sort). Results are best first — largest similarity,
smallest distance — and equal values are ordered by the smaller reference index on every backend.
"""
from __future__ import annotations

from .. import _registry
from .._validation import check_embeddings
from ..distances import parse_distance


def knn(query, reference=None, k=1, *, distance="squared_euclidean", normalize_embeddings=False,
        exclude_self=False, backend="auto", check_inputs=True):
    """(values N×k, indices N×k int64): the ``k`` nearest ``reference`` rows of every ``query`` row.

    ``reference=None`` searches the queries themselves, without each query's own row. ``exclude_self=True``
    with a reference set skips reference i for query i (i < min(N, M)): the queries are the reference's
    first N rows, PML's ``ref_includes_query``. ``distance`` is any form :func:`~dml_kernels.distances.
    parse_distance` accepts; the default, squared L2 on the raw embeddings, is what PML's default
    ``FaissKNN`` (``IndexFlatL2``) ranks and returns. No gradient flows.
    """
    check_embeddings(query, "query", check_values=check_inputs)
    if reference is not None:
        check_embeddings(reference, "reference", check_values=check_inputs)
        if reference.device != query.device or reference.dtype != query.dtype or reference.shape[1] != query.shape[1]:
            raise ValueError("reference must have the same device, dtype and embedding size as query")
    k = int(k)
    m = query.shape[0] if reference is None else reference.shape[0]
    available = m - 1 if (reference is None or exclude_self) else m
    if not 0 <= k <= available:
        raise ValueError(f"k={k} neighbours requested but only {available} references are available per query")
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    if backend != "auto" and not isinstance(backend, str):
        raise TypeError("backend must be a string")
    return _registry.call("knn", backend, query.device.type, query, reference, k=k, distance=dist,
                          exclude_self=bool(exclude_self))


class FusedKNN:
    """A ``knn_func`` for :class:`~dml_kernels.evaluation.AccuracyCalculator` (and PML's): called as
    ``knn_func(query, k, reference, ref_includes_query)`` it returns ``(distances, indices)`` of the k
    nearest references, without query i's own row i when ``ref_includes_query`` (PML's semantics).

    The default, squared L2 on the raw embeddings, ranks like PML's default ``FaissKNN``. Pass e.g.
    ``distance="cosine"`` for cosine similarity (values are then similarities, largest first)."""

    def __init__(self, distance="squared_euclidean", normalize_embeddings=False, *, backend="auto",
                 check_inputs=True):
        self.distance = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
        self.backend = backend
        self.check_inputs = check_inputs

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        reference = query if reference is None else reference
        return knn(query, reference, k, distance=self.distance, exclude_self=ref_includes_query,
                   backend=self.backend, check_inputs=self.check_inputs)

    def __repr__(self):
        return f"FusedKNN(distance={self.distance.name!r}, normalize_embeddings={self.distance.normalize}, " \
               f"backend={self.backend!r})"
