"""PML 2.9's public loss base classes, for losses written against PML's API: subclass
:class:`BaseMetricLossFunction` and implement ``compute_loss(embeddings, labels, indices_tuple, ref_emb,
ref_labels)`` returning a loss dict (or :class:`GenericPairLoss` and implement ``_compute_loss`` from the
pair matrix / pair values), and the loss gets PML's forward — shape checks, labels moved to the embeddings'
device, ``ref_emb`` defaulting to the embeddings, the embedding regularizer entry, the reducer — plus
``reducer=``, ``distance=`` (default ``LpDistance(p=2)``, a distance *object* as in PML),
``embedding_regularizer=``, ``sub_loss_names()``, ``zero_losses()``, ``add_to_recordable_attributes``.
:class:`WeightRegularizerMixin` adds ``weight_regularizer=`` / ``weight_reg_weight=`` / ``weight_init_func=``.

Such a loss is computed by its own code, in plain PyTorch (no fused kernel: dml_kernels cannot know its
formula); the reducers, regularizers and distances it uses are dml_kernels' (or PML's objects, passed in).
Built on dml_kernels' loss base (``_base.py``), so reducer handling is the one every dk loss uses. Every
dml_kernels loss counts as an instance of :class:`BaseMetricLossFunction` (and PML's GenericPairLoss subclasses
as instances of :class:`GenericPairLoss`; CrossBatchMemory and SelfSupervisedLoss of :class:`BaseLossWrapper`),
as in PML, although they do not inherit this forward.

Self-pairs: ``GenericPairLoss`` without an ``indices_tuple`` excludes (i, i) when ``ref_emb`` is omitted or is
the embeddings tensor itself with ``labels`` as ``ref_labels`` (dml_kernels' rule; PML keys it on the labels
object alone).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import distances as _distances
from .. import reducers as _reducers
from .._pairs import indices_to_pairs
from ..distances import parse_distance
from ..functional.embedding_losses import ArgumentError
from ._base import _MetricLoss


class _VirtualBase(type):
    """A metaclass whose classes may name further classes (``_virtual``: a predicate on a class, set in the
    class body) that count as subclasses — how every dk loss is an instance of ``BaseMetricLossFunction``."""

    def __instancecheck__(cls, obj):
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub):
        if type.__subclasscheck__(cls, sub):
            return True
        virtual = cls.__dict__.get("_virtual")
        return virtual is not None and isinstance(sub, type) and virtual(sub)


# ------------------------------------------------------------------------------------------- shared helpers

def check_shapes(embeddings, labels):
    """PML's ``check_shapes``: labels, when given, are 1-D with one per embedding (dimensionality is left to
    the distance, as in PML)."""
    if labels is not None and embeddings.shape[0] != labels.shape[0]:
        raise ValueError("Number of embeddings must equal number of labels")
    if labels is not None and labels.ndim != 1:
        raise ValueError("labels must be a 1D tensor of shape (batch_size,)")


def set_ref_emb(embeddings, labels, ref_emb, ref_labels):
    """PML's ``set_ref_emb``: the embeddings (and labels) themselves when no ``ref_emb`` is given."""
    if ref_emb is not None:
        if ref_labels is not None:
            ref_labels = ref_labels.to(ref_emb.device)
    else:
        ref_emb, ref_labels = embeddings, labels
    check_shapes(ref_emb, ref_labels)
    return ref_emb, ref_labels


class Records:
    """PML's ``ModuleWithRecords`` bookkeeping: ``add_to_recordable_attributes`` (non-stat names always, stat
    names only with ``collect_stats``; each new one starts at 0) and ``reset_stats``."""

    def add_to_recordable_attributes(self, name=None, list_of_names=None, is_stat=False):
        if is_stat and not self.collect_stats:
            return
        names = getattr(self, "_record_these_stats" if is_stat else "_record_these", None)
        if names is None:
            names = []
            setattr(self, "_record_these_stats" if is_stat else "_record_these", names)
        for n in ([name] if name is not None else []) + list(list_of_names or []):
            if n not in names:
                names.append(n)
            if not hasattr(self, n):
                setattr(self, n, 0)

    def reset_stats(self):
        for n in getattr(self, "_record_these_stats", []):
            setattr(self, n, 0)


class TorchInitWrapper:
    """PML's ``TorchInitWrapper``: ``init_func(tensor, **kwargs)`` in place."""

    def __init__(self, init_func, **kwargs):
        self.init_func, self.kwargs = init_func, kwargs

    def __call__(self, tensor):
        self.init_func(tensor, **self.kwargs)


# ------------------------------------------------------------------------------------------------- mixins

class EmbeddingRegularizerMixin:
    """PML's mixin (part of every loss): the ``"embedding_reg_loss"`` entry, ``embedding_regularizer(embeddings)
    · embedding_reg_weight``, already reduced."""

    def __init__(self, embedding_regularizer=None, embedding_reg_weight=1, **kwargs):
        super().__init__(embedding_regularizer=embedding_regularizer, embedding_reg_weight=embedding_reg_weight,
                         **kwargs)
        if self.embedding_regularizer is not None:
            self.add_to_recordable_attributes(name="embedding_reg_weight")

    def embedding_regularization_loss(self, embeddings):
        loss = 0 if self.embedding_regularizer is None else \
            self.embedding_regularizer(embeddings) * self.embedding_reg_weight
        return {"losses": loss, "indices": None, "reduction_type": "already_reduced"}

    def add_embedding_regularization_to_loss_dict(self, loss_dict, embeddings):
        if self.embedding_regularizer is not None:
            loss_dict["embedding_reg_loss"] = self.embedding_regularization_loss(embeddings)

    def regularization_loss_names(self):
        return ["embedding_reg_loss"]


class WeightMixin:
    """PML's ``WeightMixin``: ``weight_init_func`` (default: in-place N(0, 1), PML's), for the subclass to apply
    to its weights."""

    def __init__(self, weight_init_func=None, **kwargs):
        super().__init__(**kwargs)
        self.weight_init_func = self.get_default_weight_init_func() if weight_init_func is None else weight_init_func

    def get_default_weight_init_func(self):
        return TorchInitWrapper(torch.nn.init.normal_)


class WeightRegularizerMixin(WeightMixin):
    """PML's mixin for losses with class weights: ``weight_regularizer=`` / ``weight_reg_weight=`` and the
    ``"weight_reg_loss"`` entry (``add_weight_regularization_to_loss_dict(loss_dict, weights)``, weights
    class-major: C×D)."""

    _has_weight_regularizer = True  # the loss base then takes and stores weight_regularizer / weight_reg_weight

    def __init__(self, weight_regularizer=None, weight_reg_weight=1, **kwargs):
        super().__init__(weight_regularizer=weight_regularizer, weight_reg_weight=weight_reg_weight, **kwargs)
        if self.weight_regularizer is not None:
            self.add_to_recordable_attributes(name="weight_reg_weight")

    def weight_regularization_loss(self, weights):
        loss = 0 if self.weight_regularizer is None else self.weight_regularizer(weights) * self.weight_reg_weight
        return {"losses": loss, "indices": None, "reduction_type": "already_reduced"}

    def add_weight_regularization_to_loss_dict(self, loss_dict, weights):
        if self.weight_regularizer is not None:
            loss_dict["weight_reg_loss"] = self.weight_regularization_loss(weights)

    def regularization_loss_names(self):
        return ["weight_reg_loss"]


# ---------------------------------------------------------------------------------------- the loss bases

class BaseMetricLossFunction(EmbeddingRegularizerMixin, Records, _MetricLoss, metaclass=_VirtualBase):
    """PML's ``BaseMetricLossFunction``: subclasses implement ``compute_loss(embeddings, labels, indices_tuple,
    ref_emb, ref_labels)`` and return PML's loss dict; ``forward`` is PML's. Keyword arguments: ``collect_stats``,
    ``reducer``, ``distance`` (an object or a dk distance string with ``normalize_embeddings=``),
    ``embedding_regularizer``, ``embedding_reg_weight`` (and dk's ``backend`` / ``check_inputs``, stored for
    subclasses that call dk ops)."""

    @staticmethod
    def _virtual(cls):
        return issubclass(cls, _MetricLoss)

    def __init__(self, collect_stats=None, **kwargs):
        self.collect_stats = bool(collect_stats)
        super().__init__(**kwargs)
        self.collect_stats = bool(collect_stats)
        if self.distance is None:
            self.distance = self.get_default_distance()
        elif isinstance(self.distance, str):
            self.distance = parse_distance(self.distance, self.normalize_embeddings, default="euclidean").as_module()

    def get_default_distance(self):
        return _distances.LpDistance(p=2)  # PML's ModuleWithRecordsAndDistance default

    def get_default_reducer(self):
        return _reducers.MeanReducer()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """This has to be implemented: the loss dict ``{name: {"losses", "indices", "reduction_type"}}``."""
        raise NotImplementedError

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        self.reset_stats()
        check_shapes(embeddings, labels)
        if labels is not None:
            labels = labels.to(embeddings.device)
        ref_emb, ref_labels = set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def zero_loss(self):
        return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}

    def zero_losses(self):
        return {name: self.zero_loss() for name in self.sub_loss_names()}

    def _sub_loss_names(self):
        return ["loss"]

    def sub_loss_names(self):
        return self._sub_loss_names() + self.all_regularization_loss_names()

    def all_regularization_loss_names(self):
        """PML's rule: for each ``*RegularizerMixin`` along the MRO whose regularizer is set, its names."""
        names = []
        for base in inspect.getmro(type(self)):
            if base.__name__.endswith("RegularizerMixin"):
                kind = base.__name__[: -len("RegularizerMixin")].lower()
                if getattr(self, f"{kind}_regularizer", None) is not None:
                    names.extend(base.regularization_loss_names(self))
        return names


_GENERIC_PAIR_LOSSES = {"CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss", "IntraPairVarianceLoss",
                        "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss", "TupletMarginLoss"}


class GenericPairLoss(BaseMetricLossFunction):
    """PML's ``GenericPairLoss(mat_based_loss, **kwargs)``: pairs from ``indices_tuple`` (a triplet (a, p, n) →
    (a, p), (a, n)) or all label pairs; at most one positive and one negative pair → zero losses; else
    ``self.distance(embeddings, ref_emb)`` and ``_compute_loss(mat, pos_mask, neg_mask)`` (matrix based:
    0/1 masks in the matrix's dtype) or ``_compute_loss(pos_pair, neg_pair, indices_tuple)`` (pair based: the
    pair values; ``[]`` for an empty side)."""

    @staticmethod
    def _virtual(cls):
        return issubclass(cls, _MetricLoss) and cls.__name__ in _GENERIC_PAIR_LOSSES

    def __init__(self, mat_based_loss, **kwargs):
        super().__init__(**kwargs)
        self.loss_method = self.mat_based_loss if mat_based_loss else self.pair_based_loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None and indices_tuple is None:
            raise ValueError("labels and indices_tuple cannot both be None")
        pairs = self.pairs(indices_tuple, labels, ref_labels, self_mode=ref_emb is embeddings and ref_labels is labels)
        if all(len(t) <= 1 for t in pairs):
            return self.zero_losses()
        mat = self.distance(embeddings, ref_emb)
        return self.loss_method(mat, pairs)

    @staticmethod
    def pairs(indices_tuple, labels, ref_labels, self_mode):
        """PML's ``convert_to_pairs``: (a1, p, a2, n)."""
        if indices_tuple is not None:
            return indices_to_pairs(indices_tuple)
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        pos = same.clone()
        if self_mode:
            pos.fill_diagonal_(False)
        return (*torch.where(pos), *torch.where(~same))

    def _compute_loss(self, *args):
        raise NotImplementedError

    def mat_based_loss(self, mat, indices_tuple):
        a1, p, a2, n = indices_tuple
        pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
        pos_mask[a1, p] = 1
        neg_mask[a2, n] = 1
        if bool(((pos_mask != 0) & (neg_mask != 0)).any()):
            raise ArgumentError("indices_tuple has a pair that is both positive and negative (PML 2.9 asserts: "
                                "each pair should be either positive or negative)")
        return self._compute_loss(mat, pos_mask, neg_mask)

    def pair_based_loss(self, mat, indices_tuple):
        a1, p, a2, n = indices_tuple
        pos_pair = mat[a1, p] if len(a1) > 0 else []
        neg_pair = mat[a2, n] if len(a2) > 0 else []
        return self._compute_loss(pos_pair, neg_pair, indices_tuple)


class BaseLossWrapper(nn.Module, metaclass=_VirtualBase):
    """PML's ``BaseLossWrapper(loss)``: subclasses define ``supported_losses()`` (static) and
    ``check_loss_support(loss_name)`` (class method), called with the wrapped loss's class name."""

    @staticmethod
    def _virtual(cls):
        return cls.__module__ == "dml_kernels.losses.wrappers" and cls.__name__ in ("CrossBatchMemory",
                                                                                   "SelfSupervisedLoss")

    def __init__(self, loss, **kwargs):
        super().__init__(**kwargs)
        self.check_loss_support(type(loss).__name__)

    @staticmethod
    def supported_losses():
        raise NotImplementedError

    @classmethod
    def check_loss_support(cls, loss_name):
        raise NotImplementedError


__all__ = ["BaseMetricLossFunction", "GenericPairLoss", "BaseLossWrapper", "EmbeddingRegularizerMixin",
           "WeightRegularizerMixin", "WeightMixin"]
