"""Direction regularisation (seed 002 §6.2, eq. 31–35) on TripletMarginLoss, MultiSimilarityLoss, ProxyNCALoss.

Every registered backend equals independent naive loops over the seed's equations in float64 (1e-9, values and
gradients, proxies included); gradcheck; ``direction_gamma=0`` takes exactly the base loss's path; fused forms:
no N×M (or B×C) buffer and no host sync (watches that fail on the reference).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from conftest import DEVICE
from naive import avg_nonzero, is_sim, margin, ms_mined_pairs, pairs_of, value
from patterns import PATTERNS, make
from memory import TensorWatch

EPS = 1e-12
TOL = 1e-9
OPS = ("direction_triplet_margin_loss", "direction_multi_similarity_loss", "direction_proxy_nca_loss")


def backends(op):
    return [b for b in _registry.implemented(op) if b != "cuda" and _registry.unavailable_reason(b, DEVICE) is None]


# ------------------------------------------------------------------------------------------ naive loops


def _v(t, normalize):
    return t / t.norm().clamp_min(1e-12) if normalize else t


def naive_cos(fa, ff, fn):
    """Cos(f_n − f_a, f_f − f_a) with the ε floor on both squared norms."""
    u, v = fn - fa, ff - fa
    return (u * v).sum() / torch.sqrt(torch.clamp((u * u).sum(), min=EPS) * torch.clamp((v * v).sum(), min=EPS))


def naive_triplet(x, labels, ref=None, ref_labels=None, m=0.05, gamma=0.3, smooth=False, swap=False,
                  batch_hard=False, name="euclidean", normalize=True):
    """Eq. 33: AvgNonZero over (a, p, n) of h(margin(D_ap, D_an) + m − γ Cos(f_n − f_a, f_p − f_a))."""
    self_mode = ref is None
    r = x if self_mode else ref
    rl = labels if self_mode else ref_labels
    values = []
    for a in range(len(labels)):
        pos, neg = pairs_of(a, [int(v) for v in labels], [int(v) for v in rl], self_mode)
        if batch_hard:
            if not pos or not neg:
                continue
            sgn = -1 if is_sim(name) else 1
            dv = {k: float(value(x[a], r[k], name, normalize).detach()) for k in pos + neg}
            pos = [max(pos, key=lambda k: (sgn * dv[k], -k))]
            neg = [min(neg, key=lambda k: (sgn * dv[k], k))]
        for p in pos:
            for n in neg:
                ap, an = value(x[a], r[p], name, normalize), value(x[a], r[n], name, normalize)
                if swap:
                    pn = value(r[p], r[n], name, normalize)
                    an = torch.maximum(an, pn) if is_sim(name) else torch.minimum(an, pn)
                fa, fp, fn = _v(x[a], normalize), _v(r[p], normalize), _v(r[n], normalize)
                t = margin(name, ap, an) + m - gamma * naive_cos(fa, fp, fn)
                values.append(torch.nn.functional.softplus(t) if smooth else torch.relu(t))
    return avg_nonzero(values) if values else (x * 0).sum()


def naive_ms(x, labels, ref=None, ref_labels=None, alpha=2.0, beta=50.0, base=0.5, gamma=0.3, epsilon=None,
             name="cosine", normalize=True):
    """Eq. 34, p* = the row's hardest positive among the positives used (no regulariser without one)."""
    self_mode = ref is None
    r = x if self_mode else ref
    rl = labels if self_mode else ref_labels
    mined = ms_mined_pairs(x, labels, ref, ref_labels, epsilon, name, normalize)
    rows, npos, nneg = [], 0, 0
    for a in range(len(labels)):
        pos, neg = mined[a]
        npos, nneg = npos + len(pos), nneg + len(neg)
        dv = {k: float(value(x[a], r[k], name, normalize).detach()) for k in pos}
        sgn = -1 if is_sim(name) else 1
        hp = max(pos, key=lambda k: (sgn * dv[k], -k)) if pos else None
        fa = _v(x[a], normalize)
        pos_terms = [alpha * margin(name, value(x[a], r[k], name, normalize), base) for k in pos]
        neg_terms = []
        for k in neg:
            reg = 0 if hp is None else gamma * naive_cos(fa, _v(r[hp], normalize), _v(r[k], normalize))
            neg_terms.append(beta * (margin(name, base, value(x[a], r[k], name, normalize)) - reg))
        lp = torch.log(1 + sum(torch.exp(t) for t in pos_terms)) if pos_terms else x.new_zeros(())
        ln = torch.log(1 + sum(torch.exp(t) for t in neg_terms)) if neg_terms else x.new_zeros(())
        rows.append(lp / alpha + ln / beta)
    del rl
    if npos <= 1 and nneg <= 1:
        return (x * 0).sum()
    return sum(rows) / len(rows)


def naive_nca(x, labels, proxies, scale=1.0, gamma=0.3, exclude_positive=False, weights=None,
              name="squared_euclidean", normalize=True):
    """Eq. 35: mean_a w_a·(log Σ_c e^{σ s(a,c) − γ Cos(p_c − f_a, p_y − f_a)} − σ s(a, y))."""
    rows = []
    for a in range(len(labels)):
        y = int(labels[a])
        fa, fy = _v(x[a], normalize), _v(proxies[y], normalize)

        def logit(c):
            s = value(x[a], proxies[c], name, normalize)
            return scale * (s if is_sim(name) else -s)

        den = [logit(c) - gamma * naive_cos(fa, fy, _v(proxies[c], normalize))
               for c in range(len(proxies)) if not (exclude_positive and c == y)]
        loss = torch.log(sum(torch.exp(t) for t in den)) - logit(y)
        rows.append(loss * (1 if weights is None else float(weights[a])))
    return sum(rows) / len(rows)


# ------------------------------------------------------------------------------------------ helpers


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _close(got, want, tol=TOL):
    assert abs(float(got[0]) - float(want[0])) <= tol * max(1.0, abs(float(want[0]))), (float(got[0]),
                                                                                        float(want[0]))
    for g, w in zip(got[1], want[1]):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert (g - w).abs().max() <= tol * max(1.0, float(w.abs().max())), float((g - w).abs().max())


def _run(fn, inputs):
    loss = fn(*inputs)
    return loss.detach(), _grads(loss, inputs)


def _data(pattern, n=9, d=5, m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = PATTERNS[pattern](n)
    x = torch.randn(len(labels), d, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    if m is None:
        return x, labels.to(DEVICE), None, None
    ref = torch.randn(m, d, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    return x, labels.to(DEVICE), ref, torch.randint(0, 3, (m,), generator=g).to(DEVICE)


PATTERN_NAMES = list(PATTERNS)
DISTANCES = [("euclidean", True), ("squared_euclidean", True), ("cosine", True), ("dot", False),
             ("euclidean", False)]


# ------------------------------------------------------------------------------------------ triplet (eq. 33)


@pytest.mark.parametrize("backend", backends("direction_triplet_margin_loss"))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("mining", [None, "batch_hard"])
def test_triplet_equals_naive_patterns(backend, pattern, mining):
    x, y, _, _ = _data(pattern)
    fn = lambda e: dk.functional.direction_triplet_margin_loss(  # noqa: E731
        e, y, direction_gamma=0.4, margin=0.2, mining=mining, backend=backend)
    _close(_run(fn, (x,)), _run(lambda e: naive_triplet(e, y, m=0.2, gamma=0.4, batch_hard=mining is not None),
                                (x,)))


@pytest.mark.parametrize("backend", backends("direction_triplet_margin_loss"))
@pytest.mark.parametrize("name,normalize", DISTANCES)
@pytest.mark.parametrize("mining", [None, "batch_hard"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_triplet_equals_naive_distances(backend, name, normalize, mining, with_ref):
    x, y, ref, ry = _data("random", n=7, m=6 if with_ref else None, seed=1)
    inputs = (x,) if ref is None else (x, ref)
    m = 0.3 if name != "dot" else 1.0

    def ours(e, r=None):
        return dk.functional.direction_triplet_margin_loss(e, y, None, r, ry if r is not None else None,
                                                           direction_gamma=0.7, margin=m, mining=mining,
                                                           distance=name, normalize_embeddings=normalize,
                                                           backend=backend)

    def naive(e, r=None):
        return naive_triplet(e, y, r, ry if r is not None else None, m=m, gamma=0.7, batch_hard=mining is not None,
                             name=name, normalize=normalize)

    _close(_run(ours, inputs), _run(naive, inputs))


@pytest.mark.parametrize("smooth,swap", [(True, False), (False, True), (True, True)])
def test_triplet_smooth_and_swap_reference(smooth, swap):
    x, y, ref, ry = _data("random", n=8, m=5, seed=2)
    for r, rl in ((None, None), (ref, ry)):
        inputs = (x,) if r is None else (x, r)

        def ours(e, rr=None):
            return dk.functional.direction_triplet_margin_loss(e, y, None, rr, rl, direction_gamma=0.5, margin=0.3,
                                                               smooth_loss=smooth, swap=swap, backend="reference")

        _close(_run(ours, inputs), _run(lambda e, rr=None: naive_triplet(e, y, rr, rl, m=0.3, gamma=0.5,
                                                                         smooth=smooth, swap=swap), inputs))


def test_triplet_eq33_is_squared_euclidean():
    """Eq. 33 as the seed writes it: ‖f_a − f_p‖² − ‖f_a − f_n‖² + α − γ Cos, hinged (eq. 5), summed over the
    triplets and averaged over the non-zero ones — distance="squared_euclidean"."""
    x, y, _, _ = _data("random", n=6, seed=3)
    f = torch.nn.functional.normalize(x, dim=1)
    vals = []
    for a in range(6):
        for p in range(6):
            for n in range(6):
                if p != a and y[p] == y[a] and y[n] != y[a]:
                    t = ((f[a] - f[p]) ** 2).sum() - ((f[a] - f[n]) ** 2).sum() + 0.2 - 0.6 * naive_cos(f[a], f[p],
                                                                                                          f[n])
                    vals.append(torch.relu(t))
    want = sum(v for v in vals if v > 0) / sum(1 for v in vals if v > 0)
    got = dk.losses.TripletMarginLoss(margin=0.2, distance="squared_euclidean", direction_gamma=0.6,
                                      backend="reference")(x, y)
    assert abs(float(got) - float(want)) < 1e-12


def test_triplet_indices_tuple_reference():
    x, y, _, _ = _data("random", n=8, seed=4)
    a, p, n = dk.miners.TripletMarginMiner(margin=0.5)(x.detach(), y)
    loss_fn = dk.losses.TripletMarginLoss(margin=0.1, direction_gamma=0.3, backend="reference")
    got = loss_fn(x, y, (a, p, n))
    f = torch.nn.functional.normalize(x, dim=1)
    vals = [torch.relu((f[i] - f[j]).norm() - (f[i] - f[k]).norm() + 0.1 - 0.3 * naive_cos(f[i], f[j], f[k]))
            for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())]
    assert abs(float(got) - float(avg_nonzero(vals))) < 1e-12


# ------------------------------------------------------------------------------------------ multi-similarity (eq. 34)


@pytest.mark.parametrize("backend", backends("direction_multi_similarity_loss"))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_ms_equals_naive_patterns(backend, pattern, epsilon):
    x, y, _, _ = _data(pattern)
    fn = lambda e: dk.functional.direction_multi_similarity_loss(  # noqa: E731
        e, y, direction_gamma=0.3, alpha=2, beta=10, base=0.5, epsilon=epsilon, backend=backend)
    _close(_run(fn, (x,)), _run(lambda e: naive_ms(e, y, beta=10.0, gamma=0.3, epsilon=epsilon), (x,)))


@pytest.mark.parametrize("backend", backends("direction_multi_similarity_loss"))
@pytest.mark.parametrize("name,normalize", DISTANCES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("with_ref", [False, True])
def test_ms_equals_naive_distances(backend, name, normalize, epsilon, with_ref):
    x, y, ref, ry = _data("random", n=7, m=6 if with_ref else None, seed=5)
    inputs = (x,) if ref is None else (x, ref)

    def ours(e, r=None):
        return dk.functional.direction_multi_similarity_loss(e, y, None, r, ry if r is not None else None,
                                                             direction_gamma=0.8, alpha=2, beta=5, base=0.5,
                                                             epsilon=epsilon, distance=name,
                                                             normalize_embeddings=normalize, backend=backend)

    def naive(e, r=None):
        return naive_ms(e, y, r, ry if r is not None else None, beta=5.0, gamma=0.8, epsilon=epsilon, name=name,
                        normalize=normalize)

    _close(_run(ours, inputs), _run(naive, inputs))


def test_ms_indices_tuple_reference():
    """Given pairs: p* is the hardest positive among the given positive pairs."""
    x, y, _, _ = _data("random", n=9, seed=6)
    a1, p, a2, n = dk.miners.MultiSimilarityMiner(0.3)(x.detach(), y)
    got = dk.losses.MultiSimilarityLoss(beta=10, direction_gamma=0.5, backend="reference")(x, y, (a1, p, a2, n))
    f = torch.nn.functional.normalize(x, dim=1)
    rows = []
    for i in range(9):
        pos = sorted(set(int(k) for a_, k in zip(a1, p) if a_ == i))
        neg = sorted(set(int(k) for a_, k in zip(a2, n) if a_ == i))
        hp = min(pos, key=lambda k: (float(f[i] @ f[k]), k)) if pos else None
        lp = torch.log(1 + sum(torch.exp(-2 * (f[i] @ f[k] - 0.5)) for k in pos)) / 2 if pos else 0
        ln = torch.log(1 + sum(torch.exp(10 * (f[i] @ f[k] - 0.5 - (0 if hp is None else 0.5 * naive_cos(
            f[i], f[hp], f[k])))) for k in neg)) / 10 if neg else 0
        rows.append(lp + ln)
    assert abs(float(got) - float(sum(rows) / 9)) < 1e-12


# ------------------------------------------------------------------------------------------ ProxyNCA (eq. 35)


def _proxies(c, d, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()


@pytest.mark.parametrize("backend", backends("direction_proxy_nca_loss"))
@pytest.mark.parametrize("name,normalize", DISTANCES)
@pytest.mark.parametrize("exclude_positive", [False, True])
def test_nca_equals_naive(backend, name, normalize, exclude_positive):
    x, _, _, _ = _data("random", n=7, d=5, seed=8)
    y = torch.tensor([0, 3, 3, 1, 4, 0, 3], device=DEVICE)
    p = _proxies(6, 5)

    def ours(e, pp):
        return dk.functional.direction_proxy_nca_loss(e, y, pp, direction_gamma=0.6, softmax_scale=3,
                                                      exclude_positive=exclude_positive, distance=name,
                                                      normalize_embeddings=normalize, backend=backend)

    def naive(e, pp):
        return naive_nca(e, y, pp, scale=3.0, gamma=0.6, exclude_positive=exclude_positive, name=name,
                         normalize=normalize)

    _close(_run(ours, (x, p)), _run(naive, (x, p)))


@pytest.mark.parametrize("backend", backends("direction_proxy_nca_loss"))
def test_nca_module_miner_weights(backend):
    x, _, _, _ = _data("random", n=8, d=4, seed=9)
    y = torch.randint(0, 5, (8,), device=DEVICE)
    loss_fn = dk.losses.ProxyNCALoss(5, 4, direction_gamma=0.4, backend=backend).double()
    a = torch.tensor([0, 0, 3, 5, 5, 5], device=DEVICE)
    tup = (a, a, a)
    w = torch.bincount(a, minlength=8).double()
    w = w / w.max()
    got = _run(lambda e, pp: loss_fn(e, y, tup), (x, loss_fn.proxies))
    want = _run(lambda e, pp: naive_nca(e, y, pp, gamma=0.4, weights=w), (x, loss_fn.proxies))
    _close(got, want)


# ------------------------------------------------------------------------------------------ modules, γ = 0, errors


def _module_cases():
    return {
        "triplet": (lambda **kw: dk.losses.TripletMarginLoss(margin=0.2, **kw), "triplet_margin_loss",
                    "direction_triplet_margin_loss"),
        "ms": (lambda **kw: dk.losses.MultiSimilarityLoss(beta=10, **kw), "multi_similarity_loss",
               "direction_multi_similarity_loss"),
        "nca": (lambda **kw: dk.losses.ProxyNCALoss(4, 5, **kw).double(), "proxy_nca_loss",
                "direction_proxy_nca_loss"),
    }


@pytest.mark.parametrize("case", ["triplet", "ms", "nca"])
def test_gamma_zero_takes_the_base_path(case, monkeypatch):
    """direction_gamma=0 (the default) calls exactly the base functional; ≠ 0 calls the direction one."""
    make_loss, base, direction = _module_cases()[case]
    x, y = make("random", n=9, d=5)
    y = y % 4
    calls = []
    for name in (base, direction):
        orig = getattr(dk.functional, name)
        monkeypatch.setattr(dk.functional, name, lambda *a, _n=name, _o=orig, **k: (calls.append(_n), _o(*a, **k))[1])
    torch.manual_seed(1)
    plain = make_loss(backend="reference")
    torch.manual_seed(1)
    zero = make_loss(backend="reference", direction_gamma=0)
    assert torch.equal(plain(x, y), zero(x, y))
    assert calls == [base, base]
    torch.manual_seed(1)
    make_loss(backend="reference", direction_gamma=0.25)(x, y)
    assert calls[-1] == direction


@pytest.mark.parametrize("case", ["triplet", "ms", "nca"])
def test_direction_op_at_gamma_zero_is_the_base_loss(case):
    make_loss, _, _ = _module_cases()[case]
    x, y = make("random", n=9, d=5)
    y = y % 4
    torch.manual_seed(1)
    base = make_loss(backend="reference")
    fn = getattr(dk.functional, "direction_" + base._op)
    args = (x, y, base.proxies) if case == "nca" else (x, y)
    kw = {k: getattr(base, k) for k in ("margin", "alpha", "beta", "base", "softmax_scale") if hasattr(base, k)}
    assert abs(float(fn(*args, direction_gamma=0.0, backend="reference", **kw)) - float(base(x, y))) < 1e-12


def test_module_reducer_and_regularizer():
    """A non-default reducer reduces the direction loss's elements (reference); a regularizer term is added."""
    x, y = make("random", n=9, d=5)
    kw = dict(direction_gamma=0.5, backend="reference")
    per_triplet = dk.losses.TripletMarginLoss(reducer=dk.reducers.MeanReducer(), **kw)(x, y)
    d = dk.functional.direction_triplet_margin_loss(x, y, direction_gamma=0.5, reducer=dk.reducers.DoNothingReducer(),
                                                    backend="reference")
    assert abs(float(per_triplet) - float(d["loss"]["losses"].mean())) < 1e-12
    reg = dk.regularizers.LpRegularizer()
    with_reg = dk.losses.MultiSimilarityLoss(embedding_regularizer=reg, **kw)(x, y)
    plain = dk.losses.MultiSimilarityLoss(**kw)(x, y)
    assert abs(float(with_reg) - float(plain) - float(reg(x))) < 1e-12


def test_errors():
    x, y = make("random", n=6, d=4)
    with pytest.raises(ValueError, match="direction_gamma"):
        dk.losses.TripletMarginLoss(direction_gamma=float("nan"))(x, y)
    with pytest.raises(TypeError, match="direction_gamma"):
        dk.functional.direction_multi_similarity_loss(x, y, direction_gamma="big")
    with pytest.raises(ValueError, match="ref_emb"):
        dk.functional.direction_proxy_nca_loss(x, y, torch.randn(3, 4, dtype=x.dtype), ref_emb=x,
                                               direction_gamma=0.1)


def test_inputs_untouched():
    x, y = make("random", n=7, d=5)
    p = torch.randn(3, 5, dtype=x.dtype)
    x0, y0, p0 = x.clone(), y.clone(), p.clone()
    for b in backends("direction_triplet_margin_loss"):
        dk.functional.direction_triplet_margin_loss(x, y, direction_gamma=0.3, backend=b)
        dk.functional.direction_multi_similarity_loss(x, y, direction_gamma=0.3, backend=b)
    for b in backends("direction_proxy_nca_loss"):
        dk.functional.direction_proxy_nca_loss(x, y, p, direction_gamma=0.3, backend=b)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(p, p0)


# ------------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("backend", sorted(set(backends(OPS[0])) | set(backends(OPS[1])) | set(backends(OPS[2]))))
def test_gradcheck(backend):
    x, y = make("random", n=5, d=2)
    x.requires_grad_()
    ref = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    ry = torch.tensor([0, 1, 2, 1])
    p = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    F = dk.functional
    checks = []
    if backend in backends(OPS[0]):
        checks += [(lambda e, r: F.direction_triplet_margin_loss(e, y, None, r, ry, direction_gamma=0.5, margin=0.4,
                                                                 backend=backend), ref),
                   (lambda e: F.direction_triplet_margin_loss(e, y, direction_gamma=0.5, margin=0.4, backend=backend),
                    None),
                   (lambda e: F.direction_triplet_margin_loss(e, y, direction_gamma=0.5, margin=0.4,
                                                              mining="batch_hard", backend=backend), None)]
    if backend in backends(OPS[1]):
        checks += [(lambda e, r: F.direction_multi_similarity_loss(e, y, None, r, ry, direction_gamma=0.5, beta=5,
                                                                   backend=backend), ref),
                   (lambda e: F.direction_multi_similarity_loss(e, y, direction_gamma=0.5, beta=5, epsilon=0.1,
                                                                backend=backend), None)]
    if backend in backends(OPS[2]):
        checks += [(lambda e, pp: F.direction_proxy_nca_loss(e, y, pp, direction_gamma=0.5, softmax_scale=2,
                                                             backend=backend), p)]
    for i, (fn, second) in enumerate(checks):
        if backend != "reference" and second is ref:
            continue  # the reference-set gradients are compared with the naive loops' above (interpreter time)
        inputs = (x,) if second is None else (x, second)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7), i


# ------------------------------------------------------------------------------------------ fused: memory, syncs


_Watch = TensorWatch  # tests/memory.py


FUSED = {  # name: (op, call(x, y, second, backend)); N = 64 queries, M = 64 references or classes, D = 2, fp32
    "triplet_all": (OPS[0], lambda x, y, r, ry, b: dk.functional.direction_triplet_margin_loss(
        x, y, None, r, ry, direction_gamma=0.3, margin=0.2, backend=b, check_inputs=False)),
    "triplet_batch_hard": (OPS[0], lambda x, y, r, ry, b: dk.functional.direction_triplet_margin_loss(
        x, y, None, r, ry, direction_gamma=0.3, mining="batch_hard", backend=b, check_inputs=False)),
    "ms": (OPS[1], lambda x, y, r, ry, b: dk.functional.direction_multi_similarity_loss(
        x, y, None, r, ry, direction_gamma=0.3, backend=b, check_inputs=False)),
    "ms_mined": (OPS[1], lambda x, y, r, ry, b: dk.functional.direction_multi_similarity_loss(
        x, y, None, r, ry, direction_gamma=0.3, epsilon=0.1, backend=b, check_inputs=False)),
    "proxy_nca": (OPS[2], lambda x, y, p, _ry, b: dk.functional.direction_proxy_nca_loss(
        x, y, p, direction_gamma=0.3, backend=b, check_inputs=False)),
}


def _watch(name, backend, with_ref):
    op, call = FUSED[name]
    n, m = (32, 32) if name == "triplet_all" else (64, 64)
    x = torch.randn(n, 2, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 6, (n,), device=DEVICE)
    second = ry = None
    if name == "proxy_nca" or with_ref:
        second = torch.randn(m, 2, device=DEVICE, requires_grad=True)
        ry = torch.randint(0, 6, (m,), device=DEVICE)
    with _Watch() as watch:
        call(x, y, second, ry, backend).backward()
    assert x.grad is not None and (second is None or second.grad is not None)
    return watch, n * (m if (second is not None) else n) * 4


@pytest.mark.parametrize("name,with_ref", [("triplet_all", False), ("triplet_all", True), ("triplet_batch_hard", True),
                                           ("ms", False), ("ms_mined", True), ("proxy_nca", False)])
def test_fused_no_pairwise_buffer_and_no_host_sync(name, with_ref):
    """The fused forms allocate O((N+M)·D) plus O(N + M) statistics — never N×M (B×C), never N×M×M — and never
    sync with the host, forward and backward. The limit is an eighth of one fp32 N×M matrix."""
    op, _ = FUSED[name]
    fused = [b for b in backends(op) if b != "reference"]
    if not fused:
        pytest.skip(f"no fused backend registers {op} here")
    for backend in fused:
        watch, nm_bytes = _watch(name, backend, with_ref)
        assert watch.largest < nm_bytes // 8, (backend, watch.largest, watch.largest_op)
        assert not watch.syncs, (backend, watch.syncs)


@pytest.mark.parametrize("name", list(FUSED))
def test_memory_watch_fails_on_the_reference(name):
    """The watch is not vacuous: the reference forms the N×M (B×C) matrix."""
    watch, nm_bytes = _watch(name, "reference", False)
    assert watch.largest >= nm_bytes // 8
