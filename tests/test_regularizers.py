"""dk.regularizers and the losses' regularizer arguments, against PML 2.9 itself (float64, 1e-9, values and
gradients — the proxies' gradient included for weight regularizers)."""
import warnings

import pytest
import torch

import dml_kernels as dk
from dml_kernels import reducers as dr
from dml_kernels import regularizers as dg
from patterns import make

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402
from pytorch_metric_learning import regularizers as pg  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)

REGULARIZERS = {  # id -> (constructor kwargs, number of rows it takes)
    "LpRegularizer": (dict(), 7),
    "LpRegularizer-p1-power2": (dict(p=1, power=2), 7),
    "LpRegularizer-p3": (dict(p=3), 7),
    "ZeroMeanRegularizer": (dict(), 7),
    "CenterInvariantRegularizer": (dict(), 7),
    "CenterInvariantRegularizer-p1": (dict(distance=pd.LpDistance(p=1, power=1, normalize_embeddings=False)), 7),
    "RegularFaceRegularizer": (dict(), 7),
    "RegularFaceRegularizer-dot": (dict(distance=pd.DotProductSimilarity(normalize_embeddings=False)), 7),
    "SparseCentersRegularizer": (dict(num_classes=3, centers_per_class=4), 12),
    "SparseCentersRegularizer-sum": (dict(num_classes=2, centers_per_class=3, reducer="SumReducer"), 6),
}


def _build(mod, key, reducers_mod):
    kwargs = dict(REGULARIZERS[key][0])
    if "reducer" in kwargs:
        kwargs["reducer"] = getattr(reducers_mod, kwargs["reducer"])()
    return getattr(mod, key.split("-")[0])(**kwargs)


@pytest.mark.parametrize("key", REGULARIZERS)
def test_regularizer_matches_pml(key):
    w = torch.randn(REGULARIZERS[key][1], 5, dtype=torch.float64)
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    a, b = _build(dg, key, dr)(wa), _build(pg, key, pr)(wb)
    assert a.dim() == 0
    torch.testing.assert_close(a, b, **TOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(wa.grad, wb.grad, **TOL)


def test_regularizer_argument_checks():
    with pytest.raises(ValueError, match="centers_per_class > 1"):
        dg.SparseCentersRegularizer(3, 1)
    with pytest.raises(ValueError, match="needs CosineSimilarity"):
        dg.SparseCentersRegularizer(3, 2, distance=pd.DotProductSimilarity(normalize_embeddings=False))
    with pytest.raises(ValueError, match="takes 6 rows"):
        dg.SparseCentersRegularizer(3, 2)(torch.randn(5, 4))
    with pytest.raises(ValueError, match="LpDistance\\(power=1, normalize_embeddings=False\\)"):
        dg.CenterInvariantRegularizer(distance=pd.LpDistance())
    with pytest.raises(ValueError, match="needs a similarity"):
        dg.RegularFaceRegularizer(distance=pd.LpDistance())
    with pytest.raises(ValueError, match="2-D float tensor"):
        dg.LpRegularizer()(torch.randn(5))


# ---- regularizers on the losses ----

PAIR = {"MultiSimilarityLoss": dict(beta=10), "ContrastiveLoss": dict(), "TripletMarginLoss": dict(margin=0.3),
        "NPairsLoss": dict(), "LiftedStructureLoss": dict(), "GeneralizedLiftedStructureLoss": dict()}


def _same(ours, theirs, x, y, modules=()):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, y), theirs(xb, y)
    torch.testing.assert_close(a, b, **TOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for m_ours, m_theirs in modules:
        torch.testing.assert_close(m_ours.proxies.grad, m_theirs.proxies.grad, **TOL)


@pytest.mark.parametrize("ours_reg", [True, False], ids=["dk_regularizer", "pml_regularizer"])
@pytest.mark.parametrize("reducer", [None, "SumReducer", "ThresholdReducer"])
@pytest.mark.parametrize("name", PAIR)
def test_embedding_regularizer_on_pair_losses(name, reducer, ours_reg):
    x, y = make("random", n=10, d=5)
    reg_mod = dg if ours_reg else pg
    red = {} if reducer is None else dict(reducer=(lambda m: m.ThresholdReducer(low=0.05)
                                                   if reducer == "ThresholdReducer" else m.SumReducer()))
    ours = getattr(dk.losses, name)(embedding_regularizer=reg_mod.LpRegularizer(power=2), embedding_reg_weight=0.3,
                                    backend="reference", **PAIR[name], **{k: v(dr) for k, v in red.items()})
    theirs = getattr(pl, name)(embedding_regularizer=pg.LpRegularizer(power=2), embedding_reg_weight=0.3,
                               **PAIR[name], **{k: v(pr) for k, v in red.items()})
    assert ours.sub_loss_names() == theirs.sub_loss_names()
    assert type(ours.reducer).__name__ == "MultipleReducers"
    _same(ours, theirs, x, y)


PROXY = {"ProxyNCALoss": dict(softmax_scale=3), "ProxyAnchorLoss": dict(margin=0.2, alpha=8)}


def _proxy_pair(name, **kwargs):
    ours = getattr(dk.losses, name)(4, 5, backend="reference", **PROXY[name],
                                    **{k: v(dg, dr) for k, v in kwargs.items()}).double()
    theirs = getattr(pl, name)(4, 5, **PROXY[name], **{k: v(pg, pr) for k, v in kwargs.items()}).double()
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    return ours, theirs


REG_CASES = {
    "weight": dict(weight_regularizer=lambda g, r: g.RegularFaceRegularizer(), weight_reg_weight=lambda g, r: 0.7),
    "weight_lp1": dict(weight_regularizer=lambda g, r: g.LpRegularizer(p=1)),
    "weight_sparse_centers": dict(weight_regularizer=lambda g, r: g.SparseCentersRegularizer(2, 2)),
    "both": dict(weight_regularizer=lambda g, r: g.ZeroMeanRegularizer(),
                 embedding_regularizer=lambda g, r: g.CenterInvariantRegularizer(),
                 embedding_reg_weight=lambda g, r: 2),
    "both_sum_reducer": dict(weight_regularizer=lambda g, r: g.LpRegularizer(),
                             embedding_regularizer=lambda g, r: g.LpRegularizer(power=2),
                             reducer=lambda g, r: r.SumReducer()),
    "weight_per_anchor": dict(weight_regularizer=lambda g, r: g.LpRegularizer(),
                              reducer=lambda g, r: r.PerAnchorReducer(r.AvgNonZeroReducer())),
}


@pytest.mark.parametrize("case", REG_CASES)
@pytest.mark.parametrize("name", PROXY)
def test_weight_regularizer_on_proxy_losses(name, case):
    """The weight regularizer sees the proxies (C × D): values, embeddings' and proxies' gradients."""
    x, y = make("random", n=10, d=5)
    ours, theirs = _proxy_pair(name, **REG_CASES[case])
    assert ours.sub_loss_names() == theirs.sub_loss_names()
    _same(ours, theirs, x, y % 4, modules=[(ours, theirs)])


@pytest.mark.parametrize("name", PROXY)
def test_regularizer_entries_in_the_loss_dict(name):
    x, y = make("random", n=10, d=5)
    kwargs = dict(weight_regularizer=lambda g, r: g.LpRegularizer(),
                  embedding_regularizer=lambda g, r: g.ZeroMeanRegularizer(),
                  embedding_reg_weight=lambda g, r: 0.5, reducer=lambda g, r: r.DoNothingReducer())
    ours, theirs = _proxy_pair(name, **kwargs)
    a, b = ours(x, y % 4), theirs(x, y % 4)
    assert list(a) == list(b) and list(a)[-2:] == ["weight_reg_loss", "embedding_reg_loss"]
    for key in ("weight_reg_loss", "embedding_reg_loss"):
        assert a[key]["reduction_type"] == "already_reduced" and a[key]["indices"] is None
        torch.testing.assert_close(a[key]["losses"], b[key]["losses"], **TOL)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss"])
def test_regularizer_added_to_the_zero_loss(name):
    """One sample (PML's zero losses): the loss is exactly the regularizer term, as in PML."""
    x, y = make("one_sample", d=5)
    _same(getattr(dk.losses, name)(embedding_regularizer=dg.LpRegularizer(), backend="reference"),
          getattr(pl, name)(embedding_regularizer=pg.LpRegularizer()), x, y)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "ProxyAnchorLoss", "MultiSimilarityLoss"])
def test_regularizer_keeps_the_fused_path(name):
    """Default reducer + regularizers: the fused op plus the regularizer terms (no fallback warning), equal to
    the reference backend and to PML."""
    x, y = make("random", n=10, d=5)
    kwargs = dict(embedding_regularizer=dg.LpRegularizer(), embedding_reg_weight=0.5)
    if name == "ProxyAnchorLoss":
        kwargs.update(num_classes=4, embedding_size=5, weight_regularizer=dg.RegularFaceRegularizer())
    fused = getattr(dk.losses, name)(backend="cpu", **kwargs).double()
    ref = getattr(dk.losses, name)(backend="reference", **kwargs).double()
    ref.load_state_dict(fused.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fused(xa, y % 4)
    want = ref(xb, y % 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    if name == "ProxyAnchorLoss":
        torch.testing.assert_close(fused.proxies.grad, ref.proxies.grad, rtol=1e-10, atol=1e-10)
    theirs = getattr(pl, name)(**{k: v for k, v in kwargs.items() if "regularizer" not in k},
                               embedding_regularizer=pg.LpRegularizer(),
                               **({"weight_regularizer": pg.RegularFaceRegularizer()} if "weight_regularizer" in kwargs
                                  else {})).double()
    if name == "ProxyAnchorLoss":
        with torch.no_grad():
            theirs.proxies.copy_(fused.proxies)
    torch.testing.assert_close(got.detach(), theirs(x, y % 4), rtol=1e-10, atol=1e-10)


def test_regularizer_arguments_like_pml():
    with pytest.raises(TypeError, match="unexpected keyword argument 'weight_regularizer'"):
        dk.losses.ContrastiveLoss(weight_regularizer=dg.LpRegularizer())
    with pytest.raises(TypeError, match="must be a regularizer"):
        dk.losses.ContrastiveLoss(embedding_regularizer="l2")
    loss = dk.losses.ProxyAnchorLoss(3, 4, weight_regularizer=dg.LpRegularizer(),
                                     embedding_regularizer=dg.LpRegularizer())
    assert loss.sub_loss_names() == ["pos_loss", "neg_loss", "weight_reg_loss", "embedding_reg_loss"]
    assert list(loss.reducer.reducers) == loss.sub_loss_names()
    assert set(loss.state_dict()) == {"proxies"}  # regularizers and reducers own no parameters (as in PML)
