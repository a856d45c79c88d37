"""Non-default reducers of the contrastive and triplet losses from per-row statistics (SPEC §7, issue 11):
``<loss>_row_stats`` + ``reducers.stats_plan`` / ``reduce_row_stats``, never forming pair or triplet elements.

Every supported reducer (Mean, Sum, AvgNonZero, Threshold with either bound, PerAnchor with each inner
reducer, MultipleReducers of them) × loss (contrastive; triplet over all triplets and batch-hard) × backend
(reference, cpu, triton under the interpreter) equals PML's reducer on PML's loss in float64 (1e-9, values
and gradients), on label patterns with no positive pair and with bands that keep nothing. Plus: the routing
(what goes to the statistics, what stays on the elements path), the memory of the cpu path at B = 4096
(fails on the reference), no host sync on the fused path, and the one-time warning naming the bytes when
DoNothingReducer forms elements.
"""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dml_kernels.functional as F
from dml_kernels import _registry
from dml_kernels import reducers as dr
from memory import peak_extra_bytes, requires_clear_refs
from patterns import make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter overflow in discarded branches
TOL = dict(rtol=1e-9, atol=1e-9)


def _cpu_available():
    return _registry.unavailable_reason("cpu", "cpu") is None


def _triton_available():
    return _registry.unavailable_reason("triton", "cpu") is None


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_available(), reason="no C++ ext")),
            pytest.param("triton", marks=pytest.mark.skipif(not _triton_available(), reason="no triton"))]

SPECS = {
    "Mean": lambda m: m.MeanReducer(),
    "Sum": lambda m: m.SumReducer(),
    "AvgNonZero": lambda m: m.AvgNonZeroReducer(),
    "Threshold": lambda m: m.ThresholdReducer(low=0.1, high=0.6),
    "ThresholdLow": lambda m: m.ThresholdReducer(low=0.25),
    "ThresholdHigh": lambda m: m.ThresholdReducer(high=0.4),
    "ThresholdNone": lambda m: m.ThresholdReducer(low=50.0),  # keeps nothing
    "ThresholdNegLow": lambda m: m.ThresholdReducer(low=-1.0, high=0.3),  # keeps the zero elements too
    "PerAnchor": lambda m: m.PerAnchorReducer(),
    "PerAnchorAvgNonZero": lambda m: m.PerAnchorReducer(m.AvgNonZeroReducer()),
    "PerAnchorSum": lambda m: m.PerAnchorReducer(m.SumReducer()),
    "PerAnchorThreshold": lambda m: m.PerAnchorReducer(m.ThresholdReducer(low=0.05, high=0.5)),
    "ClassWeighted": lambda m: m.ClassWeightedReducer(torch.linspace(0.5, 2.0, 16, dtype=torch.float64)),
    "Multiple": lambda m: m.MultipleReducers({"pos_loss": m.SumReducer()},
                                             default_reducer=m.ThresholdReducer(low=0.2)),
}
CASES = {  # name -> (our functional, PML loss factory, kwargs)
    "contrastive": (F.contrastive_loss, lambda r: pl.ContrastiveLoss(pos_margin=0.3, neg_margin=1.1, reducer=r), {},
                    dict(pos_margin=0.3, neg_margin=1.1)),
    "contrastive_cos": (F.contrastive_loss, None, {}, dict(pos_margin=0.8, neg_margin=0.4, distance="cosine")),
    "triplet": (F.triplet_margin_loss, lambda r: pl.TripletMarginLoss(margin=0.4, reducer=r), {}, dict(margin=0.4)),
    "triplet_batch_hard": (F.triplet_margin_loss, None, {}, dict(margin=0.4, mining="batch_hard")),
}


def _pml_value(case, spec, x, y):
    """PML's reducer on PML's loss (batch-hard = PML's BatchHardMiner + loss; cosine = CosineSimilarity)."""
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import miners as pm
    reducer = SPECS[spec](pr)
    if case == "contrastive_cos":
        return pl.ContrastiveLoss(pos_margin=0.8, neg_margin=0.4, distance=pd.CosineSimilarity(), reducer=reducer)(x, y)
    if case == "triplet_batch_hard":
        return pl.TripletMarginLoss(margin=0.4, reducer=reducer)(x, y, pm.BatchHardMiner()(x, y))
    return CASES[case][1](reducer)(x, y)


def _check(case, spec, backend, pattern, n=9, d=5):
    fn, _, _, kw = CASES[case]
    x, y = make(pattern, n=n, d=d)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        want = _pml_value(case, spec, xb, y)
    except NotImplementedError:  # PML's PerAnchorReducer on triplets
        with pytest.raises(NotImplementedError, match="Triplet reduction not supported"):
            fn(xa, y, reducer=SPECS[spec](dr), backend=backend, **kw)
        return
    got = fn(xa, y, reducer=SPECS[spec](dr), backend=backend, **kw)
    torch.testing.assert_close(got, want.to(got.dtype), **TOL)
    got.backward()
    want.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("case", ["contrastive", "contrastive_cos", "triplet", "triplet_batch_hard"])
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_reducer_equals_pml(backend, case, spec):
    if spec == "Multiple" and case.startswith("triplet"):
        pytest.skip("triplets have one sub-loss")
    _check(case, spec, backend, "random", n=11)


@pytest.mark.parametrize("pattern", ["all_same", "all_distinct", "singletons_and_pairs", "pairs",
                                     "two_samples_same", "two_samples_distinct"])
@pytest.mark.parametrize("spec", ["Mean", "Threshold", "ThresholdNone", "PerAnchorAvgNonZero"])
@pytest.mark.parametrize("case", ["contrastive", "triplet"])
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_label_patterns(backend, case, spec, pattern):
    """No positive pair (all distinct), no negative pair (all same), PML's ≤1-pair rule (two samples)."""
    _check(case, spec, backend, pattern)


@pytest.mark.skipif(not _triton_available(), reason="no triton")
@pytest.mark.parametrize("spec", ["Mean", "Sum", "Threshold", "ThresholdNegLow", "ThresholdNone", "PerAnchorThreshold",
                                  "Multiple"])
@pytest.mark.parametrize("case", ["contrastive", "contrastive_cos", "triplet", "triplet_batch_hard"])
def test_triton_interpreter(case, spec):
    if spec == "Multiple" and case.startswith("triplet"):
        pytest.skip("triplets have one sub-loss")
    _check(case, spec, "triton", "random", n=7, d=4)


@pytest.mark.parametrize("spec", ["Mean", "Sum", "ThresholdLow", "Multiple"])
@pytest.mark.parametrize("case", ["contrastive", "triplet", "triplet_batch_hard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_set(backend, case, spec):
    """ref_emb (M ≠ N): values and both gradients equal PML's."""
    if spec == "Multiple" and case.startswith("triplet"):
        pytest.skip("triplets have one sub-loss")
    fn, _, _, kw = CASES[case]
    x, y = make("random", n=6, d=4)
    ref, ry = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    xa, xb, ra, rb = (t.clone().requires_grad_() for t in (x, x, ref, ref))
    got = fn(xa, y, ref_emb=ra, ref_labels=ry, reducer=SPECS[spec](dr), backend=backend, **kw)
    if case == "triplet_batch_hard":
        pytest.importorskip("pytorch_metric_learning.miners")
        from pytorch_metric_learning import miners as pm
        want = pl.TripletMarginLoss(margin=0.4, reducer=SPECS[spec](pr))(xb, y, pm.BatchHardMiner()(xb, y, rb, ry),
                                                                         rb, ry)
    else:
        want = CASES[case][1](SPECS[spec](pr))(xb, y, None, rb, ry)
    torch.testing.assert_close(got, want, **TOL)
    (got + 0 * got).backward()
    want.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ra.grad, rb.grad, **TOL)


@pytest.mark.skipif(not _triton_available(), reason="no triton")
@pytest.mark.parametrize("pattern", ["all_same", "all_distinct", "two_samples_same"])
@pytest.mark.parametrize("case", ["contrastive", "triplet"])
def test_triton_label_patterns(case, pattern):
    _check(case, "Threshold", "triton", pattern, n=6, d=3)


def test_smooth_loss_all_triplets():
    """softplus elements (every triplet counts): triton's kernel and the reference (cpu has no smooth form)."""
    x, y = make("random", n=7, d=4)
    for backend in ["reference"] + (["triton"] if _triton_available() else []):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = F.triplet_margin_loss(xa, y, margin=0.2, smooth_loss=True, reducer=dr.ThresholdReducer(0.5, 0.9),
                                    backend=backend)
        want = pl.TripletMarginLoss(margin=0.2, smooth_loss=True, reducer=pr.ThresholdReducer(0.5, 0.9))(xb, y)
        torch.testing.assert_close(got, want, **TOL)
        got.backward()
        want.backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)


# ----------------------------------------------------------------------------------------------- routing


def test_stats_plan_routing():
    names = ("pos_loss", "neg_loss")
    both = dr.for_loss(dr.ThresholdReducer(low=0.1), list(names), dr.AvgNonZeroReducer)
    assert dr.stats_plan(both, names, [], "pair") == [("band", 0.1, None)] * 2
    assert dr.stats_plan(dr.PerAnchorReducer(pr.SumReducer()), ("loss",), [], "pair") == [("per_anchor", ("sum",))]
    assert dr.stats_plan(dr.PerAnchorReducer(), ("loss",), [], "triplet") == [("per_anchor_triplet",)]
    # not expressible: the elements path
    assert dr.stats_plan(dr.PerAnchorReducer(), ("loss",), [], "pair", per_anchor_ok=False) is None
    assert dr.stats_plan(dr.PerAnchorReducer(aggregation_func=lambda x, c: x.sum(1)), ("loss",), [], "pair") is None
    assert dr.stats_plan(dr.PerAnchorReducer(dr.ClassWeightedReducer([1.0])), ("loss",), [], "pair") is None
    assert dr.stats_plan(dr.SumReducer(collect_stats=True), ("loss",), [], "pair") is None
    assert dr.stats_plan(dr.DoNothingReducer(), ("loss",), [], "triplet") is None
    assert dr.stats_plan(dr.DivisorReducer(), ("loss",), [], "triplet") is None


@pytest.mark.skipif(not _cpu_available(), reason="no C++ ext")
def test_explicit_fused_backend_runs_the_statistics_and_refuses_the_rest():
    x, y = make("random", n=8, d=5)
    F.contrastive_loss(x, y, reducer=dr.SumReducer(), backend="cpu")  # no Unsupported any more
    with pytest.raises(_registry.Unsupported, match="computed on the reference backend"):
        F.contrastive_loss(x, y, reducer=dr.DivisorReducer(), backend="cpu")
    with pytest.raises(NotImplementedError, match="Triplet reduction not supported"):
        F.triplet_margin_loss(x, y, reducer=dr.PerAnchorReducer(), backend="cpu")
    # PerAnchorReducer on no triplet: PML's zero loss, no error
    x1, y1 = make("all_same", n=4, d=3)
    assert float(F.triplet_margin_loss(x1, y1, reducer=dr.PerAnchorReducer(), backend="cpu")) == 0.0


def test_do_nothing_warns_once_naming_the_bytes(monkeypatch):
    monkeypatch.setattr(_registry, "_WARNED", set())
    x, y = make("random", n=8, d=5)
    with pytest.warns(RuntimeWarning, match=r"forms its pair / triplet elements \(\d+ elements, \d+ bytes"):
        out = F.triplet_margin_loss(x, y, reducer=dr.DoNothingReducer(), backend="reference")
    assert out["loss"]["reduction_type"] == "triplet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.triplet_margin_loss(x, y, reducer=dr.DoNothingReducer(), backend="reference")  # once
        F.triplet_margin_loss(x, y, reducer=dr.ThresholdReducer(0.1), backend="reference")  # statistics: no warning


# ----------------------------------------------------------------------------------------------- memory, syncs


class _Syncs(TorchDispatchMode):
    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("case", ["contrastive", "triplet"])
def test_no_host_sync(backend, case):
    fn, _, _, kw = CASES[case]
    x, y = make("random", n=8, d=4)
    x.requires_grad_()
    reducer = dr.MultipleReducers({"pos_loss": dr.PerAnchorReducer(dr.ThresholdReducer(0.1))},
                                  default_reducer=dr.ThresholdReducer(0.1, 0.8)) if case == "contrastive" \
        else dr.ThresholdReducer(0.1, 0.8)
    with _Syncs() as watch:
        fn(x, y, reducer=reducer, backend=backend, check_inputs=False, **kw).backward()
    assert not watch.syncs, watch.syncs


@requires_clear_refs
@pytest.mark.skipif(not _cpu_available(), reason="no C++ ext")
def test_b4096_allocates_no_pair_buffer():
    """B = 4096, D = 32, fp32, forward + backward: AvgNonZero, Threshold and PerAnchor reductions of the
    contrastive and triplet losses on the cpu backend stay far below one B×B fp32 matrix (64 MiB); the same
    measurement through the reference (which forms the pair elements) exceeds it."""
    n, d = 4096, 32
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=gen), torch.randint(0, 64, (n,), generator=gen)
    nxn = n * n * 4
    reducers = {"AvgNonZero": dr.AvgNonZeroReducer, "Threshold": lambda: dr.ThresholdReducer(0.05, 0.5),
                "PerAnchor": lambda: dr.PerAnchorReducer(dr.AvgNonZeroReducer())}

    def step(fn, reducer, backend, backward=True):
        xr = x.clone().requires_grad_(backward)
        loss = fn(xr, y, reducer=reducer(), backend=backend)
        if backward:
            loss.backward()

    step(F.contrastive_loss, dr.AvgNonZeroReducer, "cpu")  # warm-up: thread pools, allocator caches
    # (the triplet statistics are one kernel whatever the band: one reducer keeps the test fast)
    for fn, names in ((F.contrastive_loss, reducers), (F.triplet_margin_loss, ["Threshold"])):
        for name in names:
            fused = peak_extra_bytes(lambda: step(fn, reducers[name], "cpu"))
            assert fused < nxn / 8, f"{fn.__name__} {name}: peak extra {fused / 2**20:.1f} MiB"
    reference = peak_extra_bytes(lambda: step(F.contrastive_loss, reducers["Threshold"], "reference", False))
    assert reference > nxn, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pair_rule(backend):
    """PML's ≤1-pair rule (one query, a reference set with one positive and one negative): the zero loss."""
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    ref, ry = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    y = torch.tensor([0])
    for spec in ("Sum", "Threshold", "ThresholdNegLow"):
        got = F.contrastive_loss(x, y, ref_emb=ref, ref_labels=ry, pos_margin=-5.0, neg_margin=5.0,
                                 reducer=SPECS[spec](dr), backend=backend)
        want = pl.ContrastiveLoss(pos_margin=-5.0, neg_margin=5.0, reducer=SPECS[spec](pr))(x, y, None, ref, ry)
        assert float(want) == 0.0 and float(got) == 0.0
