"""``dk.reducers``: PML 2.9's nine reducers under PML's names, constructor arguments and edge cases.

A reducer turns a loss's *loss dict* into the loss value. The dict is PML's::

    {sub_loss_name: {"losses": tensor (or the zero loss 0), "indices": ..., "reduction_type": type, ["divisor": d]}}

with ``reduction_type`` one of ``element`` (one loss per sample or proxy; ``indices`` a LongTensor),
``pos_pair`` / ``neg_pair`` (one per pair; ``indices`` = (anchors, others)), ``triplet`` (one per triplet;
``indices`` = (anchors, positives, negatives)) or ``already_reduced`` (a 0-dim or 1-element tensor,
returned as is). A reducer is called as ``reducer(loss_dict, embeddings, labels)``; PML's reducer objects
have the same call and are accepted wherever these are (losses, :class:`MultipleReducers`,
:class:`PerAnchorReducer`).

These reducers work on materialised losses and compute PML's values to the bit, syncing with the host where
PML does (ThresholdReducer gathers its survivors). Differences from PML, all deliberate: malformed dicts
raise ``ValueError`` / ``TypeError`` naming the problem (PML asserts); :class:`DivisorReducer` decides a
zero tensor divisor on the device; :class:`PerAnchorReducer` marks the written cells with a mask instead of
PML's ``finfo.max`` sentinel and says why a pair index out of the batch is refused; ``collect_stats`` is
accepted but no statistics are recorded yet.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ._records import resolve as resolve_collect_stats

REDUCTION_TYPES = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")


def _is_zero_loss(losses):
    """PML's zero loss: a non-tensor equal to 0 (``BaseMetricLossFunction.zero_loss``)."""
    if torch.is_tensor(losses):
        return False
    if isinstance(losses, (int, float)) and losses == 0:
        return True
    raise TypeError(f"a loss dict's 'losses' must be a tensor or the zero loss 0, got {losses!r}")


def _check_sizes(losses, indices, reduction_type):
    if reduction_type == "already_reduced":
        if losses.ndim != 0 and len(losses) != 1:
            raise ValueError(f"an 'already_reduced' loss must be 0-dim or hold one value, got shape "
                             f"{tuple(losses.shape)}")
        return
    if losses.ndim == 0:
        raise ValueError(f"a {reduction_type!r} loss must hold one value per {reduction_type}, got a 0-dim tensor")
    if reduction_type == "element":
        if not torch.is_tensor(indices):
            raise ValueError(f"'element' indices must be a tensor, got {type(indices).__name__}")
        if len(losses) != len(indices):
            raise ValueError(f"'element' losses ({len(losses)}) and indices ({len(indices)}) differ in length")
        return
    arity = 3 if reduction_type == "triplet" else 2
    if not isinstance(indices, (list, tuple)) or len(indices) != arity or not all(torch.is_tensor(t) for t in indices):
        raise ValueError(f"{reduction_type!r} indices must be a tuple of {arity} tensors")
    if any(len(t) != len(losses) for t in indices):
        raise ValueError(f"{reduction_type!r} losses ({len(losses)}) and indices "
                         f"({[len(t) for t in indices]}) differ in length")


class BaseReducer(nn.Module):
    """Reduces a loss dict with exactly one entry (PML's ``BaseReducer``): zero-loss rule, size checks, then
    ``<reduction_type>_reduction(losses, indices, embeddings, labels, **kwargs)``."""

    def __init__(self, collect_stats=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)  # None: PML's global flag, as PML reads it

    def forward(self, loss_dict, embeddings, labels):
        if not isinstance(loss_dict, dict) or len(loss_dict) != 1:
            n = len(loss_dict) if isinstance(loss_dict, dict) else type(loss_dict).__name__
            raise ValueError(f"{type(self).__name__} reduces a loss dict with exactly one entry, got {n}; "
                             "use MultipleReducers for several")
        (loss_info,) = loss_dict.values()
        losses, indices, reduction_type, kwargs = self.unpack_loss_info(loss_info)
        return self.reduce_the_loss(losses, indices, reduction_type, kwargs, embeddings, labels)

    def unpack_loss_info(self, loss_info):
        missing = [k for k in ("losses", "indices", "reduction_type") if k not in loss_info]
        if missing:
            raise ValueError(f"a loss dict entry needs the keys 'losses', 'indices', 'reduction_type'; "
                             f"missing {missing}")
        return loss_info["losses"], loss_info["indices"], loss_info["reduction_type"], {}

    def reduce_the_loss(self, losses, indices, reduction_type, kwargs, embeddings, labels):
        if _is_zero_loss(losses):
            return self.zero_loss(embeddings)
        if reduction_type not in REDUCTION_TYPES:
            raise ValueError(f"unknown reduction_type {reduction_type!r}; expected one of {REDUCTION_TYPES}")
        _check_sizes(losses, indices, reduction_type)
        return getattr(self, f"{reduction_type}_reduction")(losses, indices, embeddings, labels, **kwargs)

    def zero_loss(self, embeddings):
        """PML's graph-attached zero in the embeddings' dtype."""
        return torch.sum(embeddings * 0)

    def already_reduced_reduction(self, losses, indices, embeddings, labels, **kwargs):
        return losses

    def element_reduction(self, losses, indices, embeddings, labels):
        raise NotImplementedError(f"{type(self).__name__} has no element reduction")

    def pos_pair_reduction(self, losses, indices, embeddings, labels):
        return self.element_reduction(losses, indices, embeddings, labels)

    def neg_pair_reduction(self, losses, indices, embeddings, labels):
        return self.element_reduction(losses, indices, embeddings, labels)

    def triplet_reduction(self, losses, indices, embeddings, labels):
        return self.element_reduction(losses, indices, embeddings, labels)


class MeanReducer(BaseReducer):
    """Mean of every loss, whatever the type (an empty tensor gives NaN, as in PML)."""

    def element_reduction(self, losses, indices, embeddings, labels):
        return torch.mean(losses)


class SumReducer(MeanReducer):
    def element_reduction(self, losses, indices, embeddings, labels):
        return torch.sum(losses)


class ThresholdReducer(BaseReducer):
    """Mean of the losses with ``low < loss < high`` (strict; either bound may be None, not both); the
    graph-attached zero when none survive. The survivors are gathered as PML gathers them (a host sync), so
    the value is PML's to the bit (PML's own tests compare with ``==``)."""

    def __init__(self, low=None, high=None, **kwargs):
        super().__init__(**kwargs)
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs at least one of low or high")
        self.low, self.high = low, high

    def element_reduction(self, losses, indices, embeddings, labels):
        if self.low is not None:
            losses = losses[losses > self.low]
        if self.high is not None:
            losses = losses[losses < self.high]
        if len(losses) >= 1:
            return torch.mean(losses)
        return self.zero_loss(embeddings)


class AvgNonZeroReducer(ThresholdReducer):
    """Mean of the strictly positive losses (``ThresholdReducer(low=0)``)."""

    def __init__(self, **kwargs):
        super().__init__(low=0, **kwargs)


class DivisorReducer(BaseReducer):
    """``sum(losses) / loss_info["divisor"]``; a zero divisor gives the graph-attached zero. The divisor may be
    a number or a 0-dim tensor (decided on the device). fp16 sums that overflow to NaN are redone in fp32."""

    def unpack_loss_info(self, loss_info):
        losses, indices, reduction_type, kwargs = super().unpack_loss_info(loss_info)
        if reduction_type != "already_reduced":
            if "divisor" not in loss_info:
                raise KeyError("DivisorReducer needs a 'divisor' in every loss dict entry that is not "
                               "already_reduced")
            kwargs = {"divisor": loss_info["divisor"]}
        return losses, indices, reduction_type, kwargs

    def element_reduction(self, losses, indices, embeddings, labels, divisor=1):
        if not torch.is_tensor(divisor):
            if divisor == 0:
                return self.zero_loss(embeddings)
            return self._sum(losses) / divisor
        out = self._sum(losses) / divisor.where(divisor != 0, 1)
        return torch.where(divisor != 0, out, self.zero_loss(embeddings).to(out.dtype))

    @staticmethod
    def _sum(losses):
        total = torch.sum(losses)
        if losses.dtype == torch.float16:  # PML: a NaN fp16 result is recomputed in fp32 and cast back
            total = torch.where(total.isnan(), losses.float().sum().half(), total)
        return total

    def pos_pair_reduction(self, losses, indices, embeddings, labels, divisor=1):
        return self.element_reduction(losses, indices, embeddings, labels, divisor)

    def neg_pair_reduction(self, losses, indices, embeddings, labels, divisor=1):
        return self.element_reduction(losses, indices, embeddings, labels, divisor)

    def triplet_reduction(self, losses, indices, embeddings, labels, divisor=1):
        return self.element_reduction(losses, indices, embeddings, labels, divisor)


class ClassWeightedReducer(BaseReducer):
    """``mean(losses · weights[labels[anchor]])``: ``weights`` is indexed by class id; pairs and triplets use
    their anchor's class. A plain mean (not divided by the sum of the weights), as in PML."""

    def __init__(self, weights, **kwargs):
        super().__init__(**kwargs)
        self.weights = weights

    def _weighted_mean(self, losses, anchors, labels):
        if labels is None:
            raise ValueError("ClassWeightedReducer needs the labels (the loss was called without labels)")
        weights = torch.as_tensor(self.weights).to(device=losses.device, dtype=losses.dtype)
        anchors = anchors.to(labels.device)
        if anchors.numel() and int(anchors.max()) >= labels.shape[0]:
            raise ValueError(f"ClassWeightedReducer: an index ({int(anchors.max())}) is out of range for the "
                             f"{labels.shape[0]} labels")
        classes = labels[anchors]
        if classes.numel() and int(classes.max()) >= weights.shape[0]:
            raise ValueError(f"ClassWeightedReducer: class {int(classes.max())} has no weight "
                             f"({weights.shape[0]} weights)")
        return torch.mean(losses * weights[classes.to(weights.device)])

    def element_reduction(self, losses, indices, embeddings, labels):
        return self._weighted_mean(losses, indices, labels)

    def pos_pair_reduction(self, losses, indices, embeddings, labels):
        return self._weighted_mean(losses, indices[0], labels)

    def neg_pair_reduction(self, losses, indices, embeddings, labels):
        return self._weighted_mean(losses, indices[0], labels)

    def triplet_reduction(self, losses, indices, embeddings, labels):
        return self._weighted_mean(losses, indices[0], labels)


def aggregation_func(x, num_per_row):
    """PerAnchorReducer's default: per row, the sum of its pair losses over their number (0 if none)."""
    return torch.where(num_per_row > 0, x.sum(1) / num_per_row.clamp_min(1), 0)


class PerAnchorReducer(BaseReducer):
    """Pair losses → one value per anchor (``aggregation_func`` of the anchor's row of a B×B matrix holding the
    pair losses, B = the number of query embeddings; a repeated pair keeps its last loss), then ``reducer``
    (default MeanReducer) on those B values as ``element`` losses. Element losses go straight to ``reducer``;
    triplets raise NotImplementedError, as in PML."""

    def __init__(self, reducer=None, aggregation_func=aggregation_func, **kwargs):
        super().__init__(**kwargs)
        self.reducer = MeanReducer() if reducer is None else reducer
        self.aggregation_func = aggregation_func

    def element_reduction(self, losses, indices, embeddings, labels):
        loss_dict = {"loss": {"losses": losses, "indices": indices, "reduction_type": "element"}}
        return self.reducer(loss_dict, embeddings, labels)

    def _per_anchor(self, losses, indices, embeddings, labels):
        b = embeddings.shape[0]
        anchors, others = (t.to(losses.device) for t in indices)
        if anchors.numel() and max(int(anchors.max()), int(others.max())) >= b:
            raise ValueError(f"PerAnchorReducer: a pair index is >= the batch size {b} (pairs into a larger "
                             "reference set cannot be placed in the B×B matrix)")
        mat = losses.new_zeros(b, b)
        mat = mat.index_put((anchors, others), losses)
        present = torch.zeros(b, b, dtype=torch.bool, device=losses.device)
        present[anchors, others] = True
        output = self.aggregation_func(mat, present.sum(1))
        loss_dict = {"loss": {"losses": output, "indices": torch.arange(b, device=embeddings.device),
                              "reduction_type": "element"}}
        return self.reducer(loss_dict, embeddings, labels)

    def pos_pair_reduction(self, losses, indices, embeddings, labels):
        return self._per_anchor(losses, indices, embeddings, labels)

    def neg_pair_reduction(self, losses, indices, embeddings, labels):
        return self._per_anchor(losses, indices, embeddings, labels)

    def triplet_reduction(self, losses, indices, embeddings, labels):
        raise NotImplementedError("Triplet reduction not supported")


class MultipleReducers(BaseReducer):
    """One reducer per sub-loss (``reducers[name]``, else ``default_reducer`` = MeanReducer()), results summed
    in the embeddings' dtype (as PML's zeros buffer does)."""

    def __init__(self, reducers, default_reducer=None, **kwargs):
        super().__init__(**kwargs)
        self.reducers = nn.ModuleDict(reducers)
        self.default_reducer = MeanReducer() if default_reducer is None else default_reducer

    def forward(self, loss_dict, embeddings, labels):
        values = []
        for name, loss_info in loss_dict.items():
            reducer = self.reducers[name] if name in self.reducers else self.default_reducer
            value = reducer({name: loss_info}, embeddings, labels)
            if not torch.is_tensor(value):
                raise TypeError(f"MultipleReducers: the reducer for {name!r} ({type(reducer).__name__}) returned "
                                f"{type(value).__name__}, not a tensor")
            values.append(value.to(embeddings.dtype).reshape(()))
        if not values:
            return embeddings.new_zeros(())
        return self.sub_loss_reduction(torch.stack(values), embeddings, labels)

    def sub_loss_reduction(self, sub_losses, embeddings=None, labels=None):
        return torch.sum(sub_losses)


class DoNothingReducer(BaseReducer):
    """Returns the loss dict itself (regularizer entries included)."""

    def forward(self, loss_dict, embeddings, labels):
        return loss_dict


__all__ = ["AvgNonZeroReducer", "BaseReducer", "ClassWeightedReducer", "DivisorReducer", "DoNothingReducer",
           "MeanReducer", "MultipleReducers", "PerAnchorReducer", "SumReducer", "ThresholdReducer"]


# ---- How losses use a reducer (PML's set_reducer), and when the fused default path computes the same value ----

_OWN_MODULES = (__name__, "pytorch_metric_learning.reducers")


def _kind(reducer):
    """The reducer's class name if it is one of ours or PML's (not a subclass defined elsewhere), else None."""
    cls = type(reducer)
    return cls.__name__ if cls.__module__.startswith(_OWN_MODULES) else None


def _check_reducer(reducer, what="reducer"):
    if reducer is not None and not callable(reducer):
        raise TypeError(f"{what} must be a reducer (a module called with (loss_dict, embeddings, labels)), e.g. "
                        f"dml_kernels.reducers.MeanReducer() or a PML reducer; got {type(reducer).__name__}")


def describe(reducer):
    """A short name for messages: ``SumReducer``, ``MultipleReducers(pos_loss=SumReducer, ...)``."""
    name = type(reducer).__name__
    inner = getattr(reducer, "reducers", None)
    if _kind(reducer) == "MultipleReducers" and isinstance(inner, nn.ModuleDict):
        return f"{name}(" + ", ".join(f"{k}={type(v).__name__}" for k, v in inner.items()) + ")"
    return name


def for_loss(reducer, names, default, *, copy_reducer=False):
    """PML's ``set_reducer``: MultipleReducers / DoNothingReducer as they are; else, for one sub-loss, the
    reducer (or ``default()``); for several, MultipleReducers with one (copy) per sub-loss name."""
    _check_reducer(reducer)
    if _kind(reducer) in ("MultipleReducers", "DoNothingReducer"):
        return reducer

    def one():
        if reducer is None:
            return default()
        return copy.deepcopy(reducer) if copy_reducer else reducer

    if len(names) == 1:
        return one()
    return MultipleReducers({name: one() for name in names})


def _reduces_like(reducer, default_kind):
    """True iff ``reducer`` reduces a loss entry exactly as the loss's default reducer does."""
    kind = _kind(reducer)
    if kind is None or getattr(reducer, "collect_stats", False):
        return False
    if default_kind == "AvgNonZeroReducer" and kind in ("AvgNonZeroReducer", "ThresholdReducer"):
        return getattr(reducer, "low", None) == 0 and getattr(reducer, "high", 0) is None
    return kind == default_kind


def _passes_through(reducer):
    """True iff ``reducer`` returns an ``already_reduced`` entry unchanged (every reducer of ours or PML's but
    DoNothing and Multiple)."""
    kind = _kind(reducer)
    return kind is not None and kind not in ("DoNothingReducer", "MultipleReducers") \
        and not getattr(reducer, "collect_stats", False)


def reduces_like_default(reducer, names, extra_names, default_kind):
    """True iff ``reducer`` (as :func:`for_loss` left it) gives the default reduction of the loss entries
    ``names`` plus the sum of the already-reduced entries ``extra_names``: the fused path computes that."""
    if reducer is None:
        return True
    if _kind(reducer) == "MultipleReducers":
        if getattr(reducer, "collect_stats", False):
            return False
        inner = reducer.reducers
        pick = [inner[n] if n in inner else reducer.default_reducer for n in list(names) + list(extra_names)]
        return all(_reduces_like(r, default_kind) for r in pick[:len(names)]) \
            and all(_passes_through(r) for r in pick[len(names):])
    return not extra_names and len(names) == 1 and _reduces_like(reducer, default_kind)


# ---- Reductions as statistics (SPEC §7): which per-row statistics a reducer needs, and its value from them ----
#
# A fused ``<loss>_row_stats`` op returns, for each sub-loss of pair or triplet elements l (grouped by their
# anchor row i), ``sums`` = (Σ_i l, Σ_i l·[low < l < high]) and ``counts`` = (#_i, #_i[low < l < high]) — four
# O(N) vectors; ``band`` = (low, high) is the reducer's ThresholdReducer band (None = unbounded). The functions
# below are the reducers above, applied to those statistics: :func:`stats_plan` says whether (and how) a reducer
# is expressible, :func:`reduce_row_stats` computes its value without a host sync.

def _default_aggregation(func):
    import sys
    pml = sys.modules.get("pytorch_metric_learning.reducers.per_anchor_reducer")
    return func is aggregation_func or (pml is not None and func is getattr(pml, "aggregation_func", None))


def _entry_plan(reducer, element_type, per_anchor_ok):
    """How one sub-loss entry of ``element_type`` ("pair" or "triplet") is reduced by ``reducer`` from row
    statistics: ("mean",), ("sum",), ("band", low, high), ("class_weighted", weights), ("per_anchor", inner plan),
    ("per_anchor_triplet",)
    (PML raises for triplets) — or None when it is not expressible (the elements path)."""
    kind = _kind(reducer)
    if kind is None or getattr(reducer, "collect_stats", False):
        return None
    if kind == "MeanReducer":
        return ("mean",)
    if kind == "SumReducer":
        return ("sum",)
    if kind in ("ThresholdReducer", "AvgNonZeroReducer"):
        return ("band", reducer.low, reducer.high)
    if kind == "ClassWeightedReducer":  # every element weighted by its anchor's (its row's) class weight
        return ("class_weighted", reducer.weights)
    if kind == "PerAnchorReducer" and _default_aggregation(reducer.aggregation_func):
        if element_type == "triplet":
            return ("per_anchor_triplet",)
        inner = _entry_plan(reducer.reducer, "element", False)
        if per_anchor_ok and inner is not None and inner[0] in ("mean", "sum", "band"):
            return ("per_anchor", inner)
    return None


def stats_plan(reducer, names, extra_names, element_type, *, per_anchor_ok=True):
    """One plan (see :func:`_entry_plan`) per sub-loss in ``names`` if ``reducer`` (as :func:`for_loss` left it)
    reduces the loss entries from per-row statistics and passes the already-reduced ``extra_names`` through;
    else None. ``per_anchor_ok``: the pairs are the label pairs of the batch (PerAnchorReducer's B×B grouping
    of explicit pairs, which drops duplicates, or of pairs into a reference set, stays on the elements path)."""
    if reducer is None:
        return None
    if _kind(reducer) == "MultipleReducers":
        if getattr(reducer, "collect_stats", False):
            return None
        inner = reducer.reducers
        pick = [inner[n] if n in inner else reducer.default_reducer for n in list(names) + list(extra_names)]
        if not all(_passes_through(r) for r in pick[len(names):]):
            return None
        plans = [_entry_plan(r, element_type, per_anchor_ok) for r in pick[:len(names)]]
    elif not extra_names and len(names) == 1:
        plans = [_entry_plan(reducer, element_type, per_anchor_ok)]
    else:
        return None
    return None if any(p is None for p in plans) else plans


def plan_band(plan):
    """The (low, high) band the op must count for ``plan`` ((None, None) when it needs none)."""
    return (plan[1], plan[2]) if plan[0] == "band" else (None, None)


def _band_mean(values, low, high, zero):
    """ThresholdReducer on materialised O(N) values, on the device: mean of low < v < high, else ``zero``."""
    keep = torch.ones_like(values, dtype=torch.bool)
    if low is not None:
        keep &= values > low
    if high is not None:
        keep &= values < high
    count = keep.sum()
    return torch.where(count > 0, values.where(keep, 0).sum() / count.clamp_min(1), zero)


def reduce_row_stats(plan, sums, counts, zero, labels=None):
    """The value ``plan``'s reducer gives the entry whose per-row statistics are ``sums`` (2, N) and ``counts``
    (2, N) (see above); ``zero`` is PML's graph-attached zero loss, returned when the entry has no element (PML's
    zero loss 0). No host sync, except for PerAnchorReducer on triplets (PML raises when there is one)."""
    total = counts[0].sum()
    kind = plan[0]
    if kind == "mean":
        value = sums[0].sum() / total.clamp_min(1)
    elif kind == "sum":
        value = sums[0].sum()
    elif kind == "class_weighted":  # PML: mean over the elements of l · weights[label of the anchor]
        weights = torch.as_tensor(plan[1], device=sums.device).to(sums.dtype)
        value = (weights[labels] * sums[0]).sum() / total.clamp_min(1)
    elif kind == "band":
        band = counts[1].sum()
        value = torch.where(band > 0, sums[1].sum() / band.clamp_min(1), zero)
    elif kind == "per_anchor":  # PML's aggregation_func: each anchor's mean over its pairs (0 if none)
        per_anchor = torch.where(counts[0] > 0, sums[0] / counts[0].clamp_min(1), 0)
        inner = plan[1]
        if inner[0] == "mean":
            value = per_anchor.mean()
        elif inner[0] == "sum":
            value = per_anchor.sum()
        else:
            value = _band_mean(per_anchor, inner[1], inner[2], zero)
    elif kind == "per_anchor_triplet":
        if int(total) > 0:
            raise NotImplementedError("Triplet reduction not supported")
        return zero
    else:
        raise ValueError(f"unknown reduction plan {plan!r}")
    return torch.where(total > 0, value, zero)
