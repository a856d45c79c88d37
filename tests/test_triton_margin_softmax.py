"""The margin-softmax family on the Triton class engine (dml_kernels/backends/triton/margin_softmax.py; under the
interpreter without a GPU): NormalizedSoftmax, CosFace, ArcFace, LargeMarginSoftmax, SphereFace, SubCenterArcFace,
SoftTriple, P2SGrad against independent naive loops over PML's formulas, the reference backend and PML 2.9 itself
(float64, 1e-9, values, embedding and weight gradients; PML's state_dict loaded into ours with strict=True), for
C < B, C ≫ B, C not a tile multiple, absent classes, K = 1 and K > 1 centres, several class tiles and class
splits; miner weights; exact ties between sub-centres; P2SGrad's clamp; gradcheck; fp32; a watch of the largest
tensor (no B×C buffer: fails on the reference) and of host syncs."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dml_kernels as dk
from dml_kernels import _registry

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

F = dk.functional
TIGHT = dict(rtol=1e-9, atol=1e-9)
OPS = ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss", "sphereface_loss",
       "subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss"]
HAS_TRITON = all("triton" in _registry.implemented(op) for op in OPS)
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")


@pytest.fixture
def tuning():
    from dml_kernels.backends.triton import margin_softmax as TM
    saved = dict(TM.TUNING)
    yield TM.TUNING
    TM.TUNING.clear()
    TM.TUNING.update(saved)


# ------------------------------------------------------------------------------------------ naive loops


def _cos(u, v):
    return (u * v).sum() / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12))


def _arc(t, m):
    theta = torch.acos(t.clamp(-1, 1))
    return torch.cos(theta + m) if float(theta) <= math.pi - m else torch.cos(theta) - m * math.sin(m)


def _psi(t, m):
    """ψ(θ) = (−1)^k cos(mθ) − 2k, k = ⌊θm/π⌋, with cos(mθ) from the angle (not the polynomial)."""
    theta = torch.acos(t.clamp(-1, 1))
    k = math.floor(float(theta) / (math.pi / m))
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def naive(op, x, y, W, kw, weights=None):
    """One loss by loops over rows and classes (0-dim torch ops, so autograd gives the gradients)."""
    b, cols = x.shape[0], W.shape[1]
    kc = kw.get("sub_centers", kw.get("centers_per_class", 1))
    c_num = cols // kc
    w = [W[:, j] for j in range(cols)]
    total = x.sum() * 0
    for i in range(b):
        xi = x[i]
        yi = int(y[i])
        if op == "p2sgrad_loss":
            for c in range(cols):
                v = ((xi * w[c]).sum() / xi.pow(2).sum().sqrt()).clamp(-1, 1)
                total = total + (v - (1.0 if c == yi else 0.0)) ** 2
            continue
        z = []
        for c in range(c_num):
            if op == "normalized_softmax_loss":
                wc = w[c] / w[c].norm().clamp_min(1e-12)
                dist = kw.get("distance", "dot")
                u = xi / xi.norm().clamp_min(1e-12) if kw.get("normalize_embeddings", True) else xi
                if dist == "euclidean":
                    z.append(-(u - wc).norm() / kw["temperature"])
                else:
                    z.append((u * wc).sum() / kw["temperature"])
            elif op in ("cosface_loss", "arcface_loss", "subcenter_arcface_loss"):
                cos = max((_cos(xi, w[c * kc + k]) for k in range(kc)), key=lambda v: float(v.detach()))
                if c == yi:
                    cos = cos - kw["margin"] if op == "cosface_loss" else _arc(cos, kw["margin"])
                z.append(kw["scale"] * cos)
            elif op == "large_margin_softmax_loss":
                cos = _cos(xi, w[c])
                z.append(kw["scale"] * xi.norm() * w[c].norm() * (_psi(cos, kw["margin"]) if c == yi else cos))
            elif op == "sphereface_loss":
                cos = _cos(xi, w[c])
                z.append(kw["scale"] * xi.norm() * (_psi(cos, kw["margin"]) if c == yi else cos))
            else:  # soft_triple_loss, cosine
                s = [_cos(xi, w[c * kc + k]) for k in range(kc)]
                e = [torch.exp(v / kw["gamma"]) for v in s]
                rel = sum(ek * sk for ek, sk in zip(e, s)) / sum(e)
                z.append(kw["la"] * (rel - (kw["margin"] if c == yi else 0.0)))
        row = torch.log(sum(torch.exp(v) for v in z)) - z[yi]
        total = total + row * (1.0 if weights is None else weights[i])
    return total / (b * cols) if op == "p2sgrad_loss" else total / b


# ------------------------------------------------------------------------------------------ cases

# (op, keyword arguments in the functional's units (ArcFace's margin in degrees), centres per class)
CASES = [
    ("normalized_softmax_loss", {"temperature": 0.3}, 1),
    ("normalized_softmax_loss", {"temperature": 0.5, "distance": "euclidean"}, 1),
    ("cosface_loss", {"margin": 0.2, "scale": 10}, 1),
    ("arcface_loss", {"margin": 40.0, "scale": 8}, 1),
    ("large_margin_softmax_loss", {"margin": 3, "scale": 1.5}, 1),
    ("sphereface_loss", {"margin": 4, "scale": 2}, 1),
    ("subcenter_arcface_loss", {"sub_centers": 3, "margin": 28.6, "scale": 8}, 3),
    ("subcenter_arcface_loss", {"sub_centers": 1, "margin": 20.0, "scale": 4}, 1),
    ("soft_triple_loss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}, 3),
    ("soft_triple_loss", {"centers_per_class": 1, "la": 4, "gamma": 0.1, "margin": 0.1}, 1),
    ("p2sgrad_loss", {}, 1),
]
IDS = [f"{op}-{i}" for i, (op, _, _) in enumerate(CASES)]
# (B, D, C, labels): C < B; C ≫ B (several class tiles); C = 37 not a tile multiple with 3 class splits; classes
# absent (only 3 occur)
SIZES = {"C<B": (21, 5, 6, None, {}), "C>>B": (6, 5, 70, None, {"block_w": 16}),
         "odd": (17, 7, 37, None, {"splits": 3, "block_w": 16, "block_k": 16, "block_d": 16}),
         "absent": (10, 4, 30, [0, 7, 29], {})}


def _naive_kw(op, kw):
    kw = dict(kw)
    if op in ("arcface_loss", "subcenter_arcface_loss"):
        kw["margin"] = math.radians(kw["margin"])
    return kw


def _data(size, kc, seed=0, p2s=False):
    b, d, c, present, tune = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = (torch.tensor(present * b)[:b] if present else torch.randint(0, c, (b,), generator=g))
    W = torch.randn(d, c * kc, dtype=torch.float64, generator=g)
    if p2s:  # columns of norm 0.5 .. 3: some cosines pass ±1 and are clamped
        W = W / W.norm(dim=0) * torch.linspace(0.5, 3, c * kc, dtype=torch.float64)
    return x, y, W, tune


def _grads(fn, x, W):
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = fn(xr, Wr)
    loss.backward()
    return loss.detach(), xr.grad, Wr.grad


def _same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


def _fn(op, y, kw, backend, **more):
    return lambda x, W: getattr(F, op)(x, y, W, backend=backend, **kw, **more)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op,kw,kc", CASES, ids=IDS)
def test_equals_reference_and_naive(op, kw, kc, size, tuning):
    x, y, W, tune = _data(size, kc, p2s=op == "p2sgrad_loss")
    tuning.update(tune)
    got = _grads(_fn(op, y, kw, "triton"), x, W)
    _same(got, _grads(_fn(op, y, kw, "reference"), x, W))
    if size in ("C<B", "absent"):  # the loops are slow; two shapes suffice
        _same(got, _grads(lambda a, w: naive(op, a, y, w, _naive_kw(op, kw)), x, W))


@pytest.mark.parametrize("op,kw,kc", [c for c in CASES if c[0] != "p2sgrad_loss"], ids=IDS[:-1])
def test_miner_weights(op, kw, kc):
    x, y, W, _ = _data("C<B", kc, seed=3)
    tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
    counts = [sum(int((t == i).sum()) for t in tup) for i in range(x.shape[0])]
    weights = [n / max(counts) for n in counts]  # PML's miner weights: occurrences in the tuple / the most
    got = _grads(_fn(op, y, kw, "triton", indices_tuple=tup), x, W)
    _same(got, _grads(_fn(op, y, kw, "reference", indices_tuple=tup), x, W))
    _same(got, _grads(lambda a, w: naive(op, a, y, w, _naive_kw(op, kw), weights), x, W))


# ------------------------------------------------------------------------------------------ PML 2.9 modules

MODULES = [("NormalizedSoftmaxLoss", {"temperature": 0.3}), ("CosFaceLoss", {}), ("ArcFaceLoss", {}),
           ("LargeMarginSoftmaxLoss", {}), ("SphereFaceLoss", {"margin": 3, "scale": 2}),
           ("SubCenterArcFaceLoss", {"sub_centers": 3, "scale": 10}),
           ("SoftTripleLoss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}), ("P2SGradLoss", {})]


def _modules(name, kw, c, d):
    torch.manual_seed(0)
    if name == "P2SGradLoss":
        theirs, ours = pl.P2SGradLoss(d, c), dk.losses.P2SGradLoss(d, c, backend="triton")
    else:
        theirs = getattr(pl, name)(num_classes=c, embedding_size=d, **kw)
        ours = getattr(dk.losses, name)(num_classes=c, embedding_size=d, backend="triton", **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _module_step(module, x, y, *args):
    xr = x.clone().requires_grad_()
    loss = module(xr, y, *args)
    loss.backward()
    return loss.detach(), xr.grad, next(iter(module.parameters())).grad


@pytest.mark.parametrize("size", ["C<B", "C>>B", "absent"])
@pytest.mark.parametrize("name,kw", MODULES, ids=[m[0] for m in MODULES])
def test_modules_equal_pml_float64(name, kw, size, tuning):
    b, d, c, _, tune = SIZES[size]
    tuning.update(tune)
    x, y, _, _ = _data(size, 1)
    ours, theirs = _modules(name, kw, c, d)
    _same(_module_step(ours, x, y), _module_step(theirs, x, y))
    if name != "P2SGradLoss" and size == "C<B":  # with PML's miner weights
        ours, theirs = _modules(name, kw, c, d)
        tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
        _same(_module_step(ours, x, y, tup), _module_step(theirs, x, y, tup))


# ------------------------------------------------------------------------------------------ edge cases


def test_subcenter_ties_take_the_first_centre(tuning):
    """Exact duplicate sub-centres: torch.max (the reference, PML) gives the gradient to the first; so must the
    kernel. Class tiles of 8 classes × 4 slots (K = 3 padded)."""
    tuning.update(block_w=32)
    x, y, W, _ = _data("C<B", 3, seed=5)
    W = W.clone()
    W[:, 1::3] = W[:, 0::3]  # centre 1 = centre 0 of every class
    W[:, 5] = W[:, 3]
    kw = {"sub_centers": 3, "margin": 28.6, "scale": 8}
    got = _grads(_fn("subcenter_arcface_loss", y, kw, "triton"), x, W)
    _same(got, _grads(_fn("subcenter_arcface_loss", y, kw, "reference"), x, W))
    assert (got[2][:, 1::3] == 0).all()


def test_arcface_past_pi_minus_margin_and_large_margin_sectors():
    """Targets almost opposite their column (ArcFace's other branch) and angles in every sector of ψ."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = -W.t()[y] + 0.05 * torch.randn(6, 3, dtype=torch.float64, generator=g)
    kw = {"margin": 40.0, "scale": 4}
    _same(_grads(_fn("arcface_loss", y, kw, "triton"), x, W), _grads(_fn("arcface_loss", y, kw, "reference"), x, W))
    angles = torch.linspace(0.05, math.pi - 0.05, 16, dtype=torch.float64)
    xs = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * 1.5
    W2 = torch.tensor([[2.0, 0.3, -1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    y2 = torch.zeros(16, dtype=torch.long)
    for op in ("large_margin_softmax_loss", "sphereface_loss"):
        kw = {"margin": 4, "scale": 1}
        got = _grads(_fn(op, y2, kw, "triton"), xs, W2)
        _same(got, _grads(_fn(op, y2, kw, "reference"), xs, W2))
        _same(got, _grads(lambda a, w: naive(op, a, y2, w, kw), xs, W2))


def test_single_class_and_unnormalized_distances():
    """C = 1 (no other class: loss 0) and NormalizedSoftmax with unnormalised embeddings / squared euclidean."""
    x, y, W, _ = _data("C<B", 1, seed=2)
    x, y = x[:8], y[:8]
    y1, W1 = torch.zeros_like(y), W[:, :1]
    for op, kw, kc in CASES:
        if op != "p2sgrad_loss":
            _same(_grads(_fn(op, y1, kw, "triton"), x, W1.repeat(1, kc)),
                  _grads(_fn(op, y1, kw, "reference"), x, W1.repeat(1, kc)))
    for extra in ({"distance": "squared_euclidean"}, {"distance": "euclidean", "normalize_embeddings": False},
                  {"distance": "dot", "normalize_embeddings": False}, {"distance": "cosine"}):
        kw = {"temperature": 2.0, **extra}
        _same(_grads(_fn("normalized_softmax_loss", y, kw, "triton"), x, W),
              _grads(_fn("normalized_softmax_loss", y, kw, "reference"), x, W))
    kw = {"centers_per_class": 2, "distance": "dot", "normalize_embeddings": False, "la": 2, "gamma": 0.5}
    W2 = W.repeat(1, 2) * 0.3
    _same(_grads(_fn("soft_triple_loss", y, kw, "triton"), x, W2),
          _grads(_fn("soft_triple_loss", y, kw, "reference"), x, W2))


def test_custom_distance_is_refused_and_auto_falls_back():
    x, y, W, _ = _data("C<B", 1)
    d = pml.distances.LpDistance(p=1)
    with pytest.raises(_registry.Unsupported):
        F.normalized_softmax_loss(x, y, W, distance=d, backend="triton")


@pytest.mark.parametrize("op,kw,kc", [CASES[i] for i in (1, 3, 4, 5, 6, 8, 10)], ids=[IDS[i] for i in (1, 3, 4, 5, 6, 8, 10)])
def test_gradcheck(op, kw, kc):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 3 * kc, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 2, 2, 0])
    assert torch.autograd.gradcheck(_fn(op, y, kw, "triton"), (x, W))


@pytest.mark.parametrize("op,kw,kc", [CASES[i] for i in (2, 4, 6, 8, 10)], ids=[IDS[i] for i in (2, 4, 6, 8, 10)])
def test_float32_close_to_reference(op, kw, kc):
    x, y, W, _ = _data("C>>B", kc, p2s=op == "p2sgrad_loss")
    got = _grads(_fn(op, y, kw, "triton"), x.float(), W.float())
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    _same([t.double() for t in got], _grads(_fn(op, y, kw, "reference"), x, W), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ memory, syncs


class _Watch(TorchDispatchMode):
    """The largest tensor (bytes) any aten op returns, and the ops that sync with the host."""
    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")

    def __init__(self):
        super().__init__()
        self.largest, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(self.SYNCING):
            self.syncs.append(str(func))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("op,kw,kc", [CASES[i] for i in (1, 3, 4, 5, 6, 8, 10)], ids=[IDS[i] for i in (1, 3, 4, 5, 6, 8, 10)])
def test_no_batch_by_class_buffer_and_no_sync(op, kw, kc, tuning):
    """Forward + backward (both gradients) never allocate B×C·K elements and never sync; the same watch sees the
    reference's B×C buffers, so it can fail."""
    tuning.update(block_b=32, block_w=64)
    b, c, d = 64, 96, 4  # B·C·K ≥ 6144 elements against the largest legitimate buffer C·K·D ≤ 1152
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    W = torch.randn(d, c * kc, dtype=torch.float64, generator=g)

    def watched(backend):
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        with _Watch() as w:
            getattr(F, op)(xx, y, ww, backend=backend, check_inputs=False, **kw).backward()
        return w

    assert watched("reference").largest >= b * c * 8
    w = watched("triton")
    assert w.largest <= max(b, c * kc) * d * 8, w.largest
    assert not w.syncs, w.syncs


def test_no_tensor_to_python_conversions(monkeypatch):
    """CPU stand-in for CUDA's sync check: with check_inputs=False nothing turns a tensor into a Python value."""
    runs = [(op, kw, _data("C<B", kc)) for op, kw, kc in CASES]
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda o, nm: lambda self, *a, **k: (calls.append(nm),
                                                                                      o(self, *a, **k))[1])(orig, name))
    for op, kw, (x, y, W, _) in runs:
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        getattr(F, op)(xx, y, ww, backend="triton", check_inputs=False, **kw).backward()
    assert calls == []
    F.cosface_loss(x, y, W[:, :6], backend="triton")  # validation converts: the detector works
    monkeypatch.undo()
    assert calls


def test_inputs_untouched_and_double_backward_refused():
    x, y, W, _ = _data("C<B", 3)
    x0, W0 = x.clone(), W.clone()
    xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F.subcenter_arcface_loss(xx, y, ww, sub_centers=3, backend="triton")
    assert torch.equal(xx.detach(), x0) and torch.equal(ww.detach(), W0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xx, create_graph=True)
