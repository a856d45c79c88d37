"""The contrastive family (NT-Xent, SupCon, ...) against PML 2.9 in float64: values and gradients on every
label pattern, with ref_emb, SelfSupervisedLoss-style use, miner tuples, a non-default reducer, bad input."""
import os

import pytest
import torch

import dml_kernels as dk
from patterns import PATTERNS, make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402
from memory import peak_extra_bytes  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)

# name: (ours, PML's, constructor kwargs beyond the defaults)
CASES = {
    "NTXentLoss": (lambda **k: dk.losses.NTXentLoss(**k), lambda **k: pl.NTXentLoss(**k), {}),
    "NTXentLoss/t0.5": (lambda **k: dk.losses.NTXentLoss(**k), lambda **k: pl.NTXentLoss(**k), {"temperature": 0.5}),
    "SupConLoss": (lambda **k: dk.losses.SupConLoss(**k), lambda **k: pl.SupConLoss(**k), {}),
    "SupConLoss/t0.3": (lambda **k: dk.losses.SupConLoss(**k), lambda **k: pl.SupConLoss(**k), {"temperature": 0.3}),
    "NCALoss": (lambda **k: dk.losses.NCALoss(**k), lambda **k: pl.NCALoss(**k), {}),
    "NCALoss/s3": (lambda **k: dk.losses.NCALoss(**k), lambda **k: pl.NCALoss(**k), {"softmax_scale": 3}),
}
# PML's NCALoss is NaN (a mean of nothing) when no row has a positive; ours is a graph-attached 0.
NO_POSITIVE = {"all_distinct", "two_samples_distinct"}


def compare(ours, theirs, x, *args, **kwargs):
    """Value and gradient of ``ours`` vs ``theirs`` on a float64 leaf ``x`` (and a ref_emb leaf, if any)."""
    leaves = [x] + [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    results = []
    for fn in (ours, theirs):
        copies = [t.detach().clone().requires_grad_(True) for t in leaves]
        kw = dict(kwargs)
        k = 1
        for key, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                kw[key] = copies[k]
                k += 1
        loss = fn(copies[0], *args, **kw)
        assert torch.is_tensor(loss) and loss.dim() == 0 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, copies, allow_unused=True)
        results.append((loss.detach(), [torch.zeros_like(c) if g is None else g for g, c in zip(grads, copies)]))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v1, v2.to(v1.dtype), **TOL)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL)
    return v1


def backends():
    return ["reference"]


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_pml(pattern, name):
    ours, theirs, kw = CASES[name]
    torch.manual_seed(0)
    x, y = make(pattern, n=10, d=6)
    if name.startswith("NCA") and pattern in NO_POSITIVE:
        assert torch.isnan(theirs(**kw)(x, y))
        xr = x.clone().requires_grad_()
        loss = ours(backend="reference", **kw)(xr, y)
        loss.backward()
        assert loss.item() == 0 and (xr.grad == 0).all()
        return
    compare(ours(backend="reference", **kw), theirs(**kw), x, y)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dist", ["dot", "euclidean"])
def test_matches_pml_other_distances(name, dist):
    ours, theirs, kw = CASES[name]
    torch.manual_seed(1)
    x, y = make("random", n=10, d=6)
    x = x * 0.5
    pml_dist = pd.DotProductSimilarity() if dist == "dot" else pd.LpDistance()
    compare(ours(backend="reference", distance=dist, **kw), theirs(distance=pml_dist, **kw), x, y)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("pattern", ["random", "pairs", "all_distinct"])
def test_ref_emb_matches_pml(name, pattern):
    ours, theirs, kw = CASES[name]
    torch.manual_seed(2)
    x, y = make(pattern, n=8, d=6)
    ref, ref_y = make("random", n=7, d=6)
    compare(ours(backend="reference", **kw), theirs(**kw), x, y, ref_emb=ref, ref_labels=ref_y)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_use_matches_pml(name, symmetric):
    """PML's SelfSupervisedLoss: labels = arange, ref_emb = the second view (or both views concatenated)."""
    ours, theirs, kw = CASES[name]
    torch.manual_seed(3)
    x = torch.randn(8, 6, dtype=torch.float64)
    view = x + 0.3 * torch.randn_like(x)
    wrapped = pl.SelfSupervisedLoss(theirs(**kw), symmetric=symmetric)
    loss = ours(backend="reference", **kw)

    def ssl(emb, ref_emb):
        labels = torch.arange(emb.shape[0])
        if symmetric:
            return loss(torch.cat([emb, ref_emb]), torch.cat([labels, labels]))
        return loss(emb, labels, ref_emb=ref_emb, ref_labels=labels.clone())

    compare(ssl, lambda e, ref_emb: wrapped(e, ref_emb), x, ref_emb=view)


@pytest.mark.parametrize("name", list(CASES))
def test_miner_tuples_match_pml(name):
    ours, theirs, kw = CASES[name]
    torch.manual_seed(4)
    x, y = make("random", n=12, d=6)
    tup = pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)
    compare(ours(backend="reference", **kw), theirs(**kw), x, y, tup)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reducer", ["SumReducer", "DoNothingReducer", "MeanReducer", "AvgNonZeroReducer"])
def test_non_default_reducer_matches_pml(name, reducer):
    ours, theirs, kw = CASES[name]
    torch.manual_seed(5)
    x, y = make("random", n=10, d=6)
    a = ours(backend="reference", reducer=getattr(dk.reducers, reducer)(), **kw)
    b = theirs(reducer=getattr(pr, reducer)(), **kw)
    if reducer == "DoNothingReducer":
        da, db = a(x, y), b(x, y)
        assert da.keys() == db.keys()
        for key in da:
            torch.testing.assert_close(torch.as_tensor(da[key]["losses"]).flatten(),
                                       torch.as_tensor(db[key]["losses"]).flatten(), **TOL)
            assert da[key]["reduction_type"] == db[key]["reduction_type"]
        return
    compare(a, b, x, y)


@pytest.mark.parametrize("fn", ["ntxent_loss", "supcon_loss", "nca_loss"])
def test_gradcheck_reference(fn):
    torch.manual_seed(6)
    x, y = make("random", n=7, d=4)
    f = getattr(dk.functional, fn)
    ref, ref_y = make("random", n=5, d=4)
    assert torch.autograd.gradcheck(lambda a: f(a, y, backend="reference"), (x.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda a, r: f(a, y, ref_emb=r, ref_labels=ref_y, backend="reference"),
                                    (x, ref.requires_grad_()))


@pytest.mark.parametrize("cls", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("bad", [0, -0.1, float("nan")])
def test_bad_temperature(cls, bad):
    with pytest.raises(ValueError, match="temperature"):
        getattr(dk.losses, cls)(temperature=bad)
    fn = {"NTXentLoss": dk.functional.ntxent_loss, "SupConLoss": dk.functional.supcon_loss}[cls]
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.randn(4, 3), torch.arange(4), temperature=bad)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_without_positive_no_nan(name):
    """Rows with no positive (singletons) give PML's value, a finite loss and finite gradients."""
    ours, theirs, kw = CASES[name]
    torch.manual_seed(7)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    compare(ours(backend="reference", **kw), theirs(**kw), x, y)


def test_defaults_are_pml():
    assert dk.losses.TupletMarginLoss(margin=10).margin == pytest.approx(pl.TupletMarginLoss(margin=10).margin, abs=1e-15)
    assert dk.losses.CircleLoss().gamma == pl.CircleLoss().gamma and dk.losses.CircleLoss().m == pl.CircleLoss().m
    assert dk.losses.NCALoss().softmax_scale == pl.NCALoss().softmax_scale == 1
    assert dk.losses.NTXentLoss().temperature == pl.NTXentLoss().temperature == 0.07
    assert dk.losses.SupConLoss().temperature == pl.SupConLoss().temperature == 0.1
    assert type(dk.losses.NTXentLoss().reducer).__name__ == type(pl.NTXentLoss().reducer).__name__
    assert type(dk.losses.SupConLoss().reducer).__name__ == type(pl.SupConLoss().reducer).__name__


# ----------------------------------------------------------------------------------- fused (cpu) forms

def _has_cpu():
    from dml_kernels import _registry
    try:
        _registry.call("nca_loss", "cpu", "cpu", torch.randn(3, 2, dtype=torch.float64), torch.arange(3), None, None,
                       softmax_scale=1.0, distance=dk.distances.parse_distance(None, True, default="euclidean"))
        return True
    except Exception:  # noqa: BLE001 - the extension is not built here
        return False


cpu_only = pytest.mark.skipif(not _has_cpu(), reason="the C++ CPU extension is not built")
FUSED = {"nca_loss": [dict(), dict(softmax_scale=4.0), dict(distance="cosine"), dict(distance="dot"),
                      dict(distance="euclidean", normalize_embeddings=False)],
         "ntxent_loss": [dict(), dict(temperature=0.5), dict(distance="dot", normalize_embeddings=False),
                         dict(distance="euclidean", temperature=2.0),
                         dict(distance="squared_euclidean", normalize_embeddings=False, temperature=3.0)],
         "supcon_loss": [dict(), dict(temperature=0.5), dict(distance="dot", normalize_embeddings=False),
                         dict(distance="squared_euclidean"), dict(distance="squared_euclidean",
                                                                  normalize_embeddings=False, temperature=3.0)]}


@cpu_only
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("fn,kw", [(f, k) for f, ks in FUSED.items() for k in ks])
@pytest.mark.parametrize("with_ref", [False, True])
def test_fused_cpu_equals_reference(fn, kw, pattern, with_ref):
    torch.manual_seed(8)
    x, y = make(pattern, n=11, d=5)
    extra = {}
    if with_ref:
        ref, ref_y = make("random", n=6, d=5)
        extra = dict(ref_emb=ref.requires_grad_(), ref_labels=ref_y)
    f = getattr(dk.functional, fn)
    out = []
    for backend in ("cpu", "reference"):
        xr = x.clone().requires_grad_()
        loss = f(xr, y, backend=backend, **kw, **extra)
        leaves = [xr] + ([extra["ref_emb"]] if with_ref else [])
        out.append((loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(out[0][1], out[1][1]):
        if a is None or b is None:
            assert (a is None or (a == 0).all()) and (b is None or (b == 0).all())
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@cpu_only
def test_fused_cpu_matches_pml_and_weights():
    torch.manual_seed(9)
    x, y = make("random", n=12, d=6)
    compare(dk.losses.NCALoss(backend="cpu"), pl.NCALoss(), x, y)
    tup = pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)
    compare(dk.losses.NCALoss(backend="cpu", softmax_scale=2), pl.NCALoss(softmax_scale=2), x, y, tup)
    compare(dk.losses.SupConLoss(backend="cpu"), pl.SupConLoss(), x, y)
    compare(dk.losses.NTXentLoss(backend="cpu"), pl.NTXentLoss(), x, y)
    # SelfSupervisedLoss use (labels = arange, ref_emb = the second view) on the fused path
    view = x + 0.3 * torch.randn_like(x)
    compare(lambda e, ref_emb: dk.losses.NTXentLoss(backend="cpu")(e, torch.arange(12), ref_emb=ref_emb,
                                                                   ref_labels=torch.arange(12)),
            lambda e, ref_emb: pl.SelfSupervisedLoss(pl.NTXentLoss(), symmetric=False)(e, ref_emb), x, ref_emb=view)
    with pytest.raises(dk.Unsupported if hasattr(dk, "Unsupported") else NotImplementedError):
        dk.losses.SupConLoss(backend="cpu", distance="euclidean")(x, y)


@cpu_only
@pytest.mark.parametrize("fn", list(FUSED))
def test_gradcheck_fused_cpu(fn):
    torch.manual_seed(10)
    x, y = make("random", n=7, d=4)
    ref, ref_y = make("random", n=5, d=4)
    f = getattr(dk.functional, fn)
    assert torch.autograd.gradcheck(lambda a: f(a, y, backend="cpu"), (x.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda a, r: f(a, y, ref_emb=r, ref_labels=ref_y, backend="cpu"),
                                    (x, ref.requires_grad_()))


@cpu_only
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("fn", list(FUSED))
def test_fused_path_never_allocates_n_by_n(fn):
    """N=4096, D=64 fp32, forward + backward: the cpu form's peak extra memory stays far below one N×N fp32
    matrix (64 MiB); the same measurement on the reference exceeds it. 100 classes: ~167k positive pairs, so
    a per-positive-pair buffer (the earlier C++ NT-Xent's O(P)) would show too."""
    n, d = 4096, 64
    x = torch.randn(n, d)
    y = torch.randint(0, 100, (n,))
    nxn = n * n * 4
    f = getattr(dk.functional, fn)

    def step(backend):
        xr = x.clone().requires_grad_()
        f(xr, y, backend=backend).backward()

    step("cpu")
    fused = peak_extra_bytes(lambda: step("cpu"))
    reference = peak_extra_bytes(lambda: step("reference"))
    assert fused < nxn / 4, (fused, nxn)
    assert reference > nxn, (reference, nxn)


# ------------------------------------------------------------------ issue 12 item 3: reference backend

CASES3 = {
    "CircleLoss": ("CircleLoss", {}),
    "CircleLoss/m.25g30": ("CircleLoss", {"m": 0.25, "gamma": 30}),
    "TupletMarginLoss": ("TupletMarginLoss", {}),
    "TupletMarginLoss/m10s8": ("TupletMarginLoss", {"margin": 10.0, "scale": 8}),
    "IntraPairVarianceLoss": ("IntraPairVarianceLoss", {}),
    "IntraPairVarianceLoss/euclid": ("IntraPairVarianceLoss", {"pos_eps": 0.1, "neg_eps": 0.05, "distance": "L"}),
    "SignalToNoiseRatioContrastiveLoss": ("SignalToNoiseRatioContrastiveLoss", {}),
    "SignalToNoiseRatioContrastiveLoss/m": ("SignalToNoiseRatioContrastiveLoss", {"pos_margin": 0.3,
                                                                                   "neg_margin": 1.5}),
    "ThresholdConsistentMarginLoss": ("ThresholdConsistentMarginLoss", {}),
    "ThresholdConsistentMarginLoss/m": ("ThresholdConsistentMarginLoss", {"margin_plus": 0.3, "margin_minus": -0.2,
                                                                         "lambda_plus": 2.0}),
    "MarginLoss": ("MarginLoss", {}),
    "MarginLoss/cos": ("MarginLoss", {"margin": 0.1, "beta": 0.3, "distance": "C"}),
}


def build3(name, ours):
    cls, kw = CASES3[name]
    kw = dict(kw)
    dist = kw.pop("distance", None)
    if dist == "L":
        kw["distance"] = "euclidean" if ours else pd.LpDistance()
    elif dist == "C":
        kw["distance"] = "cosine" if ours else pd.CosineSimilarity()
    if ours:
        return getattr(dk.losses, cls)(backend="reference", **kw)
    return getattr(pl, cls)(**kw)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", list(CASES3))
def test_item3_matches_pml(pattern, name):
    torch.manual_seed(11)
    x, y = make(pattern, n=10, d=6)
    compare(build3(name, True), build3(name, False), x, y)


@pytest.mark.parametrize("name", [n for n in CASES3 if not n.startswith("Threshold")])
def test_item3_ref_emb_and_miner_match_pml(name):
    torch.manual_seed(12)
    x, y = make("random", n=8, d=6)
    ref, ref_y = make("random", n=7, d=6)
    compare(build3(name, True), build3(name, False), x, y, ref_emb=ref, ref_labels=ref_y)
    x, y = make("random", n=12, d=6)
    tup = pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)
    compare(build3(name, True), build3(name, False), x, y, tup)


def test_threshold_consistent_margin_rejects_ref_emb():
    x, y = make("random", n=6, d=4)
    with pytest.raises(NotImplementedError, match="ref_emb"):
        dk.losses.ThresholdConsistentMarginLoss()(x, y, ref_emb=x.clone(), ref_labels=y)


@pytest.mark.parametrize("cls", ["CircleLoss", "TupletMarginLoss", "ThresholdConsistentMarginLoss"])
def test_cosine_only_losses_reject_other_distances(cls):
    x, y = make("random", n=6, d=4)
    with pytest.raises(ValueError, match="cosine"):
        getattr(dk.losses, cls)(distance="euclidean")(x, y)


@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same"])
def test_margin_loss_learnable_beta_matches_pml(num_classes, pattern):
    """PML's attribute name and shape for beta; the loss (with ν·β) and the beta gradient equal PML's."""
    torch.manual_seed(13)
    x, y = make(pattern, n=9, d=5)
    y = y % 3
    kw = dict(learn_beta=True, nu=0.1, num_classes=num_classes, beta=0.9)
    ours, theirs = dk.losses.MarginLoss(backend="reference", **kw), pl.MarginLoss(**kw)
    assert isinstance(ours.beta, torch.nn.Parameter) and ours.beta.shape == theirs.beta.shape
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = ours(xa, y), theirs(xb, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb.to(la.dtype), **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    gb = torch.zeros_like(theirs.beta) if theirs.beta.grad is None else theirs.beta.grad  # PML: no triplet
    torch.testing.assert_close(ours.beta.grad.double(), gb.double(), **TOL)


@pytest.mark.parametrize("name", ["CircleLoss", "IntraPairVarianceLoss", "MarginLoss", "TupletMarginLoss"])
@pytest.mark.parametrize("reducer", ["SumReducer", "MeanReducer"])
def test_item3_non_default_reducer_matches_pml(name, reducer):
    torch.manual_seed(14)
    x, y = make("random", n=10, d=6)
    cls = CASES3[name][0]
    compare(getattr(dk.losses, cls)(backend="reference", reducer=getattr(dk.reducers, reducer)()),
            getattr(pl, cls)(reducer=getattr(pr, reducer)()), x, y)


# CircleLoss is left out: PML's pair weights are detached, so its gradient is not the value's derivative
# (equal to PML's gradient, tested above).
@pytest.mark.parametrize("fn", ["tuplet_margin_loss", "intra_pair_variance_loss",
                                "signal_to_noise_ratio_contrastive_loss", "threshold_consistent_margin_loss"])
def test_item3_gradcheck_reference(fn):
    torch.manual_seed(15)
    x, y = make("random", n=7, d=4)
    f = getattr(dk.functional, fn)
    assert torch.autograd.gradcheck(lambda a: f(a, y, backend="reference"), (x.requires_grad_(),))


def test_margin_loss_gradcheck_beta():
    torch.manual_seed(16)
    x, y = make("random", n=7, d=4)
    beta = torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: dk.functional.margin_loss(a, y, beta=b, learn_beta=True, nu=0.2, backend="reference"),
        (x.requires_grad_(), beta))


@pytest.mark.skipif(not hasattr(dk.losses, "SelfSupervisedLoss"), reason="no dk.losses.SelfSupervisedLoss")
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss", "NCALoss", "CircleLoss", "TupletMarginLoss",
                                  "IntraPairVarianceLoss", "SignalToNoiseRatioContrastiveLoss"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_in_dk_self_supervised_wrapper_matches_pml(name, symmetric):
    torch.manual_seed(17)
    x = torch.randn(8, 5, dtype=torch.float64)
    view = x + 0.2 * torch.randn_like(x)
    ours = dk.losses.SelfSupervisedLoss(getattr(dk.losses, name)(), symmetric=symmetric)
    theirs = pl.SelfSupervisedLoss(getattr(pl, name)(), symmetric=symmetric)
    compare(lambda e, ref_emb: ours(e, ref_emb), lambda e, ref_emb: theirs(e, ref_emb), x, ref_emb=view)
