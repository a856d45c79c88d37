"""The grouped-column op pair of the C++ extension (grouped_class_rows / _backward: csrc/grouped_classes.h, the CPU
driver csrc/cpu/grouped_class_ops.cpp) and the cuda backend's SubCenterArcFace / SoftTriple built on it
(dml_kernels/backends/cpp/grouped_kernels.py), run here on CPU tensors through the op's CPU implementation — the
same Python functions the cuda backend registers (the CUDA kernels themselves: tests/test_cuda_grouped_class_kernels.py).

Against the reference backend, independent naive loops and PML 2.9 (float64, 1e-9: values, dx, dW; PML's state_dict
loaded with strict=True), for C < B, C ≫ B, C not a tile multiple, absent classes, K = 1, 2, 3, several row blocks
and chunk groups (small tiles), W in PML's D×C·K layout and as the transpose of a C·K×D matrix; miner weights;
sub-centre ties; gradcheck; opcheck; double backward refused; no B×C·K tensor; no host sync; fp32, fp16/bf16."""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.backends.cpp import loader
from memory import TensorWatch, peak_extra_bytes, requires_clear_refs

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

F = dk.functional
TIGHT = dict(rtol=1e-9, atol=1e-9)
OPS = ("subcenter_arcface_loss", "soft_triple_loss")
_WHY = loader.unavailable_reason("cpu")
if _WHY is None and not loader.has_kernel("grouped_class_rows", "cpu"):
    _WHY = "the loaded extension has no grouped_class_rows CPU kernel (rebuild it)"
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"C++ extension unavailable: {_WHY}")


@pytest.fixture
def gk(monkeypatch):
    """The cuda backend's functions, run on CPU tensors: patched in as the "cpu" implementations (the functional
    layer's validation, units and miner weights in front of them). ``gk(tile, rows)``: the CPU driver's tiling."""
    from dml_kernels.backends.cpp import grouped_kernels as mod
    for op in OPS:
        monkeypatch.setitem(_registry._IMPLS, (op, "cpu"), getattr(mod, op))

    def tiling(tile=None, rows=None):
        monkeypatch.setattr(mod, "CPU_TILING", None if tile is None else (tile, rows))
    return tiling


# ------------------------------------------------------------------------------------------ naive loops


def _cosine(u, v):
    return (u * v).sum() / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12))


def naive_loss(op, x, y, W, kw, weights=None):
    """Loops over rows and classes of PML's formulas (scalar torch ops; autograd gives the gradients)."""
    k = kw.get("sub_centers", kw.get("centers_per_class"))
    rows = []
    for i in range(x.shape[0]):
        logits = []
        for c in range(W.shape[1] // k):
            if op == "subcenter_arcface_loss":
                sims = [_cosine(x[i], W[:, c * k + j]) for j in range(k)]
                best = max(range(k), key=lambda j: (float(sims[j].detach()), -j))  # the first maximal
                cos = sims[best]
                if c == int(y[i]):
                    m = math.radians(kw["margin"])
                    th = torch.acos(cos.clamp(-1, 1))
                    cos = torch.cos(th + m) if float(th.detach()) <= math.pi - m else torch.cos(th) - m * math.sin(m)
                logits.append(kw["scale"] * cos)
            else:
                if kw.get("normalize_embeddings", True):
                    sims = [_cosine(x[i], W[:, c * k + j]) for j in range(k)]
                else:
                    sims = [x[i] @ W[:, c * k + j] for j in range(k)]
                den = sum(torch.exp(s / kw["gamma"]) for s in sims)
                rel = sum(torch.exp(s / kw["gamma"]) / den * s for s in sims)
                logits.append(kw["la"] * (rel - (kw["margin"] if c == int(y[i]) else 0.0)))
        z = torch.stack(logits)
        rows.append((torch.logsumexp(z, 0) - z[int(y[i])]) * (1.0 if weights is None else weights[i]))
    return torch.stack(rows).mean()


# ------------------------------------------------------------------------------------------ cases

CASES = [  # (op, functional keyword arguments, K)
    ("subcenter_arcface_loss", {"sub_centers": 3, "margin": 28.6, "scale": 8}, 3),
    ("subcenter_arcface_loss", {"sub_centers": 2, "margin": 20.0, "scale": 6}, 2),
    ("subcenter_arcface_loss", {"sub_centers": 1, "margin": 20.0, "scale": 4}, 1),
    ("soft_triple_loss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}, 3),
    ("soft_triple_loss", {"centers_per_class": 2, "la": 2, "gamma": 0.3, "margin": 0.1, "distance": "dot",
                          "normalize_embeddings": False}, 2),
    ("soft_triple_loss", {"centers_per_class": 1, "la": 4, "gamma": 0.1, "margin": 0.1}, 1),
]
IDS = ["sc-K3", "sc-K2", "sc-K1", "st-K3", "st-dot-K2", "st-K1"]
# (B, D, C, present classes, (tile elements, rows per block)): C < B (3 row blocks); C ≫ B with 2-class chunks (more
# chunks than the 64 groups: several chunks a group); C = 37 not a chunk multiple; 3 of 30 classes present
SIZES = {"C<B": (21, 5, 6, None, (8 * 3 * 2, 8)), "C>>B": (6, 8, 150, None, (6 * 3 * 2, 8)),
         "odd": (7, 9, 37, None, (7 * 3 * 4, 7)), "absent": (10, 4, 30, [0, 7, 29], (10 * 3 * 5, 4))}


def _data(size, k, seed=0, colmajor=False, dtype=torch.float64):
    b, d, c, present, tiling = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=dtype, generator=g)
    y = torch.tensor(present * b)[:b] if present else torch.randint(0, c, (b,), generator=g)
    W = torch.randn(c * k, d, dtype=dtype, generator=g).t() if colmajor else torch.randn(d, c * k, dtype=dtype,
                                                                                         generator=g)
    return x, y, W, tiling


def _grads(fn, x, W):
    xr = x.clone().requires_grad_()
    Wr = (W.t().clone().t() if W.stride(0) == 1 else W.clone()).requires_grad_()
    loss = fn(xr, Wr)
    loss.backward()
    return loss.detach(), xr.grad, Wr.grad


def _same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


def _fn(op, y, kw, backend="cpu", **more):
    return lambda x, W: getattr(F, op)(x, y, W, backend=backend, **kw, **more)


@pytest.mark.parametrize("colmajor", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op,kw,k", CASES, ids=IDS)
def test_equals_reference(op, kw, k, size, colmajor, gk):
    x, y, W, tiling = _data(size, k, colmajor=colmajor)
    gk(*tiling)
    got = _grads(_fn(op, y, kw), x, W)
    _same(got, _grads(_fn(op, y, kw, "reference"), x, W))
    if colmajor:
        assert got[2].stride() == W.stride()  # dW in W's own layout


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[3], CASES[4]], ids=[IDS[0], IDS[3], IDS[4]])
def test_equals_naive_loops_with_miner_weights(op, kw, k, gk):
    gk(6 * k * 2, 4)
    x, y, W, _ = _data("absent", k, seed=3)
    x, y = x[:6], torch.tensor([0, 7, 7, 29, 0, 3])
    _same(_grads(_fn(op, y, kw), x, W), _grads(lambda a, w: naive_loss(op, a, y, w, kw), x, W))
    tup = pm.MultiSimilarityMiner(epsilon=0.5)(x, y)
    counts = [sum(int((t == i).sum()) for t in tup) for i in range(x.shape[0])]
    weights = [n / max(counts) for n in counts]  # PML's miner weights
    _same(_grads(_fn(op, y, kw, indices_tuple=tup), x, W),
          _grads(lambda a, w: naive_loss(op, a, y, w, kw, weights), x, W))


MODULES = [("SubCenterArcFaceLoss", {"sub_centers": 3, "scale": 10}),
           ("SubCenterArcFaceLoss", {"sub_centers": 2, "scale": 6, "margin": 20.0}),
           ("SubCenterArcFaceLoss", {"sub_centers": 1, "scale": 6}),
           ("SoftTripleLoss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}),
           ("SoftTripleLoss", {"centers_per_class": 2, "la": 6, "gamma": 0.3}), ("SoftTripleLoss", {"centers_per_class": 1})]
MOD_IDS = ["sc-K3", "sc-K2", "sc-K1", "st-K3", "st-K2", "st-K1"]


def _module_step(module, x, y, *args):
    xr = x.clone().requires_grad_()
    loss = module(xr, y, *args)
    loss.backward()
    return loss.detach(), xr.grad, next(iter(module.parameters())).grad


@pytest.mark.parametrize("size", ["C<B", "C>>B", "absent"])
@pytest.mark.parametrize("name,kw", MODULES, ids=MOD_IDS)
def test_modules_equal_pml_float64(name, kw, size, gk):
    b, d, c, _, tiling = SIZES[size]
    gk(*tiling)
    x, y, _, _ = _data(size, 1)
    torch.manual_seed(0)
    theirs = getattr(pl, name)(num_classes=c, embedding_size=d, **kw).double()
    ours = getattr(dk.losses, name)(num_classes=c, embedding_size=d, backend="cpu", **kw).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _same(_module_step(ours, x, y), _module_step(theirs, x, y))
    if size == "C<B":  # PML's miner weights
        theirs.zero_grad()
        ours.zero_grad()
        tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
        _same(_module_step(ours, x, y, tup), _module_step(theirs, x, y, tup))


# ------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_one_gradient_only(op, kw, k, gk):
    """Only dx (a frozen weight: the row-block pass) or only dW (the class-block pass alone)."""
    x, y, W, tiling = _data("C<B", k)
    gk(*tiling)
    for need_x in (True, False):
        grads = []
        for backend in ("cpu", "reference"):
            xr, Wr = x.clone().requires_grad_(need_x), W.clone().requires_grad_(not need_x)
            loss = getattr(F, op)(xr, y, Wr, backend=backend, **kw)
            grads.append((loss.detach(),) + torch.autograd.grad(loss, xr if need_x else Wr))
        _same(*grads)


def test_subcenter_ties_take_the_first_centre(gk):
    """Exact duplicate sub-centres: torch.max (the reference, PML) gives the gradient to the first; so must we. On the
    op with integer data (exact dot products in any summation order, small tiles), then on the loss at the default
    tiling (MKL's small edge tiles may round duplicate columns of one tile differently, making the tie inexact)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (7, 5), generator=g).double().requires_grad_()
    W = torch.randint(-3, 4, (5, 12 * 3), generator=g).double()
    W[:, 1::3] = W[:, 0::3]
    W[:, 2::6] = W[:, 0::6]  # every other class: all three centres tie
    W.requires_grad_()
    y = torch.randint(0, 12, (7,), generator=g)
    scale = torch.arange(1.0, 8.0, dtype=torch.float64)
    got = torch.autograd.grad(sum(u.sum() for u in _op_rows(x, W, y, 3, 0, [0.5, 1.0, 0.0, 18.0, 2.0], scale)),
                              (x, W))
    xr, Wr = x.detach().requires_grad_(), W.detach().requires_grad_()
    v = (xr @ Wr).view(7, 12, 3).max(2)[0]  # torch.max: the first maximal index
    is_t = torch.nn.functional.one_hot(y, 12).bool()
    rest = torch.logsumexp((0.5 * v).masked_fill(is_t, float("-inf")), 1)
    _same(got, torch.autograd.grad((v[torch.arange(7), y] * scale).sum() + rest.sum(), (xr, Wr)), rtol=0, atol=1e-13)
    assert (got[1][:, 1::3] == 0).all() and (got[1][:, 2::6] == 0).all()
    gk()
    x, y, W, _ = _data("C>>B", 3, seed=5)
    W = W.clone()
    W[:, 1::3] = W[:, 0::3]
    W[:, 5] = W[:, 3]
    kw = CASES[0][1]
    got = _grads(_fn("subcenter_arcface_loss", y, kw), x, W)
    _same(got, _grads(_fn("subcenter_arcface_loss", y, kw, "reference"), x, W))
    assert (got[2][:, 1::3] == 0).all() and (got[2][:, 5] == 0).all()


def test_arcface_past_pi_minus_margin_single_class_and_zero_column(gk):
    """Targets almost opposite their centre (cos θ − m·sin m); C = 1 (no other class: loss 0); a zero column (the
    clamped norm: no projection)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g)
    W[:, 6] = 0
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = -W.t()[2 * y] + 0.05 * torch.randn(6, 3, dtype=torch.float64, generator=g)
    kw = {"sub_centers": 2, "margin": 40.0, "scale": 4}
    _same(_grads(_fn("subcenter_arcface_loss", y, kw), x, W), _grads(_fn("subcenter_arcface_loss", y, kw, "reference"),
                                                                      x, W))
    y1 = torch.zeros_like(y)
    for op, kw, k in CASES:
        _same(_grads(_fn(op, y1, kw), x, W[:, :k]), _grads(_fn(op, y1, kw, "reference"), x, W[:, :k]))


def test_out_of_range_label_contributes_zero(gk):
    x, y, W, _ = _data("C>>B", 3)
    bad = y.clone()
    bad[0] = 150
    for op, kw, _ in (CASES[0], CASES[3]):
        got = getattr(F, op)(x, bad, W, backend="cpu", check_inputs=False, **kw)
        rest = getattr(F, op)(x[1:], y[1:], W, backend="reference", **kw)
        torch.testing.assert_close(got, rest * (x.shape[0] - 1) / x.shape[0], **TIGHT)


def _op_rows(x, W, y, k, mode, params, scale):
    t, rest = torch.ops.dml_kernels.grouped_class_rows(x, W, y, k, mode, params)
    return t * scale, rest


def _op_inputs(k=3, mode=0, b=5, d=4, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(d, c * k, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 3, 6, 3, 1, 2, 0][:b])
    return x, W, y, k, mode, [2.5, 2.0, 1e-12, 4.0 * k, 2.0]


@pytest.mark.parametrize("k,mode", [(3, 0), (3, 1), (1, 1), (2, 1)])
def test_op_gradcheck_and_opcheck(k, mode, gk):
    x, W, y, k, mode, params = _op_inputs(k, mode)
    op = torch.ops.dml_kernels.grouped_class_rows

    def f(x, W):
        t, rest = op(x, W, y, k, mode, params)
        return t * torch.arange(1.0, 6.0, dtype=t.dtype), rest

    assert torch.autograd.gradcheck(f, (x, W))
    Wt = W.detach().t().contiguous().t().requires_grad_()  # the transposed layout
    assert torch.autograd.gradcheck(f, (x, Wt))
    if k == 3:  # opcheck (slow): both modes, both layouts, default and small CPU tiles
        torch.library.opcheck(op, (x, W, y, k, mode, params))
        torch.library.opcheck(op, (x, Wt, y, k, mode, params[:3]))


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[4]], ids=[IDS[0], IDS[4]])
def test_loss_gradcheck(op, kw, k, gk):
    gk(3 * k, 2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 5 * k, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_fn(op, torch.tensor([0, 2, 4, 1]), kw), (x, W))


def test_double_backward_refused_and_inputs_untouched(gk):
    x, y, W, _ = _data("C>>B", 3)
    x0, W0 = x.clone(), W.clone()
    xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
    for op, kw, _ in (CASES[0], CASES[3]):
        loss = getattr(F, op)(xx, y, ww, backend="cpu", **kw)
        assert torch.equal(xx.detach(), x0) and torch.equal(ww.detach(), W0)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, xx, create_graph=True)


def test_bad_inputs_name_the_argument(gk):
    x, W, y, k, mode, params = _op_inputs()
    op = torch.ops.dml_kernels.grouped_class_rows
    with pytest.raises(RuntimeError, match="not a multiple of K"):
        op(x, W[:, :20], y, k, mode, params)
    with pytest.raises(RuntimeError, match="W must be D"):
        op(x, W.float(), y, k, mode, params)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(x, W, y.int(), k, mode, params)
    with pytest.raises(RuntimeError, match="params"):
        op(x, W, y, k, mode, params[:2])
    with pytest.raises(RuntimeError, match="bad mode"):
        op(x, W, y, k, 5, params)


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_float32_and_half_inputs(op, kw, k, gk):
    x, y, W, _ = _data("C>>B", k)
    ref = _grads(_fn(op, y, kw, "reference"), x, W)
    got = _grads(_fn(op, y, kw), x.float(), W.float())
    assert all(t.dtype == torch.float32 for t in got)
    _same([t.double() for t in got], ref, rtol=1e-4, atol=1e-5)
    for half in (torch.float16, torch.bfloat16):  # half embeddings, fp32 weights (autocast's case)
        Wf = W.float().requires_grad_()
        W0 = Wf.detach().clone()
        xh = x.to(half).requires_grad_()
        loss = getattr(F, op)(xh, y, Wf, backend="cpu", **kw)
        loss.backward()
        assert loss.dtype == torch.float32 and xh.grad.dtype == half and Wf.grad.dtype == torch.float32
        assert torch.equal(Wf.detach(), W0)
        ref_h = _grads(_fn(op, y, kw, "reference"), xh.detach().double(), W)
        torch.testing.assert_close(loss.double(), ref_h[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(Wf.grad.double(), ref_h[2], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ memory, syncs


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_no_batch_by_class_tensor_and_no_sync(op, kw, k, gk):
    """Forward + backward return no tensor larger than W (its gradient) or x — never B×C or B×C·K — and never
    sync; the same watch sees the reference's B×C·K logits."""
    g = torch.Generator().manual_seed(0)
    b, d, c = 64, 4, 96
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    W = torch.randn(d, c * k, dtype=torch.float64, generator=g)
    bound = 8 * max(W.numel(), b * d)
    assert 8 * b * c > bound

    def watched(backend):
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        with TensorWatch() as w:
            getattr(F, op)(xx, y, ww, backend=backend, check_inputs=False, **kw).backward()
        return w

    assert watched("reference").largest > bound
    w = watched("cpu")
    assert w.largest <= bound, (w.largest, w.largest_op)
    assert not w.syncs, w.syncs


def test_no_tensor_to_python_conversions(monkeypatch, gk):
    """With check_inputs=False nothing turns a tensor into a Python value (the CUDA sync check's CPU stand-in)."""
    runs = [(op, kw, _data("C>>B", k)) for op, kw, k in (CASES[0], CASES[4])]
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda o, nm: lambda self, *a, **k: (calls.append(nm),
                                                                                      o(self, *a, **k))[1])(orig, name))
    for op, kw, (x, y, W, _) in runs:
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        getattr(F, op)(xx, y, ww, backend="cpu", check_inputs=False, **kw).backward()
    assert calls == []


@requires_clear_refs
def test_peak_memory_below_one_batch_by_centre_matrix(gk):
    """fp32, B = 1024, C·K = 16384: the extra peak RSS of forward + backward stays under one B × C·K matrix (64 MiB)
    — the weight gradient (2 MiB) and tiles — while the reference's is several."""
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
    assert run("cpu") < one / 4
