"""dk.distributed on real torch.distributed process groups: gloo processes on the CPU (free port, a short
process-group timeout so a failure never hangs the run). Every rank's loss and gradients are compared with
one process computing the same quantities on the concatenated global batch (float64)."""
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import dml_kernels as dk
from dml_kernels.distributed import (DistributedLossWrapper, DistributedMinerWrapper, gather_full_weight, shard_range,
                                     shard_rows, sharded_proxy_anchor_loss, sharded_proxy_nca_loss)
from gloo import spawn

TOL = dict(rtol=1e-9, atol=1e-12)
D_IN, D = 6, 5


def _batches(world, uneven):
    """Per-rank (inputs, labels); class ids shared across ranks so positives cross ranks."""
    g = torch.Generator().manual_seed(1)
    sizes = [5 + (3 * r if uneven else 0) for r in range(world)]
    inputs = [torch.randn(n, D_IN, generator=g, dtype=torch.float64) for n in sizes]
    labels = [torch.randint(0, 4, (n,), generator=g) for n in sizes]
    return inputs, labels


LOSSES = {
    "contrastive": lambda backend: dk.losses.ContrastiveLoss(backend=backend),
    "multi_similarity": lambda backend: dk.losses.MultiSimilarityLoss(backend=backend),
    "triplet": lambda backend: dk.losses.TripletMarginLoss(margin=0.2, backend=backend),
}


CASES = [("contrastive", "reference"), ("multi_similarity", "cpu"), ("triplet", "reference")]
CONFIGS = [(2, False), (3, True)]  # (world size, uneven local batch sizes)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D).double()


# ------------------------------------------------------------------------------------- worker bodies


def _values_and_grads(rank, world, out_dir, uneven, loss_name, backend, efficient):
    inputs, labels = _batches(world, uneven)
    x = inputs[rank].clone().requires_grad_()
    wrapper = DistributedLossWrapper(LOSSES[loss_name](backend), efficient=efficient)
    loss = wrapper(x, labels[rank])
    (g,) = torch.autograd.grad(loss, x)
    torch.save(dict(loss=loss.detach(), grad=g), os.path.join(out_dir, f"{rank}.pt"))


def _ddp_training(rank, world, out_dir, uneven, efficient):
    inputs, labels = _batches(world, uneven)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapper = DistributedLossWrapper(dk.losses.ContrastiveLoss(backend="reference"), efficient=efficient)
    for _ in range(3):
        opt.zero_grad()
        wrapper(model(inputs[rank]), labels[rank]).backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, os.path.join(out_dir, "0.pt"))


def _against_pml(rank, world, out_dir):
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm
    from pytorch_metric_learning.utils import distributed as pd

    inputs, labels = _batches(world, uneven=False)  # PML's all_gather needs equal local sizes
    res = {}
    for efficient in (False, True):
        for name, ours, theirs in (("contrastive", dk.losses.ContrastiveLoss(), pl.ContrastiveLoss()),
                                   ("ms", dk.losses.MultiSimilarityLoss(), pl.MultiSimilarityLoss())):
            vals = []
            for wrap, loss in ((DistributedLossWrapper, ours), (pd.DistributedLossWrapper, theirs)):
                x = inputs[rank].clone().requires_grad_()
                v = wrap(loss, efficient=efficient)(x, labels[rank])
                vals.append((v.detach(), torch.autograd.grad(v, x)[0]))
            res[(name, efficient)] = vals
        mined = []
        for wrap, miner in ((DistributedMinerWrapper, dk.miners.MultiSimilarityMiner(0.1)),
                            (pd.DistributedMinerWrapper, pm.MultiSimilarityMiner(0.1))):
            t = wrap(miner, efficient=efficient)(inputs[rank], labels[rank])
            mined.append({tuple(int(v) for v in p) for p in zip(t[0], t[1])} |
                         {("neg",) + tuple(int(v) for v in p) for p in zip(t[2], t[3])})
        res[("miner", efficient)] = mined
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))


def _all_checks(rank, world, out_dir, uneven):
    """Everything one configuration checks, in one set of processes (a spawn costs seconds)."""
    for loss_name, backend in CASES:
        for efficient in (False, True):
            sub = os.path.join(out_dir, f"{loss_name}-{backend}-{efficient}")
            os.makedirs(sub, exist_ok=True)
            _values_and_grads(rank, world, sub, uneven, loss_name, backend, efficient)
    for efficient in (False, True):
        sub = os.path.join(out_dir, f"ddp-{efficient}")
        os.makedirs(sub, exist_ok=True)
        _ddp_training(rank, world, sub, uneven, efficient)
    sub = os.path.join(out_dir, "sharded")
    os.makedirs(sub, exist_ok=True)
    _sharded(rank, world, sub, uneven)
    sub = os.path.join(out_dir, "xbm")
    os.makedirs(sub, exist_ok=True)
    _cross_batch_memory(rank, world, sub, uneven)
    if not uneven:
        sub = os.path.join(out_dir, "no_local_positives")
        os.makedirs(sub, exist_ok=True)
        _no_local_positives(rank, world, sub)
        sub = os.path.join(out_dir, "pml")
        os.makedirs(sub, exist_ok=True)
        _against_pml(rank, world, sub)


SHARDED = {
    "nca": lambda x, y, p, C, backend: sharded_proxy_nca_loss(x, y, p, num_classes=C, softmax_scale=3.0,
                                                               backend=backend),
    "nca_exclude": lambda x, y, p, C, backend: sharded_proxy_nca_loss(x, y, p, num_classes=C, exclude_positive=True,
                                                                      backend=backend),
    "anchor": lambda x, y, p, C, backend: sharded_proxy_anchor_loss(x, y, p, num_classes=C, alpha=8.0,
                                                                    backend=backend),
}
UNSHARDED = {
    "nca": lambda x, y, p: dk.functional.proxy_nca_loss(x, y, p, softmax_scale=3.0, backend="reference"),
    "nca_exclude": lambda x, y, p: dk.functional.proxy_nca_loss(x, y, p, exclude_positive=True, backend="reference"),
    "anchor": lambda x, y, p: dk.functional.proxy_anchor_loss(x, y, p, alpha=8.0, backend="reference"),
}
SHARD_CASES = [(7, "reference"), (7, "cpu"), (2, "cpu")]  # C not divisible by W; C < W = 3 (an empty shard)


def _full_weight(num_classes):
    return torch.randn(num_classes, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _sharded(rank, world, out_dir, uneven):
    _, labels = _batches(world, uneven)
    x = torch.randn(len(labels[rank]), D, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank))
    res = {}
    for num_classes, backend in SHARD_CASES:
        full = _full_weight(num_classes)
        shard = shard_rows(full).requires_grad_()
        assert torch.equal(gather_full_weight(shard), full)
        for name, fn in SHARDED.items():
            xx = x.clone().requires_grad_()
            loss = fn(xx, labels[rank] % num_classes, shard, num_classes, backend)
            gx, gp = torch.autograd.grad(loss, (xx, shard))
            res[(num_classes, backend, name)] = (loss.detach(), gx, gp)
    # the modules: process_group= shards their proxies; a shard loaded from the full weight gives the same loss
    for cls, kw, name in ((dk.losses.ProxyNCALoss, dict(softmax_scale=3.0), "nca"),
                          (dk.losses.ProxyAnchorLoss, dict(alpha=8.0), "anchor")):
        module = cls(7, D, process_group=dist.group.WORLD, backend="cpu", **kw).double()
        assert module.proxies.shape == (shard_range(7)[1] - shard_range(7)[0], D)
        module.load_state_dict({"proxies": shard_rows(_full_weight(7))})
        xx = x.clone().requires_grad_()
        loss = module(xx, labels[rank] % 7)
        gx, gp = torch.autograd.grad(loss, (xx, module.proxies))
        res[("module", name)] = (loss.detach(), gx, gp)
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))


def _xbm_size(labels):
    """1.5 global batches: the ring wraps during the three steps."""
    return 3 * sum(len(t) for t in labels) // 2


def _cross_batch_memory(rank, world, out_dir, uneven):
    """DistributedLossWrapper(CrossBatchMemory): every rank enqueues the global batch in rank order."""
    inputs, labels = _batches(world, uneven)
    xbm = dk.losses.CrossBatchMemory(dk.losses.ContrastiveLoss(backend="reference"), D_IN,
                                     memory_size=_xbm_size(labels))
    wrapper = DistributedLossWrapper(xbm)
    values = []
    for step in range(3):
        x = (inputs[rank] + step).clone().requires_grad_()
        loss = wrapper(x, labels[rank])
        values.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    torch.save(dict(values=values, memory=xbm.embedding_memory.clone(), labels=xbm.label_memory.clone(),
                    idx=xbm.queue_idx, filled=xbm.has_been_filled), os.path.join(out_dir, f"{rank}.pt"))


NO_LOCAL_POSITIVES = [torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 5, 6, 7])]  # rank 1: all distinct


def _no_local_positives(rank, world, out_dir):
    """Rank 1's local batch has no positive pair of its own (its 0 and 1 pair up with rank 0's rows only)."""
    inputs, _ = _batches(world, uneven=False)
    res = {}
    for efficient in (False, True):
        x = inputs[rank].clone().requires_grad_()
        loss = DistributedLossWrapper(dk.losses.ContrastiveLoss(backend="reference"), efficient=efficient)(
            x, NO_LOCAL_POSITIVES[rank])
        res[efficient] = (loss.detach(), torch.autograd.grad(loss, x)[0])
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))


def _raising_rank(rank, world):
    if rank == 1:
        raise ValueError("rank 1 fails before the collective")
    DistributedLossWrapper(dk.losses.ContrastiveLoss())(torch.randn(4, D, dtype=torch.float64), torch.arange(4) % 2)


# ------------------------------------------------------------------------------------- single-process oracles


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """{(world, uneven): folder of the results of _all_checks}, each configuration spawned once."""
    out = {}
    for world, uneven in CONFIGS:
        d = tmp_path_factory.mktemp(f"w{world}")
        spawn(world, _all_checks, str(d), uneven)
        out[(world, uneven)] = d
    return out


def _global(world, uneven):
    inputs, labels = _batches(world, uneven)
    sizes = [len(t) for t in labels]
    starts = [sum(sizes[:r]) for r in range(world)]
    return inputs, labels, sizes, starts


def _pairs_but_self(labels, ref_labels, offset, count):
    same = labels[:, None] == ref_labels[None, :]
    keep = torch.ones_like(same)
    rows = torch.arange(min(len(labels), count))
    keep[rows, offset + rows] = False
    a1, p = torch.where(same & keep)
    a2, n = torch.where(~same)
    return a1, p, a2, n


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("loss_name,backend", CASES)
def test_global_batch_value_and_gradient(world, uneven, loss_name, backend, ran):
    """Default mode: every rank's value is world × the loss of the concatenated batch, and its gradient is
    PML's (world × the global loss's gradient with respect to its own rows)."""
    tmp_path = ran[(world, uneven)] / f"{loss_name}-{backend}-False"
    inputs, labels, sizes, starts = _global(world, uneven)
    x = torch.cat(inputs).requires_grad_()
    want = LOSSES[loss_name]("reference")(x, torch.cat(labels))
    (gw,) = torch.autograd.grad(want, x)
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(got["loss"], world * want.detach(), **TOL)
        torch.testing.assert_close(got["grad"], world * gw[starts[r]: starts[r] + sizes[r]], **TOL)


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("loss_name,backend", CASES)
def test_efficient_value_and_gradient(world, uneven, loss_name, backend, ran):
    """efficient=True: local queries × gathered references; the gradient of every rank's loss reaches the
    rows of every rank (PML drops the part through other ranks' copies)."""
    tmp_path = ran[(world, uneven)] / f"{loss_name}-{backend}-True"
    inputs, labels, sizes, starts = _global(world, uneven)
    x = torch.cat(inputs).requires_grad_()
    y = torch.cat(labels)
    loss_fn = LOSSES[loss_name]("reference")
    per_rank = [loss_fn(x[s: s + n], y[s: s + n], _pairs_but_self(y[s: s + n], y, s, n), x, y)
                for s, n in zip(starts, sizes)]
    (g_total,) = torch.autograd.grad(sum(per_rank), x)
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(got["loss"], world * per_rank[r].detach(), **TOL)
        torch.testing.assert_close(got["grad"], g_total[starts[r]: starts[r] + sizes[r]], **TOL)


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("efficient", [False, True])
def test_ddp_training_equals_single_process(world, uneven, efficient, ran):
    """Three DDP + SGD steps with the wrapper give the parameters of single-process training on the
    global batch (efficient: of the mean of the ranks' losses)."""
    tmp_path = ran[(world, uneven)] / f"ddp-{efficient}"
    inputs, labels, sizes, starts = _global(world, uneven)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = dk.losses.ContrastiveLoss(backend="reference")
    x_in, y = torch.cat(inputs), torch.cat(labels)
    for _ in range(3):
        opt.zero_grad()
        emb = model(x_in)
        if efficient:
            loss = sum(loss_fn(emb[s: s + n], y[s: s + n], _pairs_but_self(y[s: s + n], y, s, n), emb, y)
                       for s, n in zip(starts, sizes)) / world
        else:
            loss = loss_fn(emb, y)
        loss.backward()
        opt.step()
    got = torch.load(tmp_path / "0.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, **TOL)


def test_against_pml_wrappers(ran):
    """PML's wrappers around PML's classes and ours around ours: equal values and gradients (default mode;
    efficient mode: equal values, PML's gradients lack the other ranks' part), and the same mined pairs."""
    world = 2
    tmp_path = ran[(world, False)] / "pml"
    for r in range(world):
        res = torch.load(tmp_path / f"{r}.pt")
        for name in ("contrastive", "ms"):
            (ours, og), (theirs, tg) = res[(name, False)]
            torch.testing.assert_close(ours, theirs, **TOL)
            torch.testing.assert_close(og, tg, **TOL)
            (ours, _), (theirs, _) = res[(name, True)]
            torch.testing.assert_close(ours, theirs, **TOL)
        for efficient in (False, True):
            ours, theirs = res[("miner", efficient)]
            assert ours == theirs and ours


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("num_classes,backend", SHARD_CASES)
@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_class_weights_equal_the_unsharded_loss(world, uneven, num_classes, backend, name, ran):
    """Weights sharded over the ranks: every rank's value is the unsharded loss of the global batch, and its
    gradients are that loss's gradients for its weight rows and its local embeddings."""
    _, labels, sizes, starts = _global(world, uneven)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + r))
          for r, n in enumerate(sizes)]
    x = torch.cat(xs).requires_grad_()
    full = _full_weight(num_classes).requires_grad_()
    want = UNSHARDED[name](x, torch.cat(labels) % num_classes, full)
    gx, gp = torch.autograd.grad(want, (x, full))
    for r in range(world):
        loss, got_x, got_p = torch.load(ran[(world, uneven)] / "sharded" / f"{r}.pt")[(num_classes, backend, name)]
        lo, hi = shard_range(num_classes, rank=r, world_size=world)
        torch.testing.assert_close(loss, want.detach(), **TOL)
        torch.testing.assert_close(got_x, gx[starts[r]: starts[r] + sizes[r]], **TOL)
        torch.testing.assert_close(got_p, gp[lo:hi], **TOL)


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("name", ["nca", "anchor"])
def test_process_group_on_the_loss_modules(world, uneven, name, ran):
    """ProxyNCALoss / ProxyAnchorLoss(process_group=...) hold a shard and compute what the functions do."""
    for r in range(world):
        res = torch.load(ran[(world, uneven)] / "sharded" / f"{r}.pt")
        for got, want in zip(res[("module", name)], res[(7, "cpu", name)]):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("world,uneven", CONFIGS)
def test_cross_batch_memory_queues_are_identical_on_every_rank(world, uneven, ran):
    """Every rank's queue equals one process's CrossBatchMemory fed the concatenated batches (PML's wrapper
    gives every rank a different order, #639); values are world × that process's, gradients PML's."""
    inputs, labels, sizes, starts = _global(world, uneven)
    xbm = dk.losses.CrossBatchMemory(dk.losses.ContrastiveLoss(backend="reference"), D_IN,
                                     memory_size=_xbm_size(labels))
    want = []
    for step in range(3):
        x = (torch.cat(inputs) + step).requires_grad_()
        loss = xbm(x, torch.cat(labels))
        want.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    for r in range(world):
        got = torch.load(ran[(world, uneven)] / "xbm" / f"{r}.pt")
        torch.testing.assert_close(got["memory"], xbm.embedding_memory, **TOL)
        assert torch.equal(got["labels"], xbm.label_memory)
        assert (got["idx"], got["filled"]) == (xbm.queue_idx, xbm.has_been_filled)
        for (v, g), (wv, wg) in zip(got["values"], want):
            torch.testing.assert_close(v, world * wv, **TOL)
            torch.testing.assert_close(g, world * wg[starts[r]: starts[r] + sizes[r]], **TOL)


def test_a_rank_without_local_positives(ran):
    """Rank 1's batch has no positive pair of its own: both modes still equal one process's computation."""
    world = 2
    inputs, _ = _batches(world, uneven=False)
    x = torch.cat(inputs).requires_grad_()
    y = torch.cat(NO_LOCAL_POSITIVES)
    loss_fn = dk.losses.ContrastiveLoss(backend="reference")
    want = loss_fn(x, y)
    (gw,) = torch.autograd.grad(want, x)
    per_rank = [loss_fn(x[s: s + 5], y[s: s + 5], _pairs_but_self(y[s: s + 5], y, s, 5), x, y) for s in (0, 5)]
    (ge,) = torch.autograd.grad(sum(per_rank), x)
    for r in range(world):
        res = torch.load(ran[(world, False)] / "no_local_positives" / f"{r}.pt")
        torch.testing.assert_close(res[False][0], world * want.detach(), **TOL)
        torch.testing.assert_close(res[False][1], world * gw[5 * r: 5 * r + 5], **TOL)
        torch.testing.assert_close(res[True][0], world * per_rank[r].detach(), **TOL)
        torch.testing.assert_close(res[True][1], ge[5 * r: 5 * r + 5], **TOL)


def test_a_failing_rank_does_not_hang():
    """Rank 1 raises before the collective: the job fails promptly with either rank's error (rank 0 sees its
    peer's connection close), well before the process-group timeout would end it."""
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails|Connection reset|Connection closed"):
        spawn(2, _raising_rank, timeout_s=120)
    assert time.monotonic() - start < 60


def test_without_process_group_warns_and_computes_locally():
    x, y = torch.randn(6, D, dtype=torch.float64), torch.arange(6) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = DistributedLossWrapper(dk.losses.ContrastiveLoss())(x, y)
    assert any("not initialised" in str(w.message) for w in caught)
    torch.testing.assert_close(v, dk.losses.ContrastiveLoss()(x, y))
    with pytest.raises(ValueError, match="process group"):
        DistributedMinerWrapper(dk.miners.MultiSimilarityMiner())(x, y)


def test_the_workers_ran(ran):
    """The harness itself: every configuration's workers wrote their files (so the tests above cannot pass
    without the processes having run)."""
    for (world, uneven), d in ran.items():
        sub = d / "contrastive-reference-False"
        assert sorted(os.listdir(sub)) == [f"{r}.pt" for r in range(world)]
