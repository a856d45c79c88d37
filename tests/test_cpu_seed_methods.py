"""The ``cpu`` forms of the seed methods' fused losses (dml_kernels/backends/cpp/direction.py, proxy_gml.py):
direction regularisation on MultiSimilarity / ProxyNCA / TripletMargin (all, batch-hard, given triplets) and
ProxyGML, row blocks of O(block × M) memory with a recomputing backward.

Each equals the float64 reference at 1e-9 (values and gradients, references and proxies included) on the label
patterns of SPEC §5 and odd shapes, with block sizes that cut the rows unevenly; gradcheck; the tie rules
(hardest positive, ProxyGML's K-th value: the lower index wins); no N×M / B×C·N tensor (a watch that fails on
the reference) and no host sync; inputs untouched; clear refusals. The naive-loop oracles of
tests/test_direction.py and tests/test_proxy_gml.py run on every registered backend, this one included.
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from patterns import PATTERNS
from memory import TensorWatch

F = dk.functional
TOL = 1e-9
pytestmark = [pytest.mark.skipif(_registry.unavailable_reason("cpu", "cpu") is not None, reason="no cpu backend"),
              pytest.mark.usefixtures("one_thread")]  # one_thread, tile: tests/conftest.py


def _run(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


def _same(fn, *inputs, tol=TOL):
    """cpu == reference: value and every gradient (relative to max(1, |reference|))."""
    (v_ref, g_ref), (v_cpu, g_cpu) = _run(fn, inputs, "reference"), _run(fn, inputs, "cpu")
    assert v_cpu.dtype == v_ref.dtype
    assert abs(float(v_cpu) - float(v_ref)) <= tol * max(1.0, abs(float(v_ref))), (float(v_cpu), float(v_ref))
    for a, b in zip(g_cpu, g_ref):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())
    return float(v_ref)


def _data(n, d, m=None, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    if m is None:
        return x, None, None
    return x, torch.randn(m, d, dtype=torch.float64, generator=g), torch.randint(0, classes, (m,), generator=g)


# ------------------------------------------------------------------------------------------ direction: MS


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_ms_patterns(pattern, epsilon, tile):
    y = PATTERNS[pattern](37)
    x, _, _ = _data(len(y), 5)
    _same(lambda e, backend: F.direction_multi_similarity_loss(e, y, direction_gamma=0.4, beta=7, epsilon=epsilon,
                                                               backend=backend), x)


@pytest.mark.parametrize("distance,normalize", [("cosine", True), ("dot", False), ("euclidean", True),
                                                ("squared_euclidean", False), ("euclidean", False)])
@pytest.mark.parametrize("epsilon", [None, 0.2])
def test_ms_distances_with_ref(distance, normalize, epsilon):
    x, r, ry = _data(23, 6, m=19)
    y = torch.randint(0, 3, (23,), generator=torch.Generator().manual_seed(1))
    _same(lambda e, rr, backend: F.direction_multi_similarity_loss(
        e, y, None, rr, ry, direction_gamma=0.6, alpha=3, beta=9, base=0.3, epsilon=epsilon, distance=distance,
        normalize_embeddings=normalize, backend=backend), x, r)


def test_ms_hardest_positive_ties_take_the_lower_index():
    """Duplicated embeddings: the hardest positive is tied; both backends take the lowest index (the tie
    matters: a mutation taking the last one changes the value)."""
    x, _, _ = _data(4, 3)
    x = torch.cat([x, x[:2], x[:2]])  # rows 4..7 repeat rows 0, 1
    y = torch.tensor([0, 1, 2, 2, 0, 1, 0, 1])
    _same(lambda e, backend: F.direction_multi_similarity_loss(e, y, direction_gamma=0.8, beta=5, backend=backend), x)
    # a sharper tie: row 0's positives 3 and 5 are the same point
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2], [-1.0, 0.2], [0.5, -0.7], [-1.0, 0.2]], dtype=torch.float64)
    y2 = torch.tensor([0, 1, 1, 0, 1, 0])
    _same(lambda e, backend: F.direction_multi_similarity_loss(e, y2, direction_gamma=0.8, beta=5, backend=backend),
          x2)


# ------------------------------------------------------------------------------------------ direction: ProxyNCA


@pytest.mark.parametrize("distance,normalize", [("squared_euclidean", True), ("cosine", True), ("dot", False),
                                                ("euclidean", False)])
@pytest.mark.parametrize("exclude_positive", [False, True])
def test_proxy_nca(distance, normalize, exclude_positive, tile):
    x, p, _ = _data(29, 5, m=11)
    y = torch.randint(0, 11, (29,), generator=torch.Generator().manual_seed(2))
    _same(lambda e, pp, backend: F.direction_proxy_nca_loss(
        e, y, pp, direction_gamma=0.7, softmax_scale=3, exclude_positive=exclude_positive, distance=distance,
        normalize_embeddings=normalize, backend=backend), x, p)


def test_proxy_nca_miner_weights():
    x, p, _ = _data(13, 4, m=5)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0, 1])
    tup = (torch.tensor([0, 3, 3, 7]), torch.tensor([5, 8, 8, 2]), torch.tensor([1, 4, 4, 0]))  # anchor 3 twice
    _same(lambda e, pp, backend: F.direction_proxy_nca_loss(e, y, pp, tup, direction_gamma=0.5, backend=backend), x, p)


# ------------------------------------------------------------------------------------------ direction: triplet


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mining", [None, "batch_hard"])
def test_triplet_patterns(pattern, mining, tile):
    y = PATTERNS[pattern](21)
    x, _, _ = _data(len(y), 4)
    _same(lambda e, backend: F.direction_triplet_margin_loss(e, y, direction_gamma=0.4, margin=0.3, mining=mining,
                                                             backend=backend), x)


@pytest.mark.parametrize("mining", [None, "batch_hard"])
@pytest.mark.parametrize("swap,smooth", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("distance,normalize", [("euclidean", True), ("cosine", True), ("squared_euclidean", False)])
def test_triplet_variants_with_ref(mining, swap, smooth, distance, normalize):
    x, r, ry = _data(17, 3, m=13)
    y = torch.randint(0, 3, (17,), generator=torch.Generator().manual_seed(3))
    _same(lambda e, rr, backend: F.direction_triplet_margin_loss(
        e, y, None, rr, ry, direction_gamma=0.5, margin=0.4, swap=swap, smooth_loss=smooth, mining=mining,
        distance=distance, normalize_embeddings=normalize, backend=backend), x, r)


def test_triplet_given_triplets():
    x, _, _ = _data(10, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    tup = (torch.tensor([0, 0, 2, 9, 4]), torch.tensor([1, 6, 3, 6, 5]), torch.tensor([2, 4, 0, 8, 7]))
    for swap in (False, True):
        _same(lambda e, backend: F.direction_triplet_margin_loss(e, y, tup, direction_gamma=0.5, margin=0.3, swap=swap,
                                                                 backend=backend), x)
    empty = (torch.zeros(0, dtype=torch.long),) * 3
    _same(lambda e, backend: F.direction_triplet_margin_loss(e, y, empty, direction_gamma=0.5, backend=backend), x)


def test_direction_float32_and_half():
    x, r, ry = _data(30, 8, m=20)
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(4))
    for fn in (lambda e, rr, backend: F.direction_multi_similarity_loss(e, y, None, rr, ry, direction_gamma=0.3,
                                                                        backend=backend),
               lambda e, rr, backend: F.direction_triplet_margin_loss(e, y, direction_gamma=0.3, backend=backend),
               lambda e, rr, backend: F.direction_proxy_nca_loss(e, y, rr[:5], direction_gamma=0.3, backend=backend),
               lambda e, rr, backend: F.proxy_gml_loss(e, y, rr.T[:, :6], proxies_per_class=2, top_k=3,
                                                       weight_lambda=0.2, backend=backend)):
        want = fn(x, r, "reference")
        got = fn(x.float(), r.float(), "cpu")
        assert got.dtype == torch.float32 and abs(float(got) - float(want)) < 1e-5 * max(1, abs(float(want)))
        assert fn(x.half(), r.half(), "cpu").dtype == torch.float32


# ------------------------------------------------------------------------------------------ ProxyGML


def _gml_data(b, c, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, dtype=torch.float64, generator=g), torch.randint(0, c, (b,), generator=g),
            torch.randn(d, c * n, dtype=torch.float64, generator=g))


GML_CASES = [  # (B, C, N, D, K, λ, options)
    (37, 7, 3, 6, 9, 0.3, {}),
    (33, 5, 2, 5, 3, 0.0, {}),  # K' = 1
    (19, 23, 4, 8, 13, 0.5, {}),  # C > B: absent classes
    (21, 3, 4, 4, 2, 0.3, {}),  # K < N: own class only
    (21, 3, 3, 4, 3, 0.3, {}),  # K' = 0
    (17, 3, 2, 4, 6, 0.3, {}),  # every proxy selected
    (40, 9, 1, 5, 3, 0.3, {}),  # N = 1
    (37, 7, 3, 6, 10, 0.3, {"release_eps": True}),
    (37, 7, 3, 6, 10, 0.3, {"class_mask": "nonzero"}),
    (37, 7, 3, 6, 10, 0.3, {"release_eps": True, "class_mask": "nonzero", "normalize_embeddings": False}),
]


@pytest.mark.parametrize("case", GML_CASES, ids=[str(i) for i in range(len(GML_CASES))])
def test_proxy_gml(case, tile):
    b, c, n, d, k, lam, opts = case
    x, y, P = _gml_data(b, c, n, d)
    _same(lambda e, pp, backend: F.proxy_gml_loss(e, y, pp, proxies_per_class=n, top_k=k, weight_lambda=lam,
                                                  backend=backend, **opts), x, P)


@pytest.mark.parametrize("k", [4, 5, 6, 7, 9])
def test_proxy_gml_ties_at_the_kth_value(k):
    """Duplicated proxy columns tie at the K-th value: the lower proxy index wins on both backends (with N = 2
    and duplicates in different classes, the choice moves mass between classes: the value depends on it)."""
    x, y, P = _gml_data(20, 5, 2, 4, seed=5)
    P = P.clone()
    P[:, 9], P[:, 6], P[:, 4] = P[:, 1], P[:, 3], P[:, 2] * 2.0  # same directions: equal similarities
    x[3] = x[0]  # duplicated rows as well
    _same(lambda e, pp, backend: F.proxy_gml_loss(e, y, pp, proxies_per_class=2, top_k=k, weight_lambda=0.2,
                                                  backend=backend), x, P)


# ------------------------------------------------------------------------------------------ gradcheck


def test_gradcheck():
    x, r, ry = _data(7, 3, m=6)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 0])
    p = torch.randn(3, 3, dtype=torch.float64)
    gx, gy, gp = _gml_data(6, 3, 2, 3, seed=7)
    checks = [
        (lambda e, rr: F.direction_multi_similarity_loss(e, y, None, rr, ry, direction_gamma=0.5, beta=5, epsilon=0.3,
                                                         backend="cpu"), (x, r)),
        (lambda e: F.direction_multi_similarity_loss(e, y, direction_gamma=0.5, beta=5, backend="cpu"), (x,)),
        (lambda e, pp: F.direction_proxy_nca_loss(e, y, pp, direction_gamma=0.5, softmax_scale=2, backend="cpu"),
         (x, p)),
        (lambda e, rr: F.direction_triplet_margin_loss(e, y, None, rr, ry, direction_gamma=0.5, margin=0.6,
                                                       swap=True, backend="cpu"), (x, r)),
        (lambda e: F.direction_triplet_margin_loss(e, y, direction_gamma=0.5, margin=0.6, mining="batch_hard",
                                                   backend="cpu"), (x,)),
        (lambda e, pp: F.proxy_gml_loss(e, gy, pp, proxies_per_class=2, top_k=4, weight_lambda=0.4, backend="cpu"),
         (gx, gp)),
    ]
    for i, (fn, inputs) in enumerate(checks):
        inputs = tuple(t.clone().requires_grad_() for t in inputs)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7), i


def test_double_backward_is_refused():
    x, _, _ = _data(6, 3)
    x.requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = F.direction_multi_similarity_loss(x, y, direction_gamma=0.3, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


# ------------------------------------------------------------------------------------------ memory, syncs


_Watch = TensorWatch  # tests/memory.py


N, M, D = 96, 80, 3  # fp64: one N×M matrix is 61440 bytes; the O((N + M)·D) buffers are ≤ 2304
WATCHED = {
    "ms": lambda x, y, r, ry, b: F.direction_multi_similarity_loss(x, y, None, r, ry, direction_gamma=0.3,
                                                                   epsilon=0.1, backend=b, check_inputs=False),
    "ms_self": lambda x, y, r, ry, b: F.direction_multi_similarity_loss(x, y, direction_gamma=0.3, backend=b,
                                                                        check_inputs=False),
    "proxy_nca": lambda x, y, r, ry, b: F.direction_proxy_nca_loss(x, y % M, r, direction_gamma=0.3, backend=b,
                                                                   check_inputs=False),
    "triplet_all": lambda x, y, r, ry, b: F.direction_triplet_margin_loss(x, y, None, r, ry, direction_gamma=0.3,
                                                                          swap=True, backend=b, check_inputs=False),
    "triplet_batch_hard": lambda x, y, r, ry, b: F.direction_triplet_margin_loss(
        x, y, None, r, ry, direction_gamma=0.3, mining="batch_hard", backend=b, check_inputs=False),
    "proxy_gml": lambda x, y, r, ry, b: F.proxy_gml_loss(x, y % 20, r.T, proxies_per_class=4, top_k=9,
                                                         weight_lambda=0.3, backend=b, check_inputs=False),
}


SIZES = {"triplet_all": (40, 32)}  # (N, M): all triplets run N × (M/8)² chunks at this size (time)


def _watched(name, backend):
    n, m = SIZES.get(name, (N, M))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(m, D, dtype=torch.float64, generator=g, requires_grad=True)
    y, ry = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 6, (m,), generator=g)
    with _Watch() as w:
        WATCHED[name](x, y, r, ry, backend).backward()
    assert x.grad is not None and (name == "ms_self" or r.grad is not None)
    return w


@pytest.mark.parametrize("name", list(WATCHED))
def test_no_pairwise_buffer_and_no_host_sync(name):
    """Forward + backward on cpu: no tensor of an eighth of the N×M (B×C·N) fp64 matrix, no sync; the same
    watch sees the reference's N×M buffers (it can fail)."""
    n, m = SIZES.get(name, (N, M))
    limit = n * (n if name == "ms_self" else m) * 8 // 8
    assert _watched(name, "reference").largest >= limit
    w = _watched(name, "cpu")
    assert w.largest < limit, (w.largest, w.largest_op)
    assert not w.syncs, w.syncs


def test_no_tensor_to_python_conversions(monkeypatch):
    """With check_inputs=False nothing turns a tensor into a Python value (a CPU stand-in for a CUDA sync)."""
    calls = []
    for nm in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, nm)
        monkeypatch.setattr(torch.Tensor, nm, (lambda o, k: lambda self, *a, **kw: (calls.append(k),
                                                                                     o(self, *a, **kw))[1])(orig, nm))
    for name in WATCHED:
        _watched(name, "cpu")
    monkeypatch.undo()
    assert calls == [], calls


# ------------------------------------------------------------------------------------------ inputs, refusals


def test_inputs_untouched():
    x, r, ry = _data(12, 4, m=9)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(6))
    P = torch.randn(4, 6, dtype=torch.float64)
    saved = [t.clone() for t in (x, r, ry, y, P)]
    F.direction_multi_similarity_loss(x, y, None, r, ry, direction_gamma=0.3, epsilon=0.1, backend="cpu")
    F.direction_proxy_nca_loss(x, y, r[:3], direction_gamma=0.3, backend="cpu")
    F.direction_triplet_margin_loss(x, y, direction_gamma=0.3, swap=True, backend="cpu")
    F.direction_triplet_margin_loss(x, y, None, r, ry, direction_gamma=0.3, mining="batch_hard", backend="cpu")
    F.proxy_gml_loss(x, y, P, proxies_per_class=2, top_k=3, weight_lambda=0.3, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip((x, r, ry, y, P), saved))


def test_explicit_pairs_are_refused_and_auto_falls_back():
    x, _, _ = _data(8, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    pairs = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 4]), torch.tensor([2, 5]))
    with pytest.raises(_registry.Unsupported, match="explicit-pair"):
        F.direction_multi_similarity_loss(x, y, pairs, direction_gamma=0.3, backend="cpu")
    want = F.direction_multi_similarity_loss(x, y, pairs, direction_gamma=0.3, backend="reference")
    with pytest.warns(RuntimeWarning, match="falling back"):
        _registry._WARNED.clear()
        got = F.direction_multi_similarity_loss(x, y, pairs, direction_gamma=0.3, backend="auto")
    assert torch.equal(got, want)


def test_auto_picks_cpu(monkeypatch):
    seen = []
    impl = _registry._IMPLS[("proxy_gml_loss", "cpu")]
    monkeypatch.setitem(_registry._IMPLS, ("proxy_gml_loss", "cpu"), lambda *a, **k: (seen.append(1), impl(*a, **k))[1])
    x, y, P = _gml_data(5, 3, 2, 4)
    F.proxy_gml_loss(x, y, P, proxies_per_class=2, top_k=3, backend="auto")
    assert seen == [1]
