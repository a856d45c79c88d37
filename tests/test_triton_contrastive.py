"""The contrastive family on the Triton pair engine (backends/triton/contrastive_losses.py): NT-Xent, SupCon, NCA,
Circle, ThresholdConsistentMargin, IntraPairVariance.

Equal in float64 (1e-9, values and gradients of x and ref_emb) to the reference op (itself equal to PML 2.9 in
tests/test_contrastive_losses.py) on the label patterns of SPEC §5, with and without a reference set, explicit
pairs; equal to independent naive loops written here; gradcheck; fp32 / fp16 / bf16 close to fp64; the fused
forms allocate no N×M tensor and never sync with the host (a watch that fails on the reference). Shapes are odd
and span several 16 × 16 interpreter tiles. Tested under the Triton interpreter, not on a GPU.
"""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels._pairs import PackedPairMask
from conftest import DEVICE
from naive import is_sim, value
from patterns import PATTERNS
from memory import TensorWatch

F = dk.functional
TOL = 1e-9
HAS_TRITON = "triton" in _registry.implemented("supcon_loss") and _registry.unavailable_reason("triton", DEVICE) is None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available here")

# op: configurations (keyword arguments of dk.functional.<op>)
CONFIGS = {
    "ntxent_loss": [dict(), dict(distance="euclidean", temperature=0.5),
                    dict(distance="squared_euclidean", normalize_embeddings=False, temperature=3.0)],
    "supcon_loss": [dict(), dict(distance="dot", normalize_embeddings=False, temperature=0.7),
                    dict(distance="euclidean", temperature=0.3)],
    "nca_loss": [dict(), dict(distance="cosine", softmax_scale=3.0), dict(distance="euclidean", normalize_embeddings=False)],
    "circle_loss": [dict(), dict(m=0.25, gamma=30.0)],
    "threshold_consistent_margin_loss": [dict(), dict(margin_plus=0.3, margin_minus=-0.1, lambda_plus=0.7,
                                                      lambda_minus=1.3)],
    "intra_pair_variance_loss": [dict(), dict(distance="euclidean", pos_eps=0.1, neg_eps=0.05),
                                 dict(distance="dot", normalize_embeddings=False)],
}
NO_REF = {"threshold_consistent_margin_loss"}  # PML gathers reference indices from the embeddings
PATTERN_NAMES = ["random", "all_same", "all_distinct", "singletons_and_pairs", "pairs", "one_sample",
                 "two_samples_same", "two_samples_distinct"]


def _data(pattern, n=19, d=7, m=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = PATTERNS[pattern](n)
    x = torch.randn(len(labels), d, dtype=dtype, generator=g)
    if m is None:
        return x.to(DEVICE), labels.to(DEVICE), None, None
    ref = torch.randn(m, d, dtype=dtype, generator=g)
    return x.to(DEVICE), labels.to(DEVICE), ref.to(DEVICE), torch.randint(0, 3, (m,), generator=g).to(DEVICE)


def _run(op, kw, backend, x, y, ref=None, ry=None, tuple_=None):
    leaves = [x.detach().clone().requires_grad_()]
    extra = {}
    if ref is not None:
        leaves.append(ref.detach().clone().requires_grad_())
        extra = dict(ref_emb=leaves[1], ref_labels=ry)
    loss = getattr(F, op)(leaves[0], y, tuple_, backend=backend, **kw, **extra)
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


@pytest.mark.parametrize("op", list(CONFIGS))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_equals_reference_patterns(op, pattern):
    """Every label pattern, self mode, the default configuration; N=19 D=7 (two 16-row tiles, ragged)."""
    x, y, _, _ = _data(pattern)
    _close(_run(op, CONFIGS[op][0], "triton", x, y), _run(op, CONFIGS[op][0], "reference", x, y))


@pytest.mark.parametrize("op,k", [(op, k) for op in CONFIGS for k in range(len(CONFIGS[op]))])
@pytest.mark.parametrize("with_ref", [False, True])
def test_equals_reference_configs(op, k, with_ref):
    """Every configuration (distances, temperatures, margins), with and without a reference set (M=21)."""
    if with_ref and op in NO_REF:
        pytest.skip("no ref_emb for this loss (PML's semantics)")
    x, y, ref, ry = _data("random", m=21 if with_ref else None, seed=k + 3)
    _close(_run(op, CONFIGS[op][k], "triton", x, y, ref, ry), _run(op, CONFIGS[op][k], "reference", x, y, ref, ry))


@pytest.mark.parametrize("op", ["ntxent_loss", "supcon_loss", "circle_loss", "intra_pair_variance_loss"])
def test_reference_set_patterns(op):
    """A reference set whose labels miss some query classes (rows without positives) and M ≫ N."""
    x, y, _, _ = _data("pairs", n=7)
    ref = torch.randn(37, 7, dtype=torch.float64, device=DEVICE)
    ry = torch.randint(0, 5, (37,)).to(DEVICE)
    _close(_run(op, {}, "triton", x, y, ref, ry), _run(op, {}, "reference", x, y, ref, ry))


def _miner_tuple(x, y):
    return dk.miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)


@pytest.mark.parametrize("op", list(CONFIGS))
def test_explicit_pairs(op):
    """A miner's pair tuple (PackedPairMask for the matrix losses, the 4-tuple for the pair-list ones)."""
    if op == "nca_loss":
        pytest.skip("NCA takes a tuple as row weights (test_nca_weights)")
    x, y, _, _ = _data("random", seed=5)
    t = _miner_tuple(x, y)
    _close(_run(op, CONFIGS[op][0], "triton", x, y, tuple_=t), _run(op, CONFIGS[op][0], "reference", x, y, tuple_=t))
    if op in ("supcon_loss", "circle_loss"):  # also as a packed mask given directly
        mask = PackedPairMask.from_indices(t, 19, 19)
        _close(_run(op, CONFIGS[op][0], "triton", x, y, tuple_=mask),
               _run(op, CONFIGS[op][0], "reference", x, y, tuple_=mask))


def test_nca_weights():
    x, y, _, _ = _data("random", seed=6)
    t = _miner_tuple(x, y)
    _close(_run("nca_loss", {}, "triton", x, y, tuple_=t), _run("nca_loss", {}, "reference", x, y, tuple_=t))


@pytest.mark.parametrize("op", ["ntxent_loss", "intra_pair_variance_loss", "threshold_consistent_margin_loss"])
def test_repeated_pairs_are_unsupported(op):
    """These losses count a repeated pair of a tuple twice (PML); the fused form does not: it refuses, auto falls
    back to the reference."""
    x, y, _, _ = _data("random", n=9)
    t = (torch.tensor([0, 0, 1]), torch.tensor([3, 3, 4]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    with pytest.raises(_registry.Unsupported):
        getattr(F, op)(x, y, t, backend="triton")


def test_fp32_and_half_close_to_fp64():
    """Lower precisions: fp32 ~1e-5, fp16 / bf16 within the inputs' rounding (a loose check: the tile values
    are accumulated in fp32)."""
    x, y, ref, ry = _data("random", m=21, seed=9)
    for op in CONFIGS:
        kw = CONFIGS[op][0]
        want = _run(op, kw, "reference", x, y, None if op in NO_REF else ref, ry)
        for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
            r = None if op in NO_REF else ref.to(dtype)
            got = _run(op, kw, "triton", x.to(dtype), y, r, ry)
            assert got[0].dtype in (torch.float32, dtype)
            scale = max(1.0, abs(float(want[0])))
            assert abs(float(got[0]) - float(want[0])) <= tol * scale, (op, dtype, float(got[0]), float(want[0]))
            for g, w in zip(got[1], want[1]):
                assert g.dtype == dtype
                assert float((g.double() - w).abs().max()) <= tol * max(1.0, float(w.abs().max())) * 10, (op, dtype)


# ------------------------------------------------------------------------------------- naive loops


def _values(x, ref, name="cosine", normalize=True):
    r = x if ref is None else ref
    return [[value(x[i], r[k], name, normalize) for k in range(len(r))] for i in range(len(x))]


def _label_pairs(y, ry):
    self_mode = ry is None
    ry = y if self_mode else ry
    pos = [(i, k) for i in range(len(y)) for k in range(len(ry)) if ry[k] == y[i] and not (self_mode and i == k)]
    neg = [(i, k) for i in range(len(y)) for k in range(len(ry)) if ry[k] != y[i]]
    return pos, neg


def _zero(x):
    return (x * 0).sum()


def naive_ntxent(x, y, ref=None, ry=None, temperature=0.07, name="cosine", normalize=True):
    s = _values(x, ref, name, normalize)
    sg = 1 if is_sim(name) else -1
    pos, neg = _label_pairs(y, ry)
    if len(pos) == 0 or len(neg) == 0 or (len(pos) <= 1 and len(neg) <= 1):
        return _zero(x)
    total = 0
    for a, p in pos:
        negs = [sg * s[a][n] / temperature for a2, n in neg if a2 == a]
        if negs:
            sp = sg * s[a][p] / temperature
            total = total - torch.log(torch.exp(sp) / (torch.exp(sp) + sum(torch.exp(v) for v in negs)))
    return total / len(pos)


def naive_supcon(x, y, ref=None, ry=None, temperature=0.1, name="cosine", normalize=True):
    s = _values(x, ref, name, normalize)
    sg = 1 if is_sim(name) else -1
    pos, neg = _label_pairs(y, ry)
    if len(pos) == 0 or len(neg) == 0 or (len(pos) <= 1 and len(neg) <= 1):
        return _zero(x)
    rows = []
    for i in range(len(x)):
        ps = [k for a, k in pos if a == i]
        every = ps + [k for a, k in neg if a == i]
        if ps:
            den = torch.log(sum(torch.exp(sg * s[i][k] / temperature) for k in every))
            rows.append(-sum(sg * s[i][k] / temperature - den for k in ps) / len(ps))
    kept = [v for v in rows if v > 0]
    return sum(kept) / len(kept) if kept else _zero(x)


def naive_nca(x, y, ref=None, ry=None, softmax_scale=1.0, name="squared_euclidean", normalize=True):
    s = _values(x, ref, name, normalize)
    sg = 1 if is_sim(name) else -1
    pos, neg = _label_pairs(y, ry)
    rows = []
    for i in range(len(x)):
        ps = [k for a, k in pos if a == i]
        every = ps + [k for a, k in neg if a == i]
        if ps:
            num = sum(torch.exp(softmax_scale * sg * s[i][k]) for k in ps)
            rows.append(-torch.log(num / sum(torch.exp(softmax_scale * sg * s[i][k]) for k in every)))
    return sum(rows) / len(rows) if rows else _zero(x)


def naive_circle(x, y, ref=None, ry=None, m=0.4, gamma=80.0):
    s = _values(x, ref)
    pos, neg = _label_pairs(y, ry)
    if len(pos) <= 1 and len(neg) <= 1:
        return _zero(x)
    rows = []
    for i in range(len(x)):
        ps = [s[i][k] for a, k in pos if a == i]
        ns = [s[i][k] for a, k in neg if a == i]
        if ps and ns:
            lp = torch.log(sum(torch.exp(-gamma * max(0.0, 1 + m - float(v.detach())) * (v - (1 - m))) for v in ps))
            ln = torch.log(sum(torch.exp(gamma * max(0.0, float(v.detach()) + m) * (v - m)) for v in ns))
            rows.append(torch.log1p(torch.exp(lp + ln)))
    kept = [v for v in rows if v > 0]
    return sum(kept) / len(kept) if kept else _zero(x)


def naive_tcm(x, y, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5):
    s = _values(x, None)
    pos, neg = _label_pairs(y, None)
    lo = [margin_plus - s[i][k] for i, k in pos if s[i][k] <= margin_plus]
    hi = [s[i][k] - margin_minus for i, k in neg if s[i][k] >= margin_minus]
    total = _zero(x)
    if lo:
        total = total + lambda_plus * sum(lo) / len(lo)
    if hi:
        total = total + lambda_minus * sum(hi) / len(hi)
    return total


def naive_ipv(x, y, ref=None, ry=None, pos_eps=0.01, neg_eps=0.01, name="cosine", normalize=True):
    s = _values(x, ref, name, normalize)
    pos, neg = _label_pairs(y, ry)
    if len(pos) <= 1 and len(neg) <= 1:
        return _zero(x)
    total = _zero(x)
    for pairs, eps, increase in ((pos, pos_eps, is_sim(name)), (neg, neg_eps, not is_sim(name))):
        if pairs:
            vals = [s[i][k] for i, k in pairs]
            mean = sum(vals) / len(vals)
            terms = [torch.relu((1 - eps) * mean - v if increase else v - (1 + eps) * mean) ** 2 for v in vals]
            total = total + sum(terms) / len(terms)
    return total


NAIVE = {  # op: (naive function, its keyword arguments, ours')
    "ntxent_loss": [(naive_ntxent, dict(temperature=0.5), dict(temperature=0.5)),
                    (naive_ntxent, dict(name="euclidean", temperature=0.5),
                     dict(distance="euclidean", temperature=0.5))],
    "supcon_loss": [(naive_supcon, dict(temperature=0.3), dict(temperature=0.3)),
                    (naive_supcon, dict(name="dot", normalize=False, temperature=2.0),
                     dict(distance="dot", normalize_embeddings=False, temperature=2.0))],
    "nca_loss": [(naive_nca, {}, {}), (naive_nca, dict(name="cosine", softmax_scale=2.0),
                                       dict(distance="cosine", softmax_scale=2.0))],
    "circle_loss": [(naive_circle, dict(m=0.25, gamma=8.0), dict(m=0.25, gamma=8.0))],
    "threshold_consistent_margin_loss": [(naive_tcm, dict(margin_plus=0.3, margin_minus=-0.1),
                                          dict(margin_plus=0.3, margin_minus=-0.1))],
    "intra_pair_variance_loss": [(naive_ipv, dict(pos_eps=0.1, neg_eps=0.05), dict(pos_eps=0.1, neg_eps=0.05)),
                                 (naive_ipv, dict(name="euclidean", pos_eps=0.1, neg_eps=0.05),
                                  dict(distance="euclidean", pos_eps=0.1, neg_eps=0.05))],
}


@pytest.mark.parametrize("op,k", [(op, k) for op in NAIVE for k in range(len(NAIVE[op]))])
@pytest.mark.parametrize("pattern,with_ref", [("random", False), ("pairs", False), ("all_same", False),
                                              ("random", True)])
def test_equals_naive_loops(op, k, pattern, with_ref):
    if with_ref and op in NO_REF:
        pytest.skip("no ref_emb for this loss")
    naive, nkw, kw = NAIVE[op][k]
    x, y, ref, ry = _data(pattern, n=9, d=5, m=7 if with_ref else None, seed=11 + k)
    leaves = [x.detach().clone().requires_grad_()] + ([ref.detach().clone().requires_grad_()] if with_ref else [])
    args = (leaves[0], [int(v) for v in y]) + ((leaves[1], [int(v) for v in ry]) if with_ref else ())
    want = naive(*args, **nkw)
    grads = torch.autograd.grad(want, leaves, allow_unused=True)
    want = (want.detach(), [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)])
    _close(_run(op, kw, "triton", x, y, ref, ry), want)


# ------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("op", [op for op in CONFIGS if op != "circle_loss"])
def test_gradcheck(op):
    """(CircleLoss is left out: its pair weights [1+m−s]₊, [s+m]₊ are detached, as in PML, so its gradient is by
    design not the derivative of its value; it is compared with the naive loops and the reference instead.)"""
    torch.manual_seed(1)
    y = torch.tensor([0, 1, 0, 1, 0]).to(DEVICE)
    x = torch.randn(5, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    kw = dict(CONFIGS[op][-1])
    f = getattr(F, op)
    assert torch.autograd.gradcheck(lambda a: f(a, y, backend="triton", **kw), (x,), eps=1e-6, atol=1e-7)
    if op not in NO_REF:  # the column kernel (reference-set gradient); fast mode: a few directional derivatives
        ref = torch.randn(4, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
        ry = torch.tensor([0, 1, 2, 1]).to(DEVICE)
        assert torch.autograd.gradcheck(lambda a, r: f(a, y, None, r, ry, backend="triton", **kw), (x, ref),
                                        eps=1e-6, atol=1e-7, fast_mode=True)


def test_double_backward_refused_and_inputs_untouched():
    x, y, ref, ry = _data("random", m=21)
    x0, ref0 = x.clone(), ref.clone()
    xr = x.clone().requires_grad_()
    loss = F.supcon_loss(xr, y, None, ref, ry, backend="triton")
    (g,) = torch.autograd.grad(loss, xr, create_graph=False)
    assert torch.equal(x, x0) and torch.equal(ref, ref0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(F.nca_loss(xr, y, backend="triton"), xr, create_graph=True)


# ------------------------------------------------------------------------------------- fused: memory, syncs


_Watch = TensorWatch  # tests/memory.py


def _watch(op, backend, with_ref):
    n = m = 64
    x = torch.randn(n, 2, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 6, (n,), device=DEVICE)
    extra = {}
    if with_ref:
        ref = torch.randn(m, 2, device=DEVICE, requires_grad=True)
        extra = dict(ref_emb=ref, ref_labels=torch.randint(0, 6, (m,), device=DEVICE))
    with _Watch() as watch:
        getattr(F, op)(x, y, backend=backend, check_inputs=False, **extra).backward()
    assert x.grad is not None and (not with_ref or extra["ref_emb"].grad is not None)
    return watch, n * m * 4


@pytest.mark.parametrize("op,with_ref", [(op, r) for op in CONFIGS for r in (False, True) if not (r and op in NO_REF)])
def test_fused_no_pairwise_buffer_and_no_host_sync(op, with_ref):
    """Forward + backward allocate O((N + M)·D) plus O(N) statistics — the largest tensor is under an eighth of
    one fp32 N×M matrix — and never sync with the host."""
    watch, nm_bytes = _watch(op, "triton", with_ref)
    assert watch.largest < nm_bytes // 8, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


@pytest.mark.parametrize("op", list(CONFIGS))
def test_watch_fails_on_the_reference(op):
    """The watch is not vacuous: the reference forms the N×M matrix (and syncs)."""
    watch, nm_bytes = _watch(op, "reference", False)
    assert watch.largest >= nm_bytes // 8


def test_logits_stay_finite_at_low_temperature():
    """τ = 0.01 on cosine (logits up to 100): the online LSE keeps everything finite and equal."""
    x, y, _, _ = _data("random", seed=12)
    for op in ("ntxent_loss", "supcon_loss"):
        _close(_run(op, dict(temperature=0.01), "triton", x, y), _run(op, dict(temperature=0.01), "reference", x, y))
    assert math.isfinite(float(_run("nca_loss", dict(softmax_scale=50.0), "triton", x, y)[0]))


PML_CLASSES = {"ntxent_loss": ("NTXentLoss", {}), "supcon_loss": ("SupConLoss", {}), "nca_loss": ("NCALoss", {}),
               "circle_loss": ("CircleLoss", {"m": 0.25, "gamma": 30}),
               "threshold_consistent_margin_loss": ("ThresholdConsistentMarginLoss", {}),
               "intra_pair_variance_loss": ("IntraPairVarianceLoss", {})}


@pytest.mark.parametrize("op", list(PML_CLASSES))
def test_modules_equal_pml(op):
    """dk.losses.<Class>(backend="triton") equals PML 2.9's class in float64 (1e-9), also given a miner's tuple."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    pm = pytest.importorskip("pytorch_metric_learning.miners")
    cls, kw = PML_CLASSES[op]
    x, y, _, _ = _data("random", seed=21)
    x, y = x.cpu(), y.cpu()
    for tup in (None, pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, y)):
        out = []
        for loss_fn in (getattr(dk.losses, cls)(backend="triton", **kw), getattr(pl, cls)(**kw)):
            xr = x.clone().requires_grad_()
            loss = loss_fn(xr.to(DEVICE) if loss_fn.__module__.startswith("dml") else xr, y, tup)
            out.append((loss.detach().cpu(), [torch.autograd.grad(loss, xr)[0]]))
        _close(out[0], out[1])
