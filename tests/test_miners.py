"""PML 2.9's remaining miners (PairMargin, BatchEasyHard, DistanceWeighted, Angular, HDC, UniformHistogram,
EmbeddingsAlreadyPackagedAsTriplets) against PML itself: the same index tensors in the same order (the
reference computes its matrix as PML's distance classes do, so even ties agree), on every label pattern, with
and without ``ref_emb``; the random miners draw PML's indices under the same ``torch.manual_seed``; bad
arguments are ValueErrors naming the argument."""
import inspect
import math

import pytest
import torch

import dml_kernels as dk
from patterns import PATTERNS, make

pm = pytest.importorskip("pytorch_metric_learning.miners")
pd = pytest.importorskip("pytorch_metric_learning.distances")

NEW = ["PairMarginMiner", "BatchEasyHardMiner", "DistanceWeightedMiner", "AngularMiner", "HDCMiner",
       "UniformHistogramMiner", "EmbeddingsAlreadyPackagedAsTriplets"]
# ours: a string (or None: PML's default LpDistance()); PML: the equivalent object.
DISTANCES = {
    "default": (None, lambda: pd.LpDistance()),
    "cosine": ("cosine", lambda: pd.CosineSimilarity()),
    "dot/raw": ("dot", lambda: pd.DotProductSimilarity(normalize_embeddings=False)),
    "euclidean/raw": ("euclidean", lambda: pd.LpDistance(normalize_embeddings=False)),
    "squared_euclidean": ("squared_euclidean", lambda: pd.LpDistance(power=2)),
}
STRATEGIES = [(p, n) for p in ("easy", "semihard", "hard", "all") for n in ("easy", "semihard", "hard", "all")
              if not ("semihard" in (p, n) and (p == n or "all" in (p, n)))]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _ours(name, dist_case="default", **kw):
    dist, _ = DISTANCES[dist_case]
    normalize = {"dot/raw": False, "euclidean/raw": False}.get(dist_case, True)
    if dist is not None:
        kw.update(distance=dist, normalize_embeddings=normalize)
    return getattr(dk.miners, name)(backend="reference", **kw)


def _pml(name, dist_case="default", **kw):
    return getattr(pm, name)(distance=DISTANCES[dist_case][1](), **kw)


def _data(pattern, n, ref, d=5):
    x, y = make(pattern, n=n, d=d)
    if not ref:
        return x, y, None, None
    m = 2 * len(y) + 1  # odd, and larger than the batch
    return x, y, torch.randn(m, d, dtype=x.dtype), torch.randint(0, 3, (m,))


def _same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.long and a.device == b.device
        assert a.tolist() == b.tolist()


# ------------------------------------------------------------------------------------ equal to PML, exactly


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pair_margin_matches_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 9, ref)
    for dist in DISTANCES:
        for pos_margin, neg_margin in [(0.2, 0.8), (0.5, 0.3), (-0.1, 1.1)]:
            kw = dict(pos_margin=pos_margin, neg_margin=neg_margin)
            _same(_ours("PairMarginMiner", dist, **kw)(x, y, r, ry), _pml("PairMarginMiner", dist, **kw)(x, y, r, ry))


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_batch_easy_hard_matches_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 11, ref)
    for dist in DISTANCES:
        for pos_s, neg_s in STRATEGIES:
            for pos_range, neg_range in [(None, None), ((0.3, 1.2), None), (None, (-0.5, 0.9))]:
                kw = dict(pos_strategy=pos_s, neg_strategy=neg_s, allowed_pos_range=pos_range,
                          allowed_neg_range=neg_range)
                _same(_ours("BatchEasyHardMiner", dist, **kw)(x, y, r, ry),
                      _pml("BatchEasyHardMiner", dist, **kw)(x, y, r, ry))


def test_batch_easy_hard_ties_match_pml():
    """PML's own set-up (integer points on a line, unnormalised euclidean): many equal distances. The tie rule
    (lowest index, torch's min/max) and the strict semihard bounds must agree exactly."""
    y = torch.tensor([0, 0, 1, 1, 0, 2, 1, 1, 1])
    x = torch.arange(9, dtype=torch.float64).unsqueeze(1)
    for pos_s, neg_s in STRATEGIES:
        for rng in [None, (1, 7), (2, 2)]:
            kw = dict(pos_strategy=pos_s, neg_strategy=neg_s, allowed_pos_range=rng, allowed_neg_range=rng)
            _same(_ours("BatchEasyHardMiner", "euclidean/raw", **kw)(x, y),
                  _pml("BatchEasyHardMiner", "euclidean/raw", **kw)(x, y))


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_hdc_matches_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 9, ref)
    for dist in DISTANCES:
        for fp in (0.5, 0.3, 1.0, 0.0):
            _same(_ours("HDCMiner", dist, filter_percentage=fp)(x, y, r, ry),
                  _pml("HDCMiner", dist, filter_percentage=fp)(x, y, r, ry))


def test_hdc_cascade_matches_pml():
    """With pairs set externally every call filters the stored pairs again; reset_idx() starts over."""
    x, y = make("random", n=13, d=4)
    ours, theirs = _ours("HDCMiner", filter_percentage=0.6), _pml("HDCMiner", filter_percentage=0.6)
    t = dk.miners.TripletMarginMiner(0.5, backend="reference")(x, y)
    ours.set_idx_externally(t, y)
    theirs.set_idx_externally(t, y)
    for _ in range(3):
        _same(ours(x, y), theirs(x, y))
    assert ours.was_set_externally
    ours.reset_idx()
    theirs.reset_idx()
    _same(ours(x, y), theirs(x, y))


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_angular_matches_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 9, ref, d=3)
    x = x * torch.linspace(0.5, 2, len(x), dtype=x.dtype).unsqueeze(1)  # raw norms matter (PML does not normalise)
    for angle in (0, 20, 35, 50):
        _same(_ours("AngularMiner", angle=angle)(x, y, r, ry), _pml("AngularMiner", angle=angle)(x, y, r, ry))


@pytest.mark.parametrize("n", [3, 9, 21])
def test_packaged_triplets_matches_pml(n):
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    _same(dk.miners.EmbeddingsAlreadyPackagedAsTriplets()(x, y), pm.EmbeddingsAlreadyPackagedAsTriplets()(x, y))
    _same(dk.miners.EmbeddingsAlreadyPackagedAsTriplets()(x, None), pm.EmbeddingsAlreadyPackagedAsTriplets()(x, y))


def test_pml_distance_objects_and_engine_inexpressible_distances():
    """PML's objects are accepted; those the engines cannot express (SNR, L1) are computed by the reference."""
    x, y, r, ry = _data("random", 13, True)
    for dist in [pd.SNRDistance(), pd.LpDistance(p=1), pd.CosineSimilarity(), pd.LpDistance(power=2)]:
        for name, kw in [("PairMarginMiner", dict(pos_margin=0.4, neg_margin=0.9)), ("HDCMiner", {}),
                         ("BatchEasyHardMiner", dict(pos_strategy="hard", neg_strategy="semihard"))]:
            _same(getattr(dk.miners, name)(distance=dist, **kw)(x, y, r, ry),
                  getattr(pm, name)(distance=dist, **kw)(x, y, r, ry))
        torch.manual_seed(3)
        ours = dk.miners.UniformHistogramMiner(7, 3, 2, distance=dist)(x, y, r, ry)
        torch.manual_seed(3)
        _same(ours, pm.UniformHistogramMiner(7, 3, 2, distance=dist)(x, y, r, ry))


# ------------------------------------------------------------------------------- random: PML's draws exactly


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_distance_weighted_same_draws_as_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 15, ref, d=4)
    for cutoff, nonzero in [(0.5, 1.4), (0.0, 1.2), (0.2, 2.0)]:
        torch.manual_seed(11)
        ours = _ours("DistanceWeightedMiner", cutoff=cutoff, nonzero_loss_cutoff=nonzero)(x, y, r, ry)
        after_ours = torch.rand(1)
        torch.manual_seed(11)
        try:
            theirs = _pml("DistanceWeightedMiner", cutoff=cutoff, nonzero_loss_cutoff=nonzero)(x, y, r, ry)
        except RuntimeError as e:  # every log-weight infinite (cutoff 0, one sample): PML fails, ours mines nothing
            assert "numel() == 0" in str(e) and cutoff == 0
            theirs = tuple(torch.zeros(0, dtype=torch.long) for _ in range(3))
        _same(ours, theirs)
        assert torch.equal(after_ours, torch.rand(1))  # the RNG stream advanced by exactly as much
        if pattern == "random":
            assert len(ours[0]) > 0


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_uniform_histogram_same_draws_as_pml(pattern, ref):
    x, y, r, ry = _data(pattern, 13, ref)
    for dist in DISTANCES:
        for bins, pos_per_bin, neg_per_bin in [(100, 10, 10), (5, 3, 7), (1, 1, 2)]:
            kw = dict(num_bins=bins, pos_per_bin=pos_per_bin, neg_per_bin=neg_per_bin)
            torch.manual_seed(7)
            ours = _ours("UniformHistogramMiner", dist, **kw)(x, y, r, ry)
            after_ours = torch.rand(1)
            torch.manual_seed(7)
            _same(ours, _pml("UniformHistogramMiner", dist, **kw)(x, y, r, ry))
            assert torch.equal(after_ours, torch.rand(1))


def test_random_miners_float32_and_a_larger_batch():
    x, y = make("random", n=64, d=16, dtype=torch.float32)
    for name, kw in [("DistanceWeightedMiner", {}), ("UniformHistogramMiner", dict(num_bins=20, pos_per_bin=5))]:
        torch.manual_seed(1)
        ours = _ours(name, **kw)(x, y)
        torch.manual_seed(1)
        _same(ours, _pml(name, **kw)(x, y))
        assert len(ours[0]) > 50


# ------------------------------------------------------------------------- API, device forms, bookkeeping


def test_pml_names_and_defaults():
    for name in NEW:
        ours, theirs = getattr(dk.miners, name), getattr(pm, name)
        ours_params = inspect.signature(ours.__init__).parameters
        for param, spec in inspect.signature(theirs.__init__).parameters.items():
            if spec.default is not inspect.Parameter.empty:
                assert ours_params[param].default == spec.default, (name, param)
    assert dk.miners.BatchEasyHardMiner.all_batch_mining_strategies == pm.BatchEasyHardMiner.all_batch_mining_strategies
    assert dk.miners.AngularMiner(20).angle == pytest.approx(pm.AngularMiner(20).angle)


def test_mine_and_bookkeeping_as_pml():
    """PML's tests call ``miner.mine(...)`` directly; ``forward`` records num_pos_pairs / num_triplets."""
    x, y = make("random", n=10, d=4)
    for name in ["PairMarginMiner", "BatchEasyHardMiner", "AngularMiner", "HDCMiner"]:
        ours, theirs = _ours(name), _pml(name)
        _same(ours.mine(x, y, x, y), theirs.mine(x, y, x, y))
        out, _ = ours(x, y), theirs(x, y)
        attrs = ["num_triplets"] if len(out) == 3 else ["num_pos_pairs", "num_neg_pairs"]
        assert [getattr(ours, a) for a in attrs] == [getattr(theirs, a) for a in attrs]


def test_device_forms():
    """PairMarginMiner.mask is the same selection as a PackedPairMask; BatchEasyHardMiner.per_row the per-row
    indices its tuple is made of (-1 where a row has none, None for an "all" side)."""
    x, y, r, ry = _data("singletons_and_pairs", 11, True)
    miner = _ours("PairMarginMiner", pos_margin=0.3, neg_margin=1.0)
    mask = miner.mask(x, y, r, ry)
    assert isinstance(mask, dk._pairs.PackedPairMask) and tuple(mask.shape) == (11, 23)
    _same(mask.to_indices(), miner(x, y, r, ry))
    beh = _ours("BatchEasyHardMiner", pos_strategy="hard", neg_strategy="easy")
    pos, neg = beh.per_row(x, y, r, ry)
    a = torch.where((pos >= 0) & (neg >= 0))[0]
    _same((a, pos[a], a, neg[a]), beh(x, y, r, ry))
    assert bool((pos[(ry.unsqueeze(0) == y.unsqueeze(1)).sum(1) == 0] == -1).all())
    assert _ours("BatchEasyHardMiner", pos_strategy="all", neg_strategy="hard").per_row(x, y)[0] is None


@pytest.mark.parametrize("n", [1, 2, 7])
def test_odd_and_tiny_batches(n):
    x, y = make("random", n=n, d=3)
    for name in ["PairMarginMiner", "BatchEasyHardMiner", "AngularMiner", "HDCMiner"]:
        _same(_ours(name)(x, y), _pml(name)(x, y))
    for name in ["DistanceWeightedMiner", "UniformHistogramMiner"]:
        torch.manual_seed(0)
        ours = _ours(name)(x, y)
        torch.manual_seed(0)
        _same(ours, _pml(name)(x, y))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("make_miner, names", [
    (lambda: dk.miners.BatchEasyHardMiner(pos_strategy="blah"), "pos_strategy"),
    (lambda: dk.miners.BatchEasyHardMiner(neg_strategy="hardest"), "neg_strategy"),
    (lambda: dk.miners.BatchEasyHardMiner("semihard", "semihard"), "semihard"),
    (lambda: dk.miners.BatchEasyHardMiner("all", "semihard"), "semihard"),
    (lambda: dk.miners.BatchEasyHardMiner("semihard", "all"), "semihard"),
    (lambda: dk.miners.BatchEasyHardMiner(allowed_pos_range=(0.5, 0.2)), "allowed_pos_range"),
    (lambda: dk.miners.BatchEasyHardMiner(allowed_pos_range=0.5), "allowed_pos_range"),
    (lambda: dk.miners.BatchEasyHardMiner(allowed_neg_range=(0.1, 0.2, 0.3)), "allowed_neg_range"),
    (lambda: dk.miners.BatchEasyHardMiner(allowed_neg_range=("a", 1)), "allowed_neg_range"),
    (lambda: dk.miners.BatchEasyHardMiner(allowed_neg_range=(0, math.nan)), "allowed_neg_range"),
    (lambda: dk.miners.UniformHistogramMiner(num_bins=0), "num_bins"),
    (lambda: dk.miners.UniformHistogramMiner(num_bins=2.5), "num_bins"),
    (lambda: dk.miners.UniformHistogramMiner(pos_per_bin=0), "pos_per_bin"),
    (lambda: dk.miners.UniformHistogramMiner(neg_per_bin=-3), "neg_per_bin"),
    (lambda: dk.miners.HDCMiner(filter_percentage=1.5), "filter_percentage"),
    (lambda: dk.miners.HDCMiner(filter_percentage=-0.1), "filter_percentage"),
    (lambda: dk.miners.PairMarginMiner(pos_margin="0.2"), "pos_margin"),
    (lambda: dk.miners.PairMarginMiner(neg_margin=math.nan), "neg_margin"),
    (lambda: dk.miners.DistanceWeightedMiner(cutoff=None), "cutoff"),
    (lambda: dk.miners.DistanceWeightedMiner(distance=pd.CosineSimilarity()), "distance"),
    (lambda: dk.miners.AngularMiner(distance=pd.LpDistance(power=2)), "distance"),
    (lambda: dk.miners.AngularMiner(angle="20"), "angle"),
    (lambda: dk.miners.PairMarginMiner(distance="manhattan"), "distance"),
])
def test_bad_arguments_are_value_errors_naming_them(make_miner, names):
    with pytest.raises(ValueError, match=names):
        make_miner()


def test_bad_calls():
    x, y = make("random", n=10, d=4)
    with pytest.raises(ValueError, match="multiple of 3"):
        dk.miners.EmbeddingsAlreadyPackagedAsTriplets()(x, y)
    with pytest.raises(ValueError, match="labels"):
        dk.miners.PairMarginMiner()(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        dk.miners.HDCMiner()(x.clone().fill_(math.nan), y)
    with pytest.raises(NotImplementedError, match="collect_stats"):
        dk.miners.HDCMiner(collect_stats=True)
