"""``dk.regularizers``: PML 2.9's five regularizers under PML's names and arguments.

A regularizer is a module called with a matrix (embeddings N×D, or a loss's class weights C×D) that returns a
0-dim tensor: its per-row losses (``element``), reduced by its reducer (MeanReducer; DivisorReducer for
SparseCentersRegularizer). Losses take them as ``embedding_regularizer=`` (+ ``embedding_reg_weight=``) and,
the proxy losses, ``weight_regularizer=`` (+ ``weight_reg_weight=``); PML's regularizer objects work there too.

``distance=`` takes PML's distance objects (or a ``dk.Distance`` / distance string where one is meaningful);
each regularizer checks the kind it needs, with a ``ValueError`` where PML asserts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import reducers as _reducers
from ._records import resolve as resolve_collect_stats
from .distances import Distance, parse_distance


class BaseRegularizer(nn.Module):
    """``forward(x)``: ``compute_loss(x)`` (a loss dict) reduced by ``reducer`` with labels ``arange(len(x))``."""

    def __init__(self, collect_stats=None, reducer=None, distance=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)
        self.distance = self.get_default_distance() if distance is None else distance
        self.reducer = _reducers.for_loss(reducer, ["loss"], self.get_default_reducer, copy_reducer=True)

    def get_default_reducer(self):
        return _reducers.MeanReducer()

    def get_default_distance(self):
        return Distance("euclidean", True)  # PML's LpDistance(); unused by LpRegularizer / ZeroMeanRegularizer

    def compute_loss(self, x):
        raise NotImplementedError

    def forward(self, x):
        if not torch.is_tensor(x) or x.dim() != 2 or not x.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__} takes a 2-D float tensor (rows × features), got "
                             + (f"shape {tuple(x.shape)}, {x.dtype}" if torch.is_tensor(x) else type(x).__name__))
        loss_dict = self.compute_loss(x)
        return self.reducer(loss_dict, x, torch.arange(x.shape[0], device=x.device))


def _elements(losses, x):
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=x.device),
                     "reduction_type": "element"}}


def _similarity(distance, who):
    """A similarity distance (PML ``is_inverted``) as a dk Distance, or a clear error."""
    dist = parse_distance(distance, default="cosine")
    if not dist.is_similarity:
        raise ValueError(f"{who} needs a similarity (CosineSimilarity or DotProductSimilarity), got {distance!r}")
    return dist


def _similarity_matrix(w, dist):
    w = F.normalize(w, p=2, dim=1) if dist.normalize else w
    return w @ w.T


class LpRegularizer(BaseRegularizer):
    """Mean over rows of ‖w_i‖_p ** power."""

    def __init__(self, p=2, power=1, **kwargs):
        super().__init__(**kwargs)
        self.p, self.power = p, power

    def compute_loss(self, x):
        reg = torch.norm(x, p=self.p, dim=1)
        if self.power != 1:
            reg = reg ** self.power
        return _elements(reg, x)


class ZeroMeanRegularizer(BaseRegularizer):
    """Mean over rows of |Σ_d w_id|."""

    def compute_loss(self, x):
        return _elements(torch.abs(torch.sum(x, dim=1)), x)


class CenterInvariantRegularizer(BaseRegularizer):
    """Mean over rows of (n_i − mean_j n_j)² / 4 with n_i = ‖w_i‖_p² (``distance`` an un-normalised LpDistance
    with power 1; its ``p`` is used)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._p = self._norm_p(self.distance)

    def get_default_distance(self):
        return Distance("euclidean", False)  # PML's LpDistance(power=1, normalize_embeddings=False)

    @staticmethod
    def _norm_p(distance):
        if isinstance(distance, Distance):
            if distance.name == "euclidean" and not distance.normalize:
                return 2
        elif (type(distance).__name__ == "LpDistance" and getattr(distance, "power", None) == 1
              and getattr(distance, "normalize_embeddings", None) is False):
            return getattr(distance, "p", 2)
        raise ValueError("CenterInvariantRegularizer needs LpDistance(power=1, normalize_embeddings=False), got "
                         f"{distance!r}")

    def compute_loss(self, w):
        norms = torch.norm(w, p=self._p, dim=1) ** 2
        deviations = norms - torch.mean(norms)
        return _elements(deviations ** 2 / 4, w)


class RegularFaceRegularizer(BaseRegularizer):
    """Mean over rows of the similarity to the nearest other row (chosen without gradient; ``distance`` a
    similarity, default cosine)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._dist = _similarity(self.distance, "RegularFaceRegularizer")

    def get_default_distance(self):
        return Distance("cosine", True)

    def compute_loss(self, w):
        sim = _similarity_matrix(w, self._dist)
        with torch.no_grad():
            others = sim.clone()
            others.fill_diagonal_(torch.finfo(w.dtype).min)
            nearest = others.max(dim=1).indices
        return _elements(sim.gather(1, nearest.unsqueeze(1)).squeeze(1), w)


class SparseCentersRegularizer(BaseRegularizer):
    """SoftTriple's centre regularizer: for each class's K consecutive rows and each pair i < j among them,
    sqrt(2 + tiny − min(2·cos_ij, 2)); summed and divided by 2·#pairs = C·K·(K−1) (DivisorReducer)."""

    def __init__(self, num_classes, centers_per_class, **kwargs):
        super().__init__(**kwargs)
        if centers_per_class <= 1:
            raise ValueError(f"SparseCentersRegularizer needs centers_per_class > 1, got {centers_per_class}")
        dist = _similarity(self.distance, "SparseCentersRegularizer")
        if dist.name != "cosine":
            raise ValueError(f"SparseCentersRegularizer needs CosineSimilarity, got {self.distance!r}")
        self.num_classes, self.centers_per_class = int(num_classes), int(centers_per_class)
        i, j = torch.triu_indices(self.centers_per_class, self.centers_per_class, offset=1)
        start = (torch.arange(self.num_classes) * self.centers_per_class).unsqueeze(1)
        self._pairs = ((start + i).flatten(), (start + j).flatten())  # PML's same-class mask, row-major

    def get_default_distance(self):
        return Distance("cosine", True)

    def get_default_reducer(self):
        return _reducers.DivisorReducer()

    def compute_loss(self, w):
        total = self.num_classes * self.centers_per_class
        if w.shape[0] != total:
            raise ValueError(f"SparseCentersRegularizer({self.num_classes}, {self.centers_per_class}) takes "
                             f"{total} rows, got {w.shape[0]}")
        sim = _similarity_matrix(w, Distance("cosine", True))
        i, j = (t.to(w.device) for t in self._pairs)
        reg = torch.sqrt(2.0 + torch.finfo(w.dtype).tiny - torch.clamp(2.0 * sim[i, j], max=2))
        loss = _elements(reg, w)
        loss["loss"]["divisor"] = 2 * len(reg)
        return loss


__all__ = ["BaseRegularizer", "CenterInvariantRegularizer", "LpRegularizer", "RegularFaceRegularizer",
           "SparseCentersRegularizer", "ZeroMeanRegularizer"]
