"""Fused (per-row) miners: ``batch_easy_hard_mining`` and ``pair_margin_mining`` on the cpu backend (torch row
blocks, ``backends/cpp/mining.py``) and on Triton (the pair engine, ``backends/triton/mining.py``; under the
interpreter here, not yet run on a GPU), plus the random miners' reproducibility under ``torch.manual_seed``.

Equal to the float64 reference op, to PML 2.9's miners (the same index tuples in the same order: PML's order is
defined — ascending anchors for batch easy/hard, row-major pairs for pair-margin and "all" sides) and to naive
per-row loops written here; SPEC §5 label patterns, ``ref_emb``, odd sizes spanning several tiles / row blocks,
ties (duplicated embeddings, integer points); no N×M tensor and no host sync (the watch fails on the reference).
"""
import itertools

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.distances import Distance
from memory import TensorWatch
from patterns import PATTERNS, make

pm = pytest.importorskip("pytorch_metric_learning.miners")
pd = pytest.importorskip("pytorch_metric_learning.distances")

STRATEGIES = [(p, n) for p in ("easy", "semihard", "hard", "all") for n in ("easy", "semihard", "hard", "all")
              if not ("semihard" in (p, n) and (p == n or "all" in (p, n)))]
DIST_CASES = {  # ours (Distance), PML's object
    "euclidean": (Distance("euclidean", True), lambda: pd.LpDistance()),
    "euclidean/raw": (Distance("euclidean", False), lambda: pd.LpDistance(normalize_embeddings=False)),
    "squared_euclidean": (Distance("squared_euclidean", True), lambda: pd.LpDistance(power=2)),
    "cosine": (Distance("cosine", True), lambda: pd.CosineSimilarity()),
    "dot/raw": (Distance("dot", False), lambda: pd.DotProductSimilarity(normalize_embeddings=False)),
}
RANGES = [(None, None), ((0.3, 1.2), None), (None, (-0.5, 0.9)), ((0.1, 1.5), (0.2, 1.3))]
HAS_CPU = _registry.unavailable_reason("cpu", "cpu") is None
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="no cpu backend")), "triton"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _op(op, backend, x, y, r, ry, **kw):
    return _registry.call(op, backend, x.device.type, x, y, r, ry, **kw)


def _eh(backend, x, y, r, ry, dist, p, n, pr=None, nr=None):
    return _op("batch_easy_hard_mining", backend, x, y, r, ry, pos_strategy=p, neg_strategy=n, allowed_pos_range=pr,
               allowed_neg_range=nr, distance=dist)


def _same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == torch.long and a.tolist() == b.tolist()


def _data(pattern, n, ref, d=5, dtype=torch.float64):
    x, y = make(pattern, n=n, d=d, dtype=dtype)
    if not ref:
        return x, y, None, None
    m = n + 4 if n > 2 else 3
    return x, y, torch.randn(m, d, dtype=dtype), torch.randint(0, 3, (m,))


# --------------------------------------------------------------------------------- naive per-row loops


def _naive_easy_hard(mat, y, ry, p, n, pr, nr, sim):
    """Plain loops over PML's rule: per row, the admissible values; easy positive = closest, hard / semihard
    positive = farthest; hard / semihard negative = closest, easy negative = farthest; the semihard side strictly
    nearer than the other side's pick (an empty other side: the start of its search, ±inf, as in PML); the first
    index wins a tie; -1 when nothing is admissible."""
    rows, cols = mat.shape
    self_mode = ry is None
    mat, y, ry = mat.tolist(), y.tolist(), (y if self_mode else ry).tolist()

    def closer(a, b):  # a strictly closer than b
        return a > b if sim else a < b

    def pick(i, kind, strategy, bound=None, rng=None):
        best = -1
        for k in range(cols):
            same = y[i] == ry[k]
            if (kind == "pos") != same or (self_mode and k == i and kind == "pos"):
                continue
            v = mat[i][k]
            if rng is not None and not rng[0] <= v <= rng[1]:
                continue
            if bound is not None and not (closer(v, bound) if kind == "pos" else closer(bound, v)):
                continue
            want_close = (strategy == "easy") == (kind == "pos")
            if best < 0 or (closer(v, mat[i][best]) if want_close else closer(mat[i][best], v)):
                best = k
        return best

    def empty_bound(kind, strategy):  # PML: an empty side's value is where its search starts, -inf or +inf
        want_close = (strategy == "easy") == (kind == "pos")
        return float("-inf") if want_close == sim else float("inf")

    pos_out, neg_out = [], []
    for i in range(rows):
        if p == "semihard":
            ni = pick(i, "neg", n, rng=nr)
            bound = mat[i][ni] if ni >= 0 else empty_bound("neg", n)
            pi = pick(i, "pos", "hard", bound, pr)
        elif n == "semihard":
            pi = pick(i, "pos", p, rng=pr)
            bound = mat[i][pi] if pi >= 0 else empty_bound("pos", p)
            ni = pick(i, "neg", "hard", bound, nr)
        else:
            pi, ni = pick(i, "pos", p, rng=pr), pick(i, "neg", n, rng=nr)
        pos_out.append(pi)
        neg_out.append(ni)
    return (None if p == "all" else torch.tensor(pos_out)), (None if n == "all" else torch.tensor(neg_out))


def _pml_mat(x, r, case):
    return DIST_CASES[case][1]()(x, r)


# ------------------------------------------------------------------------------------ batch easy / hard


@pytest.mark.skipif(not HAS_CPU, reason="no cpu backend")
@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_easy_hard_cpu_equals_reference_and_naive(pattern, ref):
    x, y, r, ry = _data(pattern, 37, ref)  # 37 rows: blocks of 2 rows (≤ 1/16 of the matrix), odd sizes
    for case, (dist, _) in DIST_CASES.items():
        mat = _pml_mat(x, r, case)
        for (p, n), (pr, nr) in itertools.product(STRATEGIES, RANGES):
            got = _eh("cpu", x, y, r, ry, dist, p, n, pr, nr)
            _same(got, _eh("reference", x, y, r, ry, dist, p, n, pr, nr))
            if case in ("euclidean", "cosine") and pattern in ("random", "singletons_and_pairs"):
                _same(got, _naive_easy_hard(mat, y, ry, p, n, pr, nr, dist.is_similarity))


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
def test_easy_hard_triton_equals_reference_and_naive(ref):
    """Every strategy pair on 19 rows (two 16-row programs, two reference tiles), each with another range."""
    x, y, r, ry = _data("random", 19, ref)
    cases = list(DIST_CASES)
    for k, (p, n) in enumerate(STRATEGIES):
        case = cases[k % len(cases)]
        dist = DIST_CASES[case][0]
        pr, nr = RANGES[k % len(RANGES)]
        got = _eh("triton", x, y, r, ry, dist, p, n, pr, nr)
        _same(got, _eh("reference", x, y, r, ry, dist, p, n, pr, nr))
        _same(got, _naive_easy_hard(_pml_mat(x, r, case), y, ry, p, n, pr, nr, dist.is_similarity))


@pytest.mark.parametrize("pattern", ["all_same", "all_distinct", "singletons_and_pairs", "one_sample",
                                     "two_samples_same", "two_samples_distinct"])
def test_easy_hard_triton_label_patterns(pattern):
    """Rows without positives / negatives: -1 on that side, the semihard side unbounded when the other is empty."""
    x, y, r, ry = _data(pattern, 17, False)
    dist = Distance("euclidean", True)
    for p, n in [("semihard", "hard"), ("easy", "semihard")]:
        _same(_eh("triton", x, y, r, ry, dist, p, n), _eh("reference", x, y, r, ry, dist, p, n))


def _pml_miner(name, case, **kw):
    return getattr(pm, name)(distance=DIST_CASES[case][1](), **kw)


def _our_miner(name, case, backend, **kw):
    dist = DIST_CASES[case][0]
    return getattr(dk.miners, name)(distance=dist.name, normalize_embeddings=dist.normalize, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_hard_miner_tuples_equal_pml(backend):
    """The miner's (a, p, a, n) through the fused op is PML's tuple, in PML's order (ascending anchors; "all"
    sides row-major)."""
    x, y, r, ry = _data("random", 17, True)
    for k, (p, n) in enumerate(STRATEGIES):
        pr, nr = RANGES[k % 2]
        case = ("euclidean", "cosine")[k % 2]
        kw = dict(pos_strategy=p, neg_strategy=n, allowed_pos_range=pr, allowed_neg_range=nr)
        args = (x, y) if k % 3 else (x, y, r, ry)
        _same(_our_miner("BatchEasyHardMiner", case, backend, **kw)(*args),
              _pml_miner("BatchEasyHardMiner", case, **kw)(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_hard_exact_ties_equal_pml(backend):
    """PML's integer points on a line (unnormalised euclidean: exact arithmetic, many equal distances): the
    lowest index wins a tie and the semihard bound is strict — the same tuples as PML's."""
    y = torch.tensor([0, 0, 1, 1, 0, 2, 1, 1, 1])
    x = torch.arange(9, dtype=torch.float64).unsqueeze(1)
    strategies = STRATEGIES if backend == "cpu" else [("hard", "semihard"), ("semihard", "easy"), ("easy", "hard")]
    for (p, n), rng in itertools.product(strategies, [None, (1, 7)]):
        kw = dict(pos_strategy=p, neg_strategy=n, allowed_pos_range=rng, allowed_neg_range=rng)
        _same(_our_miner("BatchEasyHardMiner", "euclidean/raw", backend, **kw)(x, y),
              _pml_miner("BatchEasyHardMiner", "euclidean/raw", **kw)(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_hard_duplicated_embeddings(backend):
    """Duplicated embeddings (each row 2-4 times, the copies both positives and negatives). PML's full N×N GEMM is
    not tie-consistent: copies of one embedding get values 1 ulp apart in one row (measured: 1e-16 in fp64), so
    PML's pick among copies follows BLAS's tiling. The fused forms see exact ties and take the lowest index: equal
    to the naive rule on the exactly tied matrix (values of the distinct embeddings, gathered), and the same
    embeddings as PML's picks (the same copy group; indices may differ within it — a deliberate difference).
    With a semihard side even the copy group and the anchors can differ from PML's (see below)."""
    base = torch.randn(6, 4, dtype=torch.float64)
    group = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 5, 2, 3, 0, 1, 5, 4, 4, 3])
    xd = base[group]  # 17 rows
    yd = torch.tensor([0, 1, 1, 0, 1, 2, 0, 2, 0, 1, 2, 1, 0, 2, 1, 0, 2])
    strategies = STRATEGIES if backend == "cpu" else [("hard", "hard"), ("easy", "easy"), ("semihard", "hard"),
                                                      ("easy", "semihard")]
    for (p, n), case in itertools.product(strategies, ("euclidean", "cosine")):
        dist = DIST_CASES[case][0]
        tied = _pml_mat(base, None, case)[group][:, group]
        got = _eh(backend, xd, yd, None, None, dist, p, n)
        _same(got, _naive_easy_hard(tied, yd, None, p, n, None, None, dist.is_similarity))
        kw = dict(pos_strategy=p, neg_strategy=n)
        ours = _our_miner("BatchEasyHardMiner", case, backend, **kw)(xd, yd)
        theirs = _pml_miner("BatchEasyHardMiner", case, **kw)(xd, yd)
        if "semihard" in (p, n):  # a copy of the other side's pick sits exactly at the strict bound: excluded
            continue  # here (an exact tie), in or out in PML by the last bit of its GEMM (even the anchor count)
        _same((ours[0], ours[2]), (theirs[0], theirs[2]))
        assert torch.equal(group[ours[1]], group[theirs[1]]) and torch.equal(group[ours[3]], group[theirs[3]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    x, y, r, ry = _data("random", 21, True, d=8, dtype=torch.float32)
    for dist in (Distance("euclidean", True), Distance("cosine", True)):
        for p, n in [("hard", "semihard"), ("semihard", "easy")]:
            _same(_eh(backend, x, y, r, ry, dist, p, n, (0.2, 1.3)),
                  _eh("reference", x, y, r, ry, dist, p, n, (0.2, 1.3)))
        got = _op("pair_margin_mining", backend, x, y, None, None, pos_margin=0.5, neg_margin=0.6, distance=dist)
        _same(got.to_indices(), _op("pair_margin_mining", "reference", x, y, None, None, pos_margin=0.5,
                                    neg_margin=0.6, distance=dist).to_indices())


# ----------------------------------------------------------------------------------------- pair margin


def _naive_pair_margin(mat, y, ry, pos_margin, neg_margin, sim):
    self_mode = ry is None
    rows, cols = mat.shape
    mat, y, ry = mat.tolist(), y.tolist(), (y if self_mode else ry).tolist()
    a1, p, a2, n = [], [], [], []
    for i in range(rows):
        for k in range(cols):
            v = mat[i][k]
            if y[i] == ry[k] and not (self_mode and i == k) and (v < pos_margin if sim else v > pos_margin):
                a1.append(i)
                p.append(k)
            if y[i] != ry[k] and (v > neg_margin if sim else v < neg_margin):
                a2.append(i)
                n.append(k)
    return tuple(torch.tensor(t, dtype=torch.long) for t in (a1, p, a2, n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
def test_pair_margin_bits_equal_reference_naive_and_pml(backend, ref):
    patterns = list(PATTERNS) if backend == "cpu" else ["random", "all_same", "two_samples_distinct"]
    for k, pattern in enumerate(patterns):
        x, y, r, ry = _data(pattern, 19 if backend == "triton" else 37, ref)
        cases = list(DIST_CASES) if backend == "cpu" else [list(DIST_CASES)[k % len(DIST_CASES)]]
        for case in cases:
            dist = DIST_CASES[case][0]
            margins = [(0.2, 0.8), (0.5, 0.3)] if backend == "cpu" else [(0.5, 0.9)]
            for pm_, nm in margins:
                kw = dict(pos_margin=pm_, neg_margin=nm, distance=dist)
                got = _op("pair_margin_mining", backend, x, y, r, ry, **kw)
                want = _op("pair_margin_mining", "reference", x, y, r, ry, **kw)
                assert isinstance(got, dk._pairs.PackedPairMask) and got.shape == want.shape
                assert torch.equal(got.pos_bits, want.pos_bits) and torch.equal(got.neg_bits, want.neg_bits)
                _same(got.to_indices(), _naive_pair_margin(_pml_mat(x, r, case), y, ry, pm_, nm,
                                                           dist.is_similarity))
                _same(_our_miner("PairMarginMiner", case, backend, pos_margin=pm_, neg_margin=nm)(x, y, r, ry),
                      _pml_miner("PairMarginMiner", case, pos_margin=pm_, neg_margin=nm)(x, y, r, ry))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_margin_exact_ties_equal_pml(backend):
    """Integer points (unnormalised euclidean and dot: exact values equal to the margins): both bounds strict."""
    y = torch.tensor([0, 0, 1, 1, 0, 2, 1, 1, 1, 0, 2])
    x = torch.arange(11, dtype=torch.float64).unsqueeze(1)
    for case, margins in (("euclidean/raw", (2.0, 3.0)), ("dot/raw", (12.0, 20.0))):
        kw = dict(pos_margin=margins[0], neg_margin=margins[1])
        _same(_our_miner("PairMarginMiner", case, backend, **kw)(x, y), _pml_miner("PairMarginMiner", case, **kw)(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_margin_mask_feeds_multi_similarity(backend):
    """The packed mask goes to MultiSimilarityLoss as indices_tuple (no index tuple, no N×M mask): equal to PML's
    loss (value and gradient) on PML's PairMarginMiner tuple."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = make("random", n=19, d=5)
    x.requires_grad_()
    mask = _our_miner("PairMarginMiner", "euclidean", backend, pos_margin=0.6, neg_margin=1.1).mask(x, y)
    ours = dk.losses.MultiSimilarityLoss(backend=backend)(x, y, mask)
    theirs = pl.MultiSimilarityLoss()(x, y, pm.PairMarginMiner(pos_margin=0.6, neg_margin=1.1)(x, y))
    assert abs(ours.item() - theirs.item()) < 1e-9
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(theirs, x)
    assert torch.allclose(g1, g2, atol=1e-9, rtol=0)
    # ContrastiveLoss takes the mask too — on the reference backend (the cpu / Triton contrastive forms have no
    # explicit-pair form yet): equal to PML's on PML's tuple (the mask has no duplicate pairs to count)
    ours = dk.losses.ContrastiveLoss(backend="reference")(x, y, mask)
    theirs = pl.ContrastiveLoss()(x, y, pm.PairMarginMiner(pos_margin=0.6, neg_margin=1.1)(x, y))
    assert abs(ours.item() - theirs.item()) < 1e-9


# ------------------------------------------------------------------------- memory, syncs, inputs, refusals


def _watch(fn):
    with TensorWatch() as w:
        fn()
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_m_tensor_and_no_sync(backend):
    """Largest tensor below an N×M bool mask (the packed bits are N×M/8 bytes); the reference's N×M fp64 matrix
    fails the same bound."""
    n, m, d = (64, 72, 3) if backend == "triton" else (256, 300, 3)
    x, y, r, ry = torch.randn(n, d, dtype=torch.float64), torch.randint(0, 5, (n,)), torch.randn(m, d,
                                                                                          dtype=torch.float64), \
        torch.randint(0, 5, (m,))
    calls = [lambda b: _eh(b, x, y, r, ry, Distance("euclidean", True), "hard", "semihard", (0.1, 1.5)),
             lambda b: _eh(b, x, y, None, None, Distance("cosine", True), "semihard", "easy"),
             lambda b: _op("pair_margin_mining", b, x, y, r, ry, pos_margin=0.3, neg_margin=0.9,
                           distance=Distance("euclidean", True))]
    for call in calls:
        w = _watch(lambda: call(backend))
        assert w.largest < n * m and not w.syncs, (w.largest, w.largest_op, w.syncs)
        w = _watch(lambda: call("reference"))
        assert w.largest >= n * m


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched_and_refusals(backend):
    x, y, r, ry = _data("random", 17, True)
    before = [t.clone() for t in (x, y, r, ry)]
    _eh(backend, x, y, r, ry, Distance("euclidean", True), "semihard", "hard", (0.1, 1.0))
    _op("pair_margin_mining", backend, x, y, r, ry, pos_margin=0.3, neg_margin=0.9, distance=Distance("cosine", True))
    assert all(torch.equal(a, b) for a, b in zip(before, (x, y, r, ry)))
    with pytest.raises(ValueError, match="pos_strategy"):
        _eh(backend, x, y, r, ry, Distance("euclidean", True), "semihard", "all")
    with pytest.raises(ValueError, match="neg_strategy"):
        _eh(backend, x, y, r, ry, Distance("euclidean", True), "hard", "hardest")
    snr = pd.SNRDistance()  # not expressible by the engines: Unsupported, and "auto" falls back to the reference
    with pytest.raises(_registry.Unsupported):
        _op("pair_margin_mining", backend, x, y, r, ry, pos_margin=0.3, neg_margin=0.9, distance=snr)
    with pytest.raises(_registry.Unsupported):
        _eh(backend, x, y, r, ry, snr, "hard", "hard")
    for name, kw in [("PairMarginMiner", dict(pos_margin=0.4, neg_margin=0.9)),
                     ("BatchEasyHardMiner", dict(pos_strategy="hard", neg_strategy="semihard"))]:
        _same(getattr(dk.miners, name)(distance=snr, **kw)(x, y, r, ry), getattr(pm, name)(distance=snr, **kw)(x, y, r, ry))


def test_auto_picks_the_cpu_forms():
    assert {"cpu", "triton"} <= set(_registry.implemented("batch_easy_hard_mining"))
    assert {"cpu", "triton"} <= set(_registry.implemented("pair_margin_mining"))


# ------------------------------------------------------------------------- random miners: torch's RNG


@pytest.mark.parametrize("name,kw", [("DistanceWeightedMiner", {}),
                                     ("UniformHistogramMiner", dict(num_bins=10, pos_per_bin=3, neg_per_bin=4))])
def test_random_miners_follow_torch_manual_seed(name, kw):
    """Same seed → the same tuples (and PML's); another seed → different ones."""
    x, y = make("random", n=24, d=6)

    def run(seed, miner=None):
        torch.manual_seed(seed)
        return (miner or getattr(dk.miners, name)(**kw))(x, y)

    first = run(5)
    _same(run(5), first)
    _same(run(5, getattr(pm, name)(**kw)), first)
    assert any(a.tolist() != b.tolist() for a, b in zip(run(6), first))
    assert len(first[0]) > 0
