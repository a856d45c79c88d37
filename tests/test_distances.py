"""``dk.distances``: PML's distance classes (same matrices, attributes, constructor rules), their use by our
losses (``parse_distance``) and by PML's own code (PML losses and miners given our objects)."""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import distances as dd
from dml_kernels.distances import CustomDistance, Distance, parse_distance

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

CASES = [("CosineSimilarity", {}), ("CosineSimilarity", dict(power=2)), ("DotProductSimilarity", {}),
         ("DotProductSimilarity", dict(normalize_embeddings=False)), ("LpDistance", {}),
         ("LpDistance", dict(power=2)), ("LpDistance", dict(p=1)), ("LpDistance", dict(p=3, power=2)),
         ("LpDistance", dict(normalize_embeddings=False)), ("SNRDistance", {}),
         ("SNRDistance", dict(normalize_embeddings=False))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_matrix_equals_pml(name, kw, dtype):
    if dtype == torch.float16 and name == "SNRDistance":
        pytest.skip("torch.var has no float16 CPU kernel")
    ours, theirs = getattr(dd, name)(**kw), getattr(pd, name)(**kw)
    q, r = torch.randn(30, 7, dtype=dtype), torch.randn(27, 7, dtype=dtype)  # > 25 rows: cdist's matmul path
    for args in [(q,), (q, r), (q[:4], r[:3])]:
        a, b = ours(*args), theirs(*args)
        assert a.dtype == b.dtype and torch.equal(a, b)
    torch.testing.assert_close(ours.pairwise_distance(q[:5], r[:5]), theirs.pairwise_distance(q[:5], r[:5]),
                               rtol=0, atol=0)
    for attr in ("is_inverted", "normalize_embeddings", "p", "power"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    x, y = torch.rand(5), torch.rand(5)
    assert torch.equal(ours.margin(x, y), theirs.margin(x, y))
    m = torch.rand(4, 6)
    assert torch.equal(ours.smallest_dist(m, dim=1)[0], theirs.smallest_dist(m, dim=1)[0])
    assert torch.equal(ours.largest_dist(m, dim=1)[0], theirs.largest_dist(m, dim=1)[0])
    assert torch.equal(ours.normalize(q.double()), theirs.normalize(q.double()))
    assert torch.equal(ours.get_norm(q.double()), theirs.get_norm(q.double()))


def test_gradients_equal_pml():
    q = torch.randn(30, 5, dtype=torch.float64)
    for name, kw in CASES:
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        getattr(dd, name)(**kw)(qa).sum().backward()
        getattr(pd, name)(**kw)(qb).sum().backward()
        torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_constructor_rules_match_pml():
    with pytest.raises(TypeError):
        dd.CosineSimilarity(normalize_embeddings=False)  # PML: duplicate keyword → TypeError
    with pytest.raises(TypeError):
        dd.DotProductSimilarity(is_inverted=False)
    with pytest.raises(ValueError, match="is_inverted"):
        dd.LpDistance(is_inverted=True)  # PML: AssertionError
    with pytest.raises(TypeError):
        dd.LpDistance(margin=1)
    assert dd.CosineSimilarity().is_inverted and dd.CosineSimilarity().normalize_embeddings
    assert not dd.LpDistance().is_inverted and dd.LpDistance().p == 2 and dd.LpDistance().power == 1
    assert list(dd.LpDistance().state_dict()) == []  # stateless, as PML's


def test_check_shapes():
    with pytest.raises(ValueError, match="2D"):
        dd.LpDistance()(torch.randn(2, 3, 4))

    class Flat(dd.LpDistance):  # PML's test_custom_check_shape: a subclass may override check_shapes
        def check_shapes(self, q, r):
            pass

        def compute_mat(self, q, r):
            return super().compute_mat(q.flatten(1), r.flatten(1))

    assert Flat(normalize_embeddings=False)(torch.randn(3, 2, 2)).shape == (3, 3)


def test_collect_stats_are_device_scalars():
    d = dd.LpDistance(collect_stats=True)
    d(torch.randn(6, 4) * 3)
    assert float(d.initial_avg_query_norm) > 1.5 and abs(float(d.final_avg_query_norm) - 1) < 1e-6
    assert isinstance(d.final_avg_ref_norm, torch.Tensor) and d.final_avg_ref_norm.dim() == 0
    assert not hasattr(dd.LpDistance(), "initial_avg_query_norm")


def test_batched_distance():
    x = torch.randn(70, 6, dtype=torch.float64)
    chunks = []
    bd = dd.BatchedDistance(dd.CosineSimilarity(), lambda mat, s, e: chunks.append((s, e, mat)), batch_size=32)
    assert bd(x) is None
    assert [(s, e) for s, e, _ in chunks] == [(0, 32), (32, 64), (64, 96)]
    torch.testing.assert_close(torch.cat([m for _, _, m in chunks]), pd.CosineSimilarity()(x), rtol=0, atol=0)
    assert bd.is_inverted and bd.p == 2 and bd.normalize_embeddings  # forwarded to the wrapped distance
    with pytest.raises(ValueError, match="is not supported"):
        parse_distance(bd, default="cosine")


# ------------------------------------------------------------------------------- parse_distance (our losses)

@pytest.mark.parametrize("make, expected", [
    (lambda m: m.CosineSimilarity(), Distance("cosine", True)),
    (lambda m: m.DotProductSimilarity(), Distance("cosine", True)),
    (lambda m: m.DotProductSimilarity(normalize_embeddings=False), Distance("dot", False)),
    (lambda m: m.DotProductSimilarity(normalize_embeddings=False, p=1), Distance("dot", False)),
    (lambda m: m.LpDistance(), Distance("euclidean", True)),
    (lambda m: m.LpDistance(power=2), Distance("squared_euclidean", True)),
    (lambda m: m.LpDistance(normalize_embeddings=False), Distance("euclidean", False)),
], ids=["cos", "dot", "dot-raw", "dot-raw-p1", "l2", "l2sq", "l2-raw"])
def test_parse_ours_and_pml_alike(make, expected):
    assert parse_distance(make(dd), default="cosine") == expected
    assert parse_distance(make(pd), default="cosine") == expected


@pytest.mark.parametrize("make", [
    lambda m: m.LpDistance(p=1), lambda m: m.LpDistance(power=3), lambda m: m.LpDistance(p=3),
    lambda m: m.SNRDistance(), lambda m: m.CosineSimilarity(power=2), lambda m: m.CosineSimilarity(p=1),
    lambda m: m.DotProductSimilarity(p=1),
], ids=["p1", "power3", "p3", "snr", "cos-power2", "cos-p1", "dot-p1"])
def test_objects_the_engines_cannot_express_are_custom(make):
    """Kept as they are (CustomDistance), computed by the reference backend as PML computes them."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    for mod in (dd, pd):
        assert isinstance(parse_distance(make(mod), default="cosine"), CustomDistance)
        a = dk.losses.ContrastiveLoss(distance=make(mod), backend="reference")(x, y)
        torch.testing.assert_close(a, pl.ContrastiveLoss(distance=make(pd))(x, y), rtol=1e-9, atol=1e-12)


def test_subclass_of_ours_is_not_taken_for_its_base():
    class Scaled(dd.CosineSimilarity):
        def compute_mat(self, q, r):
            return 2 * super().compute_mat(q, r)

    d = parse_distance(Scaled(), default="cosine")
    assert isinstance(d, CustomDistance) and isinstance(d.module, Scaled)
    with pytest.raises(ValueError, match="is not supported"):
        parse_distance(object(), default="cosine")


@pytest.mark.parametrize("name, kw", [("CosineSimilarity", {}), ("LpDistance", {}), ("LpDistance", dict(power=2)),
                                      ("DotProductSimilarity", dict(normalize_embeddings=False))])
@pytest.mark.parametrize("loss", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss"])
def test_our_losses_with_our_objects_equal_pml(loss, name, kw):
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    a = getattr(dk.losses, loss)(distance=getattr(dd, name)(**kw), backend="reference")(x, y)
    b = getattr(pl, loss)(distance=getattr(pd, name)(**kw))(x, y)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- PML's code given our distance objects

@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_pml_losses_and_miners_accept_ours(name, kw):
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    for make in (lambda m: pl.ContrastiveLoss(distance=m), lambda m: pl.NTXentLoss(distance=m),
                 lambda m: pl.TripletMarginLoss(distance=m), lambda m: pl.MultiSimilarityLoss(distance=m)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = make(getattr(dd, name)(**kw))(xa, y), make(getattr(pd, name)(**kw))(xb, y)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        a.backward()
        b.backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for make in (lambda m: pm.PairMarginMiner(distance=m), lambda m: pm.TripletMarginMiner(0.1, distance=m),
                 lambda m: pm.BatchEasyHardMiner(distance=m)):
        for a, b in zip(make(getattr(dd, name)(**kw))(x, y), make(getattr(pd, name)(**kw))(x, y)):
            assert torch.equal(a, b)
