"""The C++ CPU backend (csrc/, dml_kernels/backends/cpp/) against the float64 reference.

Values and gradients in fp64 (1e-10) and fp32 (no worse than the reference's own fp32 error, plus a small
slack), gradcheck in fp64, torch.library.opcheck on the raw ops, odd shapes, label patterns, reference
sets with M ≫ N, packed pair masks, tiles that span several reference chunks, and a memory test that
shows the fused path never allocates an N×N matrix (and that the same check fails on the reference).
Skips (with the reason) when the extension can neither be loaded nor JIT-compiled.
"""
import os
import re

import pytest
import torch

import dml_kernels as dk
import dml_kernels._ops  # noqa: F401
from dml_kernels import _pairs, _registry
from dml_kernels.backends.cpp import loader
from dml_kernels._pairs import PackedPairMask
from patterns import DISTANCE_CASES, DISTANCES, PATTERNS, dist_kw, make
from memory import peak_extra_bytes  # noqa: E402

F = dk.functional
_WHY = loader.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"C++ CPU extension unavailable: {_WHY}")

CPU_OPS = {"pairwise_similarity", "multi_similarity_thresholds", "multi_similarity_mask", "batch_hard_mining",
           "multi_similarity_loss", "generalized_lifted_structure_loss", "contrastive_loss", "triplet_margin_loss",
           "lifted_structure_loss", "n_pairs_loss",
           "proxy_nca_loss", "proxy_anchor_loss", "proxy_nca_row_stats", "proxy_anchor_class_terms", "knn"}
CPU_OPS |= {"nca_loss", "supcon_loss", "ntxent_loss"}  # the contrastive family (tests/test_contrastive_losses.py)
CPU_OPS |= {"normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
            "sphereface_loss", "p2sgrad_loss"}  # the margin-softmax family (tests/test_margin_softmax.py)
CPU_OPS |= {"contrastive_loss_row_stats", "triplet_margin_loss_row_stats"}  # tests/test_fused_reducers.py
CPU_OPS |= {"margin_softmax_row_stats"}  # one class shard's rows (tests/test_distributed_margin_softmax.py)
CPU_OPS |= {"language_guidance_loss"}  # O(block × B) torch.mm tiles (tests/test_language_guidance.py)
CPU_OPS |= {"fastap_loss", "ranked_list_loss"}  # O(block × N) torch.mm row blocks (tests/test_ranking_fused.py)
CPU_OPS |= {"direction_multi_similarity_loss", "direction_proxy_nca_loss", "direction_triplet_margin_loss",
            "proxy_gml_loss"}  # O(block × M) row blocks (tests/test_cpu_seed_methods.py)
CPU_OPS |= {"circle_loss", "threshold_consistent_margin_loss",
            "intra_pair_variance_loss"}  # row blocks (tests/test_cpu_contrastive_rowblocks.py)
CPU_OPS |= {"tuplet_margin_loss", "margin_loss", "snr_contrastive_loss"}  # tests/test_cpu_pair_margin_losses.py
CPU_OPS |= {"subcenter_arcface_loss", "soft_triple_loss"}  # grouped columns (tests/test_cpu_grouped_margin_softmax.py)
CPU_OPS |= {"batch_easy_hard_mining", "pair_margin_mining"}  # per-row miners (tests/test_fused_miners.py)
TIGHT = dict(rtol=1e-10, atol=1e-10)


def _run(fn, tensors, backend, **kw):
    """(value, grads of every tensor) of fn(*tensors, backend=backend, **kw), on clones of the inputs."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves, backend=backend, **kw)
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, diff) if out.requires_grad else [torch.zeros_like(t) for t in diff]
    return out.detach(), [g.detach() for g in grads]


def _compare(fn, tensors, tol=TIGHT, **kw):
    v_ref, g_ref = _run(fn, tensors, "reference", **kw)
    v_cpu, g_cpu = _run(fn, tensors, "cpu", **kw)
    torch.testing.assert_close(v_cpu, v_ref, **tol)
    for a, b in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, b, **tol)
    return v_ref


def _ms(x, y, r=None, ry=None, **kw):
    return F.multi_similarity_loss(x, y, ref_emb=r, ref_labels=ry, **kw)


# --------------------------------------------------------------------------------------- registry


def test_registered_ops_and_how_loaded():
    assert {op for op in CPU_OPS | set(dk._ops.OPS) if "cpu" in _registry.implemented(op)} == CPU_OPS
    assert loader.how_loaded()
    assert _registry.unavailable_reason("cpu", "cpu") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    """fp16/bf16 embeddings are upcast: the loss comes back in fp32, no worse than the reference run in the
    same low precision (errors vs fp64 on the same rounded inputs), gradients in the input dtype."""
    x, y = make("random", n=40, d=16, dtype=dtype)
    fn = lambda x, backend: F.multi_similarity_loss(x, y, epsilon=0.1, backend=backend)  # noqa: E731
    exact, (exact_g,) = _run(fn, [x.double()], "reference")
    low, (low_g,) = _run(fn, [x], "reference")
    ours, (ours_g,) = _run(fn, [x], "cpu")
    assert ours.dtype == torch.float32 and ours_g.dtype == dtype
    for a, b, t in ((ours, low, exact), (ours_g, low_g, exact_g)):
        err, err_low = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err <= err_low + 1e-3 * max(1.0, t.abs().max().item()), (err, err_low)


# --------------------------------------------------------------------------------------- multi-similarity


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_multi_similarity_fp64_self(pattern, distance, epsilon):
    x, y = make(pattern, n=11, d=5)
    fn = lambda x, backend: _ms(x, y, **dist_kw(distance), epsilon=epsilon, backend=backend)  # noqa: E731
    _compare(fn, [x])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("m", [1, 7, 130])
def test_multi_similarity_fp64_ref(distance, epsilon, m):
    x, y = make("random", n=9, d=6)
    r, ry = torch.randn(m, 6, dtype=torch.float64), torch.randint(0, 3, (m,))
    fn = lambda x, r, backend: _ms(x, y, r, ry, **dist_kw(distance), epsilon=epsilon, backend=backend)  # noqa: E731
    _compare(fn, [x, r])


@pytest.mark.parametrize("n", [1, 2, 7, 33, 130])
@pytest.mark.parametrize("d", [1, 2, 7, 33, 130])
def test_multi_similarity_odd_shapes(n, d):
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    for eps in (None, 0.1):
        fn = lambda x, backend: _ms(x, y, epsilon=eps, backend=backend)  # noqa: E731
        _compare(fn, [x])


def test_multi_similarity_many_reference_chunks():
    """M above the kernel's reference tile (4096): several tiles per row, mining recomputes them."""
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (40,))
    r, ry = torch.randn(4100, 3, dtype=torch.float64), torch.randint(0, 5, (4100,))
    for dist in ("cosine", "euclidean"):
        fn = lambda x, r, backend: _ms(x, y, r, ry, epsilon=0.1, distance=dist, backend=backend)  # noqa: E731
        _compare(fn, [x, r])
    hp, hn = F.multi_similarity_thresholds(x, y, r, ry, backend="cpu")
    hp0, hn0 = F.multi_similarity_thresholds(x, y, r, ry, backend="reference")
    torch.testing.assert_close((hp, hn), (hp0, hn0), **TIGHT)
    m1 = F.multi_similarity_mask(x, y, r, ry, backend="cpu")
    m0 = F.multi_similarity_mask(x, y, r, ry, backend="reference")
    assert torch.equal(m1.pos_bits, m0.pos_bits) and torch.equal(m1.neg_bits, m0.neg_bits)


@pytest.mark.parametrize("shape", [(2100, 700), (600, 2500)])  # rows outer / columns outer
def test_reference_mode_gradients_in_one_pass_over_many_tiles(shape):
    """Both gradients of reference mode come from one pass (the larger side in parallel blocks, the smaller
    side and the norm terms in per-thread accumulators): several blocks each way, several inner chunks."""
    n, m = shape
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 6, (n,))
    r, ry = torch.randn(m, 3, dtype=torch.float64), torch.randint(0, 6, (m,))
    for dist in ("cosine", "squared_euclidean/raw"):
        _compare(lambda x, r, backend: _ms(x, y, r, ry, alpha=0.5, beta=0.5, backend=backend, **dist_kw(dist)),
                 [x, r])
        _compare(lambda x, r, backend: F.contrastive_loss(x, y, None, r, ry, backend=backend, **dist_kw(dist)),
                 [x, r])


def test_zero_and_tiny_rows_normalise_like_the_reference():
    """The extension's own row normalisation (one-pass backward) matches F.normalize's clamp at eps = 1e-12:
    a zero row and a row below eps get g / eps, no projection; ordinary rows the projected gradient."""
    x, y = make("random", n=9, d=4)
    x[1] = 0.0
    x[4] *= 1e-14
    p = torch.randn(5, 4, dtype=torch.float64)
    p[2] = 0.0
    _compare(lambda x, backend: _ms(x, y, alpha=0.5, beta=0.5, backend=backend), [x])
    _compare(lambda x, p, backend: F.proxy_anchor_loss(x, y % 5, p, backend=backend), [x, p])
    _compare(lambda x, p, backend: F.proxy_nca_loss(x, y % 5, p, backend=backend), [x, p])


def test_multi_similarity_m_much_larger_than_n():
    x, y = make("random", n=3, d=8)
    r, ry = torch.randn(700, 8, dtype=torch.float64), torch.randint(0, 3, (700,))
    fn = lambda x, r, backend: _ms(x, y, r, ry, epsilon=0.1, backend=backend)  # noqa: E731
    _compare(fn, [x, r])


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("normalize", [True, False])  # unnormalised: the distances' ‖·‖² terms stay visible
@pytest.mark.parametrize("ref", [False, True])
def test_multi_similarity_packed_pairs(distance, normalize, ref):
    x, y = make("random", n=13, d=4)
    kw = dict(distance=distance, normalize_embeddings=normalize)
    if ref:  # the reference side's gradient goes through the column pass with per-pair mask bits
        r, ry = torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 4, (11,))
        mask = F.multi_similarity_mask(x, y, ref_emb=r, ref_labels=ry, epsilon=0.3, backend="reference", **kw)
        fn = lambda x, r, backend: F.multi_similarity_loss(  # noqa: E731
            x, y, mask, ref_emb=r, ref_labels=ry, backend=backend, **kw)
        _compare(fn, [x, r])
    else:
        mask = F.multi_similarity_mask(x, y, epsilon=0.3, backend="reference", **kw)
        fn = lambda x, backend: F.multi_similarity_loss(x, y, mask, backend=backend, **kw)  # noqa: E731
        _compare(fn, [x])
    # an explicit index tuple is not handled by the kernels: Unsupported, and auto falls back
    tup = mask.to_indices()
    with pytest.raises(_registry.Unsupported):
        F.contrastive_loss(x, y, tup, backend="cpu")


def test_multi_similarity_pair_rule_counts_on_device():
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1])  # 2 ordered positive pairs, 4 negative pairs: the rule does not apply
    _compare(lambda x, backend: _ms(x, y, backend=backend), [x])
    y = torch.tensor([0, 1])  # 0 positive pairs, 2 negative pairs
    v = _compare(lambda x, backend: _ms(x, y, backend=backend), [x[:2]])
    assert v == 0
    r, ry = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    v = _compare(lambda x, r, backend: _ms(x, torch.tensor([0]), r, ry, backend=backend), [x[:1], r])
    assert v == 0  # 1 positive + 1 negative pair → 0 (PML's ≤1-pair rule)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("ref", [False, True])
def test_multi_similarity_fp32(distance, epsilon, ref):
    """fp32: error vs fp64 no worse than the reference's own fp32 error (×2, + 1e-6)."""
    x32 = torch.randn(70, 16)
    y = torch.randint(0, 6, (70,))
    r32, ry = (torch.randn(50, 16), torch.randint(0, 6, (50,))) if ref else (None, None)
    tensors32 = [x32] + ([r32] if ref else [])

    def fn(x, *rest, backend):
        r = rest[0] if rest else None
        return _ms(x, y, r, ry if ref else None, distance=distance, epsilon=epsilon, backend=backend)

    exact, exact_g = _run(fn, [t.double() for t in tensors32], "reference")
    ref32, ref32_g = _run(fn, tensors32, "reference")
    cpu32, cpu32_g = _run(fn, tensors32, "cpu")
    assert cpu32.dtype == torch.float32
    for ours, theirs, truth in zip([cpu32] + cpu32_g, [ref32] + ref32_g, [exact] + exact_g):
        err = (ours.double() - truth).abs().max().item()
        err_ref = (theirs.double() - truth).abs().max().item()
        assert err <= 2 * err_ref + 1e-6 * max(1.0, truth.abs().max().item()), (err, err_ref)


# --------------------------------------------------------------------------------------- other losses


@pytest.mark.parametrize("pattern", ["random", "all_same", "all_distinct", "singletons_and_pairs", "two_samples_same"])
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("ref", [False, True])
def test_generalized_lifted_and_contrastive(pattern, distance, ref):
    x, y = make(pattern, n=10, d=4)
    r, ry = (torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))) if ref else (None, None)
    tensors = [x] + ([r] if ref else [])
    for name in ("generalized_lifted_structure_loss", "contrastive_loss"):
        def fn(x, *rest, backend, name=name):
            return getattr(F, name)(x, y, None, rest[0] if rest else None, ry, **dist_kw(distance), backend=backend)
        _compare(fn, tensors)
    for kw in (dict(pos_margin=0.3, neg_margin=0.8), dict(pos_margin=-0.2, neg_margin=2.0)):
        def fn(x, *rest, backend):
            return F.contrastive_loss(x, y, None, rest[0] if rest else None, ry, **dist_kw(distance), backend=backend,
                                      **kw)
        _compare(fn, tensors)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("margins", [(1.0, 0.0), (0.4, 0.3)])
def test_lifted_structure(pattern, distance, margins):
    x, y = make(pattern, n=13, d=5)
    neg, pos = margins
    fn = lambda x, backend: F.lifted_structure_loss(x, y, neg_margin=neg, pos_margin=pos, **dist_kw(distance),  # noqa
                                                    backend=backend)
    _compare(fn, [x])


@pytest.mark.parametrize("n", [1, 2, 7, 33, 130])
def test_lifted_structure_odd_shapes_and_tuples(n):
    x = torch.randn(n, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    _compare(lambda x, backend: F.lifted_structure_loss(x, y, backend=backend), [x])
    if n >= 7:
        tup = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 4]), torch.tensor([5, 6]))
        with pytest.raises(_registry.Unsupported, match="explicit pairs"):
            F.lifted_structure_loss(x, None, tup, backend="cpu")


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [True, False])
def test_n_pairs(pattern, distance, normalize):
    x, y = make(pattern, n=13, d=5)
    fn = lambda x, backend: F.n_pairs_loss(x, y, distance=distance, normalize_embeddings=normalize,  # noqa: E731
                                           backend=backend)
    _compare(fn, [x])


@pytest.mark.parametrize("exact", [True, False])  # the K×K block (CPU) or the sync-free ceil(N/2) bound (GPU)
@pytest.mark.parametrize("n", [1, 2, 7, 33, 130])
def test_n_pairs_shapes_and_block_cut(n, exact, monkeypatch):
    monkeypatch.setattr(_pairs, "N_PAIRS_EXACT_ON_CPU", exact)
    y = torch.randint(0, max(1, n // 3), (n,))
    x = torch.randn(n, 6, dtype=torch.float64)
    for distance in ("cosine", "euclidean/raw"):
        _compare(lambda x, backend: F.n_pairs_loss(x, y, **dist_kw(distance), backend=backend), [x])


@pytest.mark.parametrize("pattern", ["random", "all_same", "all_distinct", "pairs", "one_sample"])
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_batch_hard(pattern, distance, swap, smooth):
    x, y = make(pattern, n=12, d=5)
    fn = lambda x, backend: F.triplet_margin_loss(x, y, mining="batch_hard", swap=swap, smooth_loss=smooth,  # noqa
                                                  **dist_kw(distance), margin=0.2, backend=backend)
    _compare(fn, [x])
    if swap or smooth:  # all-triplets mode takes neither
        with pytest.raises(_registry.Unsupported, match="swap / smooth_loss"):
            F.triplet_margin_loss(x, y, swap=swap, smooth_loss=smooth, backend="cpu")


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("margin", [0.05, 0.4])
def test_triplet_all(pattern, distance, margin):
    x, y = make(pattern, n=14, d=5)
    fn = lambda x, backend: F.triplet_margin_loss(x, y, **dist_kw(distance), margin=margin, backend=backend)  # noqa
    _compare(fn, [x])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 2), (33, 130, 7), (130, 33, 33)])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet_all_ref_and_odd_shapes(shape, distance):
    n, m, d = shape
    x, r = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    y, ry = torch.randint(0, 3, (n,)), torch.randint(0, 3, (m,))
    fn = lambda x, r, backend: F.triplet_margin_loss(x, y, None, r, ry, distance=distance, margin=0.2,  # noqa
                                                     backend=backend)
    _compare(fn, [x, r])
    fn = lambda x, backend: F.triplet_margin_loss(x, y, distance=distance, margin=0.2, backend=backend)  # noqa
    _compare(fn, [x])


def test_triplet_all_many_triplets_fp32():
    """300 anchors, ~100 positives × ~200 negatives each (≈ 6M triplets): sums and counts by sorting."""
    x32 = torch.randn(300, 32)
    y = torch.randint(0, 3, (300,))
    fn = lambda x, backend: F.triplet_margin_loss(x, y, margin=0.1, backend=backend)  # noqa: E731
    exact, (exact_g,) = _run(fn, [x32.double()], "reference")
    ref32, (ref32_g,) = _run(fn, [x32], "reference")
    ours, (ours_g,) = _run(fn, [x32], "cpu")
    for a, b, t in ((ours, ref32, exact), (ours_g, ref32_g, exact_g)):
        err, err_ref = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-6 * max(1.0, t.abs().max().item()), (err, err_ref)


def test_triplet_batch_hard_ref():
    x, y = make("random", n=9, d=5)
    r, ry = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    for swap in (False, True):
        fn = lambda x, r, backend: F.triplet_margin_loss(x, y, None, r, ry, mining="batch_hard", swap=swap,  # noqa
                                                         backend=backend)
        _compare(fn, [x, r])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("exclude_positive", [False, True])
@pytest.mark.parametrize("classes", [2, 7, 130])
def test_proxy_nca(distance, exclude_positive, classes):
    x = torch.randn(33, 6, dtype=torch.float64)
    y = torch.randint(0, min(classes, 5), (33,))  # classes absent from the batch too
    p = torch.randn(classes, 6, dtype=torch.float64)
    fn = lambda x, p, backend: F.proxy_nca_loss(x, y, p, softmax_scale=3.0, exclude_positive=exclude_positive,  # noqa
                                                **dist_kw(distance), backend=backend)
    _compare(fn, [x, p])


def test_proxy_nca_single_class_and_miner_weights():
    x = torch.randn(5, 3, dtype=torch.float64)
    p1 = torch.randn(1, 3, dtype=torch.float64)
    _compare(lambda x, p, backend: F.proxy_nca_loss(x, torch.zeros(5, dtype=torch.long), p, backend=backend), [x, p1])
    y = torch.tensor([0, 1, 0, 2, 1])
    p = torch.randn(3, 3, dtype=torch.float64)
    tup = (torch.tensor([0, 0, 2]), torch.tensor([2, 2, 0]), torch.tensor([1, 3, 4]))
    _compare(lambda x, p, backend: F.proxy_nca_loss(x, y, p, tup, backend=backend), [x, p])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("classes", [1, 4, 33])
def test_proxy_anchor(distance, classes):
    x = torch.randn(20, 7, dtype=torch.float64)
    y = torch.randint(0, min(classes, 3), (20,))
    p = torch.randn(classes, 7, dtype=torch.float64)
    fn = lambda x, p, backend: F.proxy_anchor_loss(x, y, p, **dist_kw(distance), backend=backend)  # noqa: E731
    _compare(fn, [x, p])


# --------------------------------------------------------------------------------------- similarity and miners


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 2), (130, 7, 33)])
def test_pairwise_similarity(distance, normalize, shape):
    n, m, d = shape
    x, r = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    w = torch.randn(n, m, dtype=torch.float64)
    fn = lambda x, r, backend: (F.pairwise_similarity(x, r, distance, normalize_embeddings=normalize,  # noqa
                                                      backend=backend) * w).sum()
    _compare(fn, [x, r])
    fn = lambda x, backend: (F.pairwise_similarity(x, None, distance, normalize_embeddings=normalize,  # noqa
                                                   backend=backend) * w[:, :n] if m >= n else x.sum()).sum()
    if m >= n:
        _compare(fn, [x])
    v = F.pairwise_similarity(x, r, distance, normalize_embeddings=normalize, backend="cpu")
    assert v.shape == (n, m) and v.dtype == torch.float64


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
def test_miners(pattern, distance):
    x, y = make(pattern, n=15, d=4)
    hp, hn = F.multi_similarity_thresholds(x, y, **dist_kw(distance), backend="cpu")
    hp0, hn0 = F.multi_similarity_thresholds(x, y, **dist_kw(distance), backend="reference")
    torch.testing.assert_close((hp, hn), (hp0, hn0), **TIGHT)
    for eps in (0.0, 0.1, 0.5):
        m1 = F.multi_similarity_mask(x, y, epsilon=eps, **dist_kw(distance), backend="cpu")
        m0 = F.multi_similarity_mask(x, y, epsilon=eps, **dist_kw(distance), backend="reference")
        assert isinstance(m1, PackedPairMask) and m1.shape == m0.shape
        assert torch.equal(m1.pos_bits, m0.pos_bits) and torch.equal(m1.neg_bits, m0.neg_bits)
    bp, bn = F.batch_hard_mining(x, y, **dist_kw(distance), backend="cpu")
    bp0, bn0 = F.batch_hard_mining(x, y, **dist_kw(distance), backend="reference")
    assert torch.equal(bp, bp0) and torch.equal(bn, bn0)


def test_batch_hard_ties_go_to_the_lowest_index():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    assert [t.tolist() for t in F.batch_hard_mining(x, y, backend="cpu")] == \
        [t.tolist() for t in F.batch_hard_mining(x, y, backend="reference")]


# --------------------------------------------------------------------------------------- autograd machinery


def test_gradcheck_fp64():
    torch.manual_seed(1)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y, ry = torch.tensor([0, 1, 0, 2, 1, 1, 0]), torch.tensor([0, 1, 2, 0, 1])
    cases = [
        lambda x: F.multi_similarity_loss(x, y, epsilon=0.5, backend="cpu"),
        lambda x: F.multi_similarity_loss(x, y, distance="euclidean", backend="cpu"),
        lambda x, r: F.multi_similarity_loss(x, y, None, r, ry, epsilon=0.5, distance="squared_euclidean",
                                             backend="cpu"),
        lambda x, r: F.generalized_lifted_structure_loss(x, y, None, r, ry, backend="cpu"),
        lambda x: F.contrastive_loss(x, y, pos_margin=0.1, neg_margin=1.5, backend="cpu"),
        lambda x: F.triplet_margin_loss(x, y, mining="batch_hard", margin=0.5, backend="cpu"),
        lambda x: F.triplet_margin_loss(x, y, margin=0.5, backend="cpu"),
        lambda x: F.lifted_structure_loss(x, y, neg_margin=0.5, backend="cpu"),
        lambda x: F.lifted_structure_loss(x, y, distance="cosine", backend="cpu"),
        lambda x: F.n_pairs_loss(x, y, backend="cpu"),
        lambda x: F.n_pairs_loss(x, y, distance="euclidean", normalize_embeddings=False, backend="cpu"),
        lambda x, r: F.triplet_margin_loss(x, y, None, r, ry, margin=0.5, distance="squared_euclidean",
                                           backend="cpu"),
        lambda x, p: F.proxy_nca_loss(x, y, p, backend="cpu"),
        lambda x, p: F.proxy_anchor_loss(x, y, p, backend="cpu"),
        lambda x, r: F.pairwise_similarity(x, r, "euclidean", backend="cpu"),
        lambda x: F.pairwise_similarity(x, None, "dot", normalize_embeddings=False, backend="cpu"),
    ]
    for fn in cases:
        nargs = fn.__code__.co_argcount
        args = (x,) if nargs == 1 else (x, r if "r" in fn.__code__.co_varnames[:2] else p)
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7), fn


def _opcheck_cases():
    torch.manual_seed(2)
    q = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y, ry = torch.randint(0, 3, (9,)), torch.randint(0, 3, (6,))
    mask = PackedPairMask.from_dense(torch.rand(9, 9) < 0.3, torch.rand(9, 9) < 0.5)
    ops = torch.ops.dml_kernels
    return [
        (ops.pair_values.default, (q, None, 0)),
        (ops.pair_values.default, (q, r, 1)),
        (ops.pair_values.default, (q.float(), r.float(), 2)),
        (ops.pair_reduce.default, (q, None, y, None, None, None, 0, 1, -2.0, 0.5, 50.0, 0.5, 0.1)),
        (ops.pair_reduce.default, (q, r, y, ry, None, None, 1, 0, 1.0, 0.0, -1.0, 1.0, None)),
        (ops.pair_reduce.default, (q, None, None, None, mask.pos_bits, mask.neg_bits, 2, 2, -1.0, 0.1, 1.0, 0.9,
                                   None)),
        (ops.ms_thresholds.default, (q.detach(), None, y, None, None, None, 0)),
        (ops.ms_mask.default, (q.detach(), r.detach(), y, ry, 1, 0.1)),
        (ops.batch_hard.default, (q.detach(), None, y, None, 2)),
        (ops.triplet_all.default, (q, None, y, None, 1, 0.3)),
        (ops.triplet_all.default, (q, r, y, ry, 0, 0.3)),
        (ops.lifted_pos.default, (q, y, torch.randn(9, dtype=torch.float64, requires_grad=True),
                                  torch.rand(9) < 0.7, 1, 0.2)),
        (ops.pair_reduce.default, (q, None, y, None, None, None, 0, 0, 1.0, 0.0, 1.0, 0.0, None,
                                   torch.rand(9) < 0.6)),
        (ops.pair_reduce.default, (q, r, y, ry, None, None, 1, 1, -2.0, 0.5, 50.0, 0.5, 0.1, torch.rand(6) < 0.6)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_no_input_mutation_and_clear_errors():
    x, y = make("random", n=8, d=4)
    x0, y0 = x.clone(), y.clone()
    xr = x.clone().requires_grad_()
    F.multi_similarity_loss(xr, y, epsilon=0.1, backend="cpu").backward()
    F.proxy_anchor_loss(x, y, torch.randn(3, 4, dtype=torch.float64), backend="cpu")
    assert torch.equal(x, x0) and torch.equal(y, y0)
    ops = torch.ops.dml_kernels
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.pair_reduce(x, None, y.int(), None, None, None, 0, 1, 1.0, 0.0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="bad dist code"):
        ops.pair_values(x, None, 7)
    with pytest.raises(RuntimeError, match=re.escape("packed pair bits must be uint8")):
        ops.pair_reduce(x, None, None, None, torch.zeros(8, 2, dtype=torch.uint8),
                        torch.zeros(8, 1, dtype=torch.uint8), 0, 1, 1.0, 0.0, 1.0, 0.0, None)


def test_torch_compile_traces_the_ops():
    x, y = make("random", n=16, d=8)
    fn = torch.compile(lambda x: F.multi_similarity_loss(x, y, epsilon=0.1, backend="cpu", check_inputs=False),
                       backend="aot_eager")
    xr = x.clone().requires_grad_()
    v = fn(xr)
    v.backward()
    v0, (g0,) = _run(lambda x, backend: _ms(x, y, epsilon=0.1, backend=backend), [x], "reference")
    torch.testing.assert_close(v.detach(), v0, **TIGHT)
    torch.testing.assert_close(xr.grad, g0, **TIGHT)


def test_backend_functions_compile_fullgraph():
    """The cpu backend's functions (what the registry calls) trace into one graph: fake kernels, registered
    autograd, device-side pair counts (no host sync)."""
    from dml_kernels.distances import Distance

    x, y = make("random", n=16, d=8)
    for name, kw in (("multi_similarity_loss", dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)),
                     ("triplet_margin_loss", dict(margin=0.1)),
                     ("contrastive_loss", dict(pos_margin=0.0, neg_margin=1.0))):
        impl = _registry.get_impl(name, "cpu", "cpu")
        fn = torch.compile(lambda x: impl(x, y, None, None, distance=Distance("euclidean", True), **kw),
                           fullgraph=True, backend="aot_eager")
        xr = x.clone().requires_grad_()
        v = fn(xr)
        (g,) = torch.autograd.grad(v, xr)
        v0, (g0,) = _run(lambda x, backend: getattr(F, name)(x, y, distance="euclidean", backend=backend, **kw),
                         [x], "reference")
        torch.testing.assert_close(v.detach(), v0, **TIGHT)
        torch.testing.assert_close(g, g0, **TIGHT)


def test_public_api_compiles_fullgraph_on_the_cpu_backend():
    x, y = make("random", n=16, d=8)
    for name, kw in (("multi_similarity_loss", dict(epsilon=0.1)), ("n_pairs_loss", {}),
                     ("lifted_structure_loss", {}), ("triplet_margin_loss", {})):
        fn = torch.compile(lambda x: getattr(F, name)(x, y, backend="cpu", check_inputs=False, **kw),
                           fullgraph=True, backend="aot_eager")
        xr = x.clone().requires_grad_()
        v = fn(xr)
        (g,) = torch.autograd.grad(v, xr)
        v0, (g0,) = _run(lambda x, backend: getattr(F, name)(x, y, backend=backend, **kw), [x], "reference")
        torch.testing.assert_close(v.detach(), v0, **TIGHT)
        torch.testing.assert_close(g, g0, **TIGHT)


# --------------------------------------------------------------------------------------- memory


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_fused_path_never_allocates_n_by_n():
    """N=4096, D=64 fp32, MS with mining, forward + backward: peak extra memory stays far below one N×N fp32
    matrix (64 MiB) on the cpu backend; the same measurement on the reference exceeds it."""
    n, d = 4096, 64
    x = torch.randn(n, d)
    y = torch.randint(0, 100, (n,))
    nxn = n * n * 4

    def step(backend):
        xr = x.clone().requires_grad_()
        F.multi_similarity_loss(xr, y, epsilon=0.1, backend=backend).backward()

    step("cpu")  # warm-up: thread pools, allocator caches
    fused = peak_extra_bytes(lambda: step("cpu"))
    reference = peak_extra_bytes(lambda: step("reference"))
    assert fused < nxn / 8, f"fused path peak extra {fused / 2**20:.1f} MiB"
    assert reference > nxn, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_proxy_losses_never_allocate_n_by_c():
    """N=1024 embeddings against C=65536 proxies (one N×C fp32 matrix = 256 MiB), forward + backward: the
    fused proxy losses stay far below it; the reference exceeds it."""
    n, c, d = 1024, 65536, 8  # O((N + C)·D) tensors are ~2 MiB each
    x, p = torch.randn(n, d), torch.randn(c, d)
    y = torch.randint(0, c, (n,))
    nxc = n * c * 4

    def step(name, backend):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        getattr(F, name)(xr, y, pr, backend=backend).backward()

    for name in ("proxy_nca_loss", "proxy_anchor_loss"):
        step(name, "cpu")
        fused = peak_extra_bytes(lambda: step(name, "cpu"))
        assert fused < nxc / 8, f"{name}: fused path peak extra {fused / 2**20:.1f} MiB"
    reference = peak_extra_bytes(lambda: step("proxy_nca_loss", "reference"))
    assert reference > nxc, f"the check cannot fail: reference peak extra only {reference / 2**20:.1f} MiB"
