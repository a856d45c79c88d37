"""``collect_stats``: PML's recorded statistics of the losses, as device scalars (no host sync), equal to PML's;
``collect_stats=None`` follows PML's global flag as PML's classes do."""
import numbers

import pytest
import torch

import dml_kernels as dk
from patterns import make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning.utils import common_functions as c_f  # noqa: E402

WEIGHTED = {"LargeMarginSoftmaxLoss": dict(margin=3), "SphereFaceLoss": dict(margin=3), "ArcFaceLoss": {},
            "CosFaceLoss": {}, "SubCenterArcFaceLoss": dict(sub_centers=3)}


def _close(ours, theirs):
    assert torch.is_tensor(ours) and ours.dim() == 0 and not ours.requires_grad
    assert isinstance(theirs, numbers.Number)
    torch.testing.assert_close(ours.double(), torch.tensor(float(theirs), dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", WEIGHTED)
def test_weight_losses_record_pmls_avg_angle(name):
    torch.manual_seed(0)
    x, y = make("random", 12, 6, torch.float64)
    theirs = getattr(pl, name)(num_classes=3, embedding_size=6, collect_stats=True, **WEIGHTED[name]).double()
    ours = getattr(dk.losses, name)(num_classes=3, embedding_size=6, collect_stats=True, **WEIGHTED[name])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    a, b = ours(x, y), theirs(x, y)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert ours._record_these_stats == ["avg_angle"]
    _close(ours.avg_angle, theirs.avg_angle)


@pytest.mark.parametrize("mined", [False, True])
def test_tuplet_and_npairs_record_pmls_statistics(mined):
    torch.manual_seed(1)
    x, y = make("random", 14, 5, torch.float64)
    tup = pm.MultiSimilarityMiner(0.2)(x, y) if mined else None
    ours, theirs = dk.losses.TupletMarginLoss(collect_stats=True), pl.TupletMarginLoss(collect_stats=True)
    torch.testing.assert_close(ours(x, y, tup), theirs(x, y, tup), rtol=1e-9, atol=1e-9)
    _close(ours.avg_pos_angle, theirs.avg_pos_angle)
    _close(ours.avg_neg_angle, theirs.avg_neg_angle)
    ours, theirs = dk.losses.NPairsLoss(collect_stats=True), pl.NPairsLoss(collect_stats=True)
    torch.testing.assert_close(ours(x, y, tup), theirs(x, y, tup), rtol=1e-9, atol=1e-9)
    _close(ours.num_pairs, theirs.num_pairs)


def test_recording_never_syncs(monkeypatch):
    x, y = make("random", 10, 4, torch.float64)
    loss = dk.losses.CosFaceLoss(num_classes=3, embedding_size=4, collect_stats=True, backend="reference")

    def no_item(*a, **k):
        raise AssertionError("a host sync (.item()) while recording statistics")
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    loss(x, y)
    assert torch.is_tensor(loss.avg_angle)


@pytest.mark.parametrize("flag", [True, False])
def test_none_follows_pmls_global_flag(monkeypatch, flag):
    monkeypatch.setattr(c_f, "COLLECT_STATS", flag)
    loss = dk.losses.TripletMarginLoss()
    assert loss.collect_stats is flag and loss.distance.collect_stats is flag and loss.reducer.collect_stats is flag
    assert dk.losses.TripletMarginLoss(collect_stats=not flag).collect_stats is (not flag)
    x, y = make("random", 8, 4, torch.float64)
    torch.testing.assert_close(loss(x, y), pl.TripletMarginLoss()(x, y), rtol=1e-9, atol=1e-9)


def test_no_statistics_without_collect_stats():
    loss = dk.losses.NPairsLoss(collect_stats=False)
    loss(*make("random", 8, 4, torch.float64))
    assert not hasattr(loss, "num_pairs") and not loss._forward_hooks
