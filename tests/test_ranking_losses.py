"""The ranking / histogram family (FastAP, Histogram, PNP, RankedList, DynamicSoftMargin, Smooth-AP) against
PML 2.9 and against independent naive loops in float64 (values and gradients), on every label pattern PML
accepts; gradcheck; reducers, regularizers, miner tuples, errors; the fused Triton forms (interpreter)."""
import math
import warnings

import numpy as np
import pytest
import torch

import dml_kernels as dk
import naive
from patterns import PATTERNS, make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402
from pytorch_metric_learning import regularizers as preg  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)
warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # PML's HistogramLoss indexing

# name: (class name, constructor kwargs)
CASES = {
    "FastAPLoss": ("FastAPLoss", {}),
    "FastAPLoss/b5": ("FastAPLoss", {"num_bins": 5}),
    "HistogramLoss": ("HistogramLoss", {}),
    "HistogramLoss/n10": ("HistogramLoss", {"n_bins": 10}),
    "PNPLoss": ("PNPLoss", {}),
    "RankedListLoss": ("RankedListLoss", {"margin": 0.4, "Tn": 1}),
    "RankedListLoss/T": ("RankedListLoss", {"margin": 0.6, "Tn": 3, "Tp": 2, "imbalance": 0.3, "alpha": 1.1}),
    "DynamicSoftMarginLoss": ("DynamicSoftMarginLoss", {}),
    "DynamicSoftMarginLoss/b7": ("DynamicSoftMarginLoss", {"num_bins": 7, "min_val": -2.5}),
    "SmoothAPLoss": ("SmoothAPLoss", {}),
    "SmoothAPLoss/t.1": ("SmoothAPLoss", {"temperature": 0.1}),
}
CASES.update({f"PNPLoss/{v}": ("PNPLoss", {"variant": v, "alpha": 4, "anneal": 0.1}) for v in ("Ds", "Dq", "Iu", "Ib")})
EQUAL_COUNTS = {"all_same", "all_distinct", "pairs", "one_sample", "two_samples_same", "two_samples_distinct"}


def build(name, ours, **extra):
    cls, kw = CASES[name]
    if ours:
        return getattr(dk.losses, cls)(backend="reference", **kw, **extra)
    return getattr(pl, cls)(**kw, **extra)


def run(fn, x, *args, **kwargs):
    xr = x.detach().clone().requires_grad_(True)
    refs = {k: v.detach().clone().requires_grad_(True) for k, v in kwargs.items() if k == "ref_emb"}
    loss = fn(xr, *args, **{**kwargs, **refs})
    leaves = [xr] + list(refs.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def assert_same(a, b, tol=TOL):
    (va, ga), (vb, gb) = a, b
    assert torch.isfinite(va)
    torch.testing.assert_close(va.double(), vb.double(), **tol)
    for u, v in zip(ga, gb):
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u, v, **tol)


def _pml_pattern_ok(name, pattern):
    return not name.startswith("SmoothAP") or pattern in EQUAL_COUNTS


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_pml(pattern, name):
    torch.manual_seed(0)
    x, y = make(pattern, n=10, d=6)
    if not _pml_pattern_ok(name, pattern):
        for ours in (True, False):
            with pytest.raises(ValueError, match="same number of elements"):
                build(name, ours)(x, y)
        return
    assert_same(run(build(name, True), x, y), run(build(name, False), x, y))


# ------------------------------------------------------------------------------------- naive loops

def _d(x, i, j, name):
    return naive.value(x[i], x[j], name, True)


def naive_fastap(x, y, num_bins=10, power=2, weights=None):
    name = "squared_euclidean" if power == 2 else "euclidean"
    n, hmax = len(y), 2.0 ** power
    delta = hmax / num_bins
    total, rows = 0, 0
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        neg = [j for j in range(n) if y[j] != y[i]]
        if not pos:
            continue
        hp, hn = [], []
        for k in range(num_bins + 1):
            z = k * delta
            hp.append(sum((torch.relu(1 - torch.abs(_d(x, i, j, name) - z) / delta) for j in pos), x.sum() * 0))
            hn.append(sum((torch.relu(1 - torch.abs(_d(x, i, j, name) - z) / delta) for j in neg), x.sum() * 0))
        ap, cp, ca = 0, 0, 0
        for k in range(num_bins + 1):
            cp, ca = cp + hp[k], ca + hp[k] + hn[k]
            if float(hp[k] * cp) > 0:
                ap = ap + hp[k] * cp / ca
        total = total + (1 - ap / len(pos)) * (1 if weights is None else float(weights[i]))
        rows += 1
    return total / rows if rows else x.sum() * 0


def _f32(v):
    return float(np.float32(v))


def naive_histogram(x, y, delta):
    """Nodes −1 + rΔ with r = floor(float32 (s + 1)/Δ), r·Δ and (r+1)·Δ − 1 rounded to float32: PML's arithmetic."""
    n = len(y)
    has_pos = [any(y[j] == y[i] and j != i for j in range(n)) for i in range(n)]
    has_neg = [any(y[j] != y[i] for j in range(n)) for i in range(n)]
    anchor = [has_pos[i] and has_neg[i] for i in range(n)]
    nodes = round(1 + 2 / delta)
    sets = {True: [], False: []}
    for i in range(n):
        for j in range(i + 1, n):
            same = y[i] == y[j]
            if anchor[i] or anchor[j]:
                sets[bool(same)].append(_d(x, i, j, "cosine"))
    if not sets[True] or not sets[False]:
        return x.sum() * 0
    dens = {}
    for key, vals in sets.items():
        p = [x.sum() * 0 for _ in range(nodes)]
        for s in vals:
            r = math.floor(float((np.float32(float(s)) + np.float32(1)) / np.float32(delta)))  # in float32
            lo = _f32(np.float32(r) * np.float32(delta))
            hi_minus_1 = _f32(np.float32(r + 1) * np.float32(delta) - np.float32(1))  # PML: float32 (r+1)Δ − 1
            p[r + 1] = p[r + 1] + (s + 1 - lo) / delta / len(vals)
            p[r] = p[r] + (hi_minus_1 - s) / delta / len(vals)
        dens[key] = p
    loss, cdf = 0, 0
    for r in range(nodes):
        cdf = cdf + dens[True][r]
        loss = loss + dens[False][r] * cdf
    return loss


def naive_pnp(x, y, b=2, alpha=1, anneal=0.01, variant="O"):
    n = len(y)
    rows = []
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if not pos:
            continue
        terms = []
        for j in pos + [i]:
            r = x.sum() * 0
            for k in range(n):
                if y[k] != y[j]:
                    t = (_d(x, i, k, "cosine") - _d(x, i, j, "cosine")) / anneal
                    r = r + 1 / (1 + torch.exp(torch.clamp(-t, -50, 50)))
            terms.append({"O": r, "Ds": torch.log(1 + r), "Dq": (1 + r) ** (-alpha), "Iu": (1 + r) * torch.log(1 + r),
                          "Ib": (b * r - torch.log(1 + b * r)) / b ** 2}[variant])
        rows.append(sum(terms) / len(terms))
    if not rows:
        return x.sum() * 0
    loss = sum(rows) / len(rows)
    return 1 - loss if variant == "Dq" else loss


def naive_ranked_list(x, y, margin, Tn, imbalance=0.5, alpha=None, Tp=0):
    alpha = 1 + margin / 2 if alpha is None else alpha
    n, c = len(y), alpha - margin
    out = []
    for i in range(n):
        sp = wp = sn = wn = 0
        for j in range(n):
            if j == i:
                continue
            d = _d(x, i, j, "euclidean")
            if y[j] == y[i] and float(d) > c and float(d) > 0:
                w = torch.exp(Tp * (d - c))
                sp, wp = sp + w * (d - c), wp + w
            elif y[j] != y[i] and float(d) < alpha and float(d) > 0:
                w = torch.exp(Tn * (alpha - d))
                sn, wn = sn + w * (alpha - d), wn + w
        out.append((1 - imbalance) * sp / (wp + n * 1e-5) + imbalance * sn / (wn + n * 1e-5))
    return sum(out) / n


def naive_dsm_values(x, y, ref=None, ref_y=None):
    r = x if ref is None else ref
    ry = y if ref is None else ref_y
    vals = []
    for a in range(len(y)):
        for p in range(len(ry)):
            if ry[p] != y[a] or (ref is None and p == a):
                continue
            for q in range(len(ry)):
                if ry[q] != y[a]:
                    vals.append(naive.value(x[a], r[p], "euclidean", True) - naive.value(x[a], r[q], "euclidean", True))
    return vals


def naive_dsm(vals, hist, min_val=-2.0, num_bins=10, momentum=0.01):
    """Returns (loss, new histogram as a list of 0-dim tensors)."""
    if not vals:
        return None, hist
    delta = 2 * abs(min_val) / num_bins
    mu = momentum if sum(float(h) for h in hist) != 0 else 1.0
    new = [(1 - mu) * h for h in hist]
    for d in vals:
        u = (d - min_val) / delta
        k = math.floor(float(u))
        f = u - k
        new[k] = new[k] + mu * (1 - f)
        new[k + 1] = new[k + 1] + mu * f
    total = sum(new)
    new = [h / total for h in new]
    loss = 0
    for d in vals:
        k = math.floor(float((d - min_val) / delta))
        loss = loss + sum(new[: k + 1]) * d
    return loss / len(vals), new


def naive_smooth_ap(x, y, temperature=0.01):
    n = len(y)
    per_class = n // len(set(y))
    g = n // per_class
    s = [[_d(x, i, j, "cosine") for j in range(n)] for i in range(n)]
    sig = lambda t: 1 / (1 + torch.exp(-t / temperature))  # noqa: E731
    loss = 0
    for i in range(n):
        b0 = (i // g) * g
        ap = 0
        for q in range(b0, b0 + g):
            rank = 1 + sum(sig(s[i][k] - s[i][q]) for k in range(n) if k != q)
            rank_pos = 1 + sum(sig(s[i][k] - s[i][q]) for k in range(b0, b0 + g) if k != q)
            ap = ap + rank_pos / rank
        loss = loss + (1 - (ap / g).float())  # PML keeps AP in float32
    return loss / n


NAIVE = {
    "FastAPLoss": lambda x, y: naive_fastap(x, y),
    "FastAPLoss/b5": lambda x, y: naive_fastap(x, y, num_bins=5),
    "HistogramLoss": lambda x, y: naive_histogram(x, y, 0.02),
    "HistogramLoss/n10": lambda x, y: naive_histogram(x, y, 0.2),
    "PNPLoss": lambda x, y: naive_pnp(x, y),
    "PNPLoss/Dq": lambda x, y: naive_pnp(x, y, alpha=4, anneal=0.1, variant="Dq"),
    "PNPLoss/Ib": lambda x, y: naive_pnp(x, y, alpha=4, anneal=0.1, variant="Ib"),
    "RankedListLoss": lambda x, y: naive_ranked_list(x, y, 0.4, 1),
    "RankedListLoss/T": lambda x, y: naive_ranked_list(x, y, 0.6, 3, 0.3, 1.1, 2),
    "DynamicSoftMarginLoss": lambda x, y: naive_dsm(naive_dsm_values(x, y), [0.0] * 10)[0],
    "SmoothAPLoss/t.1": lambda x, y: naive_smooth_ap(x, y, 0.1),
}


@pytest.mark.parametrize("pattern", ["random", "pairs", "singletons_and_pairs", "all_same", "two_samples_same"])
@pytest.mark.parametrize("name", list(NAIVE))
def test_reference_matches_naive_loops(name, pattern):
    torch.manual_seed(1)
    x, y = make(pattern, n=8, d=4)
    if not _pml_pattern_ok(name, pattern):
        return
    y_list = [int(v) for v in y]

    def nv(xr, _y):
        out = NAIVE[name](xr, y_list)
        return out if out is not None else xr.sum() * 0

    assert_same(run(build(name, True), x, y), run(nv, x, y))


def test_dsm_two_steps_match_pml_with_detached_histogram_and_naive():
    """PML cannot take a second step (its hist_ keeps the graph); with hist_ detached between steps it equals
    ours, which stores the histogram detached. The naive loop carries its histogram across the steps too."""
    torch.manual_seed(2)
    ours, theirs = dk.losses.DynamicSoftMarginLoss(backend="reference"), pl.DynamicSoftMarginLoss()
    hist = [0.0] * 10
    for step in range(3):
        x, y = make("random", n=8, d=5)
        a, b = run(ours, x, y), run(theirs, x, y)
        assert_same(a, b)
        theirs.hist_ = theirs.hist_.detach()
        torch.testing.assert_close(ours.hist_, theirs.hist_, **TOL)
        assert not ours.hist_.requires_grad and ours.state_dict() == {}
        vals_x = x.clone().requires_grad_()
        loss, hist = naive_dsm(naive_dsm_values(vals_x, [int(v) for v in y]), hist)
        hist = [float(h) for h in hist]
        torch.testing.assert_close(loss.detach(), a[0], **TOL)


def test_dsm_second_backward_works_where_pml_raises():
    x, y = make("random", n=8, d=5)
    theirs, ours = pl.DynamicSoftMarginLoss(), dk.losses.DynamicSoftMarginLoss()
    for _ in range(2):
        ours(x.clone().requires_grad_(), y).backward()
    theirs(x.clone().requires_grad_(), y).backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        theirs(x.clone().requires_grad_(), y).backward()


@pytest.mark.parametrize("shape", [(6, 6), (5, 8), (8, 5)])
def test_dsm_without_labels_matches_pml_value(shape):
    """Label-free mode (query i vs reference i): the same value as PML's; PML's backward fails (an in-place
    fill_diagonal_ on cdist's output) while ours has a gradient (gradcheck below)."""
    torch.manual_seed(3)
    x = torch.randn(shape[0], 5, dtype=torch.float64)
    ref = x[: shape[1]] + 0.1 * torch.randn(shape[1], 5, dtype=torch.float64) if shape[1] <= shape[0] else \
        torch.cat([x, torch.randn(shape[1] - shape[0], 5, dtype=torch.float64)]) + 0.1
    a = dk.losses.DynamicSoftMarginLoss()(x, ref_emb=ref)
    b = pl.DynamicSoftMarginLoss()(x, ref_emb=ref)
    torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(RuntimeError, match="inplace"):
        pl.DynamicSoftMarginLoss()(x.clone().requires_grad_(), ref_emb=ref).backward()
    assert torch.autograd.gradcheck(lambda a_, r_: dk.functional.dynamic_soft_margin_loss(a_, ref_emb=r_),
                                    (x.clone().requires_grad_(), ref.clone().requires_grad_()))


def test_dsm_ref_emb_and_tuple_match_pml():
    torch.manual_seed(4)
    x, y = make("random", n=7, d=5)
    ref, ref_y = make("random", n=6, d=5)
    assert_same(run(build("DynamicSoftMarginLoss", True), x, y, ref_emb=ref, ref_labels=ref_y),
                run(build("DynamicSoftMarginLoss", False), x, y, ref_emb=ref, ref_labels=ref_y))
    tup = pm.TripletMarginMiner(margin=0.5)(x, y)
    assert_same(run(build("DynamicSoftMarginLoss", True), x, y, tup), run(build("DynamicSoftMarginLoss", False), x, y, tup))


@pytest.mark.parametrize("name", ["FastAPLoss", "HistogramLoss/n10", "SmoothAPLoss/t.1"])
@pytest.mark.parametrize("miner", ["pairs", "triplets"])
def test_miner_tuples_match_pml(name, miner):
    """FastAP / Smooth-AP: PML's miner weights; Histogram: the tuple's triplets (also without labels)."""
    torch.manual_seed(5)
    x, y = make("pairs", n=12, d=6)
    tup = (pm.PairMarginMiner(pos_margin=0.3, neg_margin=0.7) if miner == "pairs" else pm.TripletMarginMiner(0.3))(x, y)
    assert_same(run(build(name, True), x, y, tup), run(build(name, False), x, y, tup))
    if name.startswith("Histogram"):
        assert_same(run(build(name, True), x, None, tup), run(build(name, False), x, None, tup))


@pytest.mark.parametrize("name", ["FastAPLoss", "RankedListLoss", "SmoothAPLoss", "HistogramLoss/n10", "PNPLoss",
                                  "DynamicSoftMarginLoss"])
@pytest.mark.parametrize("reducer", ["SumReducer", "DoNothingReducer", "ThresholdReducer"])
def test_non_default_reducers_and_regularizer_match_pml(name, reducer):
    torch.manual_seed(6)
    x, y = make("pairs", n=10, d=6)
    mk = {"ThresholdReducer": lambda m: m.ThresholdReducer(low=0.05)}.get(reducer, lambda m: getattr(m, reducer)())
    a, b = build(name, True, reducer=mk(dk.reducers)), build(name, False, reducer=mk(pr))
    if reducer == "DoNothingReducer":
        da, db = a(x, y), b(x, y)
        assert da.keys() == db.keys()
        for key in da:
            torch.testing.assert_close(torch.as_tensor(da[key]["losses"]).double().flatten(),
                                       torch.as_tensor(db[key]["losses"]).double().flatten(), **TOL)
            assert da[key]["reduction_type"] == db[key]["reduction_type"]
            if da[key]["indices"] is not None or db[key]["indices"] is not None:
                torch.testing.assert_close(torch.as_tensor(da[key]["indices"]), torch.as_tensor(db[key]["indices"]))
        return
    assert_same(run(a, x, y), run(b, x, y))
    a = build(name, True, embedding_regularizer=dk.regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    b = build(name, False, embedding_regularizer=preg.LpRegularizer(), embedding_reg_weight=0.3)
    assert a.sub_loss_names() == b.sub_loss_names()
    assert_same(run(a, x, y), run(b, x, y))


GRADCHECK = {
    "fastap_loss": dict(), "histogram_loss": dict(n_bins=10), "pnp_loss": dict(anneal=0.3, variant="Iu"),
    "ranked_list_loss": dict(margin=0.5, Tn=2, Tp=1), "dynamic_soft_margin_loss": dict(),
    "smooth_ap_loss": dict(temperature=0.2),
}


@pytest.mark.parametrize("fn", list(GRADCHECK))
def test_gradcheck_reference(fn):
    torch.manual_seed(7)
    x, y = make("pairs", n=8, d=4)
    f = getattr(dk.functional, fn)
    # Smooth-AP's value passes through float32 (PML's AP buffer): finite differences need a wide step there.
    tol = dict(eps=1e-3, atol=2e-4, rtol=1e-2) if fn == "smooth_ap_loss" else {}
    assert torch.autograd.gradcheck(lambda a: f(a, y, backend="reference", **GRADCHECK[fn]).double(),
                                    (x.requires_grad_(),), **tol)


def test_defaults_and_attributes_are_pml():
    for cls, kw in [("FastAPLoss", {}), ("HistogramLoss", {}), ("PNPLoss", {}), ("DynamicSoftMarginLoss", {}),
                    ("SmoothAPLoss", {}), ("RankedListLoss", {"margin": 0.3, "Tn": 1})]:
        a, b = getattr(dk.losses, cls)(**kw), getattr(pl, cls)(**kw)
        for attr in ("num_bins", "num_edges", "delta", "b", "alpha", "anneal", "variant", "min_val", "momentum",
                     "temperature", "margin", "imbalance", "Tp", "Tn"):
            if hasattr(b, attr):
                assert getattr(a, attr) == getattr(b, attr), (cls, attr)
        assert type(a.reducer).__name__ == type(b.reducer).__name__ and a.sub_loss_names() == b.sub_loss_names()
        assert dict(a.state_dict()) == dict(b.state_dict()) == {}
    assert dk.losses.PNPLoss.VARIANTS == pl.PNPLoss.VARIANTS
    assert torch.equal(dk.losses.DynamicSoftMarginLoss().hist_, pl.DynamicSoftMarginLoss().hist_)
    assert dk.losses.HistogramLoss(delta=0.25).delta == 0.25


def test_errors():
    x, y = make("pairs", n=8, d=4)
    for cls, kw in [("FastAPLoss", {}), ("HistogramLoss", {}), ("PNPLoss", {}), ("SmoothAPLoss", {}),
                    ("RankedListLoss", {"margin": 0.3, "Tn": 1})]:
        for mod in (dk.losses, pl):
            with pytest.raises(ValueError, match="ref_emb"):
                getattr(mod, cls)(**kw)(x, y, ref_emb=x.clone(), ref_labels=y)
    tup = pm.PairMarginMiner()(x, y)
    for cls, kw in [("PNPLoss", {}), ("RankedListLoss", {"margin": 0.3, "Tn": 1})]:
        for mod in (dk.losses, pl):
            with pytest.raises(ValueError, match="indices_tuple"):
                getattr(mod, cls)(**kw)(x, y, tup)
    for cls in ("FastAPLoss", "PNPLoss", "SmoothAPLoss"):
        with pytest.raises(ValueError, match="labels"):
            getattr(dk.losses, cls)()(x)
    with pytest.raises(ValueError, match="labels"):
        dk.losses.HistogramLoss()(x)
    for n_bins, delta in [(1, 0.5), (10, 0.4)]:
        for mod in (dk.losses, pl):
            with pytest.raises(AssertionError):
                mod.HistogramLoss(n_bins=n_bins, delta=delta)
    for mod in (dk.losses, pl):
        with pytest.raises(AssertionError):
            mod.RankedListLoss(margin=1, Tn=0, imbalance=2)
        with pytest.raises(ValueError, match="variant"):
            mod.PNPLoss(variant="PNP")
    with pytest.warns(UserWarning, match="Tp or Tn"):
        dk.losses.RankedListLoss(margin=0.1, Tn=6)
    for cls in ("HistogramLoss", "PNPLoss", "SmoothAPLoss"):
        with pytest.raises(ValueError, match="cosine"):
            getattr(dk.losses, cls)(distance="euclidean")(x, y)
    for cls in ("FastAPLoss", "DynamicSoftMarginLoss"):
        with pytest.raises(ValueError, match="LpDistance"):
            getattr(dk.losses, cls)(distance="cosine")(x, y)
        with pytest.raises(ValueError, match="LpDistance"):
            getattr(dk.losses, cls)(distance="euclidean", normalize_embeddings=False)(x, y)
    with pytest.raises(ValueError, match="num_bins"):
        dk.functional.fastap_loss(x, y, num_bins=0)
    with pytest.raises(ValueError, match="anneal"):
        dk.functional.pnp_loss(x, y, anneal=0)
    with pytest.raises(ValueError, match="non-negative"):
        dk.functional.smooth_ap_loss(x, y - 5)


def test_smooth_ap_is_float32_and_inputs_unchanged():
    x, y = make("pairs", n=8, d=4)
    x0 = x.clone()
    loss = dk.losses.SmoothAPLoss()(x, y)
    assert loss.dtype == pl.SmoothAPLoss()(x, y).dtype == torch.float32
    assert torch.equal(x, x0)


def test_ranked_list_other_distance_matches_pml():
    torch.manual_seed(8)
    x, y = make("random", n=9, d=5)
    from pytorch_metric_learning import distances as pd
    for ours, theirs in [("squared_euclidean", pd.LpDistance(power=2)), ("cosine", pd.CosineSimilarity())]:
        a = dk.losses.RankedListLoss(margin=0.3, Tn=1, distance=ours)
        b = pl.RankedListLoss(margin=0.3, Tn=1, distance=theirs)
        assert_same(run(a, x, y), run(b, x, y))
    a = dk.losses.FastAPLoss(distance=pd.LpDistance(), num_bins=6)
    assert_same(run(a, x, y), run(pl.FastAPLoss(distance=pd.LpDistance(), num_bins=6), x, y))


@pytest.mark.parametrize("kw", [dict(margin=0.4, Tn=1), dict(margin=1.5, Tn=1, Tp=1, alpha=0.5)])
def test_ranked_list_ignores_zero_distances_as_pml(kw):
    """PML selects by P*/N* > 0: a duplicate (distance 0) is in neither set, also when α − margin < 0."""
    torch.manual_seed(9)
    x = torch.randn(6, 4, dtype=torch.float64)
    x[3], x[4] = 2 * x[0], x[1]  # same direction: distance 0 after normalisation
    y = torch.tensor([0, 1, 0, 1, 0, 2])
    y2 = torch.tensor([0, 1, 0, 0, 1, 2])  # the duplicates as negatives and as positives
    for labels in (y, y2):
        assert_same(run(dk.losses.RankedListLoss(**kw), x, labels), run(pl.RankedListLoss(**kw), x, labels))


# ------------------------------------------------------------------------------ fused FastAP (Triton)

def _has_triton():
    try:
        return "triton" in dk._registry.implemented("fastap_loss") and \
            dk._registry.unavailable_reason("triton", "cpu") is None
    except Exception:  # noqa: BLE001 - triton missing
        return False


triton_only = pytest.mark.skipif(not _has_triton(), reason="triton (or TRITON_INTERPRET=1) not available")
FUSED_KW = [dict(), dict(num_bins=7, distance="euclidean"), dict(num_bins=3)]


def _both(f, x, y, **kw):
    out = []
    for backend in ("triton", "reference"):
        xr = x.clone().requires_grad_()
        loss = f(xr, y, backend=backend, **kw)
        out.append((loss.detach(), torch.autograd.grad(loss, xr)[0]))
    return out


@triton_only
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kw", FUSED_KW)
def test_fused_fastap_equals_reference(pattern, kw):
    """Under the interpreter in float64: values and gradients equal the reference to 1e-10 (odd N spanning
    several 16-row tiles, every label pattern), also with miner weights."""
    torch.manual_seed(10)
    x, y = make(pattern, n=37, d=19)
    (va, ga), (vb, gb) = _both(dk.functional.fastap_loss, x, y, **kw)
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


@triton_only
def test_fused_fastap_matches_pml_weights_fp32_gradcheck():
    torch.manual_seed(11)
    x, y = make("random", n=21, d=6)
    assert_same(run(dk.losses.FastAPLoss(backend="triton"), x, y), run(pl.FastAPLoss(), x, y))
    tup = pm.PairMarginMiner(pos_margin=0.3, neg_margin=0.7)(x, y)
    assert_same(run(dk.losses.FastAPLoss(backend="triton", num_bins=6), x, y, tup),
                run(pl.FastAPLoss(num_bins=6), x, y, tup))
    (va, ga), (vb, gb) = _both(dk.functional.fastap_loss, x.float(), y)
    assert va.dtype == torch.float32
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    xs, ys = make("pairs", n=9, d=4)
    assert torch.autograd.gradcheck(lambda a: dk.functional.fastap_loss(a, ys, backend="triton", num_bins=5),
                                    (xs.requires_grad_(),))
    with pytest.raises(dk.Unsupported):  # the op contract: only the normalised euclidean distances are fused
        dk._registry.call("fastap_loss", "triton", "cpu", x, y, num_bins=10,
                          distance=dk.distances.Distance("cosine", True))


@triton_only
@pytest.mark.skipif(not __import__("memory").HAS_CLEAR_REFS, reason="needs Linux /proc/self/clear_refs")
def test_fused_fastap_never_allocates_n_by_n():
    """N=160, fp32, forward + backward: the fused form's peak extra memory stays below a quarter of the
    reference's (num_bins+1)·N·N pulse tensor (1.1 MiB); the reference exceeds it."""
    from memory import peak_extra_bytes
    n = 160
    x, y = torch.randn(n, 8), torch.randint(0, 20, (n,))

    def step(backend, xx=x, yy=y):
        xr = xx.clone().requires_grad_()
        dk.functional.fastap_loss(xr, yy, backend=backend).backward()

    step("triton", x[:20], y[:20])
    pulse = 11 * n * n * 4
    fused = peak_extra_bytes(lambda: step("triton"))
    reference = peak_extra_bytes(lambda: step("reference"))
    assert fused < pulse / 4, (fused, pulse)
    assert reference > pulse, (reference, pulse)
