"""PML's public base classes in dml_kernels: a loss or miner written against PML's API (the same class body,
subclassing PML's base or ours) gives PML's values and gradients (float64), with PML's reducers, sub-loss
names, regularizers, distances and stats; every dk loss / miner counts as an instance of the base."""
import pytest
import torch
from torch import nn

import dml_kernels as dk
from patterns import PATTERNS, make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402
from pytorch_metric_learning import regularizers as pg  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)


def user_classes(losses, miners, reducers):
    """Loss and miner classes as a PML user writes them, on the given library's base classes."""

    class RowMarginLoss(losses.BaseMetricLossFunction):
        """Per anchor: relu(mean positive distance − mean negative distance + margin) (``element``)."""

        def __init__(self, margin=0.2, **kwargs):
            super().__init__(**kwargs)
            self.margin = margin
            self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
            self.add_to_recordable_attributes(name="num_rows", is_stat=True)

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            if len(a1) == 0 or len(a2) == 0:
                return self.zero_losses()
            mat = self.distance(embeddings, ref_emb)
            rows = embeddings.shape[0]
            pos = torch.zeros(rows, dtype=mat.dtype).index_add(0, a1, mat[a1, p])
            neg = torch.zeros(rows, dtype=mat.dtype).index_add(0, a2, mat[a2, n])
            npos = torch.bincount(a1, minlength=rows).clamp_min(1)
            nneg = torch.bincount(a2, minlength=rows).clamp_min(1)
            losses = torch.relu(self.distance.margin(pos / npos, neg / nneg) + self.margin)
            if self.collect_stats:
                self.num_rows = rows
            return {"loss": {"losses": losses, "indices": torch.arange(rows), "reduction_type": "element"}}

    class TwoPartLoss(losses.BaseMetricLossFunction):
        """Two sub-losses (per positive pair, per negative pair), AvgNonZero by default."""

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            mat = self.distance(embeddings, ref_emb)
            out = {}
            for name, (a, b), sign in (("pos_loss", (a1, p), 1), ("neg_loss", (a2, n), -1)):
                if len(a) == 0:
                    out[name] = self.zero_loss()
                else:
                    out[name] = {"losses": torch.relu(sign * (mat[a, b] - 0.5)), "indices": (a, b),
                                 "reduction_type": "pos_pair" if sign > 0 else "neg_pair"}
            return out

        def _sub_loss_names(self):
            return ["pos_loss", "neg_loss"]

        def get_default_reducer(self):
            return reducers.AvgNonZeroReducer()

    class MatPairLoss(losses.GenericPairLoss):
        """Matrix based: per row, softplus of (LSE over negatives − mean over positives) of the matrix."""

        def __init__(self, **kwargs):
            super().__init__(mat_based_loss=True, **kwargs)

        def get_default_distance(self):
            return (pd if losses is pl else dk.distances).CosineSimilarity()

        def _compute_loss(self, mat, pos_mask, neg_mask):
            neg = torch.logsumexp(mat.masked_fill(neg_mask == 0, -1e4), dim=1)
            pos = (mat * pos_mask).sum(1) / pos_mask.sum(1).clamp_min(1)
            losses = torch.nn.functional.softplus(neg - pos) * (pos_mask.sum(1) > 0)
            return {"loss": {"losses": losses, "indices": torch.arange(len(mat)), "reduction_type": "element"}}

    class ListPairLoss(losses.GenericPairLoss):
        """Pair based: hinge on each pair's value."""

        def __init__(self, **kwargs):
            super().__init__(mat_based_loss=False, **kwargs)

        def _compute_loss(self, pos_pair, neg_pair, indices_tuple):
            a1, p, a2, n = indices_tuple
            out = {"pos_loss": self.zero_loss(), "neg_loss": self.zero_loss()}
            if len(pos_pair) > 0:
                out["pos_loss"] = {"losses": torch.relu(pos_pair - 0.3), "indices": (a1, p),
                                   "reduction_type": "pos_pair"}
            if len(neg_pair) > 0:
                out["neg_loss"] = {"losses": torch.relu(0.9 - neg_pair), "indices": (a2, n),
                                   "reduction_type": "neg_pair"}
            return out

        def _sub_loss_names(self):
            return ["pos_loss", "neg_loss"]

    class LinearProxyLoss(losses.WeightRegularizerMixin, losses.BaseMetricLossFunction):
        """Cross-entropy over x·W with a (D, C) weight, PML's weight mixins."""

        def __init__(self, num_classes, embedding_size, **kwargs):
            super().__init__(**kwargs)
            self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
            self.weight_init_func(self.W)

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            logits = embeddings @ self.W.to(embeddings.dtype)
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            loss_dict = {"loss": {"losses": losses, "indices": torch.arange(len(labels)),
                                  "reduction_type": "element"}}
            self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
            return loss_dict

    class CloseMiner(miners.BaseMiner):
        """Positive pairs farther than ``cut``, negative pairs closer than ``cut``."""

        def __init__(self, cut=0.9, **kwargs):
            super().__init__(**kwargs)
            self.cut = cut

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            mat = self.distance(embeddings, ref_emb)
            a1, p, a2, n = lmu.get_all_pairs_indices(labels, ref_labels)
            keep_p = self.distance.margin(mat[a1, p], self.cut) > 0
            keep_n = self.distance.margin(self.cut, mat[a2, n]) > 0
            return a1[keep_p], p[keep_p], a2[keep_n], n[keep_n]

    return dict(RowMarginLoss=RowMarginLoss, TwoPartLoss=TwoPartLoss, MatPairLoss=MatPairLoss,
                ListPairLoss=ListPairLoss, LinearProxyLoss=LinearProxyLoss, CloseMiner=CloseMiner)


OURS = user_classes(dk.losses, dk.miners, dk.reducers)
THEIRS = user_classes(pl, pm, pr)
LOSSES = ["RowMarginLoss", "TwoPartLoss", "MatPairLoss", "ListPairLoss"]


def run(loss, x, *args, **kwargs):
    leaf = x.detach().clone().requires_grad_(True)
    value = loss(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if grad is None else grad


def assert_same(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **TOL)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("name", LOSSES)
def test_user_loss_equals_pml(name, pattern):
    x, y = make(pattern, n=7, d=4)
    assert_same(run(OURS[name](), x, y), run(THEIRS[name](), x, y))


@pytest.mark.parametrize("name", LOSSES)
def test_user_loss_options(name):
    """ref_emb, a miner tuple, a distance object, reducers, an embedding regularizer: as PML."""
    x, y = make("random", n=8, d=4)
    r, ry = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    tup = pm.TripletMarginMiner(margin=0.3)(x, y)
    settings = [
        ({}, {}, dict(ref_emb=r, ref_labels=ry)),
        ({}, {}, dict(indices_tuple=tup)),
        (dict(distance=dk.distances.LpDistance(power=2)), dict(distance=pd.LpDistance(power=2)), {}),
        (dict(distance=pd.DotProductSimilarity()), dict(distance=pd.DotProductSimilarity()), {}),
        (dict(reducer=dk.reducers.SumReducer()), dict(reducer=pr.SumReducer()), {}),
        (dict(reducer=pr.MeanReducer()), dict(reducer=pr.MeanReducer()), {}),
        (dict(embedding_regularizer=dk.regularizers.LpRegularizer(), embedding_reg_weight=0.5),
         dict(embedding_regularizer=pg.LpRegularizer(), embedding_reg_weight=0.5), {}),
    ]
    for mine, theirs, call in settings:
        a = run(OURS[name](**mine), x, y, **call)
        b = run(THEIRS[name](**theirs), x, y, **call)
        assert_same(a, b)
    ours = OURS[name](reducer=dk.reducers.DoNothingReducer())(x, y)
    pmls = THEIRS[name](reducer=pr.DoNothingReducer())(x, y)
    assert list(ours) == list(pmls)
    for key in ours:
        assert ours[key]["reduction_type"] == pmls[key]["reduction_type"]
        torch.testing.assert_close(ours[key]["losses"], pmls[key]["losses"], **TOL)


def test_base_machinery_as_pml():
    for name in LOSSES:
        ours, theirs = OURS[name](embedding_regularizer=dk.regularizers.LpRegularizer()), \
            THEIRS[name](embedding_regularizer=pg.LpRegularizer())
        assert ours.sub_loss_names() == theirs.sub_loss_names()
        assert list(ours.zero_losses()) == list(theirs.zero_losses())
        assert type(ours.reducer).__name__ == type(theirs.reducer).__name__
        assert type(ours.distance).__name__ == type(theirs.distance).__name__
        assert ours.distance.is_inverted == theirs.distance.is_inverted
        assert ours._record_these == theirs._record_these
    loss = OURS["RowMarginLoss"](margin=0.3, collect_stats=True)
    assert loss.margin == 0.3 and loss.collect_stats and loss._record_these_stats == ["num_rows"]
    x, y = make("random", n=6, d=3)
    loss(x, y)
    assert loss.num_rows == 6
    assert getattr(OURS["RowMarginLoss"](), "_record_these_stats", []) == []  # no stats without collect_stats
    # a reducer passed is deep-copied per sub-loss (PML's set_reducer)
    two = OURS["TwoPartLoss"](reducer=dk.reducers.SumReducer())
    assert isinstance(two.reducer, dk.reducers.MultipleReducers) and set(two.reducer.reducers) == {"pos_loss",
                                                                                                    "neg_loss"}
    with pytest.raises(NotImplementedError):
        dk.losses.BaseMetricLossFunction()(x, y)
    with pytest.raises(ValueError, match="cannot both be None"):
        OURS["MatPairLoss"]()(x)
    bad = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 2]), torch.tensor([1, 4]))
    with pytest.raises(AssertionError):
        OURS["MatPairLoss"]()(x, y, bad)
    with pytest.raises(ValueError):
        OURS["RowMarginLoss"]()(x, y[:5])


def test_weight_regularizer_mixin_and_state_dict():
    x, y = make("random", n=9, d=4)
    torch.manual_seed(3)
    ours = OURS["LinearProxyLoss"](3, 4, weight_regularizer=dk.regularizers.LpRegularizer(), weight_reg_weight=0.2,
                                   embedding_regularizer=dk.regularizers.ZeroMeanRegularizer())
    torch.manual_seed(3)
    theirs = THEIRS["LinearProxyLoss"](3, 4, weight_regularizer=pg.LpRegularizer(), weight_reg_weight=0.2,
                                       embedding_regularizer=pg.ZeroMeanRegularizer())
    assert torch.equal(ours.W, theirs.W)  # the default init (N(0, 1)) draws the same numbers
    assert ours.sub_loss_names() == theirs.sub_loss_names() == ["loss", "weight_reg_loss", "embedding_reg_loss"]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for loss in (ours, theirs):
        loss.W.grad = None
    a, b = run(ours, x, y), run(theirs, x, y)
    assert_same(a, b)
    ga = torch.autograd.grad(ours(x, y), ours.W)[0]
    gb = torch.autograd.grad(theirs(x, y), theirs.W)[0]
    torch.testing.assert_close(ga, gb, **TOL)
    init = OURS["LinearProxyLoss"](3, 4, weight_init_func=lambda t: torch.nn.init.constant_(t, 0.5))
    assert bool((init.W == 0.5).all())


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct"])
def test_user_miner_equals_pml(pattern):
    x, y = make(pattern, n=8, d=3)
    for kw in ({}, {"distance": "cosine"}):
        ours = OURS["CloseMiner"](**kw)
        theirs = THEIRS["CloseMiner"](**({"distance": pd.CosineSimilarity()} if kw else {}))
        out1, out2 = ours(x, y), theirs(x, y)
        assert all(torch.equal(u, v) for u, v in zip(out1, out2))
        # with a reference set, and consumed by PML's and our losses
        r, ry = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
        assert all(torch.equal(u, v) for u, v in zip(ours(x, y, r, ry), theirs(x, y, r, ry)))
        torch.testing.assert_close(dk.losses.ContrastiveLoss(backend="reference")(x, y, out1),
                                   pl.ContrastiveLoss()(x, y, out2), **TOL)


def test_miner_bookkeeping_and_output_assertion():
    x, y = make("random", n=8, d=3)
    miner = OURS["CloseMiner"](collect_stats=True)
    a1, _, a2, _ = miner(x, y)
    assert (miner.num_pos_pairs, miner.num_neg_pairs) == (len(a1), len(a2))
    assert set(miner._record_these_stats) == {"num_pos_pairs", "num_neg_pairs", "num_triplets"}
    assert isinstance(miner.distance, dk.distances.LpDistance)

    class Bad(dk.miners.BaseMiner):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            return self.out

    with pytest.raises(TypeError):
        Bad((torch.tensor([0]), torch.tensor([1])))(x, y)
    with pytest.raises(AssertionError):
        Bad((torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([3])))(x, y)
    t = Bad((torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([3, 4])))
    t(x, y)
    assert t.num_triplets == 2


def test_dk_classes_are_instances_of_the_bases():
    assert isinstance(dk.losses.ContrastiveLoss(), dk.losses.BaseMetricLossFunction)
    assert isinstance(dk.losses.ContrastiveLoss(), dk.losses.GenericPairLoss)
    assert isinstance(dk.losses.AngularLoss(), dk.losses.BaseMetricLossFunction)
    assert not isinstance(dk.losses.AngularLoss(), dk.losses.GenericPairLoss)  # as in PML
    assert issubclass(dk.losses.ArcFaceLoss, dk.losses.BaseMetricLossFunction)
    assert not isinstance(dk.losses.MultipleLosses([dk.losses.ContrastiveLoss()]), dk.losses.BaseMetricLossFunction)
    assert isinstance(dk.losses.CrossBatchMemory(dk.losses.ContrastiveLoss(), 4), dk.losses.BaseLossWrapper)
    assert isinstance(dk.miners.BatchHardMiner(), dk.miners.BaseMiner)
    assert isinstance(OURS["MatPairLoss"](), dk.losses.GenericPairLoss)
    assert not isinstance(OURS["RowMarginLoss"](), dk.losses.GenericPairLoss)
    assert not isinstance(pl.ContrastiveLoss(), dk.losses.BaseMetricLossFunction)

    class Wrapper(dk.losses.BaseLossWrapper):
        @staticmethod
        def supported_losses():
            return ["ContrastiveLoss"]

        @classmethod
        def check_loss_support(cls, loss_name):
            if loss_name not in cls.supported_losses():
                raise Exception(f"{loss_name} not supported")

    Wrapper(dk.losses.ContrastiveLoss())
    with pytest.raises(Exception, match="not supported"):
        Wrapper(dk.losses.NTXentLoss())
