"""What every miner shares: PML's constructor arguments (``distance=``, ``collect_stats=``) plus dk's
(``normalize_embeddings=``, ``backend=``, ``check_inputs=``), input checks, the distance in the form the ops
take, PML's output bookkeeping (``num_pos_pairs`` / ``num_neg_pairs`` / ``num_triplets``)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import _registry
from ..distances import CosineSimilarity, Distance, LpDistance, parse_distance
from .._validation import check_embeddings, check_labels, check_ref


class _Miner(nn.Module):
    _default_distance = "cosine"

    def __init__(self, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                 collect_stats=None):
        super().__init__()
        if collect_stats:
            raise NotImplementedError(f"{type(self).__name__}(collect_stats=True): PML's recorded statistics are "
                                      "not implemented by dml_kernels' miners")
        # As in PML, ``self.distance`` is always a distance object: the one given or PML's default for this miner
        # (LpDistance; CosineSimilarity for MultiSimilarityMiner). A string is kept as given.
        self.normalize_embeddings = normalize_embeddings
        self.distance = self.get_default_distance() if distance is None else distance
        self.backend, self.check_inputs = backend, check_inputs
        self.collect_stats = False

    def get_default_distance(self):
        """PML's ``get_default_distance()``: a new instance of this miner's default distance object."""
        if self._default_distance == "cosine":
            return CosineSimilarity()
        return LpDistance(normalize_embeddings=self.normalize_embeddings)

    def _common(self):
        return dict(distance=self.distance, normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                    check_inputs=self.check_inputs)


class _PMLMiner(_Miner):
    """The miners whose computation is one registered op: ``forward`` = ``mine`` + PML's bookkeeping.

    ``distance=``: a string or a distance object (ours or PML's) the engines express (see
    ``dk.distances``); any other distance object (SNRDistance, LpDistance(p=1), a custom subclass) is kept as
    is and computed by the reference op in plain PyTorch, as PML's miner would."""

    _default_distance = "euclidean"  # PML's BaseMiner: LpDistance(normalize_embeddings=True, p=2, power=1)
    _fixed_distance: str | None = None  # PML asserts LpDistance(p=2, power=1, normalize_embeddings=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._resolve_distance()  # a bad distance= fails at construction, as in PML

    def _resolve_distance(self):
        fixed = ValueError(f"{type(self).__name__} needs distance=LpDistance(p=2, power=1, normalize_embeddings=True) "
                           f"(the default, or 'euclidean' with normalize_embeddings=True), got {self.distance!r}"
                           + (f" with normalize_embeddings={self.normalize_embeddings}"
                              if isinstance(self.distance, str) else ""))
        try:
            dist = parse_distance(self.distance, self.normalize_embeddings, default=self._default_distance)
        except ValueError:
            if self._fixed_distance is not None:
                raise fixed from None
            if not _is_distance_object(self.distance):
                raise
            return self.distance
        if self._fixed_distance is not None and dist != Distance("euclidean", True):
            raise fixed
        return dist

    def _prepare(self, embeddings, labels, ref_emb, ref_labels, labels_required=True):
        check_embeddings(embeddings, check_values=self.check_inputs)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device, required=labels_required)
        ref, ref_labels, _ = check_ref(embeddings, labels, ref_emb, ref_labels, check_values=self.check_inputs)
        return labels, ref, ref_labels

    def _call(self, op, embeddings, *args, **kwargs):
        return _registry.call(op, self.backend, embeddings.device.type, embeddings, *args, **kwargs)

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        out = self.mine(embeddings, labels, ref_emb, ref_labels)
        if len(out) == 3:
            self.num_triplets = len(out[0])
        else:
            self.num_pos_pairs, self.num_neg_pairs = len(out[0]), len(out[2])
        return out


def _is_distance_object(obj):
    return (isinstance(obj, nn.Module) and callable(obj) and isinstance(getattr(obj, "is_inverted", None), bool)
            and type(obj).__name__ != "BatchedDistance")


def all_pairs(labels, ref_labels):
    """PML's ``get_all_pairs_indices``: (a1, p, a2, n) row-major; no (i, i) pair in self mode."""
    same = labels.unsqueeze(1) == (labels if ref_labels is None else ref_labels).unsqueeze(0)
    pos = same.clone()
    if ref_labels is None:
        pos.fill_diagonal_(False)
    return (*torch.where(pos), *torch.where(~same))


def real(name, value, *, low=-math.inf, high=math.inf):
    """``value`` as a float in [low, high], else a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


def count(name, value, *, low=1):
    """``value`` as an int >= low, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def value_range(name, value):
    """None, or a (low, high) pair of real numbers with low <= high (PML's allowed_*_range)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be None or a (low, high) pair, got {value!r}")
    lo, hi = real(f"{name}[0]", value[0]), real(f"{name}[1]", value[1])
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi
