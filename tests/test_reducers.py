"""dk.reducers and ``reducer=`` on every loss, against PML 2.9 itself (float64, 1e-9, values and gradients).

Every reducer × every element type: per-anchor elements (multi-similarity, generalized lifted, N-pairs,
ProxyNCA), pair elements (lifted: pos_pair; contrastive: pos_pair + neg_pair), triplets (all and batch-hard),
per-proxy elements with a divisor (Proxy Anchor), already-reduced entries — each with our reducer object and
with PML's. Plus the reducers on hand-made loss dicts (edge cases), the default reducer passed explicitly
(= the fused path, no fallback), and fused backends refusing a non-default reducer clearly.
"""
import warnings

import pytest
import torch

import dml_kernels as dk
import dml_kernels.functional as F
from dml_kernels import _registry
from dml_kernels import reducers as dr
from patterns import make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)
NUM_CLASSES = 4

# name -> (module kwargs shared by ours and PML's, whether it owns proxies)
LOSSES = {
    "MultiSimilarityLoss": (dict(alpha=2, beta=10, base=0.5), False),
    "GeneralizedLiftedStructureLoss": (dict(neg_margin=0.8), False),
    "NPairsLoss": (dict(), False),
    "LiftedStructureLoss": (dict(neg_margin=0.6, pos_margin=0.1), False),
    "ContrastiveLoss": (dict(pos_margin=0.2, neg_margin=0.9), False),
    "TripletMarginLoss": (dict(margin=0.3), False),
    "ProxyNCALoss": (dict(num_classes=NUM_CLASSES, embedding_size=5), True),
    "ProxyAnchorLoss": (dict(num_classes=NUM_CLASSES, embedding_size=5, margin=0.2, alpha=8), True),
}
SUB_LOSSES = {"ContrastiveLoss": ("pos_loss", "neg_loss"), "ProxyAnchorLoss": ("pos_loss", "neg_loss")}
WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)


def _reducer(mod, spec, loss_name):
    """A reducer of module ``mod`` (dk.reducers or PML's) from a spec string."""
    first = SUB_LOSSES.get(loss_name, ("loss",))[0]
    return {
        "Mean": lambda: mod.MeanReducer(),
        "Sum": lambda: mod.SumReducer(),
        "AvgNonZero": lambda: mod.AvgNonZeroReducer(),
        "Threshold": lambda: mod.ThresholdReducer(low=0.05, high=1.5),
        "ThresholdHigh": lambda: mod.ThresholdReducer(high=0.7),
        "Divisor": lambda: mod.DivisorReducer(),
        "ClassWeighted": lambda: mod.ClassWeightedReducer(WEIGHTS.clone()),
        "PerAnchor": lambda: mod.PerAnchorReducer(),
        "PerAnchorAvgNonZero": lambda: mod.PerAnchorReducer(mod.AvgNonZeroReducer()),
        "Multiple": lambda: mod.MultipleReducers({first: mod.SumReducer()}, default_reducer=mod.AvgNonZeroReducer()),
        "MultipleDivisor": lambda: mod.MultipleReducers({"neg_loss": mod.SumReducer()},
                                                        default_reducer=mod.DivisorReducer()),
        "DoNothing": lambda: mod.DoNothingReducer(),
    }[spec]()


REDUCERS = ["Mean", "Sum", "AvgNonZero", "Threshold", "ThresholdHigh", "Divisor", "ClassWeighted", "PerAnchor",
            "PerAnchorAvgNonZero", "Multiple", "MultipleDivisor", "DoNothing"]


# PML's multi-similarity, generalized lifted and lifted losses hand their reducer (N, 1)-shaped losses (a
# keepdim logsumexp), so its ClassWeightedReducer broadcasts them to an N×N product and its PerAnchorReducer
# fails on them. Ours are 1-D (a deliberate difference, test_pml_column_losses_are_flattened): for those
# reducers PML's value is taken from PML's own loss dict, flattened, reduced by PML's reducer.
FLAT = {"MultiSimilarityLoss", "GeneralizedLiftedStructureLoss", "LiftedStructureLoss"}
SHAPE_SENSITIVE = {"ClassWeighted", "PerAnchor", "PerAnchorAvgNonZero", "DoNothing"}


def _pml_flat(name, theirs):
    kwargs, _ = LOSSES[name]
    dicts = getattr(pl, name)(reducer=pr.DoNothingReducer(), **kwargs)

    def run(e, lab, *args):
        loss_dict = dicts(e, lab, *args)
        for entry in loss_dict.values():
            if torch.is_tensor(entry["losses"]) and entry["reduction_type"] != "already_reduced":
                entry["losses"] = entry["losses"].flatten()
        return theirs.reducer(loss_dict, e, lab)
    return run


def _pair(name, our_reducer, pml_reducer, backend="reference", spec=None, **extra):
    """(our module, PML's (callable), PML's module)."""
    kwargs, proxies = LOSSES[name]
    ours = getattr(dk.losses, name)(backend=backend, reducer=our_reducer, **kwargs, **extra)
    theirs = getattr(pl, name)(reducer=pml_reducer, **kwargs)
    if proxies:
        ours, theirs = ours.double(), theirs.double()
        with torch.no_grad():
            theirs.proxies.copy_(ours.proxies)
    call = _pml_flat(name, theirs) if (name in FLAT and spec in SHAPE_SENSITIVE) else theirs
    return ours, call, theirs


def _compare_dicts(a, b):
    assert list(a) == list(b)
    for name in a:
        ea, eb = a[name], b[name]
        assert ea["reduction_type"] == eb["reduction_type"], name
        assert ea.get("divisor") == (int(eb["divisor"]) if "divisor" in eb else None), name
        if not torch.is_tensor(eb["losses"]):
            assert ea["losses"] == eb["losses"] == 0
            continue
        torch.testing.assert_close(ea["losses"], eb["losses"], **TOL)
        ia, ib = ea["indices"], eb["indices"]
        ia, ib = ((ia,), (ib,)) if torch.is_tensor(ib) else (ia, ib)
        assert len(ia) == len(ib) and all(torch.equal(s.cpu(), t.cpu()) for s, t in zip(ia, ib)), name


def _total(out):
    """A differentiable scalar of a loss value or of a loss dict's element tensors."""
    if torch.is_tensor(out):
        return out
    parts = [e["losses"].sum() for e in out.values() if torch.is_tensor(e["losses"])]
    return sum(parts) if parts else None


def check(ours, theirs, x, y, *args, modules=None):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        b = theirs(xb, y, *args)
    except NotImplementedError as e:  # PML's PerAnchorReducer on triplets
        with pytest.raises(NotImplementedError, match=str(e)):
            ours(xa, y, *args)
        return
    a = ours(xa, y, *args)
    if isinstance(b, dict):
        _compare_dicts(a, b)
    else:
        assert a.dim() == b.dim() == 0
        torch.testing.assert_close(a, b, **TOL, equal_nan=True)
    ta, tb = _total(a), _total(b)
    if tb is None or not tb.requires_grad:
        return
    ta.backward()
    tb.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    if modules is not None and hasattr(modules[1], "proxies"):
        a, b = (m.proxies.grad for m in modules)
        zeros = torch.zeros_like(modules[1].proxies)  # None: the proxies are not on the graph (zero gradient)
        torch.testing.assert_close(zeros if a is None else a, zeros if b is None else b, **TOL)


@pytest.mark.parametrize("ours_obj", [True, False], ids=["dk_reducer", "pml_reducer"])
@pytest.mark.parametrize("spec", REDUCERS)
@pytest.mark.parametrize("name", LOSSES)
def test_every_reducer_on_every_loss(name, spec, ours_obj):
    x, y = make("random", n=12, d=5)
    y = y % NUM_CLASSES
    ours, theirs, module = _pair(name, _reducer(dr if ours_obj else pr, spec, name), _reducer(pr, spec, name),
                                 spec=spec)
    if "Divisor" in spec and name != "ProxyAnchorLoss":  # only Proxy Anchor's loss dict has a "divisor"
        for fn in (ours, theirs):
            with pytest.raises(KeyError, match="divisor"):
                fn(x, y)
        return
    check(ours, theirs, x, y, modules=(ours, module))


@pytest.mark.parametrize("spec", ["Sum", "Threshold", "PerAnchorAvgNonZero", "ClassWeighted", "DoNothing"])
@pytest.mark.parametrize("miner", ["batch_hard", "ms", "triplet_margin"])
@pytest.mark.parametrize("name", ["TripletMarginLoss", "ContrastiveLoss", "LiftedStructureLoss", "MultiSimilarityLoss"])
def test_reducers_with_pml_miner_tuples(name, miner, spec):
    """Mined pairs and triplets (PML's miners) as indices_tuple, and the fused batch-hard mining."""
    x, y = make("random", n=12, d=5)
    y = y % NUM_CLASSES
    m = {"batch_hard": pm.BatchHardMiner(), "ms": pm.MultiSimilarityMiner(0.3),
         "triplet_margin": pm.TripletMarginMiner(0.3)}[miner]
    ours, theirs, _ = _pair(name, _reducer(dr, spec, name), _reducer(pr, spec, name), spec=spec)
    check(lambda e, lab: ours(e, lab, m(e, lab)), lambda e, lab: theirs(e, lab, m(e, lab)), x, y)
    if name == "TripletMarginLoss" and miner == "batch_hard":
        fused = dk.losses.TripletMarginLoss(margin=0.3, mining="batch_hard", reducer=_reducer(dr, spec, name),
                                            backend="reference")
        check(fused, lambda e, lab: theirs(e, lab, m(e, lab)), x, y)


@pytest.mark.parametrize("spec", ["AvgNonZero", "PerAnchor", "Multiple", "DoNothing"])
@pytest.mark.parametrize("pattern", ["all_same", "all_distinct", "pairs", "two_samples_distinct"])
@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "LiftedStructureLoss", "NPairsLoss",
                                  "TripletMarginLoss", "GeneralizedLiftedStructureLoss", "ProxyAnchorLoss"])
def test_edge_label_patterns(name, pattern, spec):
    """No positive pairs, no negative pairs, the ≤1-pair rule, no triplets, no N-pairs pair, one sample."""
    x, y = make(pattern, n=8, d=5)
    y = y % NUM_CLASSES
    ours, theirs, module = _pair(name, _reducer(dr, spec, name), _reducer(pr, spec, name), spec=spec)
    check(ours, theirs, x, y, modules=(ours, module))


@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss", "ProxyNCALoss"])
def test_threshold_none_survive(name):
    """ThresholdReducer with no loss inside the band: PML's graph-attached zero (gradient 0)."""
    x, y = make("random", n=10, d=5)
    y = y % NUM_CLASSES
    ours, theirs, module = _pair(name, dr.ThresholdReducer(low=1e6), pr.ThresholdReducer(low=1e6))
    check(ours, theirs, x, y, modules=(ours, module))
    xa = x.clone().requires_grad_()
    out = ours(xa, y)
    out.backward()
    assert out.item() == 0 and out.requires_grad and torch.count_nonzero(xa.grad) == 0


@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss"])
def test_ref_emb_with_reducers(name):
    x, y = make("random", n=6, d=5)
    ref, ref_y = torch.randn(15, 5, dtype=torch.float64), torch.randint(0, 3, (15,))
    for spec in ("Sum", "ClassWeighted", "DoNothing"):
        ours, theirs, _ = _pair(name, _reducer(dr, spec, name), _reducer(pr, spec, name), spec=spec)
        ra, rb = ref.clone().requires_grad_(), ref.clone().requires_grad_()
        check(lambda e, lab: ours(e, lab, None, ra, ref_y), lambda e, lab: theirs(e, lab, None, rb, ref_y), x, y)
        if spec != "DoNothing":
            torch.testing.assert_close(ra.grad, rb.grad, **TOL)


@pytest.mark.parametrize("name", sorted(FLAT))
def test_pml_column_losses_are_flattened(name):
    """Deliberate difference: our per-anchor / per-pair losses are 1-D where PML's are (N, 1). PML's
    ClassWeightedReducer then multiplies (N, 1) losses by (N,) weights into an N×N product — the mean of the
    losses times the mean weight, no per-class weighting —; ours weights each loss by its anchor's class."""
    x, y = make("random", n=12, d=5)
    y = y % NUM_CLASSES
    ours, flat, theirs = _pair(name, dr.ClassWeightedReducer(WEIGHTS), pr.ClassWeightedReducer(WEIGHTS),
                               spec="ClassWeighted")
    loss_dict = getattr(dk.losses, name)(reducer=dr.DoNothingReducer(), backend="reference", **LOSSES[name][0])(x, y)
    losses, indices = loss_dict["loss"]["losses"], loss_dict["loss"]["indices"]
    anchors = indices if torch.is_tensor(indices) else indices[0]
    assert losses.dim() == 1
    torch.testing.assert_close(ours(x, y), (losses * WEIGHTS[y[anchors]]).mean(), **TOL)
    torch.testing.assert_close(ours(x, y), flat(x, y), **TOL)
    assert not torch.allclose(ours(x, y), theirs(x, y))


def test_per_anchor_reducer_out_of_batch_pairs_is_a_clear_error():
    """PML raises IndexError when a reference index is >= the batch size; we say why."""
    x, y = make("random", n=4, d=5)
    ref, ref_y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    loss = dk.losses.ContrastiveLoss(reducer=dr.PerAnchorReducer(), backend="reference")
    with pytest.raises(ValueError, match="batch size 4"):
        loss(x, y, None, ref, ref_y)


# ---- the reducers on hand-made loss dicts ----

def _dicts(g):
    """One loss dict per reduction type over 7 losses (some zero, one negative) of a batch of 6."""
    losses = torch.tensor([0.0, 0.3, 1.2, 0.0, 2.5, -0.4, 0.9], dtype=torch.float64) * g
    a = torch.tensor([0, 1, 1, 2, 3, 5, 5])
    o = torch.tensor([1, 0, 2, 4, 3, 4, 4])  # a repeated pair (5, 4): the last loss wins in PerAnchor
    n = torch.tensor([2, 2, 0, 1, 1, 0, 3])
    return {
        "element": {"loss": {"losses": losses, "indices": torch.tensor([0, 1, 2, 3, 4, 5, 0]),
                             "reduction_type": "element", "divisor": 4}},
        "pos_pair": {"loss": {"losses": losses, "indices": (a, o), "reduction_type": "pos_pair", "divisor": 3}},
        "neg_pair": {"loss": {"losses": losses, "indices": (a, o), "reduction_type": "neg_pair",
                              "divisor": torch.tensor(5)}},
        "triplet": {"loss": {"losses": losses, "indices": (a, o, n), "reduction_type": "triplet", "divisor": 2}},
        "already_reduced": {"loss": {"losses": losses.sum(), "indices": None, "reduction_type": "already_reduced"}},
    }


@pytest.mark.parametrize("rtype", ["element", "pos_pair", "neg_pair", "triplet", "already_reduced"])
@pytest.mark.parametrize("spec", [s for s in REDUCERS if s not in ("DoNothing", "MultipleDivisor")])
def test_reducers_on_loss_dicts(spec, rtype):
    emb = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    outs, grads = [], []
    for mod in (dr, pr):
        g = torch.ones((), dtype=torch.float64, requires_grad=True)
        reducer = _reducer(mod, spec, "x")
        loss_dict = _dicts(g)[rtype]
        try:
            out = reducer(loss_dict, emb, labels)
        except NotImplementedError as e:
            outs.append(("raises", str(e)))
            continue
        out.backward()
        outs.append(out.detach())
        grads.append(g.grad)
    if isinstance(outs[1], tuple):
        assert outs[0] == outs[1]
        return
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("spec", [s for s in REDUCERS if s != "DoNothing"])
def test_zero_loss_rule(spec):
    """losses == 0 (a Python number) → sum(embeddings * 0): 0-dim, the embeddings' dtype, on the graph."""
    emb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    zero = {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    out = _reducer(dr, spec, "x")(zero, emb, torch.arange(5))
    assert out.dim() == 0 and out.dtype == torch.float64 and out.requires_grad and out.item() == 0


def test_empty_and_all_zero_losses():
    emb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    empty = {"loss": {"losses": torch.zeros(0, dtype=torch.float64), "indices": torch.zeros(0, dtype=torch.long),
                      "reduction_type": "element"}}
    assert torch.isnan(dr.MeanReducer()(empty, emb, None)) and torch.isnan(pr.MeanReducer()(empty, emb, None))
    assert dr.SumReducer()(empty, emb, None).item() == 0
    assert dr.AvgNonZeroReducer()(empty, emb, None).item() == 0
    zeros = {"loss": {"losses": torch.zeros(3, dtype=torch.float64), "indices": torch.arange(3),
                      "reduction_type": "element"}}
    out = dr.AvgNonZeroReducer()(zeros, emb, None)
    assert out.item() == 0 and out.requires_grad
    div = {"loss": {"losses": torch.ones(3, dtype=torch.float64), "indices": torch.arange(3),
                    "reduction_type": "element", "divisor": 0}}
    assert dr.DivisorReducer()(div, emb, None).item() == 0
    div["loss"]["divisor"] = torch.tensor(0)
    assert dr.DivisorReducer()(div, emb, None).item() == 0


def test_size_checks_are_value_errors():
    emb = torch.randn(4, 3, dtype=torch.float64)
    bad = [
        {"loss": {"losses": torch.ones(3), "indices": torch.arange(2), "reduction_type": "element"}},
        {"loss": {"losses": torch.ones(3), "indices": (torch.arange(3),), "reduction_type": "pos_pair"}},
        {"loss": {"losses": torch.ones(3), "indices": (torch.arange(3), torch.arange(2)),
                  "reduction_type": "neg_pair"}},
        {"loss": {"losses": torch.ones(3), "indices": (torch.arange(3),) * 2, "reduction_type": "triplet"}},
        {"loss": {"losses": torch.ones(2), "indices": None, "reduction_type": "already_reduced"}},
        {"loss": {"losses": torch.ones(2), "indices": torch.arange(2), "reduction_type": "quadruplet"}},
        {"loss": {"losses": torch.ones(2), "reduction_type": "element"}},
        {"a": {"losses": 0, "indices": None, "reduction_type": "already_reduced"},
         "b": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}},
    ]
    for loss_dict in bad:
        with pytest.raises(ValueError):
            dr.MeanReducer()(loss_dict, emb, None)
    with pytest.raises(TypeError, match="zero loss"):
        dr.MeanReducer()({"loss": {"losses": 0.5, "indices": None, "reduction_type": "already_reduced"}}, emb, None)
    with pytest.raises(ValueError, match="at least one of low or high"):
        dr.ThresholdReducer()
    with pytest.raises(ValueError, match="needs the labels"):
        dr.ClassWeightedReducer(WEIGHTS)({"loss": {"losses": torch.ones(2), "indices": torch.arange(2),
                                                   "reduction_type": "element"}}, emb, None)


def test_multiple_reducers_sum_in_the_embeddings_dtype():
    emb = torch.randn(4, 3, dtype=torch.float64)
    loss_dict = {"a": {"losses": torch.tensor([1.0, 2.0]), "indices": torch.arange(2), "reduction_type": "element"},
                 "b": {"losses": torch.tensor(0.25), "indices": None, "reduction_type": "already_reduced"}}
    for mod in (dr, pr):
        out = dr.MultipleReducers({"a": mod.SumReducer()})(loss_dict, emb, None)
        assert out.dtype == torch.float64 and out.item() == 3.25
    assert pr.MultipleReducers({"a": dr.SumReducer()})(loss_dict, emb, None).item() == 3.25  # ours inside PML's


# ---- set_reducer, the fused default path, and fused backends ----

def test_set_reducer_like_pml():
    ours = dk.losses.ContrastiveLoss(reducer=dr.SumReducer())
    assert type(ours.reducer).__name__ == "MultipleReducers" and list(ours.reducer.reducers) == ["pos_loss",
                                                                                                  "neg_loss"]
    given = dr.SumReducer()
    assert dk.losses.TripletMarginLoss(reducer=given).reducer is not given  # a deep copy (PML #216)
    keep = dr.DoNothingReducer()
    assert dk.losses.TripletMarginLoss(reducer=keep).reducer is keep
    assert type(dk.losses.TripletMarginLoss().reducer) is dr.AvgNonZeroReducer
    assert type(dk.losses.MultiSimilarityLoss().reducer) is dr.MeanReducer
    assert [type(r) for r in dk.losses.ProxyAnchorLoss(3, 4).reducer.reducers.values()] == [dr.DivisorReducer] * 2
    assert dk.losses.ProxyAnchorLoss(3, 4).state_dict().keys() == {"proxies"}
    with pytest.raises(TypeError, match="must be a reducer"):
        dk.losses.MultiSimilarityLoss(reducer=object())


DEFAULTS = {"MultiSimilarityLoss": "MeanReducer", "GeneralizedLiftedStructureLoss": "MeanReducer",
            "NPairsLoss": "MeanReducer", "LiftedStructureLoss": "MeanReducer", "ContrastiveLoss": "AvgNonZeroReducer",
            "TripletMarginLoss": "AvgNonZeroReducer", "ProxyNCALoss": "MeanReducer",
            "ProxyAnchorLoss": "DivisorReducer"}


@pytest.mark.parametrize("mod", [dr, pr], ids=["dk", "pml"])
@pytest.mark.parametrize("name", LOSSES)
def test_default_reducer_given_explicitly_runs_the_fused_path(name, mod):
    """The default reducer passed explicitly (ours or PML's) runs the fused op: no fallback, same value."""
    kwargs, proxies = LOSSES[name]
    x, y = make("random", n=12, d=5, dtype=torch.float32)
    y = y % NUM_CLASSES
    plain = getattr(dk.losses, name)(backend="cpu", **kwargs)
    explicit = getattr(dk.losses, name)(backend="cpu", reducer=getattr(mod, DEFAULTS[name])(), **kwargs)
    if proxies:
        explicit.load_state_dict(plain.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(explicit(x, y), plain(x, y), rtol=0, atol=0)
    assert type(plain.reducer).__name__ in (DEFAULTS[name], "MultipleReducers")


def _sum_over_pairs(x, num_per_row):
    """A custom PerAnchorReducer aggregation (each anchor's sum): not expressible in row statistics."""
    return torch.sum(x, dim=1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss", "ProxyAnchorLoss"])
def test_fused_backend_refuses_a_non_default_reducer(name, backend):
    kwargs, _ = LOSSES[name]
    x, y = make("random", n=8, d=5, dtype=torch.float32)
    # (Mean, Sum, AvgNonZero, Threshold, ClassWeighted and PerAnchor of contrastive / triplet run fused:
    # tests/test_fused_reducers.py; a custom aggregation function needs the elements)
    reducer = dr.SumReducer() if name == "ProxyAnchorLoss" else dr.PerAnchorReducer(aggregation_func=_sum_over_pairs)
    loss = getattr(dk.losses, name)(backend=backend, reducer=reducer, **kwargs)
    with pytest.raises(dk.Unsupported, match="computed on the reference backend for now.*backend='reference'"):
        loss(x, y % NUM_CLASSES)


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_registry, "_WARNED", set())
    x, y = make("random", n=10, d=5)
    loss = dk.losses.ContrastiveLoss(reducer=dr.PerAnchorReducer(aggregation_func=_sum_over_pairs))
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend"):
        got = loss(x, y % NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(x, y % NUM_CLASSES)  # announced once
    torch.testing.assert_close(got, pl.ContrastiveLoss(reducer=pr.PerAnchorReducer(aggregation_func=_sum_over_pairs))(
        x, y % NUM_CLASSES), **TOL)


def test_functional_reducer():
    x, y = make("random", n=10, d=5)
    torch.testing.assert_close(F.contrastive_loss(x, y, reducer=dr.SumReducer(), backend="reference"),
                               pl.ContrastiveLoss(reducer=pr.SumReducer())(x, y), **TOL)
    out = F.triplet_margin_loss(x, y, reducer=dr.DoNothingReducer(), backend="reference")
    assert out["loss"]["reduction_type"] == "triplet"
    torch.testing.assert_close(F.multi_similarity_loss(x, y, reducer=dr.MeanReducer(), backend="reference"),
                               F.multi_similarity_loss(x, y, backend="reference"), rtol=0, atol=0)
