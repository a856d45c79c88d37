"""AngularLoss, InstanceLoss, ManifoldLoss and VICRegLoss (reference backend) against PML 2.9 and independent
naive loops in float64: values and gradients (embeddings, ref_emb, ManifoldLoss's proxies) on every label
pattern PML accepts, miner tuples, loss dicts under non-default reducers, gradcheck, checkpoints, bad input
and the deliberate differences."""
import math

import pytest
import torch

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
REF = dict(backend="reference")


def run(fn, leaves, call):
    """(value, gradients of every leaf — zeros where unused) of ``call(fn, *copies)`` on fresh leaf copies."""
    copies = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = call(fn, *copies)
    assert torch.is_tensor(loss)
    grads = torch.autograd.grad(loss.sum(), copies, allow_unused=True)
    return loss.detach().reshape(()), [torch.zeros_like(c) if g is None else g for g, c in zip(grads, copies)]


def assert_same(a, b, tol=TOL):
    (v1, g1), (v2, g2) = a, b
    torch.testing.assert_close(v1, v2.to(v1.dtype), **tol)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y.to(x.dtype), **tol)


# --------------------------------------------------------------------------------------------- naive loops

def _unit(v):
    return v / v.norm().clamp_min(1e-12)


def naive_angular(x, labels, ref=None, ref_labels=None, alpha=40, pairs=None):
    """Mean over positive pairs (a, p) of log(1 + Σ_{k: y_k ≠ y_a} exp(4t²(â + p̂)·r_k − 2(1 + t²) â·p̂))."""
    self_mode = ref is None
    r, rl = (x, labels) if self_mode else (ref, ref_labels)
    t2 = math.tan(math.radians(alpha)) ** 2
    if pairs is None:
        pairs = [(a, p) for a in range(len(x)) for p in range(len(r))
                 if int(labels[a]) == int(rl[p]) and not (self_mode and a == p)]
        has_neg = any(int(labels[a]) != int(rl[k]) for a in range(len(x)) for k in range(len(r)))
        if not has_neg:
            pairs = []
    if not pairs:
        return (x * 0).sum()
    total = 0
    for a, p in pairs:
        ah, ph = _unit(x[a]), _unit(r[p])
        terms = [torch.exp(4 * t2 * ((ah + ph) * r[k]).sum() - 2 * (1 + t2) * (ah * ph).sum())
                 for k in range(len(r)) if int(rl[k]) != int(labels[a])]
        total = total + torch.log(1 + sum(terms)) if terms else total + 0 * x.sum()
    return total / len(pairs)


def naive_instance(x, labels, gamma=64):
    distinct = sorted({int(v) for v in labels})
    total = 0
    for i in range(len(x)):
        logits = [gamma * (_unit(x[i]) * _unit(x[j])).sum() for j in range(len(x))]
        target = distinct.index(int(labels[i]))
        total = total + torch.log(sum(torch.exp(v) for v in logits)) - logits[target]
    return total / len(x)


def naive_manifold(x, proxies, meta, lambdaC=1.0, alpha=0.8, margin=5e-4):
    """Float64 throughout (ours with inverse_dtype=None); the random-walk matrix by a linear solve."""
    z = torch.cat([x, proxies.to(x.dtype)])
    n, k, m = len(x), len(proxies), len(x) + len(proxies)
    s = [[torch.exp(2 * torch.clamp((_unit(z[i]) * _unit(z[j])).sum(), min=0)) if i != j else 0 * z.sum()
          for j in range(m)] for i in range(m)]
    d = [sum(s[i]) ** -0.5 for i in range(m)]
    s_bar = torch.stack([torch.stack([d[i] * s[i][j] * d[j] for j in range(m)]) for i in range(m)])
    eye = torch.eye(m, dtype=x.dtype)
    walk = (1 - alpha) * torch.linalg.solve(eye - alpha * s_bar, eye)

    def part(score):
        total = 0
        for i in range(n):
            own = int(meta[i])
            terms = [torch.exp(score(i, j) - score(i, own) + margin) for j in range(k)
                     if j != own and score(i, j) - score(i, own) + margin >= 0]
            total = total + (torch.log(1 + sum(terms)) if terms else 0 * z.sum())
        return total / n

    def cos(i, j):
        u, v = walk[i], walk[n + j]
        return (u * v).sum() / (u.norm() * v.norm())

    context = part(cos)
    if math.isinf(lambdaC):
        return context
    return part(lambda i, j: walk[i, n + j]) + lambdaC * context


def naive_vicreg(x, ref, lam=25, mu=25, nu=1, eps=1e-4):
    n, d = x.shape
    inv = sum(((x[i] - ref[i]) ** 2).sum() for i in range(n)) / (n * d)
    var, cov = 0, 0
    for z in (x, ref):
        means = [sum(z[i, f] for i in range(n)) / n for f in range(d)]
        for f in range(d):
            v = sum((z[i, f] - means[f]) ** 2 for i in range(n)) / (n - 1)
            var = var + torch.relu(1 - torch.sqrt(v + eps)) / 2 / d
            for g in range(d):
                if g != f:
                    c = sum((z[i, f] - means[f]) * (z[i, g] - means[g]) for i in range(n)) / (n - 1)
                    cov = cov + c ** 2 / d
    return lam * inv + mu * var + nu * cov


# --------------------------------------------------------------------------------------------- AngularLoss

PML_PATTERNS = sorted(PATTERNS)


@pytest.mark.parametrize("pattern", PML_PATTERNS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_angular_equals_pml_and_naive(pattern, with_ref):
    x, y = make(pattern, n=7, d=5)
    x = x * 1.7  # raw (unnormalised) negatives matter: PML normalises the anchor and positive only
    ours, theirs = dk.losses.AngularLoss(alpha=35, **REF), pl.AngularLoss(alpha=35)
    if with_ref:
        r, ry = torch.randn(6, 5, dtype=torch.float64) * 1.3, torch.randint(0, 3, (6,))
        a = run(ours, [x, r], lambda f, e, q: f(e, y, ref_emb=q, ref_labels=ry))
        b = run(theirs, [x, r], lambda f, e, q: f(e, y, ref_emb=q, ref_labels=ry))
        c = run(None, [x, r], lambda f, e, q: naive_angular(e, y, q, ry, alpha=35))
    else:
        a = run(ours, [x], lambda f, e: f(e, y))
        b = run(theirs, [x], lambda f, e: f(e, y))
        c = run(None, [x], lambda f, e: naive_angular(e, y, alpha=35))
    assert_same(a, b)
    assert_same(a, c)


@pytest.mark.parametrize("miner", ["pairs", "triplets", "ms"])
def test_angular_with_miner_tuples(miner):
    """Only the tuple's positive pairs count (duplicates included); its negatives are ignored."""
    x, y = make("random", n=9, d=4)
    tup = {"pairs": lambda: lmu.get_all_pairs_indices(y),
           "triplets": lambda: pm.TripletMarginMiner(margin=0.5)(x, y),
           "ms": lambda: pm.MultiSimilarityMiner(0.3)(x, y)}[miner]()
    a = run(dk.losses.AngularLoss(**REF), [x], lambda f, e: f(e, y, tup))
    b = run(pl.AngularLoss(), [x], lambda f, e: f(e, y, tup))
    assert_same(a, b)
    if len(tup) == 3 and len(tup[0]):
        c = run(None, [x], lambda f, e: naive_angular(e, y, pairs=list(zip(tup[0].tolist(), tup[1].tolist()))))
        assert_same(a, c)


def test_angular_loss_dict_and_reducers():
    """PML's entry (pos_pair, indices (a, p)), 1-D here (PML's is (P, 1): the deliberate difference of the
    other keepdim losses); Sum, ThresholdReducer and a PML reducer object as PML computes them."""
    x, y = make("random", n=8, d=4)
    ours = dk.losses.AngularLoss(reducer=dk.reducers.DoNothingReducer(), **REF)(x, y)["loss"]
    theirs = pl.AngularLoss(reducer=pr.DoNothingReducer())(x, y)["loss"]
    assert ours["reduction_type"] == theirs["reduction_type"] == "pos_pair"
    assert ours["losses"].shape == (len(theirs["indices"][0]),) and theirs["losses"].shape[1:] == (1,)
    torch.testing.assert_close(ours["losses"], theirs["losses"].flatten(), **TOL)
    for t1, t2 in zip(ours["indices"], theirs["indices"]):
        assert torch.equal(t1, t2)
    for mine, pmls in [(dk.reducers.SumReducer(), pr.SumReducer()), (pr.SumReducer(), pr.SumReducer()),
                       (dk.reducers.ThresholdReducer(low=0.5), pr.ThresholdReducer(low=0.5))]:
        a = run(dk.losses.AngularLoss(reducer=mine, **REF), [x], lambda f, e: f(e, y))
        b = run(pl.AngularLoss(reducer=pmls), [x], lambda f, e: f(e, y))
        assert_same(a, b)


def test_angular_embedding_regularizer():
    x, y = make("random", n=8, d=4)
    a = run(dk.losses.AngularLoss(embedding_regularizer=dk.regularizers.LpRegularizer(), embedding_reg_weight=0.3,
                                  **REF), [x], lambda f, e: f(e, y))
    b = run(pl.AngularLoss(embedding_regularizer=pg.LpRegularizer(), embedding_reg_weight=0.3), [x],
            lambda f, e: f(e, y))
    assert_same(a, b)


def test_angular_attributes_and_errors():
    loss = dk.losses.AngularLoss(alpha=30)
    assert loss.alpha.dtype == torch.float64 and loss.alpha.dim() == 0
    assert float(loss.alpha) == float(pl.AngularLoss(alpha=30).alpha)
    assert loss.state_dict() == {} and isinstance(loss.reducer, dk.reducers.MeanReducer)
    for bad in ["cosine", pd.CosineSimilarity(), pd.LpDistance(power=2), pd.LpDistance(normalize_embeddings=False)]:
        with pytest.raises(AssertionError, match="AngularLoss needs distance"):
            dk.losses.AngularLoss(distance=bad)
        with pytest.raises(ValueError, match="AngularLoss needs distance"):
            dk.functional.angular_loss(torch.randn(4, 3), torch.zeros(4).long(), distance=bad)
    dk.losses.AngularLoss(distance=pd.LpDistance())  # PML's own default object is fine
    x, y = make("random", n=6, d=3)
    with pytest.raises(ValueError, match="labels"):
        dk.losses.AngularLoss(**REF)(x, indices_tuple=lmu.get_all_pairs_indices(y))


# -------------------------------------------------------------------------------------------- InstanceLoss

@pytest.mark.parametrize("pattern", PML_PATTERNS + ["gapped"])
def test_instance_equals_pml_and_naive(pattern):
    if pattern == "gapped":  # label values far from 0..N-1 (the rank, not the value, is the target)
        x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([40, 3, 3, 17, 40, 99, 3])
    else:
        x, y = make(pattern, n=7, d=5)
    a = run(dk.losses.InstanceLoss(gamma=3, **REF), [x], lambda f, e: f(e, y))
    b = run(pl.InstanceLoss(gamma=3), [x], lambda f, e: f(e, y))
    c = run(None, [x], lambda f, e: naive_instance(e, y, gamma=3))
    assert_same(a, b)
    assert_same(a, c)


def test_instance_default_gamma_reducers_and_errors():
    x, y = make("random", n=9, d=4)
    for mine, pmls in [(None, None), (dk.reducers.AvgNonZeroReducer(), pr.AvgNonZeroReducer()),
                       (dk.reducers.ClassWeightedReducer(torch.rand(3, dtype=torch.float64)), None)]:
        if mine is not None and pmls is None:
            pmls = pr.ClassWeightedReducer(mine.weights.clone())
        a = run(dk.losses.InstanceLoss(reducer=mine, **REF), [x], lambda f, e: f(e, y))
        b = run(pl.InstanceLoss(reducer=pmls), [x], lambda f, e: f(e, y))
        assert_same(a, b)
    with pytest.raises(ValueError, match="indices_tuple"):
        dk.losses.InstanceLoss()(x, y, lmu.get_all_pairs_indices(y))
    with pytest.raises(ValueError, match="ref_emb"):
        dk.losses.InstanceLoss()(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(ValueError, match="labels"):
        dk.losses.InstanceLoss()(x)
    with pytest.raises(AssertionError):
        dk.losses.InstanceLoss(distance=pd.LpDistance())
    # the embeddings themselves as ref_emb (with the labels object) are accepted, as in PML
    torch.testing.assert_close(dk.losses.InstanceLoss(**REF)(x, y, ref_emb=x, ref_labels=y),
                               pl.InstanceLoss()(x, y, ref_emb=x, ref_labels=y), **TOL)


# -------------------------------------------------------------------------------------------- ManifoldLoss

def _manifold_pair(l, k, **kwargs):
    torch.manual_seed(5)
    ours = dk.losses.ManifoldLoss(l, K=k, **kwargs, **REF)
    torch.manual_seed(5)
    theirs = pl.ManifoldLoss(l, K=k, **kwargs)
    assert torch.equal(ours.proxies, theirs.proxies)  # same initialisation draw
    return ours, theirs


@pytest.mark.parametrize("n,k,d", [(9, 3, 5), (7, 7, 4), (2, 1, 3), (6, 4, 1)])
@pytest.mark.parametrize("params", [{}, {"lambdaC": 0.0, "alpha": 0.99, "margin": 0.0},
                                    {"lambdaC": 2.5, "alpha": 0.5, "margin": 0.01}])
def test_manifold_equals_pml(n, k, d, params):
    """Values and gradients of embeddings and proxies, float32 inverse as PML (default), 1e-9."""
    ours, theirs = _manifold_pair(d, k, **params)
    x = torch.randn(n, d, dtype=torch.float64)
    meta = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,))])
    p = ours.proxies.detach().double()

    def with_proxy_grad(loss):
        copies = [x.clone().requires_grad_(), p.clone()]
        loss.proxies.data = copies[1]
        value = loss(copies[0], indices_tuple=meta)
        gx, gp = torch.autograd.grad(value.sum(), [copies[0], loss.proxies])
        return value.detach().reshape(()), [gx, gp]

    assert_same(with_proxy_grad(ours), with_proxy_grad(theirs))


@pytest.mark.parametrize("n,k,d", [(6, 3, 4), (3, 2, 2)])
@pytest.mark.parametrize("lambdaC", [1.0, 0.0, math.inf])
def test_manifold_equals_naive_float64(n, k, d, lambdaC):
    """With ``inverse_dtype=None`` the walk is inverted in float64: equal to the naive loops at 1e-9."""
    torch.manual_seed(1)
    loss = dk.losses.ManifoldLoss(d, K=k, lambdaC=lambdaC, margin=0.02, inverse_dtype=None, **REF).double()
    x = torch.randn(n, d, dtype=torch.float64)
    meta = torch.randint(0, k, (n,))
    p = loss.proxies.detach().clone()

    def ours(_, e, q):
        loss.proxies.data = q.detach()
        return dk.functional.manifold_loss(e, indices_tuple=meta, proxies=q, lambdaC=lambdaC, margin=0.02,
                                           inverse_dtype=None, **REF)

    a = run(None, [x, p], ours)
    b = run(None, [x, p], lambda _, e, q: naive_manifold(e, q, meta, lambdaC=lambdaC, margin=0.02))
    assert_same(a, b)


def test_manifold_lambda_inf_is_the_context_loss():
    """Deliberate difference: PML 2.9 returns inf / NaN for lambdaC=inf; ours is the documented context-only
    loss, i.e. PML(λ=1) − PML(λ=0)."""
    ours, _ = _manifold_pair(4, 3, lambdaC=math.inf)
    _, one = _manifold_pair(4, 3, lambdaC=1.0)
    _, zero = _manifold_pair(4, 3, lambdaC=0.0)
    x, meta = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    value = ours(x, indices_tuple=meta)
    assert value.dim() == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, one(x, indices_tuple=meta) - zero(x, indices_tuple=meta), **TOL)
    assert not torch.isfinite(pl.ManifoldLoss(4, K=3, lambdaC=math.inf)(x, indices_tuple=meta)).all()


def test_manifold_random_assignment_is_pmls():
    ours, theirs = _manifold_pair(4, 3)
    x = torch.randn(10, 4, dtype=torch.float64)
    torch.manual_seed(11)
    a = ours(x)
    torch.manual_seed(11)
    b = theirs(x)
    torch.testing.assert_close(a, b, **TOL)


def test_manifold_float32_inverse_is_pmls_and_float64_is_closer():
    ours, theirs = _manifold_pair(5, 3)
    exact = dk.losses.ManifoldLoss(5, K=3, inverse_dtype=None, **REF)
    exact.proxies.data = ours.proxies.data.clone()
    x, meta = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    pml_value, ours_value, exact_value = theirs(x, indices_tuple=meta), ours(x, indices_tuple=meta), \
        exact(x, indices_tuple=meta)
    assert ours_value.dtype == torch.float64 and ours.proxies.dtype == torch.float32  # never cast
    torch.testing.assert_close(ours_value, pml_value, rtol=0, atol=1e-12)
    naive = naive_manifold(x, ours.proxies.detach().double(), meta)
    torch.testing.assert_close(exact_value, naive, **TOL)


def test_manifold_checkpoint_and_errors():
    ours, theirs = _manifold_pair(6, 4)
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in theirs.state_dict().items()] == [("proxies", (4, 6), torch.float32)]
    other = pl.ManifoldLoss(6, K=4)
    ours.load_state_dict(other.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(theirs.proxies, other.proxies)
    with pytest.raises(ValueError, match="lambdaC"):
        dk.losses.ManifoldLoss(6, lambdaC=-1)
    with pytest.raises(TypeError):
        dk.losses.ManifoldLoss(6, weight_init_func=lambda t: t)
    with pytest.raises(TypeError):
        dk.losses.ManifoldLoss(6, weight_regularizer=dk.regularizers.LpRegularizer())
    x = torch.randn(5, 6)
    with pytest.raises(AssertionError, match="l=999"):
        dk.losses.ManifoldLoss(999)(torch.randn(10, 10))
    ours(x)  # 5 rows, 4 proxies: fine; 3 rows are not
    with pytest.raises(ValueError, match="at least K"):
        ours(x[:3])
    with pytest.raises(ValueError, match="labels"):
        ours(x, torch.zeros(5).long())
    with pytest.raises(ValueError, match="ref_emb"):
        ours(x, ref_emb=x.clone())
    with pytest.raises(ValueError, match=r"\[0, K=4\)"):
        ours(x, indices_tuple=torch.tensor([0, 1, 2, 3, 4]))


# ---------------------------------------------------------------------------------------------- VICRegLoss

@pytest.mark.parametrize("n,d", [(2, 1), (7, 5), (33, 3)])
@pytest.mark.parametrize("params", [{}, {"invariance_lambda": 10, "variance_mu": 3, "covariance_v": 2,
                                         "eps": 1e-5}])
def test_vicreg_equals_pml_and_naive(n, d, params):
    x, r = torch.randn(n, d, dtype=torch.float64) * 0.7, torch.randn(n, d, dtype=torch.float64) * 1.2
    a = run(dk.losses.VICRegLoss(**params, **REF), [x, r], lambda f, e, q: f(e, ref_emb=q))
    b = run(pl.VICRegLoss(**params), [x, r], lambda f, e, q: f(e, ref_emb=q))
    assert_same(a, b)
    if n <= 7:
        names = {"invariance_lambda": "lam", "variance_mu": "mu", "covariance_v": "nu", "eps": "eps"}
        kw = {names[k]: v for k, v in params.items()}
        assert_same(a, run(None, [x, r], lambda f, e, q: naive_vicreg(e, q, **kw)))
    # without ref_emb the reference is the embeddings themselves, as in PML
    assert_same(run(dk.losses.VICRegLoss(**params, **REF), [x], lambda f, e: f(e)),
                run(pl.VICRegLoss(**params), [x], lambda f, e: f(e)))


def test_vicreg_loss_dict_reducers_and_errors():
    x, r = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    ours = dk.losses.VICRegLoss(reducer=dk.reducers.DoNothingReducer())(x, ref_emb=r)
    theirs = pl.VICRegLoss(reducer=pr.DoNothingReducer())(x, ref_emb=r)
    assert list(ours) == list(theirs) == dk.losses.VICRegLoss().sub_loss_names()
    for name in ours:
        assert ours[name]["reduction_type"] == theirs[name]["reduction_type"]
        torch.testing.assert_close(ours[name]["losses"], theirs[name]["losses"], **TOL)
    assert isinstance(dk.losses.VICRegLoss().reducer, dk.reducers.MultipleReducers)
    for mine, pmls in [(dk.reducers.SumReducer(), pr.SumReducer()), (pr.AvgNonZeroReducer(), pr.AvgNonZeroReducer())]:
        assert_same(run(dk.losses.VICRegLoss(reducer=mine, **REF), [x, r], lambda f, e, q: f(e, ref_emb=q)),
                    run(pl.VICRegLoss(reducer=pmls), [x, r], lambda f, e, q: f(e, ref_emb=q)))
    with pytest.raises(ValueError, match="distance"):
        dk.losses.VICRegLoss(distance="cosine")
    with pytest.raises(ValueError, match="regularizer"):
        dk.losses.VICRegLoss(embedding_regularizer=dk.regularizers.LpRegularizer())
    loss = dk.losses.VICRegLoss()
    with pytest.raises(ValueError, match="labels"):
        loss(x, torch.zeros(6).long(), ref_emb=r)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(x, None, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), r)
    with pytest.raises(ValueError, match="rows"):
        loss(x, ref_emb=r[:5])
    with pytest.raises(ValueError, match="at least 2"):
        loss(x[:1], ref_emb=r[:1])


# ------------------------------------------------------------------------------------------ all four losses

def _cases():
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    meta = torch.tensor([0, 1, 1, 0, 1, 0])
    return {
        "angular": (lambda e: dk.functional.angular_loss(e, y, alpha=30, **REF), (6, 3)),
        "angular/ref": (lambda e, r: dk.functional.angular_loss(e, y, ref_emb=r, ref_labels=y[:5], **REF),
                        (6, 3), (5, 3)),
        "instance": (lambda e: dk.functional.instance_loss(e, y, gamma=2, **REF), (6, 3)),
        "manifold": (lambda e, p: dk.functional.manifold_loss(e, indices_tuple=meta, proxies=p, inverse_dtype=None,
                                                              margin=0.01, **REF), (6, 3), (2, 3)),
        "vicreg": (lambda e, r: dk.functional.vicreg_loss(e, ref_emb=r, **REF), (6, 3), (6, 3)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_gradcheck(name):
    fn, *shapes = _cases()[name]
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("name", list(_cases()))
def test_inputs_not_mutated_and_float32(name):
    fn, *shapes = _cases()[name]
    leaves = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    before = [t.clone() for t in leaves]
    v64 = fn(*leaves)
    assert all(torch.equal(a, b) for a, b in zip(leaves, before))
    v32 = fn(*[t.float() for t in leaves])
    assert v32.dtype == torch.float32 and v32.dim() == 0
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-5)


def test_auto_backend_falls_back_to_the_reference():
    x, y = make("random", n=6, d=3)
    for loss in (dk.losses.AngularLoss(), dk.losses.InstanceLoss()):
        torch.testing.assert_close(loss(x, y), loss.__class__(**REF)(x, y), **TOL)
    for op in ("angular_loss", "instance_loss", "manifold_loss", "vicreg_loss"):
        assert dk._registry.implemented(op) == ["reference"]
