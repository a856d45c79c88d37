"""TupletMargin, MarginLoss and the SNR contrastive loss on the Triton pair engine
(backends/triton/pair_margin_losses.py).

Equal in float64 (1e-9: values, gradients of x, ref_emb and MarginLoss's β — one or per class, learn_beta False /
True) to the reference op and to PML 2.9's classes on the label patterns of SPEC §5, with and without a reference
set, with miners' tuples; equal to independent naive loops written here; gradcheck; the fused forms allocate no
N×M tensor and never sync with the host (a watch that fails on the reference). Shapes are odd and span several
16 × 16 interpreter tiles. Tested under the Triton interpreter, not on a GPU.
"""
import itertools
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from conftest import DEVICE
from memory import TensorWatch
from patterns import PATTERNS

F = dk.functional
TOL = 1e-9
HAS_TRITON = "triton" in _registry.implemented("margin_loss") and _registry.unavailable_reason("triton", DEVICE) is None
pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available here"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # the interpreter's masked-out sqrt / log


def _beta(v=1.2, c=None, grad=False):
    b = torch.full((c or 1,), float(v), dtype=torch.float64)
    if c:
        b = b + 0.1 * torch.arange(c, dtype=torch.float64)  # distinct per-class values
    return b.to(DEVICE).requires_grad_(grad)


# (functional name, keyword arguments)
CONFIGS = {
    "tuplet": ("tuplet_margin_loss", [dict(), dict(margin=10.0, scale=8)]),
    "snr": ("signal_to_noise_ratio_contrastive_loss", [dict(), dict(pos_margin=0.3, neg_margin=1.5),
                                                       dict(normalize_embeddings=False, neg_margin=1.2)]),
    "margin": ("margin_loss", [dict(beta=1.2), dict(beta=0.3, margin=0.1, distance="cosine"),
                               dict(beta="class", learn_beta=True, nu=0.3),
                               dict(beta=0.9, learn_beta=True, nu=0.2, distance="squared_euclidean",
                                    normalize_embeddings=False)]),
}
PATTERN_NAMES = ["random", "all_same", "all_distinct", "singletons_and_pairs", "pairs", "one_sample",
                 "two_samples_same", "two_samples_distinct"]


def _data(pattern, n=19, d=7, m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = PATTERNS[pattern](n)
    x = torch.randn(len(labels), d, dtype=torch.float64, generator=g)
    if m is None:
        return x.to(DEVICE), labels.to(DEVICE), None, None
    ref = torch.randn(m, d, dtype=torch.float64, generator=g)
    return x.to(DEVICE), labels.to(DEVICE), ref.to(DEVICE), torch.randint(0, 3, (m,), generator=g).to(DEVICE)


def _run(key, k, backend, x, y, ref=None, ry=None, tuple_=None, **over):
    """(loss, [dx, (dref), (dβ)]) of configuration k of ``key``; β (when learnable) is a leaf too."""
    fn, kw = CONFIGS[key][0], dict(CONFIGS[key][1][k], **over)
    leaves = [x.detach().clone().requires_grad_()]
    extra = {}
    if ref is not None:
        leaves.append(ref.detach().clone().requires_grad_())
        extra = dict(ref_emb=leaves[-1], ref_labels=ry)
    if "beta" in kw:
        c = int(max(int(y.max()), 0 if ry is None else int(ry.max()))) + 1 if kw["beta"] == "class" else None
        kw["beta"] = _beta(1.1 if c else kw["beta"], c, grad=True)
        leaves.append(kw["beta"])
    loss = getattr(F, fn)(leaves[0], y, tuple_, backend=backend, **kw, **extra)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def _close(got, want, tol=TOL):
    assert torch.isfinite(got[0]) and abs(float(got[0]) - float(want[0])) <= tol * max(1.0, abs(float(want[0]))), \
        (float(got[0]), float(want[0]))
    for g, w in zip(got[1], want[1]):
        assert torch.isfinite(g).all()
        err = float((g - w.to(g.dtype)).abs().max())
        assert err <= tol * max(1.0, float(w.abs().max())), err


# ------------------------------------------------------------------------------------- equal to the reference


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_equals_reference_patterns(key, pattern):
    """Every label pattern, self mode, the default configuration (per-class learnable β for MarginLoss); N=19 D=7."""
    k = 2 if key == "margin" else 0
    x, y, _, _ = _data(pattern)
    _close(_run(key, k, "triton", x, y), _run(key, k, "reference", x, y))


@pytest.mark.parametrize("key,k", [(key, k) for key in CONFIGS for k in range(len(CONFIGS[key][1]))])
def test_equals_reference_configs_with_ref(key, k):
    """Every configuration, in self mode (N=17) and with a reference set (M=21 with classes the queries lack)."""
    x, y, ref, ry = _data("random", n=17, m=21, seed=k + 3)
    _close(_run(key, k, "triton", x, y), _run(key, k, "reference", x, y))
    _close(_run(key, k, "triton", x, y, ref, ry), _run(key, k, "reference", x, y, ref, ry))


@pytest.mark.parametrize("key", ["tuplet", "snr", "margin"])
def test_miner_tuples(key):
    """A miner's tuple: pairs (PairMarginMiner) for TupletMargin / SNR; for MarginLoss a triplet miner's triplets
    and the pairs PML turns into triplets (every (a, p, n) sharing an anchor), with per-class learnable β."""
    x, y, _, _ = _data("random", seed=5)
    tuples = [dk.miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)]
    k = 0
    if key == "margin":
        k = 2
        tuples.append(dk.miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(x, y))
    for t in tuples:
        _close(_run(key, k, "triton", x, y, tuple_=t), _run(key, k, "reference", x, y, tuple_=t))


def test_margin_triplets_per_anchor_and_empty():
    """triplets_per_anchor sampling (torch's RNG, the same draw for both) and an empty triplet tuple."""
    x, y, ref, ry = _data("random", n=11, m=9, seed=6)
    got = (torch.manual_seed(3), _run("margin", 2, "triton", x, y, ref, ry, triplets_per_anchor=2))[1]
    want = (torch.manual_seed(3), _run("margin", 2, "reference", x, y, ref, ry, triplets_per_anchor=2))[1]
    _close(got, want)
    empty = tuple(torch.zeros(0, dtype=torch.long, device=DEVICE) for _ in range(3))
    got = _run("margin", 2, "triton", x, y, tuple_=empty)
    assert float(got[0]) == 0 and all(float(g.abs().max()) == 0 for g in got[1])


@pytest.mark.parametrize("key", ["tuplet", "snr"])
def test_repeated_pairs_are_unsupported(key):
    """PML counts a repeated pair of a tuple twice; these forms do not: they refuse, auto falls back."""
    x = torch.randn(9, 5, dtype=torch.float64, device=DEVICE)
    y = torch.arange(9, device=DEVICE) % 3
    t = (torch.tensor([0, 0, 1]), torch.tensor([3, 3, 4]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(_registry.Unsupported):
        getattr(F, CONFIGS[key][0])(x, y, t, backend="triton")
    _close(_run(key, 0, "auto", x, y, tuple_=t), _run(key, 0, "reference", x, y, tuple_=t))


@pytest.mark.parametrize("key", ["tuplet", "snr"])
def test_few_pairs_rule(key):
    """PML's "≤1 positive and ≤1 negative pair → 0": one query, two references (one of each) gives 0; with two
    queries (4 pairs) it does not apply."""
    x, _, ref, _ = _data("random", n=2, m=2, seed=13)
    ry = torch.tensor([0, 1], device=DEVICE)
    for q in (x[:1], x):
        y = torch.zeros(len(q), dtype=torch.long, device=DEVICE)
        got, want = _run(key, 0, "triton", q, y, ref, ry), _run(key, 0, "reference", q, y, ref, ry)
        _close(got, want)
        assert (float(want[0]) == 0) == (len(q) == 1)


def test_snr_one_feature_is_unsupported():
    with pytest.raises(_registry.Unsupported, match="1-feature"):
        F.signal_to_noise_ratio_contrastive_loss(torch.randn(5, 1, device=DEVICE), torch.arange(5) % 2,
                                                 backend="triton")


# ------------------------------------------------------------------------------------- PML 2.9


PML_CLASSES = {"tuplet": ("TupletMarginLoss", dict(margin=10.0, scale=8)),
               "snr": ("SignalToNoiseRatioContrastiveLoss", dict(pos_margin=0.2, neg_margin=1.3)),
               "margin": ("MarginLoss", dict(margin=0.2, beta=1.0)),
               "margin_learn": ("MarginLoss", dict(margin=0.2, beta=1.0, learn_beta=True, nu=0.3)),
               "margin_class": ("MarginLoss", dict(margin=0.2, beta=1.0, learn_beta=True, nu=0.3, num_classes=3))}


@pytest.mark.parametrize("case", list(PML_CLASSES))
def test_modules_equal_pml(case):
    """dk.losses.<Class>(backend="triton") equals PML 2.9's class in float64 (1e-9): loss, x gradient, ref_emb
    gradient and β gradient, without a tuple, with a reference set, and with a miner's tuple."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    pm = pytest.importorskip("pytorch_metric_learning.miners")
    cls, kw = PML_CLASSES[case]
    x, y, ref, ry = _data("random", n=17, m=18, seed=21)
    x, y, ref, ry = x.cpu(), y.cpu(), ref.cpu(), ry.cpu()
    miner = pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    for tup, with_ref in ((None, False), (None, True), (miner(x, y), False)):
        out = []
        for loss_fn in (getattr(dk.losses, cls)(backend="triton", **kw), getattr(pl, cls)(**kw)):
            if kw.get("learn_beta"):  # PML's float32 β, as float64 in both: a 1e-9 comparison of its gradient
                loss_fn.beta = torch.nn.Parameter(loss_fn.beta.detach().double())
            ours = loss_fn.__module__.startswith("dml")
            leaves = [x.clone().requires_grad_()] + ([ref.clone().requires_grad_()] if with_ref else [])
            args = [leaf.to(DEVICE) if ours else leaf for leaf in leaves]
            extra = dict(ref_emb=args[1], ref_labels=ry.to(args[1].device)) if with_ref else {}
            loss = loss_fn(args[0], y.to(args[0].device), tup, **extra)
            params = [p for p in loss_fn.parameters()]
            grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
            out.append((loss.detach().cpu(), [torch.zeros(1) if g is None else g.cpu() for g in grads]))
        assert len(out[0][1]) == len(out[1][1])
        _close(out[0], out[1])


# ------------------------------------------------------------------------------------- naive loops


def _cos(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def _pairs(y, ry):
    self_mode = ry is None
    ry = y if self_mode else ry
    pos = [(i, k) for i in range(len(y)) for k in range(len(ry)) if ry[k] == y[i] and not (self_mode and i == k)]
    neg = [(i, k) for i in range(len(y)) for k in range(len(ry)) if ry[k] != y[i]]
    return pos, neg


def naive_tuplet(x, y, ref=None, ry=None, margin=5.73, scale=64.0):
    r = x if ref is None else ref
    pos, neg = _pairs(y, ry)
    if not pos or not neg or (len(pos) <= 1 and len(neg) <= 1):
        return (x * 0).sum()
    total = 0
    for a, p in pos:
        theta = torch.acos(_cos(x[a], r[p]))
        terms = [torch.exp(scale * (_cos(x[a], r[n]) - torch.cos(theta - math.radians(margin))))
                 for a2, n in neg if a2 == a]
        total = total + (torch.log(1 + sum(terms)) if terms else 0)
    return total / len(pos)


def naive_snr(x, y, ref=None, ry=None, pos_margin=0.0, neg_margin=1.0):
    def var(v):
        mu = sum(v) / len(v)
        return sum((e - mu) ** 2 for e in v) / (len(v) - 1)

    xn = [row / row.norm() for row in x]
    rn = xn if ref is None else [row / row.norm() for row in ref]
    pos, neg = _pairs(y, ry)
    if len(pos) <= 1 and len(neg) <= 1:
        return (x * 0).sum()
    d = {(i, k): var(list(xn[i] - rn[k])) / var(list(xn[i])) for i, k in pos + neg}
    total = (x * 0).sum()
    for terms in ([torch.relu(d[q] - pos_margin) for q in pos], [torch.relu(neg_margin - d[q]) for q in neg]):
        kept = [t for t in terms if t > 0]
        if kept:
            total = total + sum(kept) / len(kept)
    return total


def naive_margin(x, y, beta, ref=None, ry=None, margin=0.2, nu=0.0, learn_beta=False):
    """Euclidean distance of the normalised rows, every triplet, PML's divisor (the non-zero hinge terms)."""
    r = x if ref is None else ref
    pos, neg = _pairs(y, ry)
    trip = [(a, p, n) for (a, p), (a2, n) in itertools.product(pos, neg) if a == a2]
    if not trip:
        return (x * 0).sum()

    def dist(i, k):
        return (x[i] / x[i].norm() - r[k] / r[k].norm()).norm()

    terms, regs = [], []
    for a, p, n in trip:
        b = beta[0] if len(beta) == 1 else beta[y[a]]
        terms += [torch.relu(dist(a, p) - b + margin), torch.relu(b - dist(a, n) + margin)]
        regs.append(b * nu)
    nonzero = sum(1 for t in terms if t > 0)
    total = sum(terms) / nonzero if nonzero else (x * 0).sum()
    if learn_beta:
        total = total + (beta[0] * nu if len(beta) == 1 else (sum(regs) / nonzero if nonzero else 0))
    return total


@pytest.mark.parametrize("case", ["tuplet", "snr", "margin", "margin_class"])
@pytest.mark.parametrize("pattern,with_ref", [("random", False), ("pairs", False), ("random", True)])
def test_equals_naive_loops(case, pattern, with_ref):
    x, y, ref, ry = _data(pattern, n=9, d=5, m=7 if with_ref else None, seed=11)
    leaves = [x.detach().clone().requires_grad_()] + ([ref.detach().clone().requires_grad_()] if with_ref else [])
    yl, ryl = [int(v) for v in y], (None if ry is None else [int(v) for v in ry])
    r = leaves[1] if with_ref else None
    if case == "tuplet":
        want = naive_tuplet(leaves[0], yl, r, ryl, margin=10.0, scale=4.0)
        got = _run("tuplet", 0, "triton", x, y, ref, ry, margin=10.0, scale=4.0)
    elif case == "snr":
        want = naive_snr(leaves[0], yl, r, ryl, pos_margin=0.3, neg_margin=1.4)
        got = _run("snr", 0, "triton", x, y, ref, ry, pos_margin=0.3, neg_margin=1.4)
    else:
        per_class = case == "margin_class"
        classes = int(max(int(y.max()), 0 if ry is None else int(ry.max()))) + 1  # as _run's "class"
        beta = _beta(1.1, classes if per_class else None, grad=True)
        leaves.append(beta)
        want = naive_margin(leaves[0], yl, beta, r, ryl, margin=0.2, nu=0.3, learn_beta=True)
        got = _run("margin", 2, "triton", x, y, ref, ry, beta="class" if per_class else 1.1, nu=0.3)
    grads = torch.autograd.grad(want, leaves, allow_unused=True)
    _close(got, (want.detach(), [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]))


# ------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("key", list(CONFIGS))
def test_gradcheck(key):
    """x (and β for MarginLoss, per class) in full; x and ref_emb (the column kernel) in gradcheck's fast mode."""
    torch.manual_seed(1)
    y = torch.tensor([0, 1, 0, 1, 2]).to(DEVICE)
    ry = torch.tensor([0, 1, 2, 1]).to(DEVICE)
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ref = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = getattr(F, CONFIGS[key][0])
    if key == "margin":
        beta = (_beta(0.9, 3) + 0.05 * torch.randn(3, dtype=torch.float64, device=DEVICE)).requires_grad_()
        kw = dict(learn_beta=True, nu=0.4, margin=0.3)
        assert torch.autograd.gradcheck(lambda a, b: fn(a, y, beta=b, backend="triton", **kw), (x, beta), eps=1e-6,
                                        atol=1e-7)
        assert torch.autograd.gradcheck(lambda a, r, b: fn(a, y, None, r, ry, beta=b, backend="triton", **kw),
                                        (x, ref, beta), eps=1e-6, atol=1e-7, fast_mode=True)
        return
    kw = dict(scale=4.0) if key == "tuplet" else dict(pos_margin=0.2, neg_margin=1.5)
    assert torch.autograd.gradcheck(lambda a: fn(a, y, backend="triton", **kw), (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda a, r: fn(a, y, None, r, ry, backend="triton", **kw), (x, ref), eps=1e-6,
                                    atol=1e-7, fast_mode=True)


def test_inputs_untouched_and_double_backward_refused():
    x, y, ref, ry = _data("random", m=21)
    x0, ref0 = x.clone(), ref.clone()
    beta = _beta(1.0, 3, grad=True)
    b0 = beta.detach().clone()
    xr = x.clone().requires_grad_()
    loss = F.margin_loss(xr, y, None, ref, ry, beta=beta, learn_beta=True, nu=0.1, backend="triton")
    torch.autograd.grad(loss, [xr, beta])
    assert torch.equal(x, x0) and torch.equal(ref, ref0) and torch.equal(beta.detach(), b0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(F.tuplet_margin_loss(xr, y, backend="triton"), xr, create_graph=True)


# ------------------------------------------------------------------------------------- fused: memory, syncs


def _watch(key, backend, with_ref):
    n = m = 64
    x = torch.randn(n, 3, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 6, (n,), device=DEVICE)
    kw = dict(check_inputs=False)
    if with_ref:
        kw.update(ref_emb=torch.randn(m, 3, device=DEVICE, requires_grad=True),
                  ref_labels=torch.randint(0, 6, (m,), device=DEVICE))
    if key == "margin":
        kw.update(beta=torch.full((6,), 0.9, device=DEVICE, requires_grad=True), learn_beta=True, nu=0.1)
    with TensorWatch() as watch:
        getattr(F, CONFIGS[key][0])(x, y, backend=backend, **kw).backward()
    assert x.grad is not None and (not with_ref or kw["ref_emb"].grad is not None)
    assert key != "margin" or kw["beta"].grad is not None
    return watch, n * m * 4


@pytest.mark.parametrize("key,with_ref", [(k, r) for k in CONFIGS for r in (False, True)])
def test_fused_no_pairwise_buffer_and_no_host_sync(key, with_ref):
    """Forward + backward allocate O((N + M)·D) plus O(N) statistics — the largest tensor is under an eighth of
    one fp32 N×M matrix — and never sync with the host."""
    watch, nm_bytes = _watch(key, "triton", with_ref)
    assert watch.largest < nm_bytes // 8, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


@pytest.mark.parametrize("key", list(CONFIGS))
def test_watch_fails_on_the_reference(key):
    """The watch is not vacuous: the reference forms the N×M matrix (MarginLoss: all triplets) and syncs."""
    watch, nm_bytes = _watch(key, "reference", False)
    assert watch.largest >= nm_bytes // 8 and watch.syncs


def test_lower_precisions_close_to_fp64():
    """fp32 ~1e-5; fp16 / bf16 within the inputs' rounding (tiles accumulate in fp32; TupletMargin at scale 8)."""
    x, y, _, _ = _data("random", n=17, seed=9)
    for key in CONFIGS:
        k = 1 if key == "tuplet" else 0
        want = _run(key, k, "reference", x, y)
        for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
            if key == "snr" and dtype != torch.float32:
                continue  # its kernel reads the centred rows in the compute dtype (fp32) for every input dtype
            got = _run(key, k, "triton", x.to(dtype), y)
            assert abs(float(got[0]) - float(want[0])) <= tol * max(1.0, abs(float(want[0]))), (key, dtype)
            for g, w in zip(got[1][:1], want[1][:1]):
                assert g.dtype == dtype, (key, dtype)
                assert float((g.double() - w).abs().max()) <= 10 * tol * max(1.0, float(w.abs().max())), (key, dtype)
