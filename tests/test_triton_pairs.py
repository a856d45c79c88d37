"""The Triton pair engine (``dml_kernels/backends/triton``) against the float64 reference backend.

Without a GPU every kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (conftest sets it), so the
shapes stay small; odd sizes make every tile partial and N = 19 / M = 37 / D = 33, 70 cover several row,
column, D-chunk and D-output blocks (the interpreter uses 16-wide tiles, 32-wide D chunks, 64-wide D outputs).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry, _pairs
from dml_kernels._pairs import PackedPairMask
from patterns import PATTERNS, make
from memory import TensorWatch

F = dk.functional
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DISTANCES = ["cosine", "dot", "euclidean", "squared_euclidean"]
TIGHT = dict(rtol=1e-10, atol=1e-10)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in discarded exp branches


def _ms(e, y, r, ry, dist, b, **kw):
    return F.multi_similarity_loss(e, y, None, r, ry, distance=dist, alpha=2.0, beta=10.0, base=0.5, backend=b, **kw)


# name → (loss(e, y, ref, ref_y, distance, backend), accepts a reference set)
LOSSES = {
    "ms": (_ms, True),
    "ms_mined": (lambda e, y, r, ry, d, b, **kw: _ms(e, y, r, ry, d, b, epsilon=0.1, **kw), True),
    "generalized_lifted": (lambda e, y, r, ry, d, b, **kw: F.generalized_lifted_structure_loss(
        e, y, None, r, ry, distance=d, neg_margin=0.7, pos_margin=0.1, backend=b, **kw), True),
    "lifted": (lambda e, y, r, ry, d, b, **kw: F.lifted_structure_loss(
        e, y, distance=d, neg_margin=0.8, pos_margin=0.05, backend=b, **kw), False),
    "contrastive": (lambda e, y, r, ry, d, b, **kw: F.contrastive_loss(
        e, y, None, r, ry, distance=d, pos_margin=0.1, neg_margin=0.8, backend=b, **kw), True),
    "n_pairs": (lambda e, y, r, ry, d, b, **kw: F.n_pairs_loss(e, y, distance=d, backend=b, **kw), False),
    "triplet": (lambda e, y, r, ry, d, b, **kw: F.triplet_margin_loss(e, y, None, r, ry, distance=d, margin=0.3,
                                                                backend=b, **kw), True),
    "triplet_smooth": (lambda e, y, r, ry, d, b, **kw: F.triplet_margin_loss(
        e, y, None, r, ry, distance=d, margin=0.3, smooth_loss=True, backend=b, **kw), True),
    "triplet_batch_hard": (lambda e, y, r, ry, d, b, **kw: F.triplet_margin_loss(
        e, y, None, r, ry, distance=d, margin=0.3, mining="batch_hard", backend=b, **kw), True),
    "triplet_batch_hard_swap": (lambda e, y, r, ry, d, b, **kw: F.triplet_margin_loss(
        e, y, None, r, ry, distance=d, margin=0.3, mining="batch_hard", swap=True, backend=b, **kw), True),
}


def run(fn, leaves, backend):
    """Loss value and the gradients of every leaf (zeros where none flows)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves, backend)
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    return loss.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def check_against_reference(fn, leaves, **tol):
    tol = tol or TIGHT
    val, grads = run(fn, leaves, "triton")
    want, want_grads = run(fn, leaves, "reference")
    torch.testing.assert_close(val, want.to(val.dtype), **tol)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, **tol)
    return val, grads


# ------------------------------------------------------------------------------------------ fp64 exact


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_matches_reference(name, pattern, distance):
    fn, _ = LOSSES[name]
    x, y = make(pattern, n=19, d=5, device=DEVICE)
    check_against_reference(lambda e, b: fn(e, y, None, None, distance, b), [x])


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("name", [k for k, (_, ref_ok) in LOSSES.items() if ref_ok])
def test_reference_set_much_larger_than_batch(name, distance):
    """M ≫ N (cross-batch memory shape): gradients reach both the queries and the reference set."""
    fn, _ = LOSSES[name]
    x, y = make("random", n=5, d=6, device=DEVICE)
    ref = torch.randn(70, 6, dtype=torch.float64, device=DEVICE)
    ref_y = torch.randint(0, 3, (70,), device=DEVICE)
    _, (gx, gr) = check_against_reference(lambda e, r, b: fn(e, y, r, ref_y, distance, b), [x, ref])
    if name not in ("triplet_batch_hard", "triplet_batch_hard_swap"):
        assert gr.abs().sum() > 0 and gx.abs().sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("n,d", [(1, 3), (2, 16), (7, 33), (33, 3), (33, 70)])
@pytest.mark.parametrize("name", ["ms", "ms_mined", "generalized_lifted", "lifted", "n_pairs", "triplet"])
def test_odd_shapes(name, n, d):
    fn, _ = LOSSES[name]
    y = torch.randint(0, 4, (n,), device=DEVICE)
    x = torch.randn(n, d, dtype=torch.float64, device=DEVICE)
    distance = "euclidean" if n % 2 else "cosine"
    check_against_reference(lambda e, b: fn(e, y, None, None, distance, b), [x])


@pytest.mark.parametrize("ref", [False, True])
@pytest.mark.parametrize("distance", ["dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("name", LOSSES)
def test_unnormalized_embeddings(name, distance, ref):
    """Raw embeddings: with L2-normalised ones the normalisation's backward projects the radial part of the
    gradient away (the ‖·‖² terms of the distances, dL/dn in the engine), so only these tests check it."""
    fn, ref_ok = LOSSES[name]
    if ref and not ref_ok:
        pytest.skip(f"{name} takes no reference set")
    x, y = make("random", n=19, d=5, device=DEVICE)
    kw = dict(normalize_embeddings=False)
    if name.startswith("ms"):  # raw dot products reach ~10: keep exp(β·S) moderate
        kw.update(alpha=0.5, beta=0.5, base=0.1)
        fn = lambda e, y, r, ry, d, b, **k: F.multi_similarity_loss(  # noqa: E731
            e, y, None, r, ry, distance=d, backend=b, epsilon=0.1 if name == "ms_mined" else None, **k)
    if ref:
        r, ry = torch.randn(11, 5, dtype=torch.float64, device=DEVICE), torch.randint(0, 4, (11,), device=DEVICE)
        check_against_reference(lambda e, rr, b: fn(e, y, rr, ry, distance, b, **kw), [x, r])
    else:
        check_against_reference(lambda e, b: fn(e, y, None, None, distance, b, **kw), [x])


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_n_pairs_sync_free_block_bound(n, monkeypatch):
    """The ceil(N/2) × ceil(N/2) block the GPU runs (no host read of K), here on the CPU."""
    monkeypatch.setattr(_pairs, "N_PAIRS_EXACT_ON_CPU", False)
    fn, _ = LOSSES["n_pairs"]
    y = torch.randint(0, max(1, n // 3), (n,), device=DEVICE)
    x = torch.randn(n, 6, dtype=torch.float64, device=DEVICE)
    for distance in ("cosine", "squared_euclidean"):
        check_against_reference(lambda e, b: fn(e, y, None, None, distance, b), [x])


def _random_mask(n, m, self_mode, density=0.3):
    pos = torch.rand(n, m, device=DEVICE) < density
    neg = (torch.rand(n, m, device=DEVICE) < density) & ~pos
    if self_mode:
        eye = torch.eye(n, dtype=torch.bool, device=DEVICE)
        pos, neg = pos & ~eye, neg & ~eye
    return PackedPairMask.from_dense(pos, neg)


@pytest.mark.parametrize("self_mode", [True, False])
@pytest.mark.parametrize("loss", ["ms", "generalized_lifted"])
def test_packed_pair_mask(loss, self_mode):
    """Asymmetric random masks: in self mode the transposed half of the gradient reads bit (k, i)."""
    n, m = 19, (19 if self_mode else 37)
    x = torch.randn(n, 6, dtype=torch.float64, device=DEVICE)
    ref = None if self_mode else torch.randn(m, 6, dtype=torch.float64, device=DEVICE)
    mask = _random_mask(n, m, self_mode)
    fn = F.multi_similarity_loss if loss == "ms" else F.generalized_lifted_structure_loss
    if self_mode:
        check_against_reference(lambda e, b: fn(e, None, mask, backend=b), [x])
    else:
        check_against_reference(lambda e, r, b: fn(e, None, mask, r, None, backend=b), [x, ref])


def test_packed_mask_from_the_triton_miner_equals_fused_mining():
    x, y = make("random", n=19, d=5, device=DEVICE)
    mask = F.multi_similarity_mask(x, y, epsilon=0.1, backend="triton")
    a = F.multi_similarity_loss(x, y, mask, backend="triton")
    b = F.multi_similarity_loss(x, y, epsilon=0.1, backend="triton")
    torch.testing.assert_close(a, b, **TIGHT)


def test_pair_rule_counted_on_device():
    """Two samples of one class: one positive pair each way → 2 pairs → not zeroed; one sample → 0."""
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([0, 1, 1], device=DEVICE)  # 2 positive and 4 negative ordered pairs
    check_against_reference(lambda e, b: F.multi_similarity_loss(e, y, backend=b), [x])
    mask = PackedPairMask.from_dense(torch.tensor([[False, True, False], [False, False, False], [False] * 3]),
                                     torch.tensor([[False, False, True], [False] * 3, [False] * 3]))
    val, (g,) = run(lambda e, b: F.multi_similarity_loss(e, None, mask.to(DEVICE), backend=b), [x], "triton")
    assert val == 0 and g.abs().sum() == 0


# --------------------------------------------------------------------------------------------- miners


@pytest.mark.parametrize("self_mode", [True, False])
@pytest.mark.parametrize("distance", DISTANCES)
def test_miners(distance, self_mode):
    x, y = make("random", n=19, d=5, device=DEVICE)
    ref, ref_y = (None, None) if self_mode else (torch.randn(37, 5, dtype=torch.float64, device=DEVICE),
                                                 torch.randint(0, 3, (37,), device=DEVICE))
    args = (x, y, ref, ref_y)
    th = F.multi_similarity_thresholds(*args, distance=distance, backend="triton")
    th_ref = F.multi_similarity_thresholds(*args, distance=distance, backend="reference")
    for a, b in zip(th, th_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for eps in (0.0, 0.1, 0.5):
        mask = F.multi_similarity_mask(*args, epsilon=eps, distance=distance, backend="triton")
        want = F.multi_similarity_mask(*args, epsilon=eps, distance=distance, backend="reference")
        assert mask.pos_bits.dtype == torch.uint8 and mask.pos_bits.shape == want.pos_bits.shape
        assert torch.equal(mask.pos_bits, want.pos_bits) and torch.equal(mask.neg_bits, want.neg_bits)
    hard = F.batch_hard_mining(*args, distance=distance, backend="triton")
    hard_ref = F.batch_hard_mining(*args, distance=distance, backend="reference")
    assert hard[0].dtype == torch.int64
    assert torch.equal(hard[0], hard_ref[0]) and torch.equal(hard[1], hard_ref[1])


def test_batch_hard_ties_and_empty_rows():
    base = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    x = torch.cat([base, base])  # every point twice: equal distances, the lowest index must win
    y = torch.tensor([0, 0, 1, 2, 0, 0, 1, 3], device=DEVICE)  # label 3 / 2 rows: a single positive / none
    for distance in DISTANCES:
        got = F.batch_hard_mining(x, y, distance=distance, backend="triton")
        want = F.batch_hard_mining(x, y, distance=distance, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] == -1).any()


@pytest.mark.parametrize("self_mode", [True, False])
@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_similarity(distance, self_mode):
    x = torch.randn(19, 33, dtype=torch.float64, device=DEVICE)
    ref = None if self_mode else torch.randn(37, 33, dtype=torch.float64, device=DEVICE)
    up = torch.randn(19, 19 if self_mode else 37, dtype=torch.float64, device=DEVICE)
    if self_mode and distance == "euclidean":
        # d_ii = sqrt(rounding noise ~1e-16) ~ 1e-8 in any implementation (PML included), and its gradient is
        # noise / 1e-8: the diagonal is checked for being ~0 below, not compared.
        up.fill_diagonal_(0)

    def fn(e, *rest):
        *r, b = rest
        return (F.pairwise_similarity(e, r[0] if r else None, distance, backend=b) * up).sum()

    check_against_reference(fn, [x] if self_mode else [x, ref])
    out = F.pairwise_similarity(x, ref, distance, backend="triton")
    assert out.shape == up.shape and out.dtype == x.dtype
    if self_mode and distance == "euclidean":
        assert out.diagonal().abs().max() < 1e-6


# ----------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(name):
    fn, ref_ok = LOSSES[name]
    y = torch.tensor([0, 0, 1, 1, 2, 0], device=DEVICE)
    x = torch.randn(6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    distance = "euclidean" if "triplet" in name or "lifted" in name or "contrastive" in name else "cosine"
    assert torch.autograd.gradcheck(lambda e: fn(e, y, None, None, distance, "triton"), (x,))
    if ref_ok:
        ref = torch.randn(7, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
        ry = torch.tensor([0, 1, 2, 0, 1, 2, 2], device=DEVICE)
        assert torch.autograd.gradcheck(lambda e, r: fn(e, y[:4], r, ry, distance, "triton"), (x[:4].detach()
                                        .requires_grad_(), ref))


def test_gradcheck_pairwise_similarity_euclidean():
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: F.pairwise_similarity(e, None, "cosine", backend="triton"), (x,))
    assert torch.autograd.gradcheck(lambda e, q: F.pairwise_similarity(e, q, "euclidean", backend="triton"), (x, r))


# ------------------------------------------------------------------------------------------ precision


def _errors(name, dtype, n=33, d=16):
    """(triton-in-dtype error, reference-in-dtype error, scale) of the loss and gradient vs fp64."""
    fn, _ = LOSSES[name]
    torch.manual_seed(1)
    y = torch.randint(0, 4, (n,), device=DEVICE)
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    distance = "euclidean" if name not in ("ms", "ms_mined", "n_pairs") else "cosine"
    truth, (g_truth,) = run(lambda e, b: fn(e, y, None, None, distance, b), [x.double()], "reference")
    ours, (g_ours,) = run(lambda e, b: fn(e, y, None, None, distance, b), [x], "triton")
    theirs, (g_theirs,) = run(lambda e, b: fn(e, y, None, None, distance, b), [x], "reference")
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g_ours.dtype == dtype
    err = lambda a, b: float((a.double() - b).abs().max())  # noqa: E731
    return ((err(ours, truth), err(theirs, truth), float(truth.abs()) + 1e-3),
            (err(g_ours, g_truth), err(g_theirs, g_truth), float(g_truth.abs().max()) + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ms", "ms_mined", "generalized_lifted", "lifted", "contrastive", "n_pairs",
                                  "triplet"])
def test_low_precision_no_worse_than_torch(name, dtype):
    """Cut Cross-Entropy's rule: error vs fp64 ≤ the reference's own same-dtype error + a small slack. The loss
    comes back in fp32 (slack: a few fp32 ulps); the gradient in the input dtype (slack: half an ulp of it, the
    rounding of the returned value itself)."""
    (ours, theirs, scale), (g_ours, g_theirs, g_scale) = _errors(name, dtype)
    assert ours <= theirs + 1e-6 * scale, (ours, theirs, scale)
    assert g_ours <= g_theirs + 0.5 * torch.finfo(dtype).eps * g_scale, (g_ours, g_theirs, g_scale)


@pytest.mark.parametrize("name", ["ms", "ms_mined", "generalized_lifted", "lifted", "contrastive", "n_pairs",
                                  "triplet", "triplet_batch_hard"])
def test_fp32(name):
    for ours, theirs, scale in _errors(name, torch.float32):
        assert ours <= 2 * theirs + 1e-6 * scale, (ours, theirs, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ms_large_beta_does_not_overflow(dtype):
    """β=50 and unnormalised dot products of size ~30: e^{β(S−λ)} overflows fp16, fp32 and fp64 alike."""
    y = torch.randint(0, 3, (19,), device=DEVICE)
    x = (4 * torch.randn(19, 8, device=DEVICE)).to(dtype)
    kw = dict(alpha=2, beta=50, base=0.5, distance="dot", normalize_embeddings=False)
    truth, (g_truth,) = run(lambda e, b: F.multi_similarity_loss(e, y, backend=b, **kw), [x.double()], "reference")
    ours, (g_ours,) = run(lambda e, b: F.multi_similarity_loss(e, y, backend=b, **kw), [x], "triton")
    assert torch.isfinite(ours) and torch.isfinite(g_ours).all()
    assert abs(float(ours) - float(truth)) <= 1e-3 * float(truth.abs())
    assert float((g_ours.double() - g_truth).abs().max()) <= 2e-2 * float(g_truth.abs().max())


# ------------------------------------------------------------------------ memory, host syncs, inputs


_Watch = TensorWatch  # tests/memory.py


MEMORY_CASES = ["ms", "ms_mined", "generalized_lifted", "lifted", "contrastive", "n_pairs", "triplet",
                "triplet_batch_hard"]


def _watched(name, backend, n, d=3):
    fn, _ = LOSSES[name]
    y = torch.randint(0, 8, (n,), device=DEVICE)
    x = torch.randn(n, d, device=DEVICE, requires_grad=True)
    loss_fn = lambda e: fn(e, y, None, None, "euclidean", backend, check_inputs=False)  # noqa: E731
    exact = _pairs.N_PAIRS_EXACT_ON_CPU
    _pairs.N_PAIRS_EXACT_ON_CPU = False  # N-pairs reads K on the CPU only (no sync there): watch the GPU path
    try:
        with _Watch() as watch:
            loss = loss_fn(x)
            loss.backward()
    finally:
        _pairs.N_PAIRS_EXACT_ON_CPU = exact
    return watch


@pytest.mark.parametrize("name", MEMORY_CASES)
def test_no_pairwise_allocation_and_no_host_sync(name):
    """The fused path allocates O((N+M)·D) bytes plus O(N) statistics, never N×M, and never syncs with the
    host in forward or backward. fp32, N = 128, D = 3: an N×M matrix takes 64 KiB, 8× the limit; x takes
    1.5 KiB and the (6, N) forward statistics 3 KiB."""
    n = 64 if name == "triplet" else 128
    limit = n * n * 4 // 8
    watch = _watched(name, "triton", n)
    assert watch.largest < limit, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


@pytest.mark.parametrize("name", ["ms_mined", "generalized_lifted", "contrastive", "triplet"])
def test_no_pairwise_allocation_with_a_large_reference_set(name):
    """M ≫ N, gradients for both sides (the column kernel): N = 16, M = 512, D = 1 → N×M fp32 is 32 KiB,
    4× the limit; the reference set and its gradient take 2 KiB each, the int64 reference labels 4 KiB."""
    fn, _ = LOSSES[name]
    n, m = 16, (128 if name == "triplet" else 512)
    y, ry = torch.randint(0, 4, (n,), device=DEVICE), torch.randint(0, 4, (m,), device=DEVICE)
    x = torch.randn(n, 1, device=DEVICE, requires_grad=True)
    ref = torch.randn(m, 1, device=DEVICE, requires_grad=True)
    with _Watch() as watch:
        fn(x, y, ref, ry, "euclidean", "triton", check_inputs=False).backward()
    assert ref.grad is not None and x.grad is not None
    assert watch.largest < n * m * 4 // 4, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


def test_memory_and_sync_watch_can_fail():
    """The watch above is not vacuous: the reference backend builds N×M and syncs (it must fail there)."""
    watch = _watched("ms", "reference", 128)
    assert watch.largest >= 128 * 128 * 4
    with _Watch() as watch:
        torch.ones(3).sum().item()
    assert watch.syncs


@pytest.mark.parametrize("name", LOSSES)
def test_inputs_untouched(name):
    fn, ref_ok = LOSSES[name]
    x, y = make("random", n=7, d=5, device=DEVICE)
    ref, ry = torch.randn(9, 5, dtype=torch.float64, device=DEVICE), torch.randint(0, 3, (9,), device=DEVICE)
    copies = [t.clone() for t in (x, y, ref, ry)]
    xl = x.requires_grad_()
    fn(xl, y, ref if ref_ok else None, ry if ref_ok else None, "euclidean", "triton").backward()
    for t, c in zip((x.detach(), y, ref, ry), copies):
        assert torch.equal(t, c)


def test_registered_ops_and_unsupported_forms():
    for op in ("pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
               "multi_similarity_loss", "generalized_lifted_structure_loss", "lifted_structure_loss",
               "contrastive_loss", "n_pairs_loss", "triplet_margin_loss"):
        assert "triton" in _registry.implemented(op), op
    x, y = make("random", n=7, d=5, device=DEVICE)
    tup = (torch.tensor([0, 1], device=DEVICE), torch.tensor([1, 0], device=DEVICE),
           torch.tensor([0, 2], device=DEVICE), torch.tensor([2, 0], device=DEVICE))
    with pytest.raises(_registry.Unsupported):
        F.contrastive_loss(x, y, tup, backend="triton")
    with pytest.raises(_registry.Unsupported):
        F.triplet_margin_loss(x, y, swap=True, backend="triton")


def test_unsupported_form_falls_back_under_auto(monkeypatch):
    monkeypatch.setattr(_registry, "auto_candidates", lambda device_type: ("triton", "reference"))
    monkeypatch.setattr(_registry, "_WARNED", set())
    x, y = make("random", n=7, d=5, device=DEVICE)
    tup = (torch.tensor([0, 1], device=DEVICE), torch.tensor([1, 0], device=DEVICE),
           torch.tensor([0, 2], device=DEVICE), torch.tensor([2, 0], device=DEVICE))
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = F.contrastive_loss(x, y, tup, backend="auto")
    torch.testing.assert_close(got, F.contrastive_loss(x, y, tup, backend="reference"))


# ----------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ms", "ms_mined", "generalized_lifted", "lifted", "contrastive", "n_pairs",
                                  "triplet"])
def test_cuda_no_sync_and_matches_reference(name):
    fn, _ = LOSSES[name]
    y = torch.randint(0, 10, (257,), device="cuda")
    x = torch.randn(257, 128, device="cuda", requires_grad=True)
    fn(x, y, None, None, "euclidean", "triton").backward()  # compile outside the sync check
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x, y, None, None, "euclidean", "triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check_against_reference(lambda e, b: fn(e, y, None, None, "euclidean", b), [x.detach().double()])


def test_autocast_reads_embeddings_in_the_autocast_dtype():
    x, y = make("random", n=19, d=16, dtype=torch.float32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under = F.multi_similarity_loss(x, y, backend="triton")
    plain = F.multi_similarity_loss(x.bfloat16(), y, backend="triton")
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    assert not torch.equal(under, F.multi_similarity_loss(x, y, backend="triton"))


def test_no_double_backward():
    x, y = make("random", n=7, d=5, device=DEVICE)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(F.multi_similarity_loss(x, y, backend="triton"), x, create_graph=True)
    torch.autograd.grad(F.multi_similarity_loss(x, y, backend="triton"), x)  # a plain backward still works
