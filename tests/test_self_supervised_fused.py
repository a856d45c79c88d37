"""The self-supervised / CLIP shape of NT-Xent, end to end on the fused backends (issue 12, item 2):
``SelfSupervisedLoss(NTXentLoss(...))`` (symmetric: one loss over the 2N rows ``cat([x, y])``, each row's one
positive its other view; not symmetric: ``x`` against the reference set ``y``, positives on the diagonal) and the
two-tower form ``NTXentLoss()(x, arange, ref_emb=y, ref_labels=arange)`` with both towers learning.

Checked on the triton backend (under the interpreter: small shapes) and the cpu backend (public API only):
values and the gradients of both views (and of two encoders' weights) equal PML 2.9's
``SelfSupervisedLoss(NTXentLoss())`` in float64 (1e-9) and independent naive loops written here; the CLIP form
(both directions) equals the cross-entropy of the logit matrix; the fused op really runs (the reference op is
replaced by one that fails; no fall-back warning under ``auto``); no N×M tensor and no host sync on the Triton
path (a watch that fails on the reference); the cpu path's peak memory stays far below one N×M matrix at a size
where the reference exceeds it. Tested under the Triton interpreter, not on a GPU.
"""
import math
import os
import warnings

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from conftest import DEVICE
from memory import TensorWatch, peak_extra_bytes

TOL = 1e-9
HAS_TRITON = ("triton" in _registry.implemented("ntxent_loss")
              and _registry.unavailable_reason("triton", DEVICE) is None)
HAS_CPU = "cpu" in _registry.implemented("ntxent_loss") and _registry.unavailable_reason("cpu", "cpu") is None
BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton backend here")),
            pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="no cpu backend here")),
            pytest.param("auto", marks=pytest.mark.skipif(not HAS_CPU, reason="auto is the cpu backend here"))]
AVAILABLE = [b for b, ok in (("triton", HAS_TRITON), ("cpu", HAS_CPU), ("auto", HAS_CPU)) if ok]


def _device(backend):
    return DEVICE if backend == "triton" else "cpu"


def _views(n=9, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, x + 0.7 * torch.randn(n, d, generator=g, dtype=dtype)  # two correlated "augmentations"


def _run(loss_fn, x, y, device="cpu"):
    xs, ys = (t.detach().clone().to(device).requires_grad_() for t in (x, y))
    loss = loss_fn(xs, ys)
    gx, gy = (torch.zeros_like(t) if g is None else g for g, t in
              zip(torch.autograd.grad(loss, (xs, ys), allow_unused=True), (xs, ys)))
    return loss.detach().cpu(), gx.cpu(), gy.cpu()


def _close(got, want, tol=TOL):
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        err = float((g.double() - w.double()).abs().max())
        assert err <= tol * max(1.0, float(w.abs().max())), err


def _dk(backend, symmetric, **kw):
    return dk.losses.SelfSupervisedLoss(dk.losses.NTXentLoss(backend=backend, **kw), symmetric=symmetric)


# ---------------------------------------------------------------------------- equal to PML 2.9 and naive loops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_equals_pml_self_supervised(backend, symmetric, temperature):
    """Value and the gradients of both views = PML 2.9's SelfSupervisedLoss(NTXentLoss) (float64, 1e-9); the
    second view's gradient is not zero (it is a learning tower, not a constant)."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = _views(n=11, d=6, seed=1)
    got = _run(_dk(backend, symmetric, temperature=temperature), x, y, _device(backend))
    want = _run(pl.SelfSupervisedLoss(pl.NTXentLoss(temperature=temperature), symmetric=symmetric), x, y)
    _close(got, want)
    assert float(got[2].abs().max()) > 1e-3


def _naive_ntxent(rows, refs, partner, tau, self_mode):
    """Plain loops over the formula: for every anchor i, its one positive partner[i] and every other reference
    (not i itself in self mode) as a negative; −log(e^{s_ip} / (e^{s_ip} + Σ_n e^{s_in})), mean over anchors."""
    def cos(a, b):
        return (a * b).sum() / (a.norm() * b.norm())

    terms = []
    for i in range(len(rows)):
        p = partner[i]
        sp = cos(rows[i], refs[p]) / tau
        negs = [cos(rows[i], refs[j]) / tau for j in range(len(refs)) if j != p and not (self_mode and j == i)]
        terms.append(-(sp - torch.log(torch.exp(sp) + sum(torch.exp(v) for v in negs))))
    return sum(terms) / len(terms)


def _naive_self_supervised(symmetric, tau):
    def fn(x, y):
        n = len(x)
        if symmetric:
            rows = torch.cat([x, y])
            return _naive_ntxent(rows, rows, [(i + n) % (2 * n) for i in range(2 * n)], tau, True)
        return _naive_ntxent(x, y, list(range(n)), tau, False)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_naive_loops(backend, symmetric):
    x, y = _views(n=7, d=4, seed=2)
    _close(_run(_dk(backend, symmetric, temperature=0.2), x, y, _device(backend)),
           _run(_naive_self_supervised(symmetric, 0.2), x, y))


def _towers(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Linear(5, 6).double() for _ in range(2)], torch.randn(10, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["symmetric", "one_way", "two_tower"])
def test_two_encoders_equal_pml(backend, form):
    """Two encoders (an image and a text tower, say) learning through the loss: the loss and every weight's
    gradient of both towers = PML 2.9, for SelfSupervisedLoss (symmetric and not) and the plain two-tower call
    ``NTXentLoss()(a, arange, ref_emb=b, ref_labels=arange.clone())``."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    (ta, tb), inp = _towers()
    dev = _device(backend)
    results = []
    for lib, bk in ((dk.losses, dict(backend=backend)), (pl, {})):
        if form == "two_tower":
            inner = lib.NTXentLoss(temperature=0.1, **bk)

            def loss_fn(a, b, inner=inner):
                ar = torch.arange(len(a), device=a.device)
                return inner(a, ar, ref_emb=b, ref_labels=ar.clone())  # PML: a copy (see the test below)
        else:
            loss_fn = lib.SelfSupervisedLoss(lib.NTXentLoss(temperature=0.1, **bk), symmetric=form == "symmetric")
        a_tower, b_tower = (torch.nn.Linear(5, 6).double().to(dev) for _ in range(2))
        a_tower.load_state_dict(ta.state_dict())
        b_tower.load_state_dict(tb.state_dict())
        x = inp.to(dev)
        loss = loss_fn(a_tower(x), b_tower(x.flip(1)))
        params = list(a_tower.parameters()) + list(b_tower.parameters())
        results.append([loss.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(loss, params)])
    _close(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_tower_with_the_labels_object_as_ref_labels(backend):
    """Deliberate difference (README: self-pairs): passing the *same* labels tensor as ``ref_labels`` with a
    different ``ref_emb`` keeps the diagonal positives here (= the call with a copy); PML keys self-pair
    exclusion on the labels object alone, drops every (i, i) pair — all the positives of the two-tower shape —
    and returns its zero loss."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = _views(n=8, d=4, seed=9)
    dev = _device(backend)

    def call(lib, same, **kw):
        fn = lib.NTXentLoss(temperature=0.1, **kw)

        def loss(a, b):
            ar = torch.arange(len(a), device=a.device)
            return fn(a, ar, ref_emb=b, ref_labels=ar if same else ar.clone())
        return loss

    same = _run(call(dk.losses, True, backend=backend), x, y, dev)
    _close(same, _run(call(dk.losses, False, backend=backend), x, y, dev))
    _close(same, _run(call(pl, False), x, y))
    assert float(same[0]) > 0.1 and float(call(pl, True)(x, y)) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_is_cross_entropy_both_ways(backend):
    """CLIP's loss ½(CE(S/τ, diag) + CE(Sᵀ/τ, diag)) as two one-way NT-Xent calls (x → y and y → x) equals
    torch's cross-entropy on the cosine logit matrix, values and both gradients."""
    x, y = _views(n=10, d=5, seed=4)
    tau = 0.1
    dev = _device(backend)
    fn = dk.losses.NTXentLoss(temperature=tau, backend=backend)

    def ours(a, b):
        ar = torch.arange(len(a), device=a.device)
        return 0.5 * (fn(a, ar, ref_emb=b, ref_labels=ar) + fn(b, ar, ref_emb=a, ref_labels=ar))

    def clip(a, b):
        logits = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t() / tau
        ar = torch.arange(len(a))
        return 0.5 * (torch.nn.functional.cross_entropy(logits, ar) + torch.nn.functional.cross_entropy(logits.t(), ar))

    _close(_run(ours, x, y, dev), _run(clip, x, y))


def test_pml_zero_rules_kept():
    """One pair (N = 1): symmetric has 2 rows, one positive pair each way and no negative → PML's zero loss, still
    attached to both views; not symmetric: one positive, no negative → zero. Same on every backend."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = _views(n=1, d=3, seed=5)
    for symmetric in (True, False):
        want = _run(pl.SelfSupervisedLoss(pl.NTXentLoss(), symmetric=symmetric), x, y)
        for backend in AVAILABLE:
            _close(_run(_dk(backend, symmetric), x, y, _device(backend)), want)


# ---------------------------------------------------------------------------- the fused path really runs


def _failing_reference(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the reference ntxent_loss ran: the fused path fell back")

    monkeypatch.setitem(_registry._IMPLS, ("ntxent_loss", "reference"), refuse)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_op_runs_no_fallback(backend, symmetric, monkeypatch):
    """With the reference op replaced by one that fails, the wrapper still computes (the chosen backend's own op
    ran), and ``auto`` emits no fall-back warning."""
    _failing_reference(monkeypatch)
    monkeypatch.setattr(_registry, "_WARNED", set())
    ran = []
    chosen = "cpu" if backend == "auto" else backend
    impl = _registry._IMPLS[("ntxent_loss", chosen)]
    monkeypatch.setitem(_registry._IMPLS, ("ntxent_loss", chosen), lambda *a, **k: ran.append(1) or impl(*a, **k))
    x, y = _views(n=6, d=4, seed=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dml_kernels: falling back")
        loss, gx, gy = _run(_dk(backend, symmetric), x, y, _device(backend))
    assert ran == [1] and math.isfinite(float(loss)) and float(gy.abs().max()) > 0


def _watch(backend, symmetric):
    """Forward + backward of the wrapper on n pairs (D = 2) under the tensor watch, check_inputs=False: 96 rows
    either way (the O(N) statistics, a few rows of N, are then well under an eighth of N×M)."""
    n = 48 if symmetric else 96
    g = torch.Generator().manual_seed(7)
    dev = _device(backend)
    x, y = (torch.randn(n, 2, generator=g).to(dev).requires_grad_() for _ in range(2))
    with TensorWatch() as watch:
        _dk(backend, symmetric, check_inputs=False)(x, y).backward()
    assert x.grad is not None and y.grad is not None
    rows = 2 * n if symmetric else n
    return watch, rows * rows * 4  # one fp32 N×M matrix of the loss's logits


@pytest.mark.skipif(not HAS_TRITON, reason="no triton backend here")
@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_no_pairwise_buffer_no_host_sync(symmetric):
    """The Triton path's largest tensor is under an eighth of one N×M fp32 matrix (the cat of the two views is
    the largest: O(N·D)) and nothing syncs with the host."""
    watch, nm = _watch("triton", symmetric)
    assert watch.largest < nm // 8, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


@pytest.mark.parametrize("symmetric", [True, False])
def test_watch_fails_on_the_reference(symmetric):
    watch, nm = _watch("reference", symmetric)
    assert watch.largest >= nm // 8


@pytest.mark.skipif(not HAS_CPU or not os.path.exists("/proc/self/clear_refs"),
                    reason="needs the cpu backend and Linux /proc/self/clear_refs")
def test_cpu_peak_memory_below_one_n_by_m():
    """2048 pairs (4096 rows), D = 8, fp32, forward + backward through the symmetric wrapper: the cpu path's peak
    extra memory stays under half of one fp32 N×M matrix of the loss (64 MiB) and under an eighth of what the
    reference's peak is; the reference exceeds one N×M matrix. (At 1024 pairs the 8 MiB bound was within the few
    MiB the allocator state left by earlier test modules adds: 9.8 MiB in the full suite.)"""
    n, d = 2048, 8
    g = torch.Generator().manual_seed(8)
    x0, y0 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    nm = (2 * n) ** 2 * 4

    def step(backend):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        _dk(backend, True, check_inputs=False)(x, y).backward()

    step("cpu")  # warm-up
    fused = peak_extra_bytes(lambda: step("cpu"))
    reference = peak_extra_bytes(lambda: step("reference"))
    assert fused < nm / 2 and 8 * fused < reference, \
        f"cpu peak extra {fused / 2**20:.1f} MiB, reference {reference / 2**20:.1f} MiB (N×M: {nm / 2**20:.0f} MiB)"
    assert reference > nm, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- the benchmark case


def test_bench_case_equals_pml():
    """``ntxent_self_supervised``: the first and second halves of the benchmark's B rows are the two views of B/2
    pairs; the dk call (reference backend here) and the PML pipeline give the same value."""
    pytest.importorskip("pytorch_metric_learning")
    from dml_kernels.bench import cases as bc

    case = bc.CASES["ntxent_self_supervised"]
    assert case.family == "pair" and case.op == "ntxent_loss"
    t = bc.make_inputs(case, 32, None, None, 8, torch.float64, "cpu")
    fn, extra = case.pml(t)
    want = fn()
    got = case.dk(t, "reference").detach()
    assert abs(float(got) - float(want.detach())) <= TOL and extra == []
    if HAS_CPU:
        assert abs(float(case.dk(t, "cpu").detach()) - float(want.detach())) <= TOL
