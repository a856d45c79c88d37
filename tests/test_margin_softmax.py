"""The margin-softmax family (NormalizedSoftmax, CosFace, ArcFace, LargeMarginSoftmax, SphereFace; and on the
reference backend SubCenterArcFace, SoftTriple, P2SGrad) against PML
2.9 in float64 (values, embedding and weight gradients, after loading PML's state_dict into ours with
strict=True), on the reference and the fused cpu paths; gradcheck; state_dict round trips; the fused cpu path
against the reference (fp64 1e-10, fp32); non-default reducers, miners and weight regularizers against PML; a
memory test that fails on any B×C buffer."""
import math
import os

import warnings

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.backends.cpp import loader

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402
from pytorch_metric_learning import regularizers as preg  # noqa: E402
from memory import peak_extra_bytes  # noqa: E402

F = dk.functional
HAS_CPU = loader.unavailable_reason("cpu") is None
BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="C++ CPU extension unavailable")
TIGHT = dict(rtol=1e-9, atol=1e-9)

# (class name, constructor kwargs besides num_classes / embedding_size, functional name)
LOSSES = [
    ("NormalizedSoftmaxLoss", {}, "normalized_softmax_loss"),
    ("NormalizedSoftmaxLoss", {"temperature": 0.3}, "normalized_softmax_loss"),
    ("CosFaceLoss", {}, "cosface_loss"),
    ("CosFaceLoss", {"margin": 0.2, "scale": 10}, "cosface_loss"),
    ("ArcFaceLoss", {}, "arcface_loss"),
    ("ArcFaceLoss", {"margin": 50, "scale": 8}, "arcface_loss"),
    ("LargeMarginSoftmaxLoss", {}, "large_margin_softmax_loss"),
    ("LargeMarginSoftmaxLoss", {"margin": 3.7, "scale": 2}, "large_margin_softmax_loss"),
    ("SphereFaceLoss", {}, "sphereface_loss"),
    ("SphereFaceLoss", {"margin": 2, "scale": 3}, "sphereface_loss"),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}" for n, kw, _ in LOSSES]
SIZES = {"C<B": (24, 6, 5), "C>>B": (6, 5, 70), "absent": (10, 4, 30)}


def _data(b, d, c, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if case == "absent":  # only 3 of the classes occur
        y = torch.tensor([0, 7, 29] * b)[:b]
    else:
        y = torch.randint(0, c, (b,), generator=g)
    return x, y


def _pair(name, kw, c, d, backend="reference", seed=0):
    torch.manual_seed(seed)
    theirs = getattr(pl, name)(num_classes=c, embedding_size=d, **kw)
    ours = getattr(dk.losses, name)(num_classes=c, embedding_size=d, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _step(module, x, y, *args, **kw):
    xr = x.clone().requires_grad_()
    loss = module(xr, y, *args, **kw)
    loss.backward()
    return loss.detach(), xr.grad, module.W.grad


def _assert_same(a, b, tol=TIGHT):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name,kw,fn", LOSSES, ids=IDS)
def test_equals_pml_float64(name, kw, fn, size, backend):
    b, d, c = SIZES[size]
    x, y = _data(b, d, c, size)
    ours, theirs = _pair(name, kw, c, d, backend)
    _assert_same(_step(ours, x, y), _step(theirs, x, y))
    assert ours.W.shape == theirs.W.shape == (d, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arcface_past_pi_minus_margin(backend):
    """Embeddings almost opposite their class column: θ + m > π takes PML's cos θ − m·sin m branch."""
    ours, theirs = _pair("ArcFaceLoss", {"margin": 40, "scale": 4}, 4, 3, backend)
    w = theirs.W.detach().t()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = -w[y].double() + 0.05 * torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[4:] = w[y[4:]].double() + 0.3  # two rows on the other branch
    _assert_same(_step(ours, x, y), _step(theirs, x, y))


@pytest.mark.parametrize("name", ["LargeMarginSoftmaxLoss", "SphereFaceLoss"])
def test_large_margin_every_k_sector(name):
    """Angles in every sector [kπ/m, (k+1)π/m) (the k-sign trick) against PML, on both paths."""
    m = 4
    d, c = 2, 3
    angles = torch.linspace(0.05, math.pi - 0.05, 16, dtype=torch.float64)
    for backend in BACKENDS:
        ours, theirs = _pair(name, {"margin": m}, c, d, backend)
        with torch.no_grad():
            theirs.W[:, 0] = torch.tensor([2.0, 0.0])
            ours.W.copy_(theirs.W)
        x = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * 1.5
        y = torch.zeros(16, dtype=torch.long)
        _assert_same(_step(ours, x, y), _step(theirs, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw,fn", LOSSES[::2], ids=IDS[::2])
def test_miner_weights_like_pml(name, kw, fn, backend):
    x, y = _data(16, 5, 4, "C<B", seed=3)
    ours, theirs = _pair(name, kw, 4, 5, backend)
    tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
    _assert_same(_step(ours, x, y, tup), _step(theirs, x, y, tup))


@pytest.mark.parametrize("name,kw,fn", LOSSES[::2], ids=IDS[::2])
def test_non_default_reducer_and_weight_regularizer_like_pml(name, kw, fn):
    x, y = _data(16, 5, 6, "C<B", seed=4)
    for their_red, our_red in [(pr.SumReducer(), dk.reducers.SumReducer()),
                               (pr.ThresholdReducer(low=0.5), dk.reducers.ThresholdReducer(low=0.5)),
                               (pr.PerAnchorReducer(), pr.PerAnchorReducer())]:
        torch.manual_seed(0)
        theirs = getattr(pl, name)(num_classes=6, embedding_size=5, reducer=their_red, **kw)
        ours = getattr(dk.losses, name)(num_classes=6, embedding_size=5, reducer=our_red, **kw)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        _assert_same(_step(ours, x, y), _step(theirs, x, y))
    # weight regularizer on Wᵀ (+ the default reducer: the fused value plus the term)
    for backend in BACKENDS:
        torch.manual_seed(0)
        theirs = getattr(pl, name)(num_classes=6, embedding_size=5, weight_regularizer=preg.RegularFaceRegularizer(),
                                   weight_reg_weight=0.7, **kw)
        ours = getattr(dk.losses, name)(num_classes=6, embedding_size=5, backend=backend, weight_reg_weight=0.7,
                                        weight_regularizer=dk.regularizers.RegularFaceRegularizer(), **kw)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        _assert_same(_step(ours, x, y), _step(theirs, x, y))


def test_do_nothing_reducer_returns_pml_elements():
    x, y = _data(8, 4, 3, "C<B")
    ours, theirs = _pair("CosFaceLoss", {}, 3, 4)
    ours.set_reducer(dk.reducers.DoNothingReducer())
    theirs.set_reducer(pr.DoNothingReducer())
    a, b = ours(x, y), theirs(x, y)
    assert a["loss"]["reduction_type"] == b["loss"]["reduction_type"] == "element"
    torch.testing.assert_close(a["loss"]["losses"], b["loss"]["losses"], **TIGHT)


@pytest.mark.parametrize("name,kw,fn", LOSSES[::2], ids=IDS[::2])
def test_get_logits_like_pml(name, kw, fn):
    x, _ = _data(7, 4, 5, "C<B")
    ours, theirs = _pair(name, kw, 5, 4)
    theirs.W.data = theirs.W.data.double()
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), **TIGHT)


@pytest.mark.parametrize("name,kw,fn", LOSSES[::2], ids=IDS[::2])
def test_state_dict_round_trip_and_init(name, kw, fn):
    torch.manual_seed(0)
    theirs = getattr(pl, name)(num_classes=9, embedding_size=4, **kw)
    torch.manual_seed(0)
    ours = getattr(dk.losses, name)(num_classes=9, embedding_size=4, **kw)
    # same init draw (N(0, 1) of a D×C tensor), same names, shapes, dtypes
    torch.testing.assert_close(ours.W.detach(), theirs.W.detach(), rtol=0, atol=0)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t) == ["W"]
    assert sd_o["W"].shape == sd_t["W"].shape == (4, 9) and sd_o["W"].dtype == sd_t["W"].dtype == torch.float32
    other = getattr(pl, name)(num_classes=9, embedding_size=4, **kw)
    other.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(other.W, ours.W, rtol=0, atol=0)
    # weight_init_func as PML's
    ours2 = getattr(dk.losses, name)(num_classes=9, embedding_size=4, weight_init_func=torch.nn.init.ones_, **kw)
    assert bool((ours2.W == 1).all())


def test_pml_attributes():
    assert dk.losses.ArcFaceLoss(3, 4).margin == pytest.approx(pl.ArcFaceLoss(3, 4).margin, abs=0)
    assert dk.losses.LargeMarginSoftmaxLoss(3, 4, margin=4.7).margin == 4
    assert dk.losses.CosFaceLoss(3, 4).margin == 0.35 and dk.losses.CosFaceLoss(3, 4).scale == 64
    assert dk.losses.NormalizedSoftmaxLoss(3, 4).temperature == 0.05
    assert dk.losses.SphereFaceLoss(3, 4).scale == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw,fn", LOSSES[::2], ids=IDS[::2])
def test_gradcheck(name, kw, fn, backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 3, 3, 0])
    kw = {k: v for k, v in kw.items()}
    if fn in ("cosface_loss", "arcface_loss"):
        kw.setdefault("scale", 4)
    assert torch.autograd.gradcheck(lambda a, w: getattr(F, fn)(a, y, w, backend=backend, **kw), (x, W))


# ------------------------------------------------------------------------------ the fused cpu path


FN_CASES = [("normalized_softmax_loss", {}), ("normalized_softmax_loss", {"distance": "euclidean"}),
            ("normalized_softmax_loss", {"distance": "squared_euclidean", "temperature": 0.5}),
            ("normalized_softmax_loss", {"normalize_embeddings": False, "temperature": 2.0}),
            ("cosface_loss", {}), ("arcface_loss", {}), ("arcface_loss", {"margin": 60, "scale": 5}),
            ("large_margin_softmax_loss", {}), ("large_margin_softmax_loss", {"margin": 1, "scale": 0.5}),
            ("sphereface_loss", {}), ("sphereface_loss", {"margin": 5})]


@needs_cpu
def test_registered_on_cpu_and_cuda():
    for fn, _ in FN_CASES:
        assert {"reference", "cpu", "cuda"} <= set(_registry.implemented(fn))
        assert "reference" in _registry.implemented(f"{fn}_elements")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn,kw", FN_CASES)
def test_cpu_matches_reference(fn, kw, dtype):
    for b, d, c in [(33, 7, 5), (4, 6, 300), (1, 3, 1)]:
        g = torch.Generator().manual_seed(b + c)
        x = torch.randn(b, d, dtype=torch.float64, generator=g)
        W = torch.randn(d, c, dtype=torch.float64, generator=g)
        y = torch.randint(0, c, (b,), generator=g)
        outs = []
        for backend, dt in [("reference", torch.float64), ("cpu", dtype)]:
            xr, Wr = x.to(dt).detach().requires_grad_(), W.to(dt).detach().requires_grad_()
            loss = getattr(F, fn)(xr, y, Wr, backend=backend, **kw)
            loss.backward()
            assert loss.dtype == dt
            outs.append([loss.detach().double(), xr.grad.double(), Wr.grad.double()])
        if dtype == torch.float64:
            tol = dict(rtol=1e-10, atol=1e-10)
        else:  # fp32 against the fp64 oracle, scaled by the size of the logits
            tol = dict(rtol=2e-4, atol=2e-4 * max(1.0, float(outs[0][0])))
        _assert_same(outs[1], outs[0], tol)


@needs_cpu
def test_cpu_with_miner_weights_and_single_class():
    x, y = _data(10, 4, 1, "C<B")
    y = torch.zeros_like(y)
    W = torch.randn(4, 1, dtype=torch.float64)
    for fn, _ in FN_CASES[::3]:
        a = getattr(F, fn)(x, y, W, backend="cpu")
        b = getattr(F, fn)(x, y, W, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    x, y = _data(12, 4, 3, "C<B", seed=2)
    tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
    W = torch.randn(4, 3, dtype=torch.float64)
    for fn, kw in FN_CASES:
        a = getattr(F, fn)(x, y, W, tup, backend="cpu", **kw)
        b = getattr(F, fn)(x, y, W, tup, backend="reference", **kw)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_errors():
    x, y = _data(4, 3, 5, "C<B")
    W = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_emb"):
        F.cosface_loss(x, y, W, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match="D×C"):
        F.arcface_loss(x, y, W.t().contiguous())
    with pytest.raises(ValueError, match="num_classes"):
        F.cosface_loss(x, y + 10, W)
    with pytest.raises(ValueError, match="cosine"):
        dk.losses.ArcFaceLoss(5, 3, distance="euclidean")
    with pytest.raises(ValueError, match="margin"):
        dk.losses.SphereFaceLoss(5, 3, margin=0.5)


@needs_cpu
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_fused_margin_losses_never_allocate_b_by_c():
    """B=1024 against C=65536 classes (one B×C fp32 matrix = 256 MiB), forward + backward through the modules:
    the fused cpu path stays far below one B×C matrix; the reference exceeds it."""
    b, c, d = 1024, 65536, 8
    x = torch.randn(b, d)
    y = torch.randint(0, c, (b,))
    bxc = b * c * 4
    mods = {name: getattr(dk.losses, name)(c, d) for name in
            ("NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss")}
    mods["P2SGradLoss"] = dk.losses.P2SGradLoss(d, c)

    def step(mod, backend):
        mod.backend = backend
        mod.zero_grad(set_to_none=True)
        mod(x.clone().requires_grad_(), y).backward()

    for name, mod in mods.items():
        step(mod, "cpu")
        fused = peak_extra_bytes(lambda: step(mod, "cpu"))
        assert fused < bxc / 8, f"{name}: fused path peak extra {fused / 2**20:.1f} MiB"
    reference = peak_extra_bytes(lambda: step(mods["ArcFaceLoss"], "reference"))
    assert reference > bxc, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"


# ------------------------------------------------------ grouped columns and P2SGrad (reference backend)

GROUPED = [("SubCenterArcFaceLoss", {}), ("SubCenterArcFaceLoss", {"sub_centers": 1, "margin": 40, "scale": 8}),
           ("SoftTripleLoss", {}), ("SoftTripleLoss", {"centers_per_class": 3, "la": 5, "gamma": 0.5, "margin": 0.2}),
           ("SoftTripleLoss", {"centers_per_class": 1, "distance": "dot", "normalize_embeddings": False}),
           ("P2SGradLoss", {})]


def _grouped_pair(name, kw, c, d, seed=0):
    pml_kw = dict(kw)
    if kw.get("distance") == "dot":
        pml_kw["distance"] = pml.distances.DotProductSimilarity(normalize_embeddings=kw["normalize_embeddings"])
        del pml_kw["normalize_embeddings"]
    torch.manual_seed(seed)
    theirs = pl.P2SGradLoss(d, c) if name == "P2SGradLoss" else getattr(pl, name)(num_classes=c, embedding_size=d,
                                                                                    **pml_kw)
    torch.manual_seed(seed)
    ours = (dk.losses.P2SGradLoss(d, c) if name == "P2SGradLoss"
            else getattr(dk.losses, name)(num_classes=c, embedding_size=d, **kw))
    for (k1, a), (k2, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):  # same init draws
        assert k1 == k2 and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _grouped_step(module, x, y, *args):
    xr = x.clone().requires_grad_()
    loss = module(xr, y, *args)
    loss.backward()
    return loss.detach(), xr.grad, next(iter(module.parameters())).grad


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name,kw", GROUPED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GROUPED)])
def test_grouped_equal_pml_float64(name, kw, size):
    b, d, c = SIZES[size]
    x, y = _data(b, d, c, size)
    ours, theirs = _grouped_pair(name, kw, c, d)
    _assert_same(_grouped_step(ours, x, y), _grouped_step(theirs, x, y))
    if name != "P2SGradLoss":
        next(iter(theirs.parameters())).data = next(iter(theirs.parameters())).data.double()
        torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), **TIGHT)
    else:  # P2SGrad re-normalises its weight in place on every call, as PML
        torch.testing.assert_close(ours.weight.detach(), theirs.weight.detach(), **TIGHT)


@pytest.mark.parametrize("name,kw", GROUPED[:4:2], ids=["subcenter", "softtriple"])
def test_grouped_miners_reducers_regularizers_like_pml(name, kw):
    x, y = _data(16, 5, 4, "C<B", seed=3)
    tup = pm.MultiSimilarityMiner(epsilon=0.3)(x, y)
    ours, theirs = _grouped_pair(name, kw, 4, 5)
    _assert_same(_grouped_step(ours, x, y, tup), _grouped_step(theirs, x, y, tup))
    torch.manual_seed(0)
    theirs = getattr(pl, name)(num_classes=4, embedding_size=5, reducer=pr.ThresholdReducer(low=0.5),
                               weight_regularizer=preg.LpRegularizer(), weight_reg_weight=0.3, **kw)
    ours = getattr(dk.losses, name)(num_classes=4, embedding_size=5, reducer=dk.reducers.ThresholdReducer(low=0.5),
                                    weight_regularizer=dk.regularizers.LpRegularizer(), weight_reg_weight=0.3, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same(_grouped_step(ours, x, y), _grouped_step(theirs, x, y))


def test_subcenter_get_outliers_like_pml():
    x, y = _data(40, 4, 6, "C<B", seed=7)
    y[y == 5] = 0  # class 5 absent
    ours, theirs = _grouped_pair("SubCenterArcFaceLoss", {"sub_centers": 3}, 6, 4)
    for threshold in (30, 75, 100):
        o_out, o_dom = ours.get_outliers(x, y, threshold=threshold)
        t_out, t_dom = theirs.get_outliers(x, y, threshold=threshold)
        assert torch.equal(o_out, t_out)
        present = torch.unique(y)
        torch.testing.assert_close(o_dom[:, present], t_dom[:, present], rtol=0, atol=0)
        assert bool((o_dom[:, 5] == 0).all())
    # K = 1 equals ArcFace on the same W (PML's own test)
    sub, _ = _grouped_pair("SubCenterArcFaceLoss", {"sub_centers": 1}, 6, 4)
    arc = dk.losses.ArcFaceLoss(6, 4)
    arc.load_state_dict(sub.state_dict(), strict=True)
    torch.testing.assert_close(sub(x, y), arc(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,kw", [("subcenter_arcface_loss", {"sub_centers": 2, "scale": 4}),
                                   ("soft_triple_loss", {"centers_per_class": 2, "la": 3}), ("p2sgrad_loss", {})])
def test_grouped_gradcheck(fn, kw):
    g = torch.Generator().manual_seed(5)
    cols = 8 if fn != "p2sgrad_loss" else 4
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, cols, dtype=torch.float64, generator=g)
    if fn == "p2sgrad_loss":
        W = W / W.norm(dim=0)
    W.requires_grad_()
    y = torch.tensor([0, 1, 3, 3, 0])
    assert torch.autograd.gradcheck(lambda a, w: getattr(F, fn)(a, y, w, backend="reference", **kw), (x, W))


def test_grouped_errors_and_attributes():
    x, y = _data(4, 3, 2, "C<B")
    with pytest.raises(ValueError, match="indices_tuple"):
        dk.losses.P2SGradLoss(3, 2)(x, y, (y, y))
    with pytest.raises(ValueError, match="similarity"):
        dk.losses.SoftTripleLoss(2, 3, distance="euclidean")
    assert dk.losses.SoftTripleLoss(2, 3).gamma == pl.SoftTripleLoss(2, 3).gamma == 10
    assert dk.losses.SubCenterArcFaceLoss(num_classes=2, embedding_size=3).num_classes == 2


@needs_cpu
@pytest.mark.parametrize("size", list(SIZES))
def test_p2sgrad_fused_cpu(size):
    """P2SGrad on the cpu/cuda backends (a D×D Gram, no N×C): equal to PML (fp64), to the reference (fp64 1e-10,
    fp32), gradcheck."""
    assert {"reference", "cpu", "cuda"} <= set(_registry.implemented("p2sgrad_loss"))
    b, d, c = SIZES[size]
    x, y = _data(b, d, c, size)
    ours, theirs = _grouped_pair("P2SGradLoss", {}, c, d)
    ours.backend = "cpu"
    _assert_same(_grouped_step(ours, x, y), _grouped_step(theirs, x, y))
    W = ours.weight.detach()
    for dt, tol in [(torch.float64, dict(rtol=1e-10, atol=1e-10)), (torch.float32, dict(rtol=1e-4, atol=1e-6))]:
        outs = []
        for backend, t in [("reference", torch.float64), ("cpu", dt)]:
            xr, Wr = x.to(t).detach().requires_grad_(), W.to(t).detach().requires_grad_()
            loss = F.p2sgrad_loss(xr, y, Wr, backend=backend)
            loss.backward()
            outs.append([loss.detach().double(), xr.grad.double(), Wr.grad.double()])
        _assert_same(outs[1], outs[0], tol)
    xg = x[:4, :3].clone().requires_grad_()
    Wg = W[:3, :5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: F.p2sgrad_loss(a, y[:4] % 5, w, backend="cpu"), (xg, Wg))


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fused_keeps_fp32_weights(dtype):
    """fp16 / bf16 embeddings on the fused path: W stays fp32 (never cast in place, unlike PML), the loss is fp32
    (accumulated in fp32) and close to the fp32 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(10, 8, generator=g).to(dtype)
    y = torch.randint(0, 7, (10,), generator=g)
    for name in ("NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss"):
        fused = getattr(dk.losses, name)(7, 8, backend="cpu")
        ref = getattr(dk.losses, name)(7, 8, backend="reference")
        ref.load_state_dict(fused.state_dict())
        xr = x.clone().requires_grad_()
        loss = fused(xr, y)
        loss.backward()
        assert loss.dtype == torch.float32 and fused.W.dtype == torch.float32 and xr.grad.dtype == dtype
        torch.testing.assert_close(loss, ref(x.float(), y), rtol=1e-4, atol=1e-4)


@needs_cpu
def test_p2sgrad_cpu_refuses_columns_longer_than_one():
    """The C++ Gram form cannot see PML's clamp: a weight column longer than 1 (possible through the functional
    form) is Unsupported there, and auto gives the exact (clamped) value."""
    x, y = _data(9, 4, 5, "C<B")
    W = 3 * torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(dk.Unsupported, match="longer than 1"):
        F.p2sgrad_loss(x, y, W, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = F.p2sgrad_loss(x, y, W)
    torch.testing.assert_close(got, F.p2sgrad_loss(x, y, W, backend="reference"), rtol=1e-12, atol=1e-12)
