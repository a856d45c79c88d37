"""SubCenterArcFace and SoftTriple on the cpu backend (dml_kernels/backends/cpp/grouped_columns.py): whole-class column
chunks in torch, gradients formed in the forward, the first pass's tiles kept in the weight gradient's buffer when
B ≤ D. Against independent naive loops over PML's formulas, the reference backend and PML 2.9 itself (float64, 1e-9,
values, embedding and weight gradients; PML's state_dict loaded into ours with strict=True), for C < B, C ≫ B, C not
a chunk multiple, absent classes, K = 1 and K = 3, B > D (tiles recomputed) and B ≤ D (tiles stashed), W in PML's
D × C·K layout and as the transpose of a C·K × D matrix; miner weights; exact ties between
sub-centres; ArcFace's other branch; gradcheck; fp32; retain_graph; a watch of every tensor (no B×C or B×C·K buffer:
fails on the reference) and of host syncs; peak RSS."""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from memory import TensorWatch, peak_extra_bytes, requires_clear_refs

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

F = dk.functional
TIGHT = dict(rtol=1e-9, atol=1e-9)
OPS = ("subcenter_arcface_loss", "soft_triple_loss")
pytestmark = pytest.mark.skipif(not all("cpu" in _registry.implemented(op) for op in OPS),
                                reason="cpu backend unavailable")


@pytest.fixture
def engine(monkeypatch):
    """Small chunks: ``engine(tile)``."""
    from dml_kernels.backends.cpp import row_blocks

    def set_(tile):
        monkeypatch.setattr(row_blocks, "TILE", tile)
    return set_


# ------------------------------------------------------------------------------------------ naive loops


def _cos(u, v):
    return (u * v).sum() / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12))


def naive(op, x, y, W, kw, weights=None):
    """The loss by loops over rows, classes and centres (0-dim torch ops: autograd gives the gradients)."""
    k = kw.get("sub_centers", kw.get("centers_per_class"))
    n_classes = W.shape[1] // k
    total = x.sum() * 0
    for i in range(x.shape[0]):
        xi, yi = x[i], int(y[i])
        z = []
        for c in range(n_classes):
            cols = [W[:, c * k + j] for j in range(k)]
            if op == "subcenter_arcface_loss":
                best = cols[0]
                for w in cols[1:]:  # the first maximal centre
                    if float(_cos(xi, w).detach()) > float(_cos(xi, best).detach()):
                        best = w
                cos = _cos(xi, best)
                if c == yi:
                    theta = torch.acos(cos.clamp(-1, 1))
                    m = kw["margin"]
                    cos = torch.cos(theta + m) if float(theta) <= math.pi - m else torch.cos(theta) - m * math.sin(m)
                z.append(kw["scale"] * cos)
            else:
                if kw.get("normalize_embeddings", True):
                    s = [_cos(xi, w) for w in cols]
                else:
                    s = [(xi * w).sum() for w in cols]
                e = [torch.exp(sj / kw["gamma"]) for sj in s]
                rel = sum(ej * sj for ej, sj in zip(e, s)) / sum(e)
                z.append(kw["la"] * (rel - (kw["margin"] if c == yi else 0.0)))
        row = torch.log(sum(torch.exp(v) for v in z)) - z[yi]
        total = total + row * (1.0 if weights is None else weights[i])
    return total / x.shape[0]


# ------------------------------------------------------------------------------------------ cases

CASES = [  # (op, keyword arguments in the functional's units (degrees), K)
    ("subcenter_arcface_loss", {"sub_centers": 3, "margin": 28.6, "scale": 8}, 3),
    ("subcenter_arcface_loss", {"sub_centers": 1, "margin": 20.0, "scale": 4}, 1),
    ("soft_triple_loss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}, 3),
    ("soft_triple_loss", {"centers_per_class": 1, "la": 4, "gamma": 0.1, "margin": 0.1}, 1),
    ("soft_triple_loss", {"centers_per_class": 2, "la": 2, "gamma": 0.5, "margin": 0.1, "distance": "dot",
                          "normalize_embeddings": False}, 2),
]
IDS = ["subcenter-K3", "subcenter-K1", "softtriple-K3", "softtriple-K1", "softtriple-dot-K2"]
# (B, D, C, present classes, TILE): C < B with B > D (tiles recomputed); C ≫ B with B ≤ D (tiles stashed), chunks of
# 2 classes at K = 3; C = 37 not a chunk multiple; only 3 of 30 classes present
SIZES = {"C<B": (21, 5, 6, None, 63), "C>>B": (6, 8, 70, None, 36), "odd": (7, 9, 37, None, 70),
         "absent": (10, 4, 30, [0, 7, 29], 60)}


def _kw(op, kw):
    kw = dict(kw)
    if op == "subcenter_arcface_loss":
        kw["margin"] = math.radians(kw["margin"])
    return kw


def _data(size, k, seed=0, colmajor=False):
    b, d, c, present, tile = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.tensor(present * b)[:b] if present else torch.randint(0, c, (b,), generator=g)
    if colmajor:  # W = Pᵀ of a row-major C·K × D matrix (the benchmark's layout)
        W = torch.randn(c * k, d, dtype=torch.float64, generator=g).t()
    else:
        W = torch.randn(d, c * k, dtype=torch.float64, generator=g)
    return x, y, W, tile


def _grads(fn, x, W):
    xr = x.clone().requires_grad_()
    Wr = (W.t().clone().t() if W.stride(0) == 1 else W.clone()).requires_grad_()
    loss = fn(xr, Wr)
    loss.backward()
    return loss.detach(), xr.grad, Wr.grad


def _same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


def _fn(op, y, kw, backend, **more):
    return lambda x, W: getattr(F, op)(x, y, W, backend=backend, **kw, **more)


@pytest.mark.parametrize("colmajor", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op,kw,k", CASES, ids=IDS)
def test_equals_reference_and_naive(op, kw, k, size, colmajor, engine):
    x, y, W, tile = _data(size, k, colmajor=colmajor)
    engine(tile)
    got = _grads(_fn(op, y, kw, "cpu"), x, W)
    _same(got, _grads(_fn(op, y, kw, "reference"), x, W))
    if not colmajor and size in ("C>>B", "absent"):  # the loops are slow; a stashed and a recomputed shape
        _same(got, _grads(lambda a, w: naive(op, a, y, w, _kw(op, kw)), x, W))


@pytest.mark.parametrize("op,kw,k", CASES, ids=IDS)
def test_miner_weights(op, kw, k, engine):
    engine(36)
    x, y, W, _ = _data("C<B", k, seed=3)
    tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
    counts = [sum(int((t == i).sum()) for t in tup) for i in range(x.shape[0])]
    weights = [n / max(counts) for n in counts]  # PML's miner weights: occurrences in the tuple / the most
    got = _grads(_fn(op, y, kw, "cpu", indices_tuple=tup), x, W)
    _same(got, _grads(_fn(op, y, kw, "reference", indices_tuple=tup), x, W))
    _same(got, _grads(lambda a, w: naive(op, a, y, w, _kw(op, kw), weights), x, W))


# ------------------------------------------------------------------------------------------ PML 2.9 modules

MODULES = [("SubCenterArcFaceLoss", {"sub_centers": 3, "scale": 10}),
           ("SubCenterArcFaceLoss", {"sub_centers": 1, "scale": 6, "margin": 20.0}),
           ("SoftTripleLoss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}),
           ("SoftTripleLoss", {"centers_per_class": 2, "la": 6, "gamma": 0.3}), ("SoftTripleLoss", {"centers_per_class": 1})]


def _module_step(module, x, y, *args):
    xr = x.clone().requires_grad_()
    loss = module(xr, y, *args)
    loss.backward()
    return loss.detach(), xr.grad, next(iter(module.parameters())).grad


@pytest.mark.parametrize("size", ["C<B", "C>>B", "absent"])
@pytest.mark.parametrize("name,kw", MODULES, ids=["subcenter-K3", "subcenter-K1", "softtriple-K3", "softtriple-K2", "softtriple-K1"])
def test_modules_equal_pml_float64(name, kw, size, engine):
    b, d, c, _, tile = SIZES[size]
    engine(tile)
    x, y, _, _ = _data(size, 1)
    torch.manual_seed(0)
    theirs = getattr(pl, name)(num_classes=c, embedding_size=d, **kw).double()
    ours = getattr(dk.losses, name)(num_classes=c, embedding_size=d, backend="cpu", **kw).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _same(_module_step(ours, x, y), _module_step(theirs, x, y))
    if size == "C<B":  # with PML's miner weights
        theirs.zero_grad()
        ours.zero_grad()
        tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
        _same(_module_step(ours, x, y, tup), _module_step(theirs, x, y, tup))


# ------------------------------------------------------------------------------------------ edge cases


def test_subcenter_ties_take_the_first_centre(engine):
    """Exact duplicate sub-centres: torch.max (the reference, PML) gives the gradient to the first; so must we."""
    engine(36)
    x, y, W, _ = _data("C>>B", 3, seed=5)
    W = W.clone()
    W[:, 1::3] = W[:, 0::3]  # centre 1 = centre 0 of every class
    W[:, 5] = W[:, 3]
    kw = {"sub_centers": 3, "margin": 28.6, "scale": 8}
    got = _grads(_fn("subcenter_arcface_loss", y, kw, "cpu"), x, W)
    _same(got, _grads(_fn("subcenter_arcface_loss", y, kw, "reference"), x, W))
    assert (got[2][:, 1::3] == 0).all() and (got[2][:, 5] == 0).all()


def test_arcface_past_pi_minus_margin_and_single_class(engine):
    """Targets almost opposite their centre (ArcFace's cos θ − m·sin m branch); C = 1 (no other class: loss 0)."""
    engine(8)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = -W.t()[2 * y] + 0.05 * torch.randn(6, 3, dtype=torch.float64, generator=g)
    kw = {"sub_centers": 2, "margin": 40.0, "scale": 4}
    _same(_grads(_fn("subcenter_arcface_loss", y, kw, "cpu"), x, W),
          _grads(_fn("subcenter_arcface_loss", y, kw, "reference"), x, W))
    y1 = torch.zeros_like(y)
    for op, kw, k in CASES:
        W1 = W[:, :k]
        _same(_grads(_fn(op, y1, kw, "cpu"), x, W1), _grads(_fn(op, y1, kw, "reference"), x, W1))


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_gradcheck(op, kw, k, engine):
    engine(8)
    g = torch.Generator().manual_seed(7)
    for b, d in ((4, 3), (3, 5)):  # B > D (recomputed tiles) and B ≤ D (stashed)
        x = torch.randn(b, d, dtype=torch.float64, generator=g, requires_grad=True)
        W = torch.randn(d, 3 * k, dtype=torch.float64, generator=g, requires_grad=True)
        y = torch.tensor([0, 2, 2, 1])[:b]
        assert torch.autograd.gradcheck(_fn(op, y, kw, "cpu"), (x, W))


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_float32_close_to_reference(op, kw, k, engine):
    engine(36)
    x, y, W, _ = _data("C>>B", k)
    got = _grads(_fn(op, y, kw, "cpu"), x.float(), W.float())
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    _same([t.double() for t in got], _grads(_fn(op, y, kw, "reference"), x, W), rtol=1e-4, atol=1e-5)


def test_retain_graph_and_upstream_scale(engine):
    """A second backward recomputes the gradients (the first consumed the forward's); grad_output scales them."""
    engine(36)
    x, y, W, _ = _data("C>>B", 3)
    kw = CASES[0][1]
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F.subcenter_arcface_loss(xr, y, Wr, backend="cpu", **kw)
    gx1, gw1 = torch.autograd.grad(loss, (xr, Wr), retain_graph=True)
    gx2, gw2 = torch.autograd.grad(loss * 3, (xr, Wr))
    _, rx, rw = _grads(_fn("subcenter_arcface_loss", y, kw, "reference"), x, W)
    _same([gx1, gw1, gx2, gw2], [rx, rw, 3 * rx, 3 * rw])


def test_out_of_range_label_contributes_zero(engine):
    """check_inputs=False with a label outside [0, C): that row's loss is 0 (the triton form's rule; PML raises)."""
    engine(36)
    x, y, W, _ = _data("C>>B", 3)
    bad = y.clone()
    bad[0] = 70
    for op, kw, _ in (CASES[0], CASES[2]):
        got = getattr(F, op)(x, bad, W, backend="cpu", check_inputs=False, **kw)
        rows = getattr(F, op)(x[1:], y[1:], W, backend="reference", **kw)
        torch.testing.assert_close(got, rows * (x.shape[0] - 1) / x.shape[0], **TIGHT)


def test_inputs_untouched_and_double_backward_refused(engine):
    engine(36)
    x, y, W, _ = _data("C>>B", 3)
    x0, W0 = x.clone(), W.clone()
    xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F.subcenter_arcface_loss(xx, y, ww, sub_centers=3, backend="cpu")
    assert torch.equal(xx.detach(), x0) and torch.equal(ww.detach(), W0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xx, create_graph=True)


# ------------------------------------------------------------------------------------------ memory, syncs


class _AllTensors(TensorWatch):
    """TensorWatch, plus every tensor an op returns whose storage holds more than ``small`` elements and is not
    weight-sized (W, the weight gradient's buffer and their views)."""

    def __init__(self, small, weight_numel):
        super().__init__()
        self.small, self.weight_numel, self.big = small, weight_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                n = t.untyped_storage().nbytes() // t.element_size()
                if self.small < n != self.weight_numel:
                    self.big.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("b,d", [(64, 4), (8, 16)], ids=["B>D", "B<=D-stash"])
@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_no_batch_by_class_buffer_and_no_sync(op, kw, k, b, d, engine):
    """Forward + backward (both gradients) return no tensor above a chunk's tile (B × c·K or c·K × D) but weight-sized
    ones (the gradient buffer), never a B×C or B×C·K one, and never sync; the same watch sees the reference's."""
    c = 96 if b > d else 40
    tile = b * k * 4  # 4 classes per chunk
    engine(tile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    W = torch.randn(d, c * k, dtype=torch.float64, generator=g)
    small = max(tile, b * d, c * k, tile // b * d)  # a tile, x, rw, a chunk of W
    assert b * c > small and b * c != W.numel()

    def watched(backend):
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        with _AllTensors(small, W.numel()) as w:
            getattr(F, op)(xx, y, ww, backend=backend, check_inputs=False, **kw).backward()
        return w

    assert watched("reference").big
    w = watched("cpu")
    assert not w.big, w.big
    assert not w.syncs, w.syncs


def test_no_tensor_to_python_conversions(monkeypatch, engine):
    """With check_inputs=False nothing turns a tensor into a Python value (the CUDA sync check's CPU stand-in)."""
    engine(36)
    runs = [(op, kw, _data("C>>B", k)) for op, kw, k in CASES]
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda o, nm: lambda self, *a, **k: (calls.append(nm),
                                                                                      o(self, *a, **k))[1])(orig, name))
    for op, kw, (x, y, W, _) in runs:
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        getattr(F, op)(xx, y, ww, backend="cpu", check_inputs=False, **kw).backward()
    assert calls == []
    x, y, W, _ = runs[0][2]
    F.subcenter_arcface_loss(x, y, W, sub_centers=3, backend="cpu")  # validation converts: the detector works
    assert calls


@requires_clear_refs
def test_peak_memory_below_one_batch_by_centre_matrix():
    """fp32, B = 1024 > D = 32, C·K = 16384: the peak extra RSS of forward + backward stays under one B × C·K
    matrix (64 MiB) — the gradient and tiles — while the reference's is several."""
    g = torch.Generator().manual_seed(0)
    b, d, c, k = 1024, 32, 8192, 2
    x = torch.randn(b, d, generator=g).requires_grad_()
    W = torch.randn(d, c * k, generator=g).requires_grad_()
    y = torch.randint(0, c, (b,), generator=g)
    one = b * c * k * 4

    def run(backend):
        def step():
            F.subcenter_arcface_loss(x, y, W, sub_centers=k, backend=backend).backward()
            x.grad = W.grad = None
        return peak_extra_bytes(step)

    assert run("reference") > 2 * one
    assert run("cpu") < one


@pytest.mark.parametrize("layout", ["pml_DxCK", "CKxD_view"])
def test_column_norms_blocked_rows(layout):
    """W's column norms in PML's row-major D×C·K layout come from sums over blocks of 16 rows (D = 37: two full
    blocks and a ragged one); equal to torch's norm to float64 rounding, and the loss to the reference at 1e-9."""
    from dml_kernels.backends.cpp.grouped_columns import _column_norms

    g = torch.Generator().manual_seed(3)
    W = torch.randn(37, 20, dtype=torch.float64, generator=g)
    if layout == "CKxD_view":
        W = W.t().contiguous().t()
    torch.testing.assert_close(_column_norms(W), torch.linalg.vector_norm(W, dim=0), rtol=1e-14, atol=0)
    x = torch.randn(9, 37, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (9,), generator=g)

    def run(backend):
        xr, wr = x.clone().requires_grad_(), W.detach().clone().requires_grad_()
        loss = dk.functional.subcenter_arcface_loss(xr, y, wr, sub_centers=2, backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, (xr, wr))]

    for a, b in zip(run("cpu"), run("reference")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
