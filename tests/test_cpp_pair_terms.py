"""The ``pair_terms`` op and the contrastive-family losses built on it (dml_kernels/backends/cpp/pair_terms.py,
registered for the ``cuda`` backend): NT-Xent, Circle, ThresholdConsistentMargin, IntraPairVariance, TupletMargin,
SNR contrastive, MarginLoss. No GPU here: the same Python functions run on CPU tensors through the op's CPU
implementation (csrc/cpu/pair_terms_ops.cpp; the per-pair math csrc/pair_terms.h is shared with the CUDA kernels).

The ``ours`` fixture puts them in the registry's ``cpu`` slot for the duration of a test, so the functional API
and PML-named classes run them. Each equals, in float64 at 1e-9, the reference backend (values; gradients to the
embeddings, ref_emb and MarginLoss's β) on the label patterns of SPEC §5, with ref_emb and odd sizes (N not a
multiple of the 32-row block, M past one 4096-reference tile), PML 2.9's classes, and naive Python loops;
gradcheck of the op (q, r, row_stats) and of each loss; opcheck; double backward refused; no N×M tensor and no host
sync (a watch that fails on the reference).
"""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels._pairs import PackedPairMask
from memory import TensorWatch
from patterns import PATTERNS

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

F = dk.functional
TOL = 1e-9
OPS = ("ntxent_loss", "circle_loss", "threshold_consistent_margin_loss", "intra_pair_variance_loss",
       "tuplet_margin_loss", "snr_contrastive_loss", "margin_loss")


def _loaded():
    if _registry.unavailable_reason("cpu", "cpu") is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dml_kernels::pair_terms", "CPU")


pytestmark = [pytest.mark.skipif(not _loaded(), reason="no cpu extension with pair_terms"),
              pytest.mark.usefixtures("one_thread", "ours")]


@pytest.fixture
def ours(monkeypatch):
    """The pair_terms forms in the registry's "cpu" slot (backend="cpu" runs them on CPU tensors)."""
    from dml_kernels.backends.cpp import pair_terms as PT

    for op in OPS:
        monkeypatch.setitem(_registry._IMPLS, (op, "cpu"), getattr(PT, op))
    return PT


def _run(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, backend=backend)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _close(got, want, tol=TOL):
    (v1, g1), (v2, g2) = got, want
    assert v1.dtype == v2.dtype
    assert abs(float(v1) - float(v2)) <= tol * max(1.0, abs(float(v2))), (float(v1), float(v2))
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


# case: (functional, kwargs, takes ref_emb, has a learnable β input)
CASES = {
    "ntxent": (F.ntxent_loss, dict(temperature=0.1), True),
    "ntxent/euclidean": (F.ntxent_loss, dict(distance="euclidean", temperature=0.5), True),
    "ntxent/sq-raw": (F.ntxent_loss, dict(distance="squared_euclidean", normalize_embeddings=False), True),
    "ntxent/dot-raw": (F.ntxent_loss, dict(distance="dot", normalize_embeddings=False, temperature=2.0), True),
    "circle": (F.circle_loss, {}, True),
    "circle/m.25g30": (F.circle_loss, dict(m=0.25, gamma=30), True),
    "tcm": (F.threshold_consistent_margin_loss, {}, False),
    "tcm/m": (F.threshold_consistent_margin_loss, dict(margin_plus=0.3, margin_minus=-0.2, lambda_plus=2.0), False),
    "ipv": (F.intra_pair_variance_loss, dict(pos_eps=0.1, neg_eps=0.05), True),
    "ipv/euclidean": (F.intra_pair_variance_loss, dict(distance="euclidean"), True),
    "ipv/euclidean-raw": (F.intra_pair_variance_loss, dict(distance="euclidean", normalize_embeddings=False), True),
    "ipv/sq-raw": (F.intra_pair_variance_loss, dict(distance="squared_euclidean", normalize_embeddings=False), True),
    "ipv/dot-raw": (F.intra_pair_variance_loss, dict(distance="dot", normalize_embeddings=False, pos_eps=0.2), True),
    "tuplet": (F.tuplet_margin_loss, dict(scale=8), True),
    "tuplet/m": (F.tuplet_margin_loss, dict(margin=20.0, scale=64), True),
    "snr": (F.signal_to_noise_ratio_contrastive_loss, dict(neg_margin=1.2), True),
    "snr/raw": (F.signal_to_noise_ratio_contrastive_loss, dict(pos_margin=0.2, normalize_embeddings=False), True),
    "margin": (F.margin_loss, dict(beta=None), True),
    "margin/scalar-learn": (F.margin_loss, dict(beta="scalar", learn_beta=True, nu=0.3), True),
    "margin/class-learn": (F.margin_loss, dict(beta="class", learn_beta=True, nu=0.2, margin=0.5), True),
    "margin/cosine": (F.margin_loss, dict(beta="class", distance="cosine", margin=0.1), True),
    "margin/sq-raw": (F.margin_loss, dict(beta="scalar", distance="squared_euclidean", normalize_embeddings=False,
                                          margin=2.0, learn_beta=True, nu=0.1), True),
}


def _call(case, classes):
    """(fn(*tensors, backend), extra tensors) of a case: MarginLoss's β is an input (its gradient is checked)."""
    fn, kw, _ = CASES[case]
    kw = dict(kw)
    if "beta" not in kw:
        return (lambda e, *r, backend, **more: fn(e, *r, backend=backend, **kw, **more)), []
    kind = kw.pop("beta")
    beta = torch.full((1,), 0.8, dtype=torch.float64) if kind == "scalar" else torch.linspace(
        0.6, 1.2, classes, dtype=torch.float64)
    return (lambda b, e, *r, backend, **more: fn(e, *r, beta=b, backend=backend, **kw, **more)), [beta]


def _data(n, d, m=None, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    if m is None:
        return x, None, None
    return x, torch.randn(m, d, dtype=torch.float64, generator=g), torch.randint(0, classes, (m,), generator=g)


def _same(case, x, y, r=None, ry=None, tol=TOL):
    """Our form == the reference (value, gradients to x, r and β)."""
    classes = int(max(y.max(), -1 if ry is None else ry.max())) + 1
    fn, extra = _call(case, classes)

    def f(*t, backend):  # t: (β,) + (x,) + (r,)
        if r is None:
            return fn(*t, y, backend=backend)
        return fn(*t[:-1], y, None, t[-1], ry, backend=backend)

    inputs = extra + [x] + ([] if r is None else [r])
    _close(_run(f, inputs, "cpu"), _run(f, inputs, "reference"), tol)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_equals_reference_on_patterns(case, pattern):
    y = PATTERNS[pattern](9)
    x, _, _ = _data(len(y), 5, seed=len(y))
    _same(case, x, y)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
@pytest.mark.parametrize("shape", [(33, 7), (5, 40), (1, 3)], ids=str)
def test_equals_reference_with_ref_emb(case, shape):
    n, m = shape
    x, r, ry = _data(n, 6, m, classes=3, seed=n + m)
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n))
    _same(case, x, y, r, ry)


def test_rows_past_one_block_and_references_past_one_tile():
    """N = 70 (blocks of 32: a ragged third), M = 4099 references (tiles of 4096: a ragged second) — ref mode."""
    for case in ("ntxent", "circle", "ipv/euclidean", "tuplet", "snr"):  # (the reference's margin: 50M triplets)
        x, r, ry = _data(3, 4, 4099, classes=4, seed=3)
        y = torch.tensor([0, 1, 2])
        _same(case, x, y, r, ry)
    x, _, _ = _data(70, 4, seed=4)
    for case in ("circle", "tcm", "ipv", "margin", "snr"):
        _same(case, x, torch.arange(70) % 5)


@pytest.mark.parametrize("case", ["ntxent", "circle", "ipv", "tuplet", "snr", "margin/class-learn", "tcm"])
def test_two_threads(case):
    """Blocks on two intra-op threads (per-thread dL/d row_stats buffers summed in thread order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, r, ry = _data(70, 5, 90, classes=4, seed=5)
        y = torch.arange(70) % 4
        if CASES[case][2]:
            _same(case, x, y, r, ry)
        _same(case, x, y)
    finally:
        torch.set_num_threads(threads)


def test_packed_pairs(ours):
    """A PackedPairMask (MultiSimilarityMiner's pairs) through the op's bit masks: Circle, NT-Xent, TCM, IPV."""
    x, r, ry = _data(13, 5, 11, classes=3, seed=9)
    y = torch.arange(13) % 3
    for rr, rl in ((None, None), (r, ry)):
        mask = dk.functional.multi_similarity_mask(x, y, rr, rl, epsilon=0.3, backend="reference")
        assert isinstance(mask, PackedPairMask)
        for fn in (F.circle_loss, F.ntxent_loss, F.intra_pair_variance_loss):
            def f(e, *t, backend, fn=fn, mask=mask, rl=rl):
                return fn(e, y, mask, *((t[0], rl) if t else ()), backend=backend)
            ins = [x] if rr is None else [x, rr]
            _close(_run(f, ins, "cpu"), _run(f, ins, "reference"))
    mask = dk.functional.multi_similarity_mask(x, y, epsilon=0.3, backend="reference")
    f = lambda e, backend: F.threshold_consistent_margin_loss(e, y, mask, margin_plus=0.5, margin_minus=0.0,  # noqa: E731
                                                             backend=backend)
    _close(_run(f, [x], "cpu"), _run(f, [x], "reference"))


def test_index_tuples():
    """PML tuples: NT-Xent / TCM / IPV / MarginLoss (triplets) take the O(T) torch paths; Circle gets them as a
    PackedPairMask (the API de-duplicates, as PML's matrix form); TupletMargin, SNR refuse them (Unsupported) and
    ``auto`` would fall back to the reference."""
    x, _, _ = _data(12, 5, seed=2)
    y = torch.arange(12) % 3
    pairs = pm.MultiSimilarityMiner(0.3)(x, y)
    for fn, kw in ((F.ntxent_loss, {}), (F.threshold_consistent_margin_loss, {}), (F.intra_pair_variance_loss, {})):
        f = lambda e, backend, fn=fn, kw=kw: fn(e, y, pairs, backend=backend, **kw)  # noqa: E731
        _close(_run(f, [x], "cpu"), _run(f, [x], "reference"))
    trip = pm.TripletMarginMiner(0.5)(x, y)
    beta = torch.linspace(0.6, 1.2, 3, dtype=torch.float64)
    f = lambda b, e, backend: F.margin_loss(e, y, trip, beta=b, learn_beta=True, nu=0.1, backend=backend)  # noqa: E731
    _close(_run(f, [beta, x], "cpu"), _run(f, [beta, x], "reference"))
    f = lambda e, backend: F.circle_loss(e, y, pairs, gamma=8, backend=backend)  # noqa: E731  (packed by the API)
    _close(_run(f, [x], "cpu"), _run(f, [x], "reference"))
    for fn in (F.tuplet_margin_loss, F.signal_to_noise_ratio_contrastive_loss):
        with pytest.raises(_registry.Unsupported):
            fn(x, y, pairs, backend="cpu")


# --------------------------------------------------------------------------------- PML 2.9 and naive loops


def _pml_cases():
    lp = pd.LpDistance()
    return {
        "NTXent": (dk.losses.NTXentLoss(backend="cpu"), pl.NTXentLoss()),
        "NTXent/L2": (dk.losses.NTXentLoss(0.3, distance=pd.LpDistance(), backend="cpu"),
                      pl.NTXentLoss(0.3, distance=lp)),
        "Circle": (dk.losses.CircleLoss(m=0.3, gamma=10, backend="cpu"), pl.CircleLoss(m=0.3, gamma=10)),
        "TCM": (dk.losses.ThresholdConsistentMarginLoss(backend="cpu"), pl.ThresholdConsistentMarginLoss()),
        "IPV": (dk.losses.IntraPairVarianceLoss(backend="cpu"), pl.IntraPairVarianceLoss()),
        "IPV/L2": (dk.losses.IntraPairVarianceLoss(distance=pd.LpDistance(), backend="cpu"),
                   pl.IntraPairVarianceLoss(distance=lp)),
        "Tuplet": (dk.losses.TupletMarginLoss(scale=16, backend="cpu"), pl.TupletMarginLoss(scale=16)),
        "SNR": (dk.losses.SignalToNoiseRatioContrastiveLoss(neg_margin=1.1, backend="cpu"),
                pl.SignalToNoiseRatioContrastiveLoss(neg_margin=1.1)),
    }


@pytest.mark.parametrize("case", list(_pml_cases()))
def test_matches_pml(case):
    ours, theirs = _pml_cases()[case]
    x, r, ry = _data(19, 6, 15, classes=4, seed=7)
    y = torch.arange(19) % 4
    calls = [lambda L, e, rr: L(e, y)]
    if case != "TCM":  # PML's TCM has no ref_emb
        calls.append(lambda L, e, rr: L(e, y, ref_emb=rr, ref_labels=ry))
    for call in calls:
        got, want = [_run(lambda e, rr, backend, L=L: call(L, e, rr), (x, r), None) for L in (ours, theirs)]
        _close(got, want)


@pytest.mark.parametrize("learn", [(False, 0.0, 1), (True, 0.3, 1), (True, 0.2, 4)], ids=str)
def test_margin_matches_pml_with_beta_gradient(learn):
    learn_beta, nu, classes = learn
    x, r, ry = _data(14, 5, 9, classes=4, seed=1)
    y = torch.arange(14) % 4
    grads = []
    for which in ("ours", "pml"):
        kw = dict(margin=0.2, nu=nu, beta=1.0, learn_beta=learn_beta, num_classes=classes if classes > 1 else None)
        L = dk.losses.MarginLoss(backend="cpu", **kw) if which == "ours" else pl.MarginLoss(**kw)
        L = L.double()
        e = x.clone().requires_grad_()
        rr = r.clone().requires_grad_()
        loss = L(e, y) + L(e, y, ref_emb=rr, ref_labels=ry)
        loss.backward()
        grads.append((loss.detach(), [e.grad, rr.grad] + ([L.beta.grad] if learn_beta else [])))
    _close(*grads)


def _sim(a, b):
    return (a @ b) / (a.norm() * b.norm())


def _sets(i, y, ry, self_mode):
    return ([k for k in range(len(ry)) if ry[k] == y[i] and not (self_mode and k == i)],
            [k for k in range(len(ry)) if ry[k] != y[i]])


def _lse(vals):
    return torch.log(sum(torch.exp(v) for v in vals))


def naive(name, x, y, r, ry):
    """Plain loops over each loss's formula (cosine; SNR on its own distance; Margin euclidean, per-class β)."""
    self_mode = r is None
    r, ry = (x, y) if self_mode else (r, ry)
    rows = [_sets(i, y, ry, self_mode) for i in range(len(y))]
    npos, nneg = sum(len(p) for p, _ in rows), sum(len(n) for _, n in rows)
    zero = (x * 0).sum()
    if name == "ntxent":
        t = [(-_sim(x[i], r[p]) / 0.2 + _lse([_sim(x[i], r[p]) / 0.2] + [_sim(x[i], r[k]) / 0.2 for k in N]))
             if N else zero for i, (P, N) in enumerate(rows) for p in P]
        return zero if not t or not nneg or (npos <= 1 and nneg <= 1) else sum(t) / len(t)
    if name == "circle":
        vals = []
        for i, (P, N) in enumerate(rows):
            if P and N:
                s = {k: _sim(x[i], r[k]) for k in P + N}
                lp = _lse([-8 * max(1.4 - float(s[k].detach()), 0) * (s[k] - 0.6) for k in P])
                ln = _lse([8 * max(float(s[k].detach()) + 0.4, 0) * (s[k] - 0.4) for k in N])
                vals.append(torch.nn.functional.softplus(lp + ln))
        vals = [v for v in vals if float(v) > 0]
        return sum(vals) / len(vals) if vals else zero
    if name == "tuplet":
        t = []
        for i, (P, N) in enumerate(rows):
            for p in P:
                c = torch.cos(torch.acos(_sim(x[i], r[p])) - math.radians(5.73))
                t.append(torch.log(1 + sum(torch.exp(8 * (_sim(x[i], r[k]) - c)) for k in N)) if N else zero)
        return zero if not t or not nneg or (npos <= 1 and nneg <= 1) else sum(t) / len(t)
    if name == "snr":
        def d(a, b):
            return torch.var(a - b) / torch.var(a)
        hp = [torch.relu(d(x[i], r[k])) for i, (P, _) in enumerate(rows) for k in P]
        hn = [torch.relu(1.1 - d(x[i], r[k])) for i, (_, N) in enumerate(rows) for k in N]
        out = zero
        for h in (hp, hn):
            nz = [v for v in h if float(v) > 0]
            out = out + (sum(nz) / len(nz) if nz else 0)
        return out
    if name == "margin":
        beta = torch.linspace(0.6, 1.2, 8, dtype=torch.float64)
        xn, rn = x / x.norm(dim=1, keepdim=True), r / r.norm(dim=1, keepdim=True)
        total, div = zero, 0
        for a, (P, N) in enumerate(rows):
            b = beta[y[a]]
            for p in P:
                for n in N:
                    hp = torch.relu((xn[a] - rn[p]).norm() - b + 0.2)
                    hn = torch.relu(b - (xn[a] - rn[n]).norm() + 0.2)
                    total, div = total + hp + hn, div + int(hp > 0) + int(hn > 0)
        return total / div if div else zero
    # ipv
    pos = [_sim(x[i], r[k]) for i, (P, _) in enumerate(rows) for k in P]
    neg = [_sim(x[i], r[k]) for i, (_, N) in enumerate(rows) for k in N]
    mp, mn = sum(pos) / len(pos), sum(neg) / len(neg)
    return (sum(torch.relu(0.9 * mp - s) ** 2 for s in pos) / len(pos)
            + sum(torch.relu(s - 1.2 * mn) ** 2 for s in neg) / len(neg))


NAIVE_KW = {"ntxent": (F.ntxent_loss, dict(temperature=0.2)), "circle": (F.circle_loss, dict(gamma=8.0)),
            "tuplet": (F.tuplet_margin_loss, dict(scale=8)),
            "snr": (F.signal_to_noise_ratio_contrastive_loss, dict(neg_margin=1.1, normalize_embeddings=False)),
            "ipv": (F.intra_pair_variance_loss, dict(pos_eps=0.1, neg_eps=0.2))}


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("name", list(NAIVE_KW) + ["margin"])
def test_naive_loops(name, with_ref):
    x, r, ry = _data(9, 4, 7, classes=3, seed=11)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])
    r, ry = (r, ry) if with_ref else (None, None)
    ins = [x] + ([r] if with_ref else [])
    if name == "margin":
        beta = torch.linspace(0.6, 1.2, 8, dtype=torch.float64)
        got = _run(lambda e, *t, backend: F.margin_loss(e, y, None, *t, *((ry,) if t else ()), beta=beta,
                                                        backend=backend), ins, "cpu")
    else:
        fn, kw = NAIVE_KW[name]
        got = _run(lambda e, *t, backend: fn(e, y, None, *t, *((ry,) if t else ()), backend=backend, **kw), ins, "cpu")
    want = _run(lambda e, *t, backend: naive(name, e, y, t[0] if t else None, ry), ins, None)
    _close(got, want)


def test_tcm_naive_loop():
    x, _, _ = _data(10, 4, seed=12)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 0])
    rows = [_sets(i, y, y, True) for i in range(10)]

    def naive_tcm(e, backend):
        pos = [0.3 - _sim(e[i], e[k]) for i, (P, _) in enumerate(rows) for k in P if float(_sim(e[i], e[k])) <= 0.3]
        neg = [_sim(e[i], e[k]) + 0.1 for i, (_, N) in enumerate(rows) for k in N if float(_sim(e[i], e[k])) >= -0.1]
        return (e * 0).sum() + sum(pos) / len(pos) + sum(neg) / len(neg)

    got = _run(lambda e, backend: F.threshold_consistent_margin_loss(e, y, margin_plus=0.3, margin_minus=-0.1,
                                                                     backend=backend), [x], "cpu")
    _close(got, _run(naive_tcm, [x], None))


# --------------------------------------------------------------------------------- the op: gradcheck, opcheck


# loss code: (params, row statistics of a tiny case (K, N) or None, dist codes)
def _op_cases():
    PT = pytest.importorskip("dml_kernels.backends.cpp.pair_terms")
    return {
        "values": (PT.VALUES, [], 0, (0, 1, 2)),
        "ntxent": (PT.NTXENT, [2.5], 1, (0, 1)),
        "circle": (PT.CIRCLE, [0.25, 3.0], 0, (0, 2)),
        "tcm": (PT.TCM, [0.4, -0.2], 0, (0,)),
        "ipv": (PT.IPV, [-1.0, 0.9, 1.0, -1.05], 2, (0, 1, 2)),
        "tuplet": (PT.TUPLET, [4.0, math.cos(0.1), math.sin(0.1)], 1, (0,)),
        "snr": (PT.SNR, [0.3, 1.5], 1, (2,)),
        "margin": (PT.MARGIN, [1.0, 0.6], 1, (1, 2)),
    }


def _op_inputs(loss, with_ref, dist, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, m, d = 7, 5, 3
    q = torch.randn(n, d, dtype=torch.float64, generator=g)
    r = torch.randn(m, d, dtype=torch.float64, generator=g) if with_ref else None
    if dist == 0:  # similarity values in (−1, 1) (TupletMargin's acos), but not normalised: radial gradients count
        q = 0.6 * q / q.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(n, 1, dtype=torch.float64, generator=g))
        r = None if r is None else 0.6 * r / r.norm(dim=1, keepdim=True)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    ry = torch.tensor([0, 1, 1, 3, 2]) if with_ref else None
    return q, r, y, ry, g


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("case", ["values", "ntxent", "tcm", "ipv", "tuplet", "snr", "margin"])
def test_op_gradcheck(case, with_ref, ours):
    """d sums / d (q, r, row_stats) of the op against finite differences, every distance the loss uses. (Circle's
    gradient is not the derivative of its value: its [·]₊ weights are constants, as PML detaches them — it is
    checked against the reference's, test_equals_reference_*.)"""
    loss, params, k, dists = _op_cases()[case]
    for dist in dists:
        q, r, y, ry, g = _op_inputs(loss, with_ref, dist)
        stats = (torch.rand(k, q.shape[0], dtype=torch.float64, generator=g) + 0.5) if k else q.new_zeros(0, 7)
        if case == "margin":
            stats = stats * 0.6
        leaves = [q.requires_grad_(), stats.requires_grad_()] + ([r.requires_grad_()] if with_ref else [])

        def f(q, s, *rr):
            sums, _ = ours.pair_terms(q, rr[0] if rr else None, y, ry, (None, None), dist, loss, params, s)
            return sums

        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", [c for c in list(CASES)[::2] if not c.startswith("circle")])
def test_loss_gradcheck(case):
    x, r, ry = _data(6, 4, 5, classes=3, seed=21)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    fn, extra = _call(case, 3)
    with_ref = CASES[case][2]
    inputs = [t.requires_grad_() for t in extra + [x] + ([r] if with_ref else [])]

    def f(*t):
        return fn(*t, y, backend="cpu") if not with_ref else fn(*t[:-1], y, None, t[-1], ry, backend="cpu")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_opcheck(with_ref, ours):
    for case, (loss, params, k, dists) in _op_cases().items():
        q, r, y, ry, g = _op_inputs(loss, with_ref, dists[0])
        stats = torch.rand(k, q.shape[0], dtype=torch.float64, generator=g) + 0.5
        args = (q.requires_grad_(), None if r is None else r.requires_grad_(), y, ry, None, None, dists[0], loss,
                [float(p) for p in params], stats.requires_grad_())
        ours.ensure_registered()
        # + AOT dispatch (static) for one loss with row statistics; schema, fake, autograd registration for all
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(torch.ops.dml_kernels.pair_terms.default, args,
                              test_utils=utils + (("test_aot_dispatch_static",) if case == "ipv" else ()))


def test_op_packed_bits_equal_label_masks(ours):
    """The op on packed bits of the label masks == the op on the labels (sums and counts)."""
    from dml_kernels._pairs import pack_bits

    q, r, y, ry, _ = _op_inputs(0, True, 0)
    pos = y[:, None] == ry[None, :]
    bits = (pack_bits(pos), pack_bits(~pos))
    for loss, params, k, dists in _op_cases().values():
        stats = torch.rand(k, 7, dtype=torch.float64) + 0.5
        a = ours.pair_terms(q, r, y, ry, (None, None), dists[0], loss, params, stats)
        b = ours.pair_terms(q, r, None, None, bits, dists[0], loss, params, stats)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=0, atol=1e-14)


def test_bad_inputs_name_the_argument(ours):
    q = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="row_stats"):
        ours.pair_terms(q, None, y, None, (None, None), 0, ours.NTXENT, [1.0], q.new_zeros(2, 4))
    with pytest.raises(RuntimeError, match="loss code"):
        ours.pair_terms(q, None, y, None, (None, None), 0, 99, [], q.new_zeros(0, 4))
    with pytest.raises(RuntimeError, match="labels"):
        ours.pair_terms(q, None, y[:3], None, (None, None), 0, ours.VALUES, [], q.new_zeros(0, 4))


@pytest.mark.parametrize("case", ["ntxent", "circle", "tcm", "ipv", "tuplet", "snr", "margin/class-learn"])
def test_double_backward_refused_and_inputs_untouched(case):
    x, _, _ = _data(8, 4, seed=3)
    y = torch.arange(8) % 3
    fn, extra = _call(case, 3)
    before = [t.clone() for t in extra + [x]]
    leaves = [t.requires_grad_() for t in extra + [x]]
    loss = fn(*leaves, y, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, leaves[-1], create_graph=True)
    for a, b in zip(before, extra + [x]):
        assert torch.equal(a, b.detach())


# --------------------------------------------------------------------------------- memory, syncs

N, M, D = 96, 80, 3  # fp64: one N×M matrix is 61440 bytes; the O((N + M)·D) buffers are ≤ 4224


def _watched(case, backend, with_ref):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(M, D, dtype=torch.float64, generator=g, requires_grad=True)
    y, ry = torch.randint(0, 6, (N,), generator=g), torch.randint(0, 6, (M,), generator=g)
    fn, extra = _call(case, 6)
    extra = [t.requires_grad_() for t in extra]
    args = (y, None, r, ry) if with_ref else (y,)
    with TensorWatch() as w:
        fn(*extra, x, *args, backend=backend, check_inputs=False).backward()
    return w


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("case", ["ntxent", "ntxent/sq-raw", "circle", "tcm", "ipv", "ipv/euclidean", "tuplet", "snr",
                                  "margin", "margin/class-learn"])
def test_no_pairwise_buffer_and_no_host_sync(case, with_ref):
    """Forward + backward: no tensor of an eighth of the N×M (N×N) fp64 matrix, no host-syncing op; the same watch sees the
    reference's pairwise buffers (it can fail)."""
    if with_ref and not CASES[case][2]:
        pytest.skip("ThresholdConsistentMarginLoss has no ref_emb")
    limit = N * (M if with_ref else N)
    assert _watched(case, "reference", with_ref).largest >= limit
    w = _watched(case, "cpu", with_ref)
    assert w.largest < limit, (w.largest, w.largest_op)  # bytes: an eighth of the fp64 matrix
    assert not w.syncs, w.syncs
