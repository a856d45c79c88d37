"""The base of every ``dk.losses`` class: PML's common constructor arguments (``reducer``,
``embedding_regularizer``, ``embedding_reg_weight``; ``weight_regularizer``, ``weight_reg_weight`` on the
proxy losses) plus ``backend=`` and ``check_inputs=``.

``self.reducer`` is set as PML's ``set_reducer`` sets it: the loss's default reducer (or a deep copy of the one
given) for a loss with one sub-loss, a ``MultipleReducers`` with one per sub-loss name (regularizer entries
included) otherwise, a given MultipleReducers / DoNothingReducer as it is. With the default reduction the
fused op runs (regularizer terms are added to it); any other reducer reduces the loss's PML loss dict, built
on the reference backend for now (``dml_kernels/functional/_common.py``).
"""
from __future__ import annotations

from torch import nn

from .. import distances as _distances
from .. import reducers as _reducers
from .._records import resolve as resolve_collect_stats
from . import _stats
from ..functional._common import LOSS_REDUCTION, default_reducer


# PML's ``get_default_distance()`` of each loss class (found along the class's MRO, so a subclass inherits it);
# a loss not listed uses CosineSimilarity, as PML's BaseMetricLossFunction does.
PML_DEFAULT_DISTANCE = {
    "ContrastiveLoss": ("LpDistance", {}),
    "GeneralizedLiftedStructureLoss": ("LpDistance", {}),
    "LiftedStructureLoss": ("LpDistance", {}),
    "MarginLoss": ("LpDistance", {}),
    "TripletMarginLoss": ("LpDistance", {}),
    "P2SGradLoss": ("LpDistance", {}),
    "NCALoss": ("LpDistance", {"power": 2}),
    "ProxyNCALoss": ("LpDistance", {"power": 2}),
    "NPairsLoss": ("DotProductSimilarity", {}),
    "NormalizedSoftmaxLoss": ("DotProductSimilarity", {}),
    "SignalToNoiseRatioContrastiveLoss": ("SNRDistance", {}),
}


def default_distance(cls, normalize_embeddings=True):
    """A new instance of PML's default distance object for loss (or miner) class ``cls`` (dml_kernels' class of
    the same name); ``normalize_embeddings`` (dml_kernels' keyword) is passed where the class takes it."""
    name, kwargs = next((PML_DEFAULT_DISTANCE[c.__name__] for c in cls.__mro__ if c.__name__ in PML_DEFAULT_DISTANCE),
                        ("CosineSimilarity", {}))
    if name != "CosineSimilarity":
        kwargs = dict(kwargs, normalize_embeddings=normalize_embeddings)
    return getattr(_distances, name)(**kwargs, collect_stats=None)


def _check_regularizer(regularizer, what):
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"{what} must be a regularizer (a module called with a 2-D tensor), e.g. "
                        f"dml_kernels.regularizers.LpRegularizer() or a PML regularizer; got "
                        f"{type(regularizer).__name__}")


class _MetricLoss(nn.Module):
    _default_distance = "cosine"
    _op = None  # the loss op (a key of LOSS_REDUCTION): its sub-loss names and default reducer
    _has_weight_regularizer = False  # PML's WeightRegularizerMixin (the proxy losses)

    def __init__(self, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, *,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None,
                 **unsupported):
        super().__init__()
        weight_regularizer = unsupported.pop("weight_regularizer", None) if self._has_weight_regularizer else None
        weight_reg_weight = unsupported.pop("weight_reg_weight", 1) if self._has_weight_regularizer else 1
        for key in unsupported:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        _check_regularizer(embedding_regularizer, "embedding_regularizer")
        _check_regularizer(weight_regularizer, "weight_regularizer")
        self.collect_stats = resolve_collect_stats(collect_stats)
        if self.collect_stats:  # PML's recorded statistics (losses/_stats.py), as device scalars
            self._record_these_stats = list(_stats.STAT_NAMES.get(_stats.kind_of(type(self)), ()))
            for name in self._record_these_stats:
                setattr(self, name, 0)
            if self._record_these_stats:
                self.register_forward_hook(_stats.hook, with_kwargs=True)
        self.normalize_embeddings = normalize_embeddings
        # As in PML, ``self.distance`` is always a distance object: the one given, or the loss's default
        # (PML programs read it, e.g. ``TripletMarginMiner(distance=loss.distance)``). A string is kept as given.
        self.distance = self.get_default_distance() if distance is None else distance
        self.backend = backend
        self.check_inputs = check_inputs
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.set_reducer(reducer)

    # ---- PML's reducer / regularizer machinery ----

    def _sub_loss_names(self):
        return list(LOSS_REDUCTION[self._op][0])

    def sub_loss_names(self):
        """PML's order: the loss's own entries, then "weight_reg_loss", then "embedding_reg_loss"."""
        names = self._sub_loss_names()
        if self.weight_regularizer is not None:
            names.append("weight_reg_loss")
        if self.embedding_regularizer is not None:
            names.append("embedding_reg_loss")
        return names

    def get_default_distance(self):
        return default_distance(type(self), self.normalize_embeddings)

    def get_default_reducer(self):
        return default_reducer(self._op)

    def set_reducer(self, reducer):
        self.reducer = _reducers.for_loss(reducer, self.sub_loss_names(), self.get_default_reducer,
                                          copy_reducer=True)
        # The reducer made here from no argument is the default: the fused op computes it, no inspection needed.
        self._made_reducer = (self.reducer if reducer is None else None,)  # a tuple: not a registered child

    def _reduction(self, embeddings, weights=None):
        """(reducer for the functional call — None for the default one made here —, regularizer entries)."""
        extra = {}
        if self.weight_regularizer is not None and weights is not None:
            extra["weight_reg_loss"] = self.weight_regularizer(weights) * self.weight_reg_weight
        if self.embedding_regularizer is not None:
            extra["embedding_reg_loss"] = self.embedding_regularizer(embeddings) * self.embedding_reg_weight
        reducer = None if (self.reducer is self._made_reducer[0] and not extra) else self.reducer
        return dict(reducer=reducer, _extra=extra or None)

    def _common(self):
        return dict(distance=self.distance, normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                    check_inputs=self.check_inputs)
