"""Distances: PML's distance classes, and the small value the fused kernels branch on.

* PML's classes under PML's names and constructor arguments — :class:`BaseDistance`,
  :class:`CosineSimilarity`, :class:`DotProductSimilarity`, :class:`LpDistance`, :class:`SNRDistance`,
  :class:`BatchedDistance` — callable like PML's (``dist(query, ref=None)`` → the N×M matrix, ``margin``,
  ``smallest_dist``, ``pairwise_distance``, ``is_inverted``, ``normalize_embeddings``, ``p``, ``power``), so
  PML code that receives one works. Calling one computes the matrix in plain PyTorch exactly as PML does
  (it is materialised by definition; ``dk.functional.pairwise_similarity`` is the fused form).
* :class:`Distance`, the immutable value every loss reduces its ``distance=`` argument to
  (:func:`parse_distance`), for what the fused engines express:

  - ``"cosine"``            S = x̂·r̂                (a similarity: larger = closer)
  - ``"dot"``               S = x·r  (x̂·r̂ when ``normalize=True``, PML's default)
  - ``"euclidean"``         D = ‖x − r‖₂          (a distance: smaller = closer)
  - ``"squared_euclidean"`` D = ‖x − r‖₂²

  Distance objects (ours or PML's) map to it by their attributes: ``CosineSimilarity()``,
  ``DotProductSimilarity()``, ``LpDistance(p=2, power=1 | 2)``.
* :class:`CustomDistance`: any other distance object (``p`` ≠ 2, other powers, ``SNRDistance``, a user
  subclass overriding ``compute_mat``), kept as it is. The fused engines cannot express it: the registry
  skips every backend but the reference for it (``backend="auto"`` falls back with the one-time warning), and
  the reference calls the object for its matrix, as PML does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._records import resolve as resolve_collect_stats

SUPPORTED = ("cosine", "dot", "euclidean", "squared_euclidean")


# --------------------------------------------------------------------------------------------------
# PML's distance classes


class BaseDistance(nn.Module):
    """PML's ``BaseDistance``: normalise each side (p-norm) when ``normalize_embeddings``, ``compute_mat``,
    then ``mat ** power``. Subclasses override ``compute_mat`` and ``pairwise_distance``.

    ``collect_stats=True`` records ``initial_avg_query_norm`` / ``initial_avg_ref_norm`` /
    ``final_avg_query_norm`` / ``final_avg_ref_norm`` as detached 0-dim device tensors (PML stores Python
    floats read with ``.item()``, a host sync); ``None`` follows PML's global flag when PML is loaded."""

    def __init__(self, normalize_embeddings=True, p=2, power=1, is_inverted=False, collect_stats=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)  # None: PML's global flag, as PML reads it
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = is_inverted
        # PML's record-keeping lists (read by PML's record keeper / hooks).
        self._record_these = ["p", "power"]
        self._record_these_stats = []
        if self.collect_stats:
            self._record_these_stats = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm",
                                        "final_avg_ref_norm"]
            for name in self._record_these_stats:
                setattr(self, name, 0)

    def forward(self, query_emb, ref_emb=None):
        self.reset_stats()
        self.check_shapes(query_emb, ref_emb)
        query_normalized = self.maybe_normalize(query_emb)
        if ref_emb is None:
            ref_emb, ref_normalized = query_emb, query_normalized
        else:
            ref_normalized = self.maybe_normalize(ref_emb)
        self.set_default_stats(query_emb, ref_emb, query_normalized, ref_normalized)
        mat = self.compute_mat(query_normalized, ref_normalized)
        if self.power != 1:
            mat = mat ** self.power
        if mat.shape != (query_emb.shape[0], ref_emb.shape[0]):
            raise RuntimeError(f"{type(self).__name__}.compute_mat returned shape {tuple(mat.shape)}, expected "
                               f"{(query_emb.shape[0], ref_emb.shape[0])}")
        return mat

    def compute_mat(self, query_emb, ref_emb):
        raise NotImplementedError

    def pairwise_distance(self, query_emb, ref_emb):
        raise NotImplementedError

    def smallest_dist(self, *args, **kwargs):
        return torch.max(*args, **kwargs) if self.is_inverted else torch.min(*args, **kwargs)

    def largest_dist(self, *args, **kwargs):
        return torch.min(*args, **kwargs) if self.is_inverted else torch.max(*args, **kwargs)

    def margin(self, x, y):
        """How much closer x is than y: ``x - y`` for a distance, ``y - x`` for a similarity (inverted)."""
        return y - x if self.is_inverted else x - y

    def normalize(self, embeddings, dim=1, **kwargs):
        return torch.nn.functional.normalize(embeddings, p=self.p, dim=dim, **kwargs)

    def maybe_normalize(self, embeddings, dim=1, **kwargs):
        return self.normalize(embeddings, dim=dim, **kwargs) if self.normalize_embeddings else embeddings

    def get_norm(self, embeddings, dim=1, **kwargs):
        return torch.norm(embeddings, p=self.p, dim=dim, **kwargs)

    def reset_stats(self):
        for name in self._record_these_stats:
            setattr(self, name, 0)

    def set_default_stats(self, query_emb, ref_emb, query_normalized, ref_normalized):
        if self.collect_stats:
            with torch.no_grad():
                self.initial_avg_query_norm = self.get_norm(query_emb).mean()
                self.initial_avg_ref_norm = self.get_norm(ref_emb).mean()
                self.final_avg_query_norm = self.get_norm(query_normalized).mean()
                self.final_avg_ref_norm = self.get_norm(ref_normalized).mean()

    def check_shapes(self, query_emb, ref_emb):
        if query_emb.ndim != 2 or (ref_emb is not None and ref_emb.ndim != 2):
            raise ValueError("embeddings must be a 2D tensor of shape (batch_size, embedding_size)")

    def extra_repr(self):
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class DotProductSimilarity(BaseDistance):
    """S = q·r (on p-normalised vectors by default, as in PML); a similarity (``is_inverted=True``)."""

    def __init__(self, normalize_embeddings=True, p=2, power=1, collect_stats=None):
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=True,
                         collect_stats=collect_stats)

    def compute_mat(self, query_emb, ref_emb):
        return torch.matmul(query_emb, ref_emb.transpose(-1, -2))

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.sum(query_emb * ref_emb, dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity: DotProductSimilarity with normalisation always on (not a constructor argument)."""

    def __init__(self, p=2, power=1, collect_stats=None):
        super().__init__(normalize_embeddings=True, p=p, power=power, collect_stats=collect_stats)


class LpDistance(BaseDistance):
    """‖q − r‖_p (``torch.cdist``; float16 through ``F.pairwise_distance`` as PML does), on p-normalised
    vectors by default, raised to ``power``."""

    def __init__(self, normalize_embeddings=True, p=2, power=1, is_inverted=False, collect_stats=None):
        if is_inverted:
            raise ValueError("LpDistance is a distance: is_inverted must be False")
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=False,
                         collect_stats=collect_stats)

    def compute_mat(self, query_emb, ref_emb):
        if ref_emb is None:
            ref_emb = query_emb
        if query_emb.dtype == torch.float16:  # PML's path: cdist does not take float16
            return self.pairwise_distance(query_emb.unsqueeze(1), ref_emb.unsqueeze(0))
        return torch.cdist(query_emb, ref_emb, p=self.p)

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.nn.functional.pairwise_distance(query_emb, ref_emb, p=self.p)


class SNRDistance(BaseDistance):
    """Signal-to-noise ratio distance: Var(r − q) / Var(q) (unbiased, over features), on normalised vectors
    by default as in PML. Builds an N×M×D tensor, as PML's does."""

    def __init__(self, normalize_embeddings=True, p=2, power=1, is_inverted=False, collect_stats=None):
        if is_inverted:
            raise ValueError("SNRDistance is a distance: is_inverted must be False")
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=False,
                         collect_stats=collect_stats)

    def compute_mat(self, query_emb, ref_emb):
        anchor_variances = torch.var(query_emb, dim=1)
        pairwise_variances = torch.var(query_emb.unsqueeze(1) - ref_emb, dim=2)
        return pairwise_variances / anchor_variances.unsqueeze(1)

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.var(query_emb - ref_emb, dim=1) / torch.var(query_emb, dim=1)


class BatchedDistance(nn.Module):
    """PML's ``BatchedDistance``: calls ``distance`` on query chunks of ``batch_size`` rows and hands each
    chunk's matrix to ``iter_fn(mat, start, end)``; returns None. Other attributes (``is_inverted``, ``p``,
    ...) are read from the wrapped distance. For inference; not a loss's ``distance=``."""

    def __init__(self, distance, iter_fn=None, batch_size=32):
        super().__init__()
        self.distance = distance
        self.iter_fn = iter_fn
        self.batch_size = batch_size

    def forward(self, query_emb, ref_emb=None):
        if self.iter_fn is None:
            raise ValueError("BatchedDistance needs iter_fn(mat, start, end) to receive each chunk")
        ref_emb = ref_emb if ref_emb is not None else query_emb
        for s in range(0, query_emb.shape[0], self.batch_size):
            e = s + self.batch_size
            self.iter_fn(self.distance(query_emb[s:e], ref_emb), s, e)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.distance, name)


# --------------------------------------------------------------------------------------------------
# What the fused engines branch on


@dataclass(frozen=True)
class Distance:
    name: str  # one of SUPPORTED
    normalize: bool  # L2-normalise both sides first

    @property
    def is_similarity(self) -> bool:
        """True for cosine/dot (PML's ``is_inverted``): larger values mean closer."""
        return self.name in ("cosine", "dot")

    @property
    def squared(self) -> bool:
        return self.name == "squared_euclidean"

    def margin(self, x, y):
        """PML's ``distance.margin(x, y)``: ``x - y`` for a distance, ``y - x`` for a similarity."""
        return y - x if self.is_similarity else x - y

    def as_module(self) -> BaseDistance:
        """The distance class PML would use for this distance (the matrix computed as PML computes it)."""
        if self.name == "cosine":
            return CosineSimilarity()
        if self.name == "dot":
            return DotProductSimilarity(normalize_embeddings=self.normalize)
        return LpDistance(normalize_embeddings=self.normalize, power=2 if self.squared else 1)


@dataclass(frozen=True, eq=False)
class CustomDistance:
    """A distance object the engines cannot express, for the reference backend: ``module(x, ref)`` is the
    matrix (PML's call), ``margin`` / ``is_similarity`` / ``normalize`` read from the object; any other
    attribute is the object's."""
    module: object
    name = "custom"
    squared = False

    @property
    def normalize(self) -> bool:
        return bool(self.module.normalize_embeddings)

    @property
    def is_similarity(self) -> bool:
        return bool(self.module.is_inverted)

    def margin(self, x, y):
        return self.module.margin(x, y)

    def __call__(self, query, ref=None):
        return self.module(query, ref)

    def __getattr__(self, name):  # is_inverted, p, power, maybe_normalize, ... (only called for missing ones)
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self):
        return f"CustomDistance({self.module!r})"


def is_custom(distance) -> bool:
    return isinstance(distance, CustomDistance)


_OURS = (CosineSimilarity, DotProductSimilarity, LpDistance)
_HINT = ("supported: a distance object (dml_kernels' or PML's: CosineSimilarity(), DotProductSimilarity(), "
         "LpDistance(p=2, power=1 or 2) on the fused engines, any other on the reference backend), or the strings "
         + ", ".join(SUPPORTED))


def parse_distance(distance, normalize_embeddings=True, *, default: str) -> Distance:
    """Turn a string, ``None`` (the loss's PML default) or a distance object (ours or PML's) into a Distance, or
    a :class:`CustomDistance` for an object the engines cannot express."""
    if distance is None:
        distance = default
    if isinstance(distance, (Distance, CustomDistance)):
        return distance
    if isinstance(distance, str):
        if distance not in SUPPORTED:
            raise ValueError(f"distance={distance!r} is not supported; {_HINT}")
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(f"normalize_embeddings must be a bool, got {type(normalize_embeddings).__name__}")
        # PML's CosineSimilarity forces normalisation on.
        return Distance(distance, True if distance == "cosine" else normalize_embeddings)
    try:
        return _from_object(distance)
    except ValueError:
        if _is_distance_object(distance):
            return CustomDistance(distance)
        raise


def _is_distance_object(obj) -> bool:
    """Callable like PML's distances (a matrix from ``obj(query, ref)``: not a BatchedDistance, which calls a
    function per chunk), with the attributes the losses read."""
    return (callable(obj) and type(obj).__name__ != "BatchedDistance" and isinstance(getattr(obj, "is_inverted", None), bool)
            and isinstance(getattr(obj, "normalize_embeddings", None), bool) and callable(getattr(obj, "margin", None)))


def _from_object(obj) -> Distance:
    """A distance object → Distance, read from its attributes. Ours must be exactly one of our three
    classes (a subclass may override ``compute_mat``); PML's (or anything else) are matched by class name,
    as PML's own classes are not importable here without PML."""
    cls = type(obj).__name__
    p = getattr(obj, "p", None)
    power = getattr(obj, "power", None)
    normalize = getattr(obj, "normalize_embeddings", None)
    inverted = getattr(obj, "is_inverted", None)
    unsupported = ValueError(f"distance object {cls}(p={p}, power={power}, normalize_embeddings={normalize}) is "
                             f"not supported; {_HINT}")
    if isinstance(obj, (BaseDistance, BatchedDistance)) and type(obj) not in _OURS:
        raise unsupported
    if not isinstance(normalize, bool) or not isinstance(inverted, bool):
        raise unsupported
    if power not in (1, 2) or (p != 2 and not (cls == "DotProductSimilarity" and normalize is False)):
        raise unsupported  # p only enters through the normalisation (and LpDistance's norm)
    if cls == "CosineSimilarity" and power == 1 and inverted and normalize:
        return Distance("cosine", True)
    if cls == "DotProductSimilarity" and power == 1 and inverted:
        return Distance("cosine" if normalize else "dot", normalize)
    if cls == "LpDistance" and not inverted:
        return Distance("euclidean" if power == 1 else "squared_euclidean", normalize)
    raise unsupported


__all__ = ["BaseDistance", "CosineSimilarity", "DotProductSimilarity", "LpDistance", "SNRDistance",
           "BatchedDistance", "Distance", "CustomDistance", "parse_distance", "SUPPORTED"]
