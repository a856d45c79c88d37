"""``dk.losses.CrossBatchMemory`` / ``MultipleLosses`` / ``SelfSupervisedLoss`` against PML 2.9's wrappers
(values, gradients, queue state over several enqueue steps), their deliberate differences, and PML's own
wrappers around dml_kernels losses."""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import PackedPairMask

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)
D, MEM, B = 6, 20, 6  # five steps of 6 rows wrap a memory of 20 on the fourth


def _dk(name, **kw):
    return getattr(dk.losses, name)(backend="reference", **kw)


def _steps(n=5, dtype=torch.float64, b=B, classes=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, D, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g))
            for _ in range(n)]


def _same_state(ours, theirs):
    assert ours.queue_idx == theirs.queue_idx
    assert ours.has_been_filled == theirs.has_been_filled
    assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)
    assert ours.embedding_memory.dtype == theirs.embedding_memory.dtype
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)


def _compare_xbm(ours, theirs, steps, mask=None, outer=None, tol=TOL):
    for x, y in steps:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        it = outer(x, y) if outer else None
        a = ours(xa, y, it, enqueue_mask=mask)
        b = theirs(xb, y, it, enqueue_mask=mask)
        assert a.dim() == 0
        torch.testing.assert_close(a, b.to(a.dtype), **tol)
        a.backward()
        b.backward()
        torch.testing.assert_close(xa.grad, xb.grad if xb.grad is not None else torch.zeros_like(x), **tol)
        _same_state(ours, theirs)


XBM_INNER = ["ContrastiveLoss", "MultiSimilarityLoss", "GeneralizedLiftedStructureLoss", "TripletMarginLoss"]


@pytest.mark.parametrize("mode", ["plain", "enqueue_mask", "inner_miner", "outer_tuple"])
@pytest.mark.parametrize("name", XBM_INNER)
def test_xbm_equals_pml_over_five_steps(name, mode):
    miner = pm.MultiSimilarityMiner(0.3) if mode == "inner_miner" else None
    ours = dk.losses.CrossBatchMemory(_dk(name), D, MEM, miner=miner)
    theirs = pl.CrossBatchMemory(getattr(pl, name)(), D, MEM, miner=miner)
    mask = torch.arange(B) % 3 != 0 if mode == "enqueue_mask" else None
    outer = pm.TripletMarginMiner(0.5) if mode == "outer_tuple" else None
    steps = _steps()
    if mode == "outer_tuple" and name in ("MultiSimilarityLoss", "GeneralizedLiftedStructureLoss"):
        steps = steps[:1]  # later steps: PML's tuple holds batch indices read as memory slots → overlap error
    _compare_xbm(ours, theirs, steps, mask=mask, outer=outer)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss"])
def test_xbm_auto_backend_float32(name):
    ours = dk.losses.CrossBatchMemory(getattr(dk.losses, name)(), D, MEM)
    theirs = pl.CrossBatchMemory(getattr(pl, name)(), D, MEM)
    _compare_xbm(ours, theirs, _steps(dtype=torch.float32), tol=dict(rtol=1e-4, atol=1e-5))


def test_xbm_wraps_pml_losses_too():
    for name, kw in [("NTXentLoss", dict(temperature=0.2)), ("CircleLoss", {})]:
        ours = dk.losses.CrossBatchMemory(getattr(pl, name)(**kw), D, MEM)
        theirs = pl.CrossBatchMemory(getattr(pl, name)(**kw), D, MEM)
        _compare_xbm(ours, theirs, _steps())


def test_xbm_memory_is_read_in_place_as_a_packed_mask():
    inner = _dk("MultiSimilarityLoss")
    xbm = dk.losses.CrossBatchMemory(inner, D, MEM)
    seen = []
    inner.register_forward_pre_hook(lambda m, args: seen.append((args[2], args[3])))
    for x, y in _steps(2):
        xbm(x, y)
        pairs, ref = seen[-1]
        assert isinstance(pairs, PackedPairMask) and pairs.shape == (B, xbm.queue_idx)
        assert ref.untyped_storage().data_ptr() == xbm.embedding_memory.untyped_storage().data_ptr()
        pos, neg = pairs.to_dense()
        same = y[:, None] == xbm.label_memory[None, :xbm.queue_idx]
        assert torch.equal(neg, ~same)
        same[torch.arange(B), xbm.curr_batch_idx] = False  # each query's own slot is left out
        assert torch.equal(pos, same)
    ptr = xbm.embedding_memory.data_ptr()
    xbm(*_steps(1, dtype=torch.float64)[0])
    assert xbm.embedding_memory.data_ptr() == ptr  # same dtype/device: written in place, never reallocated


def test_xbm_mask_built_in_chunks(monkeypatch):
    from dml_kernels.losses import wrappers
    monkeypatch.setattr(wrappers, "_MASK_CHUNK", 13)  # a few rows (or one) per chunk
    ours = dk.losses.CrossBatchMemory(_dk("MultiSimilarityLoss"), D, MEM)
    theirs = pl.CrossBatchMemory(pl.MultiSimilarityLoss(), D, MEM)
    _compare_xbm(ours, theirs, _steps(3))


def test_xbm_state_follows_dtype_and_resets():
    xbm = dk.losses.CrossBatchMemory(_dk("ContrastiveLoss"), D, MEM)
    assert xbm.embedding_memory.dtype == torch.float32 and sorted(xbm.state_dict()) == ["embedding_memory",
                                                                                         "label_memory"]
    xbm(*_steps(1)[0])
    assert xbm.embedding_memory.dtype == torch.float64 and xbm.queue_idx == B
    xbm.reset_queue()
    assert xbm.queue_idx == 0 and not xbm.has_been_filled
    assert torch.equal(xbm.embedding_memory, torch.zeros(MEM, D)) and xbm.embedding_memory.dtype == torch.float32
    assert pl.CrossBatchMemory.supported_losses() == dk.losses.CrossBatchMemory.supported_losses()


def test_xbm_argument_errors():
    with pytest.raises(ValueError, match="not supported for ProxyAnchorLoss"):  # PML: a bare Exception
        dk.losses.CrossBatchMemory(dk.losses.ProxyAnchorLoss(3, D), D)
    xbm = dk.losses.CrossBatchMemory(_dk("ContrastiveLoss"), D, 4)
    x, y = torch.randn(6, D), torch.arange(6)
    with pytest.raises(ValueError, match="does not fit"):
        xbm(x, y)
    with pytest.raises(ValueError, match="mutually exclusive"):
        xbm(x[:2], y[:2], (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([1])),
            enqueue_mask=torch.tensor([True, False]))


# Deliberate differences from PML 2.9 (README), each against what PML does.

def test_xbm_all_false_mask_leaves_the_queue_unfilled():
    x, y = torch.randn(4, D, dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    none = torch.zeros(4, dtype=torch.bool)
    ours = dk.losses.CrossBatchMemory(_dk("ContrastiveLoss"), D, MEM)
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(), D, MEM)
    a, b = ours(x, y, enqueue_mask=none), theirs(x, y, enqueue_mask=none)
    assert theirs.has_been_filled and b > 0  # PML: compares against 20 zero rows labelled 0
    assert not ours.has_been_filled and ours.queue_idx == 0 and a == 0


def test_xbm_mask_larger_than_memory_raises():
    xbm = dk.losses.CrossBatchMemory(_dk("ContrastiveLoss"), D, 4)
    with pytest.raises(ValueError, match="more than the memory holds"):
        xbm(torch.randn(8, D), torch.arange(8) % 2, enqueue_mask=torch.arange(8) < 6)


def test_xbm_one_row_batch_leaves_its_own_slot_out():
    x1, y1 = torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 1, 0])
    x2, y2 = torch.randn(1, D, dtype=torch.float64), torch.tensor([0])
    ours = dk.losses.CrossBatchMemory(_dk("ContrastiveLoss", pos_margin=0.05), D, MEM)
    ours(x1, y1)
    a = ours(x2, y2)
    mem, lab = ours.embedding_memory[:4], ours.label_memory[:4]
    expected = pl.ContrastiveLoss(pos_margin=0.05)(  # pairs with slots 0..2 only: slot 3 is the row itself
        x2, y2, (torch.tensor([0, 0]), torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([1])), mem, lab)
    torch.testing.assert_close(a, expected, **TOL)
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(pos_margin=0.05), D, MEM)
    theirs(x1, y1)
    seen = []
    theirs.loss.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    theirs(x2, y2)
    assert 3 in seen[0][1].tolist()  # PML's remove_self_comparisons misses the self pair at B = 1


# ------------------------------------------------------------------------------------- MultipleLosses

def test_multiple_losses_equal_pml():
    x, y = torch.randn(12, D, dtype=torch.float64), torch.randint(0, 3, (12,))
    for form in ("list", "dict"):
        def make(mod, form=form):
            ls = [getattr(mod, "ContrastiveLoss")(), getattr(mod, "TripletMarginLoss")(margin=0.2)]
            ms = [pm.MultiSimilarityMiner(0.2), None]
            ws = [0.5, 2.0]
            if form == "dict":
                return dict(a=ls[0], b=ls[1]), dict(a=ms[0]), dict(a=ws[0], b=ws[1])
            return ls, ms, ws
        for with_miners in (False, True):
            ls, ms, ws = make(dk.losses)
            ours = dk.losses.MultipleLosses(ls, ms if with_miners else None, ws)
            ls, ms, ws = make(pl)
            theirs = pl.MultipleLosses(ls, ms if with_miners else None, ws)
            torch.testing.assert_close(ours(x, y), theirs(x, y), **TOL)
    assert dk.losses.MultipleLosses([])(x, y) == 0


def test_multiple_losses_assertions():
    c, t = _dk("ContrastiveLoss"), _dk("TripletMarginLoss")
    for args in [([c, t], None, [1.0]), ([c, t], [None], None), (dict(a=c, b=t), dict(z=None), None),
                 (dict(a=c, b=t), None, dict(a=1.0)), ([c, t], dict(a=None), None)]:
        with pytest.raises(AssertionError):
            dk.losses.MultipleLosses(*args)
    ml = dk.losses.MultipleLosses([c], [pm.MultiSimilarityMiner()])
    with pytest.raises(AssertionError):
        ml(torch.randn(4, D), torch.arange(4) % 2, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))


# ------------------------------------------------------------------------------------- SelfSupervisedLoss

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss",
                                  "GeneralizedLiftedStructureLoss", "LiftedStructureLoss"])
def test_self_supervised_equals_pml(name, symmetric):
    x, r = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    ours = dk.losses.SelfSupervisedLoss(_dk(name), symmetric=symmetric)
    theirs = pl.SelfSupervisedLoss(getattr(pl, name)(), symmetric=symmetric)

    def check():
        xa, ra, xb, rb = (t.clone().requires_grad_() for t in (x, r, x, r))
        a, b = ours(xa, ra), theirs(xb, rb)
        torch.testing.assert_close(a, b, **TOL)
        a.backward()
        b.backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        torch.testing.assert_close(ra.grad, rb.grad, **TOL)
    check()


def test_self_supervised_support_list():
    assert dk.losses.SelfSupervisedLoss.supported_losses() == pl.SelfSupervisedLoss.supported_losses()
    with pytest.raises(ValueError, match="not supported for NPairsLoss"):
        dk.losses.SelfSupervisedLoss(_dk("NPairsLoss"))


# ---------------------------------------------------------------- PML's wrappers around dml_kernels losses

XBM_ALL = [n for n in pl.CrossBatchMemory.supported_losses() if n in dk.losses.__all__]
SSL_ALL = [n for n in pl.SelfSupervisedLoss.supported_losses() if n in dk.losses.__all__]


@pytest.mark.parametrize("name", XBM_ALL)
def test_xbm_ours_and_pmls_around_every_supported_dk_loss(name):
    for wrapper in (dk.losses.CrossBatchMemory, pl.CrossBatchMemory):
        ours = wrapper(_dk(name), D, MEM)
        theirs = pl.CrossBatchMemory(getattr(pl, name)(), D, MEM)
        _compare_xbm(ours, theirs, _steps())


@pytest.mark.parametrize("name", SSL_ALL)
def test_pml_self_supervised_around_dk_losses(name):
    x, r = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    for symmetric in (True, False):
        def check():
            a = pl.SelfSupervisedLoss(_dk(name), symmetric=symmetric)(x, r)
            b = pl.SelfSupervisedLoss(getattr(pl, name)(), symmetric=symmetric)(x, r)
            torch.testing.assert_close(a, b, **TOL)
        check()


def test_pml_multiple_losses_around_dk_losses():
    x, y = torch.randn(12, D, dtype=torch.float64), torch.randint(0, 3, (12,))
    a = pl.MultipleLosses([_dk("ContrastiveLoss"), _dk("MultiSimilarityLoss")], weights=[1.0, 0.3])(x, y)
    b = pl.MultipleLosses([pl.ContrastiveLoss(), pl.MultiSimilarityLoss()], weights=[1.0, 0.3])(x, y)
    torch.testing.assert_close(a, b, **TOL)
