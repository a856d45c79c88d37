"""Partial FC's ``sample_rate=`` on the class-sharded ProxyNCA / ProxyNCA++ (``process_group=``): on 3 gloo
processes, the value and gradients equal the unsharded ProxyNCA loss restricted to the union of the classes the
ranks sample (float64, 1e-9), on the reference and cpu backends; the module draws step t of rank r with
``sample_generator(sample_seed, r, t)``. Single-process: the op's ``columns`` mask against naive loops."""
import os

import pytest
import torch
import torch.distributed as dist

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.distances import Distance
from dml_kernels.distributed import sample_classes, sample_generator, shard_range, shard_rows, sharded_proxy_nca_loss
from gloo import spawn

D, C, RATE, SEED = 4, 60, 0.1, 5
TOL = dict(rtol=1e-9, atol=1e-9)
CONFIGS = [(3, True)]  # (tests/test_distributed*.py run 2 and 3 ranks; sampling needs one spawn)
BACKENDS = ["reference"] + (["cpu"] if _registry.unavailable_reason("cpu", "cpu") is None else [])


def _worker(rank, world, out_dir, uneven):
    xs, ys = _batches(world, uneven)
    full = _full()
    res = {}
    for backend in BACKENDS:
        for exclude in (False, True):
            x, shard = xs[rank].clone().requires_grad_(), shard_rows(full).requires_grad_()
            loss = sharded_proxy_nca_loss(x, ys[rank], shard, num_classes=C, softmax_scale=3.0,
                                          exclude_positive=exclude, backend=backend, sample_rate=RATE,
                                          generator=sample_generator(SEED, rank, 0, "cpu"))
            res[(backend, exclude)] = (loss.detach(),) + torch.autograd.grad(loss, (x, shard))
    module = dk.losses.ProxyNCAPlusPlusLoss(C, D, process_group=dist.group.WORLD, sample_rate=RATE,
                                            sample_seed=SEED, backend="reference")
    with torch.no_grad():
        module.proxies.copy_(shard_rows(full).float())
    for step in range(2):
        res[("module", step)] = module(xs[rank], ys[rank]).detach()
    assert module.sample_step == 2
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))


def _batches(world, uneven):
    g = torch.Generator().manual_seed(3)
    sizes = [4 + (2 * r if uneven else 0) for r in range(world)]
    return ([torch.randn(n, D, generator=g, dtype=torch.float64) for n in sizes],
            [torch.randint(0, C, (n,), generator=g) for n in sizes])


def _full():
    return torch.randn(C, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = {}
    for world, uneven in CONFIGS:
        d = tmp_path_factory.mktemp(f"w{world}")
        spawn(world, _worker, str(d), uneven)
        out[(world, uneven)] = {r: torch.load(d / f"{r}.pt", weights_only=False) for r in range(world)}
    return out


def _union(y, world, step):
    union = []
    for r in range(world):
        lo, hi = shard_range(C, rank=r, world_size=world)
        classes, taking_part = sample_classes(y - lo, hi - lo, RATE, generator=sample_generator(SEED, r, step, "cpu"))
        union += [lo + int(c) for c, t in zip(classes, taking_part) if t]
    assert set(y.tolist()) <= set(union) and len(union) < C
    return union


def _restricted(x, y, full, union, exclude, scale=3.0):
    """ProxyNCA (PML's squared-euclidean form on normalised vectors) over the classes in ``union`` only."""
    position = {c: i for i, c in enumerate(union)}
    x, full = x.clone().requires_grad_(), full.clone().requires_grad_()
    q, p = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(full[union], dim=1)
    logits = -scale * torch.cdist(q, p) ** 2
    target = torch.tensor([position[int(c)] for c in y])
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    if exclude:
        logits = logits.scatter(1, target[:, None], float("-inf"))
    loss = (torch.logsumexp(logits, 1) - tgt).mean()
    return (loss,) + torch.autograd.grad(loss, (x, full))


@pytest.mark.parametrize("world,uneven", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude", [False, True])
def test_sampled_proxy_nca_is_the_loss_over_the_sampled_classes(world, uneven, backend, exclude, ran):
    xs, ys = _batches(world, uneven)
    x, y = torch.cat(xs), torch.cat(ys)
    want, gx, gw = _restricted(x, y, _full(), _union(y, world, 0), exclude)
    starts = [sum(len(t) for t in ys[:r]) for r in range(world)]
    for r in range(world):
        loss, got_x, got_w = ran[(world, uneven)][r][(backend, exclude)]
        lo, hi = shard_range(C, rank=r, world_size=world)
        torch.testing.assert_close(loss, want.detach(), **TOL)
        torch.testing.assert_close(got_x, gx[starts[r]: starts[r] + len(ys[r])], **TOL)
        torch.testing.assert_close(got_w, gw[lo:hi], **TOL)


@pytest.mark.parametrize("world,uneven", CONFIGS)
def test_module_draws_per_rank_and_step(world, uneven, ran):
    xs, ys = _batches(world, uneven)
    x, y = torch.cat(xs), torch.cat(ys)
    for step in range(2):
        want = _restricted(x, y, _full().float().double(), _union(y, world, step), False, scale=9.0)[0]
        for r in range(world):
            torch.testing.assert_close(ran[(world, uneven)][r][("module", step)].double(), want.detach(),
                                       rtol=1e-5, atol=1e-5)  # the module's proxies are float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stats_columns_mask_against_naive_loops(backend):
    g = torch.Generator().manual_seed(0)
    x, proxies = torch.randn(7, D, generator=g, dtype=torch.float64), torch.randn(9, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 8, 12, -1, 5])  # 12 and -1: classes of other shards
    columns = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    columns[[0, 3, 8, 5]] = True  # the positives always take part
    target, has_t, rest, has_r = _registry.call("proxy_nca_row_stats", backend, "cpu", x, labels, proxies,
                                                softmax_scale=2.0, distance=Distance("squared_euclidean", True),
                                                columns=columns)
    q, p = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(proxies, dim=1)
    for i in range(7):
        logit = [-2.0 * float(((q[i] - p[c]) ** 2).sum()) for c in range(9)]
        others = [logit[c] for c in range(9) if columns[c] and c != int(labels[i])]
        assert bool(has_t[i]) == (0 <= int(labels[i]) < 9)
        if has_t[i]:
            assert abs(float(target[i]) - logit[int(labels[i])]) < 1e-12
        assert bool(has_r[i]) == bool(others)
        want = float(torch.logsumexp(torch.tensor(others, dtype=torch.float64), 0)) if others else 0.0
        assert abs(float(rest[i]) - want) < 1e-12


def test_sample_rate_errors():
    with pytest.raises(ValueError, match="sample_rate needs process_group"):
        dk.losses.ProxyNCALoss(4, D, sample_rate=0.5)
