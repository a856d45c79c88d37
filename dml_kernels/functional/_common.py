"""What every functional form shares: input preparation, PML index tuples → canonical pairs, dispatch, and
PML's reduction (``reducer=``, regularizer entries)."""
from __future__ import annotations

import torch

from .. import _registry
from .. import reducers as _reducers
from .._pairs import PackedPairMask, dense_from_indices, indices_to_pairs, indices_to_triplets
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


def _triplet_list(indices_tuple, n, m, device, check_inputs):
    """indices_tuple for a triplet-based loss → (a, p, n) index tensors (a PML pair 4-tuple becomes every
    (a, p, n) sharing its anchor, as PML's ``convert_to_triplets``), or None without a tuple."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    return indices_to_triplets(check_indices_tuple(indices_tuple, n, m, check_values=check_inputs, device=device))


def _call(op, backend, x, *args, **kwargs):
    if backend != "auto" and not isinstance(backend, str):
        raise TypeError("backend must be a string")
    return _registry.call(op, backend, x.device.type, x, *args, **kwargs)


# op: (PML's sub-loss names, PML's default reducer) — the fused op computes exactly that default reduction.
LOSS_REDUCTION = {
    "multi_similarity_loss": (("loss",), "MeanReducer"),
    "generalized_lifted_structure_loss": (("loss",), "MeanReducer"),
    "lifted_structure_loss": (("loss",), "MeanReducer"),
    "n_pairs_loss": (("loss",), "MeanReducer"),
    "contrastive_loss": (("pos_loss", "neg_loss"), "AvgNonZeroReducer"),
    "triplet_margin_loss": (("loss",), "AvgNonZeroReducer"),
    "proxy_nca_loss": (("loss",), "MeanReducer"),
    "proxy_anchor_loss": (("pos_loss", "neg_loss"), "DivisorReducer"),
    "normalized_softmax_loss": (("loss",), "MeanReducer"),
    "cosface_loss": (("loss",), "MeanReducer"),
    "arcface_loss": (("loss",), "MeanReducer"),
    "large_margin_softmax_loss": (("loss",), "MeanReducer"),
    "sphereface_loss": (("loss",), "MeanReducer"),
    "subcenter_arcface_loss": (("loss",), "MeanReducer"),
    "soft_triple_loss": (("loss",), "MeanReducer"),
    "p2sgrad_loss": (("loss",), "MeanReducer"),
    "ntxent_loss": (("loss",), "MeanReducer"),
    "supcon_loss": (("loss",), "AvgNonZeroReducer"),
    "nca_loss": (("loss",), "MeanReducer"),
    "circle_loss": (("loss",), "AvgNonZeroReducer"),
    "tuplet_margin_loss": (("loss",), "MeanReducer"),
    "intra_pair_variance_loss": (("pos_loss", "neg_loss"), "MeanReducer"),
    "snr_contrastive_loss": (("pos_loss", "neg_loss"), "AvgNonZeroReducer"),
    "threshold_consistent_margin_loss": (("loss",), "MeanReducer"),
    "margin_loss": (("margin_loss", "beta_reg_loss"), "DivisorReducer"),
}
# the direction-regularised losses (seed 002 eq. 33–35) reduce as the losses they regularise
LOSS_REDUCTION.update({f"direction_{op}": LOSS_REDUCTION[op]
                       for op in ("triplet_margin_loss", "multi_similarity_loss", "proxy_nca_loss")})


# op: the element type of its sub-losses, for the ops with a ``<op>_row_stats`` op (a non-default reducer is
# computed from per-row statistics when ``reducers.stats_plan`` can express it; SPEC §7).
ROW_STATS = {"contrastive_loss": "pair", "triplet_margin_loss": "triplet"}


def default_reducer(op):
    """A new instance of ``op``'s PML default reducer."""
    return getattr(_reducers, LOSS_REDUCTION[op][1])()


def _loss(op, backend, x, labels, *args, reducer=None, extra=None, few=False, **kwargs):
    """Run loss ``op`` under PML's reduction.

    ``reducer``: None (the loss's default) or a reducer (ours or PML's), used as PML's ``set_reducer`` would.
    ``extra``: {name: 0-dim tensor} already-reduced entries added to the loss dict (the regularizer terms of
    the loss modules). ``few``: the functional layer already knows PML returns its zero losses.

    When the reducer reduces the loss's own entries as its default does and passes the extra entries through,
    the fused op runs and the extra terms are added. Otherwise the reference backend's ``<op>_elements`` builds
    PML's loss dict and the reducer reduces it (a DoNothingReducer returns it); a fused backend named
    explicitly raises ``Unsupported`` there, ``backend="auto"`` falls back with the registry's warning.
    """
    names, default_kind = LOSS_REDUCTION[op]
    extra = extra or {}
    if reducer is not None or extra:
        reducer = _reducers.for_loss(reducer, list(names) + list(extra), lambda: default_reducer(op))
    if _reducers.reduces_like_default(reducer, names, list(extra), default_kind):
        loss = _zero(x) if few else _call(op, backend, x, labels, *args, **kwargs)
        for value in extra.values():
            loss = loss + value.to(loss.dtype).reshape(())
        return loss
    if op in ROW_STATS and not few:
        loss = _row_stats_loss(op, backend, x, labels, args, kwargs, reducer, names, extra)
        if loss is not None:
            return loss
    if few:
        loss_dict = {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"} for name in names}
    else:
        try:
            loss_dict = _call(f"{op}_elements", backend, x, labels, *args, **kwargs)
        except _registry.Unsupported as e:
            raise _registry.Unsupported(
                f"{op} with reducer={_reducers.describe(reducer)}: a reduction other than the loss's default "
                f"({default_kind}) is computed on the reference backend for now, and backend={backend!r} "
                "cannot run it; use backend='reference' or 'auto'") from e
        _warn_elements(op, reducer, loss_dict)
    for name, value in extra.items():
        loss_dict[name] = {"losses": value, "indices": None, "reduction_type": "already_reduced"}
    return reducer(loss_dict, x, labels)


# PML's embedding losses (AngularLoss, InstanceLoss, ManifoldLoss, VICRegLoss)
LOSS_REDUCTION.update({op: (("loss",), "MeanReducer") for op in ("angular_loss", "instance_loss", "manifold_loss")})
LOSS_REDUCTION["vicreg_loss"] = (("invariance_loss", "variance_loss1", "variance_loss2", "covariance_loss"),
                                 "MeanReducer")


# ProxyGML (seed 002 §5.3): "loss" per row, "reg_loss" (weight_lambda·reg) per proxy; the mean of each
LOSS_REDUCTION["proxy_gml_loss"] = (("loss", "reg_loss"), "MeanReducer")


# the ranking / histogram family; HistogramLoss, PNPLoss and DynamicSoftMarginLoss are already reduced (any reducer
# but DoNothing passes them through); SmoothAPLoss's entry is "ap_loss" (its sub_loss_names() still say "loss")
LOSS_REDUCTION.update({op: (("loss",), "MeanReducer") for op in ("fastap_loss", "histogram_loss", "pnp_loss",
                                                                 "ranked_list_loss", "dynamic_soft_margin_loss")})
LOSS_REDUCTION["smooth_ap_loss"] = (("ap_loss",), "MeanReducer")


def _row_stats_loss(op, backend, x, labels, args, kwargs, reducer, names, extra):
    """The loss from ``<op>_row_stats`` when ``reducer`` is expressible in per-row statistics, else None."""
    kwargs = dict(kwargs)
    pair_rule = kwargs.pop("pair_rule", False)
    explicit = kwargs.get("pairs") is not None or kwargs.get("triplets") is not None
    ref = args[1] if len(args) > 1 else None
    plans = _reducers.stats_plan(reducer, names, list(extra), ROW_STATS[op], per_anchor_ok=not explicit and ref is None)
    if plans is None:
        return None
    bands = tuple(_reducers.plan_band(p) for p in plans)
    sums, counts = _call(f"{op}_row_stats", backend, x, labels, *args, bands=bands, **kwargs)
    zero = _zero(x)
    values = [_reducers.reduce_row_stats(p, sums[2 * j:2 * j + 2], counts[2 * j:2 * j + 2], zero, labels)
              for j, p in enumerate(plans)]
    loss = values[0] if len(values) == 1 and not extra else sum(v.to(x.dtype).reshape(()) for v in values)
    if pair_rule:  # PML's ≤1-pair rule: every sub-loss is its zero loss
        few_pairs = (counts[0].sum() <= 1) & (counts[2].sum() <= 1)
        loss = torch.where(few_pairs, zero.to(loss.dtype), loss)
    for value in extra.values():
        loss = loss + value.to(loss.dtype).reshape(())
    return loss


def _warn_elements(op, reducer, loss_dict):
    """Once per op: the reducer made us form the loss's pair / triplet elements, and how much memory they took."""
    kinds = {"pos_pair", "neg_pair", "triplet"}
    entries = [e for e in loss_dict.values() if e.get("reduction_type") in kinds and torch.is_tensor(e.get("losses"))]
    if not entries:
        return
    size = sum(t.numel() * t.element_size() for e in entries
               for t in (e["losses"], *e["indices"]) if torch.is_tensor(t))
    _registry._warn_once(("elements", op), (
        f"{op} with reducer={_reducers.describe(reducer)} forms its pair / triplet elements "
        f"({sum(len(e['losses']) for e in entries)} elements, {size} bytes with their indices; the memory grows "
        "with the number of pairs / triplets); the fused ops reduce Mean, Sum, AvgNonZero, Threshold and "
        "PerAnchor reducers from per-row statistics instead"))
