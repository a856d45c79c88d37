"""``margin_softmax_row_stats`` on the Triton class engine (backends/triton/row_stats.py on margin_softmax.py's
kernels with SHARD: a class-column mask and the rest LSE for every row): one class shard's per-row statistics for
the class-sharded / Partial FC margin-softmax losses of ``dk.distributed``.

Equal in float64 (1e-9: values, the two flags, and the gradients of x and W through an arbitrary combination of
the outputs) to the reference op, itself checked against naive loops in tests/test_distributed_margin_softmax.py,
for the seven losses (K = 1 and K = 2 centres), labels of other shards (negative and ≥ C), a column mask, a mask
leaving a row only its target, an empty shard; equal to independent naive loops written here; the whole sharded
loss recombined from two shards equals the unsharded loss; no B×C tensor and no host sync (a watch that fails on
the reference). Tested under the Triton interpreter, not on a GPU.
"""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.distances import parse_distance
from conftest import DEVICE
from memory import TensorWatch

OP = "margin_softmax_row_stats"
HAS_TRITON = "triton" in _registry.implemented(OP) and _registry.unavailable_reason("triton", DEVICE) is None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available here")
TOL = 1e-9
COS = parse_distance(None, True, default="cosine")

# name -> (op, K, the op's canonical params)
FAMILY = {
    "normalized": ("normalized_softmax_loss", 1, dict(temperature=0.5, distance=parse_distance(None, True,
                                                                                              default="dot"))),
    "normalized_euclidean": ("normalized_softmax_loss", 1, dict(temperature=0.5, distance=parse_distance(
        "euclidean", True, default="dot"))),
    "cosface": ("cosface_loss", 1, dict(margin=0.35, scale=4.0)),
    "arcface": ("arcface_loss", 1, dict(margin=math.radians(28.6), scale=4.0)),
    "large_margin": ("large_margin_softmax_loss", 1, dict(margin=3, scale=1.0)),
    "sphereface": ("sphereface_loss", 1, dict(margin=3, scale=1.0)),
    "subcenter": ("subcenter_arcface_loss", 2, dict(margin=math.radians(28.6), scale=4.0, sub_centers=2)),
    "soft_triple": ("soft_triple_loss", 2, dict(centers_per_class=2, la=5.0, gamma=0.1, margin=0.01, distance=COS)),
}


def _call(backend, x, labels, W, op, columns, params):
    return _registry.call(OP, backend, x.device.type, x, labels, W, loss=op, columns=columns, **params)


def _run(backend, name, x0, w0, labels, columns):
    """The four outputs and the gradients of x and W of Σ (1.3·target + rest·(1 + row index/10))."""
    op, _, params = FAMILY[name]
    x, w = (t.detach().clone().to(DEVICE).requires_grad_() for t in (x0, w0))
    t, ht, rest, hr = _call(backend, x, labels.to(DEVICE), w, op,
                            None if columns is None else columns.to(DEVICE), params)
    weights = 1 + torch.arange(x.shape[0], device=DEVICE, dtype=rest.dtype) / 10
    gx, gw = torch.autograd.grad((1.3 * t + rest * weights).sum(), (x, w), allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    gw = torch.zeros_like(w) if gw is None else gw
    return [v.detach().cpu() for v in (t, ht, rest, hr, gx, gw)]


def _close(got, want, tol=TOL):
    for k, (g, w) in enumerate(zip(got, want)):
        if w.dtype == torch.bool:
            assert torch.equal(g, w), (k, g, w)
            continue
        assert torch.isfinite(g).all(), k
        err = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        assert err <= tol * max(1.0, float(w.abs().max()) if w.numel() else 1.0), (k, err)


def _data(k, b=13, c=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c * k, generator=g, dtype=torch.float64)
    labels = torch.randint(-3, c + 3, (b,), generator=g)  # -3..-1 and c..c+2: classes of other shards
    labels[:3] = torch.tensor([0, c - 1, 2])
    return x, w, labels


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("masked", [False, True])
def test_equals_reference(name, masked):
    """Float64, 1e-9: target, has_target, rest, has_rest and dL/dx, dL/dW; labels of other shards; a column mask
    (the target's class masked out too: row 2's class 2)."""
    _, k, _ = FAMILY[name]
    x, w, labels = _data(k, seed=1)
    columns = torch.tensor([True, True, False, True, False, True, True]) if masked else None
    got = _run("triton", name, x, w, labels, columns)
    want = _run("reference", name, x, w, labels, columns)
    _close(got, want)
    assert bool(got[1].any()) and not bool(got[1].all()) and float(got[5].abs().max()) > 0


@pytest.mark.parametrize("name", ["cosface", "subcenter", "large_margin"])
def test_tiles_and_splits(name, monkeypatch):
    """More classes than one interpreter tile (C = 40: several class tiles, 3 class splits, 2 row blocks), odd D."""
    from dml_kernels.backends.triton import margin_softmax as MS

    _, k, _ = FAMILY[name]
    x, w, labels = _data(k, b=21, c=40, d=7, seed=2)
    columns = torch.rand(40, generator=torch.Generator().manual_seed(3)) < 0.6
    monkeypatch.setitem(MS.TUNING, "splits", 3)
    monkeypatch.setitem(MS.TUNING, "block_w", 16)
    _close(_run("triton", name, x, w, labels, columns), _run("reference", name, x, w, labels, columns))


def test_edge_shapes():
    """A mask leaving row 0 only its target (no rest), a one-class shard, an empty shard (C = 0, still attached)."""
    x, w, labels = _data(1, b=6, c=3, d=4, seed=4)
    labels = torch.tensor([1, 0, 2, -1, 5, 1])
    only = torch.tensor([False, True, False])
    for columns, ww in ((only, w), (None, w[:, :1]), (None, w[:, :0])):
        got = _run("triton", "cosface", x, ww, labels, columns)
        _close(got, _run("reference", "cosface", x, ww, labels, columns))
    got = _run("triton", "cosface", x, w, labels, only)
    assert bool(got[1][0]) and not bool(got[3][0]) and float(got[2][0]) == 0.0


def _naive(name, x, labels, W, columns):
    """Plain loops over classes: each class's logit as the loss forms it, the target's with its margin."""
    op, k, p = FAMILY[name]
    out = []
    for i in range(x.shape[0]):
        xi = x[i]
        logits, target = [], None
        for c in range(W.shape[1] // k):
            if columns is not None and not bool(columns[c]):
                continue
            cols = [W[:, c * k + j] for j in range(k)]
            cos = [float(xi @ v / (xi.norm() * v.norm())) for v in cols]
            if name == "cosface":
                logit, tgt = p["scale"] * cos[0], p["scale"] * (cos[0] - p["margin"])
            elif name == "subcenter":
                m = max(cos)
                th = math.acos(max(-1.0, min(1.0, m)))
                tm = math.cos(th + p["margin"]) if th <= math.pi - p["margin"] else m - p["margin"] * math.sin(p["margin"])
                logit, tgt = p["scale"] * m, p["scale"] * tm
            else:  # soft_triple: Σ_k softmax_k(cos/γ)·cos
                wts = [math.exp(v / p["gamma"]) for v in cos]
                s = sum(a * v for a, v in zip(wts, cos)) / sum(wts)
                logit, tgt = p["la"] * s, p["la"] * (s - p["margin"])
            if c == int(labels[i]):
                target = tgt
            else:
                logits.append(logit)
        rest = math.log(sum(math.exp(v) for v in logits)) if logits else 0.0
        out.append((target if target is not None else 0.0, target is not None, rest, bool(logits)))
    return out


@pytest.mark.parametrize("name", ["cosface", "subcenter", "soft_triple"])
def test_equals_naive_loops(name):
    _, k, _ = FAMILY[name]
    x, w, labels = _data(k, b=7, c=5, d=4, seed=5)
    columns = torch.tensor([True, False, True, True, True])
    got = _run("triton", name, x, w, labels, columns)
    for i, (t, ht, rest, hr) in enumerate(_naive(name, x, labels, w, columns)):
        assert (bool(got[1][i]), bool(got[3][i])) == (ht, hr)
        assert abs(float(got[0][i]) - t) <= 1e-12 * max(1, abs(t)) and abs(float(got[2][i]) - rest) <= 1e-12 * max(1, abs(rest))


def test_two_shards_recombine_to_the_unsharded_loss():
    """CosFace over C = 9 classes split into shards [0, 4) and [4, 9): the per-row logaddexp of the shards'
    statistics, minus the target logit, is the unsharded CE; mean = dk's cosface_loss (values and dx, dW)."""
    x0, w0, _ = _data(1, b=10, c=9, d=5, seed=6)
    labels = torch.randint(0, 9, (10,), generator=torch.Generator().manual_seed(7))
    p = FAMILY["cosface"][2]

    def sharded(x, w):
        parts = [_call("triton", x, labels - lo, w[:, lo:hi], "cosface_loss", None, p) for lo, hi in ((0, 4), (4, 9))]
        target = sum(torch.where(ht, t, 0) for t, ht, _, _ in parts)
        terms = [torch.where(hr, r, -math.inf) for _, _, r, hr in parts]
        terms += [torch.where(ht, t, -math.inf) for t, ht, _, _ in parts]
        return (torch.logsumexp(torch.stack(terms), 0) - target).mean()

    def whole(x, w):
        return dk.functional.cosface_loss(x, labels, w, margin=0.35, scale=4, backend="reference")

    out = []
    for fn in (sharded, whole):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w)
        out.append([loss.detach()] + list(torch.autograd.grad(loss, (x, w))))
    _close(out[0], out[1])


def test_gradcheck():
    x, w, labels = _data(1, b=3, c=3, d=2, seed=8)
    labels = torch.tensor([0, 5, 2])
    columns = torch.tensor([True, False, True])

    def f(x, w):
        t, _, rest, _ = _call("triton", x, labels, w, "arcface_loss", columns, FAMILY["arcface"][2])
        return t, rest

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_()))


def _watch(backend, b=48, c=64):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(b, 4, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(4, c, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(-c, 2 * c, (b,), generator=g).to(DEVICE)
    columns = (torch.rand(c, generator=g) < 0.5).to(DEVICE)
    with TensorWatch() as watch:
        t, _, rest, _ = _call(backend, x, labels, w, "cosface_loss", columns, FAMILY["cosface"][2])
        (t + rest).sum().backward()
    assert x.grad is not None and w.grad is not None
    return watch, b * c * 4


def test_no_b_by_c_tensor_and_no_host_sync():
    """Forward + backward with a column mask: the largest tensor is O(B·D + C·D) (under an eighth of one fp32 B×C
    matrix) and nothing syncs with the host."""
    watch, bxc = _watch("triton")
    assert watch.largest < bxc // 8, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


def test_watch_fails_on_the_reference():
    watch, bxc = _watch("reference")
    assert watch.largest >= bxc // 8


def test_unsupported_forms_and_bad_loss():
    """SoftTriple off the dot-product forms is Unsupported (``auto`` falls back); an unknown loss is a ValueError."""
    x, w, labels = _data(2, b=4, c=3, d=3)
    params = dict(FAMILY["soft_triple"][2], distance=parse_distance("euclidean", True, default="dot"))
    with pytest.raises(dk.Unsupported, match="soft_triple_loss"):
        _call("triton", x, labels, w, "soft_triple_loss", None, params)
    with pytest.raises(ValueError, match="unknown loss"):
        _call("triton", x, labels, w, "p2sgrad_loss", None, {})
