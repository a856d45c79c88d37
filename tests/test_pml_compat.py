"""dml_kernels (reference backend) against PML 2.9 itself: float64 values and gradients within 1e-9,
every loss and label pattern, PML distance objects, PML index tuples, and the miners (compared as sets)."""
import pytest
import torch

import dml_kernels as dk
from patterns import PATTERNS, make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)


def same_loss(ours, theirs, x, y, *args, **kwargs):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, y, *args, **kwargs), theirs(xb, y, *args, **kwargs)
    assert a.dim() == 0
    torch.testing.assert_close(a, b.to(a.dtype), **TOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad if xb.grad is not None else torch.zeros_like(x), **TOL)


PAIR_LOSSES = {
    "MultiSimilarityLoss": (dict(), dict(alpha=0.1, beta=40, base=0.5)),
    "LiftedStructureLoss": (dict(), dict(neg_margin=0.5, pos_margin=0.1)),
    "GeneralizedLiftedStructureLoss": (dict(), dict(neg_margin=0.5)),
    "NPairsLoss": (dict(), dict()),
    "ContrastiveLoss": (dict(), dict(pos_margin=0.1, neg_margin=1.3)),
    "TripletMarginLoss": (dict(), dict(margin=0.3, swap=True)),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("which", [0, 1])
def test_pair_losses_match_pml(pattern, name, which):
    kwargs = PAIR_LOSSES[name][which]
    x, y = make(pattern, n=11, d=6)
    same_loss(getattr(dk.losses, name)(backend="reference", **kwargs), getattr(pl, name)(**kwargs), x, y)


DIST_OBJECTS = [pd.CosineSimilarity(), pd.DotProductSimilarity(), pd.DotProductSimilarity(normalize_embeddings=False),
                pd.LpDistance(), pd.LpDistance(power=2), pd.LpDistance(normalize_embeddings=False)]


@pytest.mark.parametrize("dist", DIST_OBJECTS, ids=lambda d: f"{type(d).__name__}-{d.power}-{d.normalize_embeddings}")
@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "GeneralizedLiftedStructureLoss", "ContrastiveLoss",
                                  "TripletMarginLoss", "LiftedStructureLoss"])
def test_pml_distance_objects(dist, name):
    x, y = make("random", n=10, d=4)
    same_loss(getattr(dk.losses, name)(distance=dist, backend="reference"), getattr(pl, name)(distance=dist), x, y)


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct", "singletons_and_pairs"])
@pytest.mark.parametrize("dist", [pd.CosineSimilarity(), pd.LpDistance()], ids=["cos", "lp"])
def test_fused_ms_mining_matches_pml_pipeline(pattern, dist):
    x, y = make(pattern, n=12, d=4)
    miner = pm.MultiSimilarityMiner(epsilon=0.1, distance=dist)
    same_loss(dk.losses.MultiSimilarityLoss(epsilon=0.1, distance=dist, backend="reference"),
              lambda e, lab: pl.MultiSimilarityLoss(distance=dist)(e, lab, miner(e, lab)), x, y)


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct"])
def test_fused_batch_hard_matches_pml_pipeline(pattern):
    x, y = make(pattern, n=12, d=4)
    miner = pm.BatchHardMiner()
    same_loss(dk.losses.TripletMarginLoss(mining="batch_hard", backend="reference"),
              lambda e, lab: pl.TripletMarginLoss()(e, lab, miner(e, lab)), x, y)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss",
                                  "GeneralizedLiftedStructureLoss", "LiftedStructureLoss", "NPairsLoss"])
@pytest.mark.parametrize("miner", ["ms", "batch_hard", "triplet_margin"])
def test_indices_tuple_from_pml_miners(name, miner):
    x, y = make("random", n=12, d=4)
    m = {"ms": pm.MultiSimilarityMiner(0.3), "batch_hard": pm.BatchHardMiner(),
         "triplet_margin": pm.TripletMarginMiner(0.3)}[miner]
    same_loss(lambda e, lab: getattr(dk.losses, name)(backend="reference")(e, lab, m(e, lab)),
              lambda e, lab: getattr(pl, name)()(e, lab, m(e, lab)), x, y)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss",
                                  "GeneralizedLiftedStructureLoss"])
def test_ref_emb_matches_pml(name):
    x, y = make("random", n=6, d=4)
    ref, ref_y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 4, (20,))
    ra, rb = ref.clone().requires_grad_(), ref.clone().requires_grad_()
    same_loss(lambda e, lab: getattr(dk.losses, name)(backend="reference")(e, lab, None, ra, ref_y),
              lambda e, lab: getattr(pl, name)()(e, lab, None, rb, ref_y), x, y)
    torch.testing.assert_close(ra.grad, rb.grad, **TOL)


@pytest.mark.parametrize("pattern", ["random", "all_same", "all_distinct", "one_sample"])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_proxy_nca_matches_pml(pattern, scale):
    x, y = make(pattern, n=10, d=6)
    ours = dk.losses.ProxyNCALoss(12, 6, softmax_scale=scale, backend="reference").double()
    theirs = pl.ProxyNCALoss(12, 6, softmax_scale=scale).double()
    theirs.proxies = torch.nn.Parameter(ours.proxies.detach().clone())
    same_loss(ours, theirs, x, y)
    torch.testing.assert_close(ours.proxies.grad, theirs.proxies.grad, **TOL)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), **TOL)


@pytest.mark.parametrize("pattern", ["random", "all_same", "all_distinct", "one_sample"])
def test_proxy_anchor_matches_pml(pattern):
    x, y = make(pattern, n=10, d=6)
    ours = dk.losses.ProxyAnchorLoss(12, 6, margin=0.5, backend="reference").double()
    theirs = pl.ProxyAnchorLoss(12, 6, margin=0.5).double()
    theirs.proxies = torch.nn.Parameter(ours.proxies.detach().clone())
    same_loss(ours, theirs, x, y)
    torch.testing.assert_close(ours.proxies.grad, theirs.proxies.grad, **TOL)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), **TOL)


@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss"])
def test_proxy_miner_weights_match_pml(name):
    x, y = make("random", n=12, d=4)
    ours = getattr(dk.losses, name)(5, 4, backend="reference").double()
    theirs = getattr(pl, name)(5, 4).double()
    theirs.proxies = torch.nn.Parameter(ours.proxies.detach().clone())
    miner = pm.MultiSimilarityMiner(0.2)
    same_loss(lambda e, lab: ours(e, lab, miner(e, lab)), lambda e, lab: theirs(e, lab, miner(e, lab)), x, y)


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct"])
@pytest.mark.parametrize("dist", [pd.CosineSimilarity(), pd.LpDistance()], ids=["cos", "lp"])
def test_miners_match_pml_as_sets(pattern, dist):
    x, y = make(pattern, n=12, d=4)
    for ours, theirs in [(dk.miners.MultiSimilarityMiner(0.1, distance=dist, backend="reference"),
                          pm.MultiSimilarityMiner(0.1, distance=dist)),
                         (dk.miners.TripletMarginMiner(0.2, "semihard", distance=dist, backend="reference"),
                          pm.TripletMarginMiner(0.2, "semihard", distance=dist))]:
        a, b = ours(x, y), theirs(x, y)
        assert len(a) == len(b)
        if len(a) == 4:
            assert set(zip(a[0].tolist(), a[1].tolist())) == set(zip(b[0].tolist(), b[1].tolist()))
            assert set(zip(a[2].tolist(), a[3].tolist())) == set(zip(b[2].tolist(), b[3].tolist()))
        else:
            assert set(zip(*[t.tolist() for t in a])) == set(zip(*[t.tolist() for t in b]))
    a = dk.miners.BatchHardMiner(distance=dist, backend="reference")(x, y)
    b = pm.BatchHardMiner(distance=dist)(x, y)
    assert [t.tolist() for t in a] == [t.tolist() for t in b]


@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss"])
def test_get_logits_float32_as_pml_computes_it(name):
    """get_logits with the default backend="auto" is computed as PML computes it (PML's own ProxyAnchor test
    compares it with atol 1e-8 in float32, which the fused cpu path's rounding exceeds)."""
    torch.manual_seed(0)
    ours = getattr(dk.losses, name)(40, 128)
    theirs = getattr(pl, name)(40, 128)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(64, 128)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), rtol=0, atol=1e-8)


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct"])
@pytest.mark.parametrize("m", [5, 9, 14])
def test_lifted_structure_with_ref_emb_matches_pml(pattern, m):
    """PML's LiftedStructureLoss with ref_emb: for a positive pair (query i, reference k) the negatives are those
    of query i and of *query* k (none when k >= N) — computed as PML computes it (values and both gradients)."""
    x, y = make(pattern, n=9, d=6)
    g = torch.Generator().manual_seed(m)
    r = torch.randn(m, 6, dtype=torch.float64, generator=g)
    ry = torch.randint(0, max(1, int(y.max()) + 1), (m,), generator=g)
    vals, grads = [], []
    for fn in (dk.losses.LiftedStructureLoss(neg_margin=1.2, pos_margin=0.1), pl.LiftedStructureLoss(neg_margin=1.2,
                                                                                                   pos_margin=0.1)):
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        v = fn(xx, y, None, rr, ry)
        vals.append(v.detach())
        grads.append(torch.autograd.grad(v, (xx, rr), allow_unused=True))
    torch.testing.assert_close(vals[0], vals[1], **TOL)
    for ours, theirs, t in zip(*grads, (x, r)):
        zero = torch.zeros_like(t)  # an unused input (no pair at all) has no gradient on either side
        torch.testing.assert_close(zero if ours is None else ours, zero if theirs is None else theirs, **TOL)


def _construct(cls, module):
    """An instance built from the required arguments only (small values)."""
    import inspect
    kw = {n: 5 for n, p in inspect.signature(cls.__init__).parameters.items()
          if n != "self" and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if cls.__name__ in ("CosFaceLoss", "ArcFaceLoss", "SubCenterArcFaceLoss"):  # PML's take them through *args
        kw = dict(num_classes=5, embedding_size=5)
    return getattr(module, cls.__name__)(**kw)


def _distance_key(d):
    return type(d).__name__, d.normalize_embeddings, d.p, d.power, d.is_inverted


def _classes_with_a_distance():
    out = []
    for pml_module, ours in ((pl, dk.losses), (pm, dk.miners)):
        for name in sorted(dir(pml_module)):
            cls = getattr(pml_module, name)
            if isinstance(cls, type) and hasattr(ours, name) and hasattr(cls, "get_default_distance") \
                    and name not in ("BaseMetricLossFunction", "BaseMiner", "GenericPairLoss"):
                out.append((pml_module, ours, name))
    return out


@pytest.mark.parametrize("pml_module,ours,name", _classes_with_a_distance(),
                         ids=[c[2] for c in _classes_with_a_distance()])
def test_default_distance_object_is_pmls(pml_module, ours, name):
    """``loss.distance`` / ``miner.distance`` is PML's default distance object (same class and attributes): PML
    programs read it, e.g. ``TripletMarginMiner(distance=loss.distance)``."""
    theirs = _construct(getattr(pml_module, name), pml_module)
    mine = _construct(getattr(pml_module, name), ours)
    assert _distance_key(mine.distance) == _distance_key(theirs.distance)
    assert _distance_key(mine.get_default_distance()) == _distance_key(theirs.get_default_distance())


def test_miner_built_from_the_losss_distance_matches_pml():
    """The PML idiom ``miner = TripletMarginMiner(distance=loss.distance)`` with a cosine loss: the miner mines on
    cosine similarity (a loss whose ``distance`` were None would leave the miner on its own default, L2)."""
    torch.manual_seed(3)
    x, y = make("random", 24, 8, torch.float64)
    theirs_loss, mine_loss = pl.MultiSimilarityLoss(), dk.losses.MultiSimilarityLoss(backend="reference")
    theirs = pm.TripletMarginMiner(margin=0.2, distance=theirs_loss.distance)(x, y)
    mine = dk.miners.TripletMarginMiner(margin=0.2, distance=mine_loss.distance, backend="reference")(x, y)
    assert sorted(zip(*[t.tolist() for t in mine])) == sorted(zip(*[t.tolist() for t in theirs]))
    same_loss(lambda *a: mine_loss(*a), lambda *a: theirs_loss(*a), x, y, mine)
