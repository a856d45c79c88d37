"""Evaluation: the fused k-NN op on every backend against the dense top-k (values, indices, the tie rule), its
memory at N = M = 65,536, and AccuracyCalculator against PML 2.9's on the same embeddings."""
import math
import os

import numpy as np
import pytest
import torch

from dml_kernels import _registry
from dml_kernels.backends.reference import pairwise_similarity
from dml_kernels.distances import Distance
from dml_kernels.evaluation import AccuracyCalculator, FusedKNN, KMeans, knn
from memory import peak_extra_bytes  # noqa: E402

BACKENDS = ["reference", "cpu", "triton"]
DISTANCES = [Distance("cosine", True), Distance("dot", False), Distance("euclidean", True),
             Distance("squared_euclidean", False)]


def _skip_unavailable(backend):
    why = _registry.unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def small_cpu_tiles(monkeypatch):
    """The cpu knn with tiny row blocks and reference chunks, so the test shapes span several of each."""
    from dml_kernels.backends.cpp import evaluation as cpu_knn
    monkeypatch.setattr(cpu_knn, "ROWS", 16)
    monkeypatch.setattr(cpu_knn, "TILE", 16 * 32)
    monkeypatch.setattr(cpu_knn, "MIN_CHUNK", 32)


def _dense_topk(x, ref, k, distance, exclude_self):
    """torch.topk of the dense matrix (the self pairs pushed to the far end)."""
    s = pairwise_similarity(x, x if ref is None else ref, distance=distance).clone()
    if exclude_self or ref is None:
        d = min(s.shape)
        s[torch.arange(d), torch.arange(d)] = -math.inf if distance.is_similarity else math.inf
    return torch.topk(s, k, dim=1, largest=distance.is_similarity)


def _naive(x, ref, k, distance, exclude_self):
    """Per row: sort (closer first, then the smaller index) with Python's sort — the documented tie rule."""
    s = pairwise_similarity(x, x if ref is None else ref, distance=distance)
    sign = -1.0 if distance.is_similarity else 1.0
    rows = []
    for i in range(s.shape[0]):
        cand = [(sign * s[i, j].item(), j) for j in range(s.shape[1]) if not ((exclude_self or ref is None) and i == j)]
        rows.append([j for _, j in sorted(cand)[:k]])
    return torch.tensor(rows, dtype=torch.int64).reshape(s.shape[0], k)


# shapes (N, M, k): odd sizes, one query, k = all references, M < BLOCK, M spanning several chunks
CASES_CPU = [(37, 101, 5), (33, None, 32), (1, 7, 7), (50, 200, 40), (64, 33, 1)]
CASES_TRITON = [(37, 45, 5), (17, None, 16), (1, 7, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_equals_dense_topk(backend, dtype, small_cpu_tiles):
    """Values and indices equal torch.topk of the dense matrix on tie-free data, with a reference set, with
    the query set itself (ref=None) and with PML's ref_includes_query (exclude_self with a reference set)."""
    _skip_unavailable(backend)
    cases = CASES_TRITON if backend == "triton" else CASES_CPU
    dists = DISTANCES if backend != "triton" or dtype == torch.float64 else DISTANCES[:1]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for n, m, k in cases:
        for distance in dists:
            x = torch.randn(n, 6, dtype=dtype)
            ref = None if m is None else torch.randn(m, 6, dtype=dtype)
            modes = [False] if ref is None else [False, True]
            for exclude in modes:
                if ref is not None and exclude:
                    ref[: min(n, m)] = x[: min(n, m)]  # PML's ref_includes_query: the queries come first
                    if k > m - 1:
                        continue
                v, i = knn(x, ref, k, distance=distance, normalize_embeddings=distance.normalize,
                           exclude_self=exclude, backend=backend)
                tv, ti = _dense_topk(x, ref, k, distance, exclude)
                assert i.dtype == torch.int64 and v.dtype == dtype and v.shape == (n, k)
                assert torch.equal(i, ti), (backend, distance, n, m, k, exclude)
                torch.testing.assert_close(v, tv, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_ties_smaller_index_first(backend, small_cpu_tiles):
    """Small integer embeddings (exact products, many equal values): every backend orders equal values by the
    smaller reference index, including at the k-th place and across chunks — the documented rule."""
    _skip_unavailable(backend)
    g = torch.Generator().manual_seed(3)
    n = 40 if backend == "triton" else 90
    x = torch.randint(-1, 2, (n, 3), generator=g).double()
    ref = torch.randint(-1, 2, (n + 23, 3), generator=g).double()
    ks = [1, 6, 17] if backend == "triton" else [1, 6, 17, n - 1]
    for distance in [Distance("dot", False), Distance("squared_euclidean", False), Distance("euclidean", False)]:
        for k in ks:
            for r, exclude in [(None, True), (ref, False)]:
                v, i = knn(x, r, k, distance=distance, normalize_embeddings=False, exclude_self=exclude,
                           backend=backend)
                expect = _naive(x, r, k, distance, exclude)
                assert torch.equal(i, expect), (backend, distance, k, exclude)
                dense = pairwise_similarity(x, x if r is None else r, distance=distance)
                assert torch.equal(v, dense.gather(1, expect))


def test_knn_arguments():
    x = torch.randn(5, 3)
    v, i = knn(x, None, 0)
    assert v.shape == (5, 0) and i.shape == (5, 0)
    with pytest.raises(ValueError, match="only 4 references"):
        knn(x, None, 5)
    with pytest.raises(ValueError, match="only 4 references"):
        knn(x, torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="only 3 references"):
        knn(x, torch.randn(4, 3), 4, exclude_self=True)
    with pytest.raises(ValueError, match="same device, dtype"):
        knn(x, torch.randn(4, 3, dtype=torch.float64), 1)
    # PML's knn_func protocol: (query, k, reference, ref_includes_query) -> (distances, indices)
    d, i = FusedKNN()(x, 2, torch.cat([x, x + 10]), True)
    assert i.shape == (5, 2) and not bool((i == torch.arange(5)[:, None]).any())


def test_triton_knn_large_k_is_unsupported():
    _skip_unavailable("triton")
    from dml_kernels.backends.triton import knn as triton_knn
    x = torch.randn(triton_knn.MAX_K + 2, 4)
    with pytest.raises(_registry.Unsupported):
        knn(x, None, triton_knn.MAX_K + 1, backend="triton")


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_cpu_knn_never_allocates_n_by_m():
    """N = M = 65,536, D = 8, fp32: the dense matrix would be 16 GiB; the cpu op's peak extra memory stays
    under 64 MiB. The same measurement sees the dense path's N×M buffer at N = M = 4096 (64 MiB)."""
    _skip_unavailable("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a busy 2-core machine (~15 s); the memory does not depend on it
    try:
        n = 65536
        x = torch.randn(n, 8)
        out = {}
        peak = peak_extra_bytes(lambda: out.update(r=knn(x, None, 4, backend="cpu")))
        assert peak < 64 * 2**20, f"cpu knn peak extra {peak / 2**20:.0f} MiB at N=M={n}"
        values, idx = out["r"]
        assert idx.shape == (n, 4) and bool((idx != torch.arange(n)[:, None]).all())
        rows = torch.arange(0, n, 4099)  # spot-check rows against the dense top-k of those rows
        d = torch.cdist(x[rows].double(), x.double()).pow(2)
        d[torch.arange(len(rows)), rows] = math.inf
        assert torch.equal(torch.topk(d, 4, largest=False).indices, idx[rows])
        small = torch.randn(4096, 8)
        dense = peak_extra_bytes(lambda: knn(small, None, 4, backend="reference"))
        assert dense > 4096 * 4096 * 4, f"the check cannot fail: dense peak extra only {dense / 2**20:.0f} MiB"
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- AccuracyCalculator

pml_ac = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")


def _pml_calculator(**kw):
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN
    # PML's default knn_func is faiss's IndexFlatL2 (squared L2, raw embeddings); CustomKNN ranks the same.
    knn_func = CustomKNN(LpDistance(normalize_embeddings=False, p=2, power=2))
    return pml_ac.AccuracyCalculator(device=torch.device("cpu"), knn_func=knn_func,
                                     kmeans_func=KMeans(library="sklearn", seed=0), **kw)


def _assert_same(ours, theirs):
    assert set(ours) == set(theirs)
    for key in ours:
        a, b = np.asarray(ours[key], dtype=float), np.asarray(theirs[key], dtype=float)
        assert a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-6, equal_nan=True), (key, a, b)


OPTIONS = [{}, {"k": "max_bin_count"}, {"k": 3}, {"avg_of_avgs": True}, {"return_per_class": True},
           {"k": "max_bin_count", "return_per_class": True}, {"include": ("precision_at_1", "r_precision")},
           {"exclude": ("NMI", "mean_average_precision")}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_accuracy_calculator_equals_pml(options):
    """Same embeddings, same k-means: every metric equals PML 2.9's within 1e-6 — same-set (a class with one
    sample: a lone query), query/reference split (a query label absent from the references) and
    ref_includes_query."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(60, 5, generator=g)
    ql = torch.randint(0, 6, (60,), generator=g)
    ql[7] = 17  # a class with one sample
    r = torch.randn(80, 5, generator=g)
    rl = torch.randint(0, 6, (80,), generator=g)
    ours = AccuracyCalculator(device="cpu", kmeans_func=KMeans(library="sklearn", seed=0), **options)
    theirs = _pml_calculator(**options)
    for args in [(q, ql), (q, ql, r, rl), (q, ql, torch.cat([q, r]), torch.cat([ql, rl]), True)]:
        _assert_same(ours.get_accuracy(*args), theirs.get_accuracy(*args))


def test_accuracy_calculator_label_edge_cases():
    """Every class with one sample (all queries lone: NaN), query labels absent from the references, numpy
    inputs, and a fused backend (cpu, triton) giving the reference backend's numbers."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(12, 4, generator=g)
    singles = torch.arange(12)
    kw = dict(k="max_bin_count")
    _assert_same(AccuracyCalculator(device="cpu", kmeans_func=KMeans(library="sklearn"), **kw).get_accuracy(q, singles),
                 _pml_calculator(**kw).get_accuracy(q, singles))
    r, rl = torch.randn(30, 4, generator=g), torch.randint(20, 23, (30,), generator=g)
    _assert_same(AccuracyCalculator(device="cpu", exclude=("NMI", "AMI")).get_accuracy(q, singles, r, rl),
                 _pml_calculator(exclude=("NMI", "AMI")).get_accuracy(q, singles, r, rl))
    y = torch.randint(0, 3, (40,), generator=g)
    x = torch.randn(40, 4, generator=g)
    _assert_same(AccuracyCalculator(device="cpu", exclude=("NMI", "AMI")).get_accuracy(x.numpy(), y.numpy()),
                 _pml_calculator(exclude=("NMI", "AMI")).get_accuracy(x, y))
    ref = AccuracyCalculator(device="cpu", exclude=("NMI", "AMI"), k="max_bin_count", backend="reference")
    for backend in ["cpu", "triton"]:
        if _registry.unavailable_reason(backend, "cpu") is None:
            fused = AccuracyCalculator(device="cpu", exclude=("NMI", "AMI"), k="max_bin_count", backend=backend)
            _assert_same(fused.get_accuracy(x, y), ref.get_accuracy(x, y))


def test_recall_at_k():
    """recall_at_K: fraction of (non-lone) queries with a same-label reference among the K nearest; equals
    precision_at_1 at K=1; checked against a loop over the dense distances."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 4, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    y[0] = 9  # lone: left out, as in precision_at_1
    calc = AccuracyCalculator(device="cpu", include=("precision_at_1", "recall_at_1", "recall_at_3", "recall_at_60"),
                              k="max_bin_count", recall_at_k=(1, 3, 60))
    res = calc.get_accuracy(x, y)
    assert set(res) == {"precision_at_1", "recall_at_1", "recall_at_3", "recall_at_60"}
    assert res["recall_at_1"] == pytest.approx(res["precision_at_1"], abs=1e-12)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    order = d.argsort(1)
    for K in (1, 3, 60):
        hits = [bool((y[order[i, :K]] == y[i]).any()) for i in range(1, 50)]
        assert res[f"recall_at_{K}"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    with pytest.raises(ValueError, match="recall_at_k"):
        AccuracyCalculator(recall_at_k=(0,))
    with pytest.raises(ValueError, match="Primary metrics"):
        AccuracyCalculator(include=("recall_at_5",), recall_at_k=(1,))


def test_accuracy_calculator_subclass_metric():
    """PML's extension point: a calculate_<name> method is a metric and receives PML's keyword arguments."""
    class WithFirstHit(AccuracyCalculator):
        def calculate_first_label(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            return float((knn_labels[not_lone_query_mask, 0] == query_labels[not_lone_query_mask]).double().mean())

        def requires_knn(self):
            return super().requires_knn() + ["first_label"]

    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    res = WithFirstHit(device="cpu", include=("first_label", "precision_at_1")).get_accuracy(x, y)
    assert res["first_label"] == pytest.approx(res["precision_at_1"])
