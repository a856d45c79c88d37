"""``triplets_per_anchor=<int>`` (TripletMarginLoss, MarginLoss): PML's random triplets, drawn from torch's global
RNG with PML's calls — the same seed gives PML's triplets, loss and gradients."""
import pytest
import torch

import dml_kernels as dk
from dml_kernels._pairs import random_triplets

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)
LABELS = {
    "random": lambda g: torch.randint(0, 4, (int(torch.randint(2, 15, (1,), generator=g)),), generator=g),
    "all_same": lambda g: torch.zeros(7, dtype=torch.long),
    "all_distinct": lambda g: torch.arange(6),
    "singletons_and_pairs": lambda g: torch.tensor([0, 1, 1, 2, 3, 3, 3, 4]),
}


@pytest.mark.parametrize("per_anchor", [0, 1, 3])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("pattern", LABELS)
def test_sampler_draws_pmls_triplets(pattern, with_ref, per_anchor):
    g = torch.Generator().manual_seed(7)
    labels = LABELS[pattern](g)
    ref_labels = torch.randint(0, 4, (9,), generator=g) if with_ref else None
    for seed in range(4):
        torch.manual_seed(seed)
        ours = random_triplets(labels, ref_labels, per_anchor)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        theirs = lmu.get_random_triplet_indices(labels, labels if ref_labels is None else ref_labels,
                                                t_per_anchor=per_anchor)
        assert torch.rand(1) == after_ours  # the same number of draws from the global generator
        for a, b in zip(ours, theirs):
            assert a.dtype == torch.long and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name,kwargs", [("TripletMarginLoss", dict(margin=0.3)),
                                         ("TripletMarginLoss", dict(margin=0.2, swap=True, smooth_loss=True)),
                                         ("MarginLoss", dict(nu=0.1, learn_beta=True, num_classes=3))])
@pytest.mark.parametrize("with_ref", [False, True])
def test_losses_with_random_triplets_match_pml(name, kwargs, backend, with_ref):
    if kwargs.get("swap") and with_ref:
        pytest.skip("swap=True with ref_emb is a documented difference (README; tests/test_pml_compat.py)")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(11, 5, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (11,), generator=g)
        ref = (torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)) \
            if with_ref else (None, None)
        ours, theirs = getattr(dk.losses, name)(triplets_per_anchor=2, backend=backend, **kwargs), \
            getattr(pl, name)(triplets_per_anchor=2, **kwargs)
        if name == "MarginLoss":
            ours.load_state_dict(theirs.state_dict(), strict=True)
            theirs.double()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(seed)
        a = ours(xa, y, ref_emb=ref[0], ref_labels=ref[1])
        torch.manual_seed(seed)
        b = theirs(xb, y, ref_emb=ref[0], ref_labels=ref[1])
        torch.testing.assert_close(a, b, **TOL)
        a.backward()
        b.backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)


def test_given_indices_tuple_wins_and_bad_values_name_the_argument():
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    triplets = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 4]))
    a = dk.losses.TripletMarginLoss(triplets_per_anchor=5, backend="reference")(x, y, triplets)
    b = dk.losses.TripletMarginLoss(backend="reference")(x, y, triplets)
    assert torch.equal(a, b)
    for bad in (-1, 1.5, "some", True):
        with pytest.raises(ValueError, match="triplets_per_anchor"):
            dk.losses.TripletMarginLoss(triplets_per_anchor=bad, backend="reference")(x, y)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        dk.losses.TripletMarginLoss(triplets_per_anchor=2, mining="batch_hard")(x, y)
