"""The distance / similarity a loss is computed with.

PML passes distance *objects* (``CosineSimilarity()``, ``LpDistance(power=2)``, ...); we reduce every
accepted form to one small immutable value, :class:`Distance`, that kernels can branch on.

* ``"cosine"``            S = x̂·r̂                (a similarity: larger = closer)
* ``"dot"``               S = x·r  (x̂·r̂ when ``normalize=True``, PML's default)
* ``"euclidean"``         D = ‖x − r‖₂          (a distance: smaller = closer)
* ``"squared_euclidean"`` D = ‖x − r‖₂²
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("cosine", "dot", "euclidean", "squared_euclidean")


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


def parse_distance(distance, normalize_embeddings=True, *, default: str) -> Distance:
    """Turn a string, ``None`` (the loss's PML default) or a PML distance object into a Distance."""
    if distance is None:
        distance = default
    if isinstance(distance, Distance):
        return distance
    if isinstance(distance, str):
        if distance not in SUPPORTED:
            raise ValueError(
                f"distance={distance!r} is not supported; use one of {SUPPORTED} or a PML "
                "CosineSimilarity / DotProductSimilarity / LpDistance(p=2, power=1|2) object"
            )
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(f"normalize_embeddings must be a bool, got {type(normalize_embeddings).__name__}")
        # PML's CosineSimilarity forces normalisation on.
        return Distance(distance, True if distance == "cosine" else normalize_embeddings)
    return _from_pml_object(distance)


def _from_pml_object(obj) -> Distance:
    cls = type(obj).__name__
    p = getattr(obj, "p", None)
    power = getattr(obj, "power", None)
    normalize = getattr(obj, "normalize_embeddings", None)
    unsupported = ValueError(
        f"distance object {cls}(p={p}, power={power}) is not supported; supported: CosineSimilarity(), "
        "DotProductSimilarity(), LpDistance(p=2, power=1 or 2), or the strings " + ", ".join(SUPPORTED)
    )
    if normalize is None or not isinstance(normalize, bool):
        raise unsupported
    if cls == "CosineSimilarity" and power == 1:
        return Distance("cosine", True)
    if cls == "DotProductSimilarity" and power == 1:
        return Distance("cosine" if normalize else "dot", normalize)
    if cls == "LpDistance" and p == 2 and power in (1, 2) and not getattr(obj, "is_inverted", False):
        return Distance("euclidean" if power == 1 else "squared_euclidean", normalize)
    raise unsupported
