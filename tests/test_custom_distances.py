"""Distances the fused engines cannot express (LpDistance(p=1), other powers, a user subclass overriding
``compute_mat``, PML's or ours) run on the reference backend, as PML computes them: ``backend="auto"`` falls
back with the one-time warning, a fused backend named explicitly raises ``Unsupported``."""
import warnings

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.distances import CustomDistance, parse_distance
from patterns import PATTERNS, make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)


class PMLScaled(pd.LpDistance):
    def compute_mat(self, query_emb, ref_emb):
        return super().compute_mat(query_emb, ref_emb) * 1.5 + 0.1


class OurScaled(dk.distances.LpDistance):
    def compute_mat(self, query_emb, ref_emb):
        return super().compute_mat(query_emb, ref_emb) * 1.5 + 0.1


DISTANCES = {  # name: (ours, PML's)
    "lp_p1": (lambda: dk.distances.LpDistance(p=1), lambda: pd.LpDistance(p=1)),
    "lp_power3_raw": (lambda: dk.distances.LpDistance(power=3, normalize_embeddings=False),
                      lambda: pd.LpDistance(power=3, normalize_embeddings=False)),
    "dot_p1": (lambda: dk.distances.DotProductSimilarity(p=1), lambda: pd.DotProductSimilarity(p=1)),
    "pml_subclass": (PMLScaled, PMLScaled),
    "our_subclass": (OurScaled, PMLScaled),
}
LOSSES = {  # name: constructor kwargs (besides distance)
    "ContrastiveLoss": {}, "TripletMarginLoss": dict(margin=0.3), "MultiSimilarityLoss": {},
    "GeneralizedLiftedStructureLoss": {}, "LiftedStructureLoss": {}, "NPairsLoss": {}, "NTXentLoss": {},
    "SupConLoss": {}, "NCALoss": {}, "IntraPairVarianceLoss": {}, "MarginLoss": {},
    "ProxyNCALoss": dict(num_classes=3, embedding_size=5), "ProxyAnchorLoss": dict(num_classes=3, embedding_size=5),
    "NormalizedSoftmaxLoss": dict(num_classes=3, embedding_size=5),
}


@pytest.mark.parametrize("pattern", ["random", "all_same"])
@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("name", LOSSES)
def test_losses_match_pml_on_the_reference(name, dist, pattern):
    torch.manual_seed(0)
    x, y = make(pattern, 10, 5, torch.float64)
    x = x * 0.5  # keeps exp(-d^3 / T) inside PML's clamped range (see test_ntxent_saturation)
    ours_d, theirs_d = DISTANCES[dist]
    theirs = getattr(pl, name)(distance=theirs_d(), **LOSSES[name])
    ours = getattr(dk.losses, name)(distance=ours_d(), **LOSSES[name])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ours(xa, y)
    b = theirs(xb, y)
    torch.testing.assert_close(a, b, **TOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad if xb.grad is not None else torch.zeros_like(x), **TOL)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, **TOL)


def test_auto_falls_back_with_the_warning_and_fused_backends_refuse(monkeypatch):
    monkeypatch.setattr(_registry, "_WARNED", set())
    x, y = make("random", 9, 4, torch.float64)
    loss = dk.losses.ContrastiveLoss(distance=dk.distances.LpDistance(p=1))
    with pytest.warns(RuntimeWarning, match="reference backend only"):
        loss(x, y)
    for backend in ("cpu", "triton"):
        with pytest.raises(_registry.Unsupported, match="reference backend only"):
            dk.losses.ContrastiveLoss(distance=dk.distances.LpDistance(p=1), backend=backend)(x, y)


def test_expressible_distances_are_not_custom():
    for d in (dk.distances.CosineSimilarity(), pd.LpDistance(power=2), pd.DotProductSimilarity(normalize_embeddings=False)):
        assert not isinstance(parse_distance(d, default="cosine"), CustomDistance)
    assert isinstance(parse_distance(pd.LpDistance(p=1), default="cosine"), CustomDistance)
    with pytest.raises(ValueError, match="distance"):
        parse_distance(object(), default="cosine")


def test_miner_with_a_custom_distance_matches_pml():
    torch.manual_seed(1)
    x, y = make("random", 12, 5, torch.float64)
    ours = dk.miners.TripletMarginMiner(margin=0.4, distance=OurScaled())(x, y)
    theirs = pm.TripletMarginMiner(margin=0.4, distance=PMLScaled())(x, y)
    assert sorted(zip(*[t.tolist() for t in ours])) == sorted(zip(*[t.tolist() for t in theirs]))


def test_ntxent_saturation():
    """Deliberate difference: PML's NTXent computes log(e^{s_ap} / Σ + tiny), which saturates at −log(tiny)
    (708 nats in float64) when a positive pair is that much less likely than the negatives; ours is the exact
    −log softmax. Below the saturation both agree (test_losses_match_pml_on_the_reference)."""
    x = torch.tensor([[0.0], [3.0], [0.1], [6.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    d = dict(distance=dk.distances.LpDistance(power=3, normalize_embeddings=False))
    ours = dk.losses.NTXentLoss(temperature=0.02, **d)(x, y)
    theirs = pl.NTXentLoss(temperature=0.02, distance=pd.LpDistance(power=3, normalize_embeddings=False))(x, y)
    tiny_cap = -torch.log(torch.tensor(torch.finfo(torch.float64).tiny, dtype=torch.float64))
    assert theirs <= tiny_cap + 1e-9 and ours > theirs + 100


assert set(PATTERNS) >= {"random", "all_same", "all_distinct"}


def test_embeddings_stay_2d_even_with_a_distance_that_skips_check_shapes():
    """Deliberate difference (README): PML lets a distance whose ``check_shapes`` accepts anything take N-D
    embeddings; ours are always (N, D), checked before any distance runs."""
    class AnyShape(dk.distances.BaseDistance):
        def compute_mat(self, query_emb, ref_emb):
            return query_emb.flatten(1) @ ref_emb.flatten(1).T

        def check_shapes(self, query_emb, ref_emb):
            pass

    with pytest.raises(ValueError, match="embeddings"):
        dk.losses.TripletMarginLoss(distance=AnyShape())(torch.randn(8, 3, 4), torch.arange(8) % 2)
