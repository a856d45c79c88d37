"""Class-sharded weights for the margin-softmax family (dk.distributed.sharded_margin_softmax_loss,
sharded_p2sgrad_loss, process_group= / sample_rate= on the modules) on real gloo process groups on the CPU (free
port, a short process-group timeout so a failure never hangs the run): every rank's value and its gradients (its
local embeddings, its weight columns) equal one process's unsharded loss of the concatenated global batch
(float64, 1e-9); a PML-shaped state_dict loads into the shards and gathers back; DDP + SGD steps stay equal to
single-process training; Partial FC's sampling equals the loss restricted to the sampled classes. Plus the
single-process checks of the row-statistics op (reference = cpu, naive loops) and of the sampler."""
import math
import os
import time

import pytest
import torch
import torch.distributed as dist

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.distances import parse_distance
from dml_kernels.distributed import (gather_full_state_dict, gather_full_weight, load_full_state_dict, sample_classes,
                                     sample_generator, shard_columns, shard_range, sharded_margin_softmax_loss,
                                     sharded_p2sgrad_loss)
from gloo import spawn

TOL = dict(rtol=1e-9, atol=1e-12)
D_IN, D = 6, 5
F = dk.functional
COS = parse_distance(None, True, default="cosine")

# name -> (op, K, the op's canonical params, the unsharded functional loss of the full weight)
FAMILY = {
    "normalized": ("normalized_softmax_loss", 1, dict(temperature=0.5, distance=parse_distance(None, True, default="dot")),
                   lambda x, y, w: F.normalized_softmax_loss(x, y, w, temperature=0.5, backend="reference")),
    "normalized_euclidean": ("normalized_softmax_loss", 1, dict(temperature=0.5, distance=parse_distance(
        "euclidean", True, default="dot")), lambda x, y, w: F.normalized_softmax_loss(
        x, y, w, temperature=0.5, distance="euclidean", backend="reference")),
    "cosface": ("cosface_loss", 1, dict(margin=0.35, scale=4.0),
                lambda x, y, w: F.cosface_loss(x, y, w, margin=0.35, scale=4, backend="reference")),
    "arcface": ("arcface_loss", 1, dict(margin=math.radians(28.6), scale=4.0),
                lambda x, y, w: F.arcface_loss(x, y, w, margin=28.6, scale=4, backend="reference")),
    "large_margin": ("large_margin_softmax_loss", 1, dict(margin=3, scale=1.0),
                     lambda x, y, w: F.large_margin_softmax_loss(x, y, w, margin=3, backend="reference")),
    "sphereface": ("sphereface_loss", 1, dict(margin=3, scale=1.0),
                   lambda x, y, w: F.sphereface_loss(x, y, w, margin=3, backend="reference")),
    "subcenter": ("subcenter_arcface_loss", 2, dict(margin=math.radians(28.6), scale=4.0, sub_centers=2),
                  lambda x, y, w: F.subcenter_arcface_loss(x, y, w, sub_centers=2, scale=4, backend="reference")),
    "soft_triple": ("soft_triple_loss", 2, dict(centers_per_class=2, la=5.0, gamma=0.1, margin=0.01, distance=COS),
                    lambda x, y, w: F.soft_triple_loss(x, y, w, centers_per_class=2, la=5, backend="reference")),
    "p2sgrad": (None, 1, {}, lambda x, y, w: F.p2sgrad_loss(x, y, w, backend="reference")),
}
FUSED = ("normalized", "normalized_euclidean", "cosface", "arcface", "large_margin", "sphereface")
CASES = [(n, "reference") for n in FAMILY] + [(n, "cpu") for n in FUSED + ("p2sgrad",)]
NUM_CLASSES = (7, 2)  # C not divisible by W; C < W = 3 (an empty shard)
CONFIGS = [(2, False), (3, True)]  # (world size, uneven local batch sizes)

# the modules, built as PML builds them (the full weight comes from PML's state_dict)
MODULES = {
    "NormalizedSoftmaxLoss": (dict(temperature=0.5), 1),
    "CosFaceLoss": (dict(margin=0.35, scale=4), 1),
    "ArcFaceLoss": (dict(margin=28.6, scale=4), 1),
    "LargeMarginSoftmaxLoss": (dict(margin=3), 1),
    "SphereFaceLoss": (dict(margin=3), 1),
    "SubCenterArcFaceLoss": (dict(scale=4, sub_centers=2), 2),
    "SoftTripleLoss": (dict(centers_per_class=2, la=5), 2),
}
# 90 classes: a shard draws fewer classes than it holds; 12: it draws them all (a mask only), 0 negatives per shard
SAMPLED = [("cosface", "cpu", 90), ("subcenter", "reference", 90), ("cosface", "reference", 12)]
SAMPLE_C, SAMPLE_RATE = 90, 0.1


def _batches(world, uneven):
    """Per-rank (embeddings, global class ids in [0, 4)): class ids shared across ranks."""
    g = torch.Generator().manual_seed(1)
    sizes = [5 + (3 * r if uneven else 0) for r in range(world)]
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in sizes]
    ys = [torch.randint(0, 4, (n,), generator=g) for n in sizes]
    return xs, ys


def _full_weight(num_classes, k, seed=2, name=None):
    """A D × C·K weight; unit columns for P2SGrad (its module renormalises them: its fused form assumes them)."""
    w = torch.randn(D, num_classes * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(w, dim=0) if name == "p2sgrad" else w


def _sharded_fn(name, backend, num_classes, **kw):
    op, k, params, _ = FAMILY[name]
    if op is None:
        return lambda x, y, w: sharded_p2sgrad_loss(x, y, w, num_classes=num_classes, backend=backend)
    return lambda x, y, w: sharded_margin_softmax_loss(x, y, w, loss=op, num_classes=num_classes, group_size=k,
                                                       backend=backend, **params, **kw)


def _value_and_grads(fn, x, labels, shard):
    xx, w = x.clone().requires_grad_(), shard.detach().clone().requires_grad_()
    loss = fn(xx, labels, w)
    gx, gw = torch.autograd.grad(loss, (xx, w))
    return loss.detach(), gx, gw


# ------------------------------------------------------------------------------------- worker bodies


def _functions(rank, world, xs, ys, res):
    for num_classes in NUM_CLASSES:
        for name, backend in CASES:
            k = FAMILY[name][1]
            full = _full_weight(num_classes, k, name=name)
            shard = shard_columns(full, group_size=k)
            assert torch.equal(gather_full_weight(shard, dim=1), full)
            fn = _sharded_fn(name, backend, num_classes)
            res[("fn", num_classes, name, backend)] = _value_and_grads(fn, xs[rank], ys[rank] % num_classes, shard)


def _pml_states():
    """PML's state_dicts of the modules (made in the parent: the workers need not import PML)."""
    from pytorch_metric_learning import losses as pl

    states = {}
    for cls_name, (kw, k) in MODULES.items():
        torch.manual_seed(3)
        states[cls_name] = getattr(pl, cls_name)(num_classes=7, embedding_size=D, **kw).double().state_dict()
    torch.manual_seed(3)
    states["P2SGradLoss"] = pl.P2SGradLoss(D, 7).double().state_dict()
    return states


def _modules(rank, world, xs, ys, res, pml_states):
    """Our modules with process_group= load PML's full state_dict into their shards and gather it back."""
    for cls_name, (kw, k) in MODULES.items():
        pml_state = pml_states[cls_name]
        ours = getattr(dk.losses, cls_name)(7, D, process_group=dist.group.WORLD, **kw).double()
        lo, hi = shard_range(7)
        assert ours._weight().shape == (D, (hi - lo) * k)
        load_full_state_dict(ours, pml_state)
        for key, v in gather_full_state_dict(ours).items():
            assert torch.equal(v, pml_state[key]), (cls_name, key)
        w = ours._weight()
        xx = xs[rank].clone().requires_grad_()
        loss = ours(xx, ys[rank] % 7)
        res[("module", cls_name)] = (loss.detach(),) + torch.autograd.grad(loss, (xx, w)) + (pml_state,)
    ours = dk.losses.P2SGradLoss(D, 7, process_group=dist.group.WORLD).double()
    load_full_state_dict(ours, pml_states["P2SGradLoss"])
    xx = xs[rank].clone().requires_grad_()
    loss = ours(xx, ys[rank] % 7)
    res[("module", "P2SGradLoss")] = (loss.detach(),) + torch.autograd.grad(loss, (xx, ours.weight)) + (
        pml_states["P2SGradLoss"],)


def _sampled(rank, world, xs, ys, res):
    """Partial FC: the functions with an explicit generator, and the module over two steps."""
    for name, backend, num_classes in SAMPLED:
        k = FAMILY[name][1]
        shard = shard_columns(_full_weight(num_classes, k), group_size=k)
        fn = _sharded_fn(name, backend, num_classes, sample_rate=SAMPLE_RATE,
                         generator=sample_generator(7, rank, 0, "cpu"))
        res[("sampled", name, backend, num_classes)] = _value_and_grads(fn, xs[rank], ys[rank] % 2, shard)
    for seed_copy in (0, 1):  # two modules with one seed: the same draws
        module = dk.losses.CosFaceLoss(SAMPLE_C, D, margin=0.35, scale=4, process_group=dist.group.WORLD,
                                       sample_rate=SAMPLE_RATE, sample_seed=7, backend="cpu").double()
        load_full_state_dict(module, {"W": _full_weight(SAMPLE_C, 1)})
        for step in range(2):
            xx = xs[rank].clone().requires_grad_()
            loss = module(xx, ys[rank] % 2)
            res[("sampled_module", seed_copy, step)] = (loss.detach(),) + torch.autograd.grad(loss, (xx, module.W))
        assert module.sample_step == 2


def _ddp(rank, world, xs_in, ys, res, lr=0.5):
    """Three DDP + SGD steps: the backbone's lr is lr·W (DDP averages the ranks' gradients of one global loss),
    the shard's lr."""
    for cls_name in ("CosFaceLoss", "SubCenterArcFaceLoss"):
        kw, k = MODULES[cls_name]
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(D_IN, D).double())
        loss_fn = getattr(dk.losses, cls_name)(7, D, process_group=dist.group.WORLD, **kw).double()
        load_full_state_dict(loss_fn, {loss_fn._weight_name: _full_weight(7, k, seed=4)})
        opt = torch.optim.SGD([dict(params=model.parameters(), lr=lr * world),
                               dict(params=loss_fn.parameters(), lr=lr)])
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(xs_in[rank]), ys[rank] % 7).backward()
            opt.step()
        res[("ddp", cls_name)] = ({n: v.detach().clone() for n, v in model.module.state_dict().items()},
                                  gather_full_weight(loss_fn._weight(), dim=1))


NO_POSITIVES = [torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 0, 1, 2, 1])]  # C = 6: rank 1 holds classes 3-5


def _no_positives(rank, world, xs, res):
    """Rank 1's shard holds no class of the global batch, and its local rows' classes live on rank 0."""
    for name, backend in (("cosface", "cpu"), ("soft_triple", "reference"), ("p2sgrad", "cpu")):
        k = FAMILY[name][1]
        shard = shard_columns(_full_weight(6, k, name=name), group_size=k)
        res[("no_positives", name)] = _value_and_grads(_sharded_fn(name, backend, 6), xs[rank], NO_POSITIVES[rank],
                                                        shard)


def _all_checks(rank, world, out_dir, uneven, pml_states):
    """Everything one configuration checks, in one set of processes (a spawn costs seconds)."""
    xs, ys = _batches(world, uneven)
    res = {}
    _functions(rank, world, xs, ys, res)
    _modules(rank, world, xs, ys, res, pml_states)
    _sampled(rank, world, xs, ys, res)
    xs_in = [torch.randn(len(y), D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(20 + r))
             for r, y in enumerate(ys)]
    _ddp(rank, world, xs_in, ys, res)
    if not uneven:
        _no_positives(rank, world, xs, res)
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))


def _raising_rank(rank, world):
    """Rank 1 passes a label outside [0, num_classes): it raises while rank 0 waits in the gather."""
    x, y = torch.randn(4, D, dtype=torch.float64), torch.arange(4) % 2
    if rank == 1:
        y = y + 100
    shard = shard_columns(_full_weight(4, 1))
    sharded_margin_softmax_loss(x, y, shard, loss="cosface_loss", num_classes=4, margin=0.35, scale=4.0)


# ------------------------------------------------------------------------------------- single-process oracles


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """{(world, uneven): {rank: results}}, each configuration spawned once."""
    out, states = {}, _pml_states()
    for world, uneven in CONFIGS:
        d = tmp_path_factory.mktemp(f"w{world}")
        spawn(world, _all_checks, str(d), uneven, states)
        out[(world, uneven)] = {r: torch.load(d / f"{r}.pt", weights_only=False) for r in range(world)}
    return out


def _global(world, uneven):
    xs, ys = _batches(world, uneven)
    sizes = [len(y) for y in ys]
    return torch.cat(xs), torch.cat(ys), sizes, [sum(sizes[:r]) for r in range(world)]


def _check_rank(got, want, gx, gw, r, world, starts, sizes, num_classes, k):
    lo, hi = shard_range(num_classes, rank=r, world_size=world)
    loss, got_x, got_w = got[:3]
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(got_x, gx[starts[r]: starts[r] + sizes[r]], **TOL)
    torch.testing.assert_close(got_w, gw[:, lo * k: hi * k], **TOL)


def _unsharded(name, x, y, full):
    x, full = x.clone().requires_grad_(), full.clone().requires_grad_()
    want = FAMILY[name][3](x, y, full)
    return (want,) + torch.autograd.grad(want, (x, full))


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("name,backend", CASES)
def test_sharded_loss_equals_the_unsharded_loss(world, uneven, num_classes, name, backend, ran):
    """Every rank's value is the unsharded loss of the global batch; its gradients are that loss's gradients for
    its local embeddings and its weight columns."""
    x, y, sizes, starts = _global(world, uneven)
    k = FAMILY[name][1]
    want, gx, gw = _unsharded(name, x, y % num_classes, _full_weight(num_classes, k, name=name))
    for r in range(world):
        got = ran[(world, uneven)][r][("fn", num_classes, name, backend)]
        _check_rank(got, want, gx, gw, r, world, starts, sizes, num_classes, k)


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("cls_name", sorted(MODULES) + ["P2SGradLoss"])
def test_modules_with_process_group_equal_pml_on_the_global_batch(world, uneven, cls_name, ran):
    """process_group= on the modules: PML's state_dict loads into the shards (and gathers back, checked in the
    workers); every rank's value and gradients are PML's for the concatenated global batch."""
    from pytorch_metric_learning import losses as pl

    x, y, sizes, starts = _global(world, uneven)
    kw, k = MODULES.get(cls_name, ({}, 1))
    state = ran[(world, uneven)][0][("module", cls_name)][3]
    pml = (pl.P2SGradLoss(D, 7) if cls_name == "P2SGradLoss" else
           getattr(pl, cls_name)(num_classes=7, embedding_size=D, **kw)).double()
    pml.load_state_dict(state)
    xx = x.clone().requires_grad_()
    want = pml(xx, y % 7)
    w = next(iter(pml.parameters()))
    gx, gw = torch.autograd.grad(want, (xx, w))
    for r in range(world):
        _check_rank(ran[(world, uneven)][r][("module", cls_name)], want, gx, gw, r, world, starts, sizes, 7, k)


def _sampled_reference(name, x, y, full, world, seed, step, num_classes=SAMPLE_C):
    """The unsharded loss restricted to the union of the classes every rank samples (recomputed here with the
    documented generator), as a loss of the full weight (the classes not drawn get a zero gradient)."""
    k = FAMILY[name][1]
    union = []
    for r in range(world):
        lo, hi = shard_range(num_classes, rank=r, world_size=world)
        if hi > lo:
            classes, taking_part = sample_classes(y - lo, hi - lo, SAMPLE_RATE,
                                                  generator=sample_generator(seed, r, step, "cpu"))
            union += [lo + int(c) for c, t in zip(classes, taking_part) if t]
    assert set(y.tolist()) <= set(union) and len(union) < num_classes  # the positives, and a strict subset
    position = {c: i for i, c in enumerate(union)}
    cols = torch.tensor([c * k + j for c in union for j in range(k)])
    x, full = x.clone().requires_grad_(), full.clone().requires_grad_()
    want = FAMILY[name][3](x, torch.tensor([position[int(c)] for c in y]), full[:, cols])
    return (want,) + torch.autograd.grad(want, (x, full))


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("name,backend,num_classes", SAMPLED)
def test_sampled_loss_is_the_loss_over_the_sampled_classes(world, uneven, name, backend, num_classes, ran):
    x, y, sizes, starts = _global(world, uneven)
    k = FAMILY[name][1]
    per_shard = -(-num_classes // world)
    assert (len(sample_classes(y % 2, per_shard, SAMPLE_RATE)[0]) < per_shard) == (num_classes == 90)
    want, gx, gw = _sampled_reference(name, x, y % 2, _full_weight(num_classes, k), world, 7, 0, num_classes)
    for r in range(world):
        _check_rank(ran[(world, uneven)][r][("sampled", name, backend, num_classes)], want, gx, gw, r, world, starts,
                    sizes, num_classes, k)


@pytest.mark.parametrize("world,uneven", CONFIGS)
def test_sampling_module_is_reproducible_per_step(world, uneven, ran):
    """CosFaceLoss(sample_rate=, sample_seed=): step t of rank r draws with sample_generator(seed, r, t); two
    modules with one seed give the same values."""
    x, y, sizes, starts = _global(world, uneven)
    for step in range(2):
        want, gx, gw = _sampled_reference("cosface", x, y % 2, _full_weight(SAMPLE_C, 1), world, 7, step)
        for r in range(world):
            res = ran[(world, uneven)][r]
            _check_rank(res[("sampled_module", 0, step)], want, gx, gw, r, world, starts, sizes, SAMPLE_C, 1)
            for a, b in zip(res[("sampled_module", 0, step)], res[("sampled_module", 1, step)]):
                assert torch.equal(a, b)


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("cls_name", ["CosFaceLoss", "SubCenterArcFaceLoss"])
def test_ddp_training_equals_single_process(world, uneven, cls_name, ran, lr=0.5):
    """Three DDP + SGD steps with the sharded loss (backbone lr·W, shard lr) give the parameters of one process
    training the unsharded loss on the global batch with lr."""
    _, y, sizes, _ = _global(world, uneven)
    xs_in = [torch.randn(n, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(20 + r))
             for r, n in enumerate(sizes)]
    kw, k = MODULES[cls_name]
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D).double()
    loss_fn = getattr(dk.losses, cls_name)(7, D, backend="reference", **kw).double()
    loss_fn.load_state_dict({loss_fn._weight_name: _full_weight(7, k, seed=4)})
    opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=lr)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(torch.cat(xs_in)), y % 7).backward()
        opt.step()
    got_model, got_w = ran[(world, uneven)][0][("ddp", cls_name)]
    for key, v in model.state_dict().items():
        torch.testing.assert_close(got_model[key], v, **TOL)
    torch.testing.assert_close(got_w, loss_fn._weight().detach(), **TOL)


@pytest.mark.parametrize("name", ["cosface", "soft_triple", "p2sgrad"])
def test_a_rank_without_positives(name, ran):
    """Rank 1 owns none of the batch's classes and its rows' classes live on rank 0: still the global loss."""
    world = 2
    x, _, sizes, starts = _global(world, False)
    k = FAMILY[name][1]
    want, gx, gw = _unsharded(name, x, torch.cat(NO_POSITIVES), _full_weight(6, k, name=name))
    for r in range(world):
        _check_rank(ran[(world, False)][r][("no_positives", name)], want, gx, gw, r, world, starts, sizes, 6, k)


def test_a_failing_rank_does_not_hang():
    """Rank 1 raises (a bad label) while rank 0 waits in the embeddings' gather: the job fails promptly with
    either rank's error, well before the process-group timeout."""
    start = time.monotonic()
    with pytest.raises(Exception, match="labels must lie|Connection reset|Connection closed"):
        spawn(2, _raising_rank, timeout_s=120)
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------- one process


def _naive_row_stats(loss, x, labels, W, columns, p):
    """Plain loops: per row, the target logit with the margin, and log Σ e^logit over the other taking-part
    classes of the shard (cosface / normalized dot / soft_triple)."""
    n, c = x.shape[0], W.shape[1] // p.get("centers_per_class", 1)
    out = []
    for i in range(n):
        xi = x[i] / x[i].norm()
        logits, target = [], None
        for j in range(c):
            if columns is not None and not columns[j]:
                continue
            if loss == "soft_triple_loss":
                kk = p["centers_per_class"]
                sims = [float(xi @ (W[:, j * kk + m] / W[:, j * kk + m].norm())) for m in range(kk)]
                wts = [math.exp(s / p["gamma"]) for s in sims]
                s = sum(w * v for w, v in zip(wts, sims)) / sum(wts)
                logit, tgt = p["la"] * s, p["la"] * (s - p["margin"])
            else:
                cos = float(xi @ (W[:, j] / W[:, j].norm()))
                if loss == "cosface_loss":
                    logit, tgt = p["scale"] * cos, p["scale"] * (cos - p["margin"])
                else:
                    logit = tgt = cos / p["temperature"]
            if j == int(labels[i]):
                target = tgt
            else:
                logits.append(logit)
        rest = math.log(sum(math.exp(v) for v in logits)) if logits else 0.0
        out.append((target or 0.0, target is not None, rest, bool(logits)))
    return out


@pytest.mark.parametrize("name", ["cosface", "normalized", "soft_triple"])
@pytest.mark.parametrize("masked", [False, True])
def test_row_stats_against_naive_loops(name, masked):
    op, k, params, _ = FAMILY[name]
    g = torch.Generator().manual_seed(5)
    x, W = torch.randn(6, D, generator=g, dtype=torch.float64), torch.randn(D, 4 * k, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, -2, 5, 1, 2])  # a shard of 4 classes: -2 and 5 belong to other shards
    columns = torch.tensor([True, False, True, True]) if masked else None
    got = _registry.call("margin_softmax_row_stats", "reference", "cpu", x, labels, W, loss=op, columns=columns,
                         **params)
    want = _naive_row_stats(op, x, labels, W, columns, params)
    for i, (t, ht, rest, hr) in enumerate(want):
        assert (bool(got[1][i]), bool(got[3][i])) == (ht, hr)
        assert float(got[0][i]) == pytest.approx(t, rel=1e-12, abs=1e-12)
        assert float(got[2][i]) == pytest.approx(rest, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", FUSED)
def test_row_stats_cpu_equals_reference(name):
    """The fused op (one pair_reduce, column mask) against the reference: values and gradients, float64."""
    op, _, params, _ = FAMILY[name]
    g = torch.Generator().manual_seed(6)
    x0, w0 = torch.randn(7, D, generator=g, dtype=torch.float64), torch.randn(D, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, -1, 7, 2, 1, 3])
    columns = torch.tensor([True, True, False, True, True])
    outs = []
    for backend in ("reference", "cpu"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        t, ht, rest, hr = _registry.call("margin_softmax_row_stats", backend, "cpu", x, labels, w, loss=op,
                                         columns=columns, **params)
        outs.append((t, ht, rest, hr) + torch.autograd.grad((t * 1.3 + rest).sum(), (x, w)))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    with pytest.raises(dk.Unsupported, match="grouped"):
        _registry.call("margin_softmax_row_stats", "cpu", "cpu", x0, labels, w0, loss="soft_triple_loss",
                       **FAMILY["soft_triple"][2])


def test_sample_classes():
    """Every positive is drawn; int(rate·n) classes take part (only the positives when there are more); the
    draw depends on the generator only; the size is static."""
    labels = torch.tensor([1, 1, 4, 9, -3, 20])  # positives of a 10-class shard: 1, 4, 9
    for rate, expect in ((0.5, 5), (0.2, 3), (1.0, 10)):
        draws = []
        for seed in (0, 0, 1):
            classes, taking_part = sample_classes(labels, 10, rate, generator=torch.Generator().manual_seed(seed))
            assert classes.shape == (min(10, max(int(rate * 10), 6)),)
            kept = set(classes[taking_part].tolist())
            assert {1, 4, 9} <= kept and len(kept) == expect and kept <= set(range(10))
            draws.append(kept)
        assert draws[0] == draws[1]
    other_seeds = [sample_classes(labels, 10, 0.5, generator=torch.Generator().manual_seed(s)) for s in range(1, 6)]
    assert any(set(c[t].tolist()) != draws[0] for c, t in other_seeds)


def test_clear_errors():
    with pytest.raises(ValueError, match="sample_rate needs process_group"):
        dk.losses.CosFaceLoss(4, D, sample_rate=0.5)
    with pytest.raises(TypeError, match="sample_rate"):
        dk.losses.P2SGradLoss(D, 4, sample_rate=0.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        sharded_margin_softmax_loss(torch.randn(3, D), torch.arange(3), torch.randn(D, 3), loss="p2sgrad_loss",
                                    num_classes=3)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        sharded_margin_softmax_loss(torch.randn(3, D), torch.arange(3), torch.randn(D, 3), loss="cosface_loss",
                                    num_classes=3, sample_rate=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_fused_row_stats_never_allocate_b_by_shard():
    """B=1024 rows against a shard of 8192 classes (one B×C fp32 matrix = 32 MiB), with a column mask, forward +
    backward: the cpu op stays far below one B×C matrix; the reference exceeds it."""
    from memory import peak_extra_bytes

    b, c, d = 1024, 8192, 8
    x0, w0 = torch.randn(b, d), torch.randn(d, c)
    labels = torch.randint(-c, 2 * c, (b,))
    columns = torch.rand(c) < 0.5
    bxc = b * c * 4

    def step(backend, op, params):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        t, _, rest, _ = _registry.call("margin_softmax_row_stats", backend, "cpu", x, labels, w, loss=op,
                                       columns=columns, **params)
        (t + rest).sum().backward()

    for name in FUSED:
        op, _, params, _ = FAMILY[name]
        step("cpu", op, params)
        fused = peak_extra_bytes(lambda: step("cpu", op, params))
        assert fused < bxc / 8, f"{name}: fused peak extra {fused / 2**20:.1f} MiB"
    reference = peak_extra_bytes(lambda: step("reference", "cosface_loss", FAMILY["cosface"][2]))
    assert reference > bxc, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"
