"""ProxyGML (seed 002 §5.3; dml_kernels/backends/reference/proxy_gml.py): the reference against independent
naive loops over the equations (float64, 1e-9, values and gradients of embeddings and proxies), the release's
variant against the official code's formula, the tie rule at the K-th value, gradcheck, the module (the
official ``Proxies`` name and layout, reducers, regularizers), errors naming the argument, no input
mutation; the fused Triton form (interpreter) against the reference, its memory and host-sync tests."""
import math

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.backends.reference import proxy_gml as R
from memory import TensorWatch

F = dk.functional
TIGHT = dict(rtol=1e-9, atol=1e-9)
BACKENDS = [b for b in ("reference", "triton", "cpu") if b in _registry.implemented("proxy_gml_loss")]


# ------------------------------------------------------------------------------------------ naive loops


def _exp(v):
    return torch.exp(v)


def naive_proxy_gml(x, labels, P, n, k, lam, class_mask="selected", release_eps=False, normalize=True):
    """ProxyGML by explicit loops over samples, proxies and classes (0-dim torch ops, so autograd works)."""
    b, cn = x.shape[0], P.shape[1]
    c_num = cn // n
    cols = [P[:, j] / P[:, j].norm().clamp_min(1e-12) for j in range(cn)]
    zero = x.sum() * 0
    total = zero
    for i in range(b):
        xi = x[i] / x[i].norm().clamp_min(1e-12) if normalize else x[i]
        s = [(xi * cols[j]).sum() for j in range(cn)]
        y = int(labels[i])
        own = [j for j in range(cn) if j // n == y]
        others = sorted((j for j in range(cn) if j // n != y), key=lambda j: (-float(s[j].detach()), j))
        chosen = set(own) | set(others[:min(max(k - n, 0), len(others))])
        z = {}
        for c in range(c_num):
            members = [j for j in range(c * n, (c + 1) * n) if j in chosen]
            zc = sum((s[j] for j in members), zero)
            if (bool(members) if class_mask == "selected" else float(zc.detach()) != 0.0):
                z[c] = zc
        if release_eps:
            den = 1e-8 + sum((_exp(v) for v in z.values()), zero)
            p = _exp(z[y]) / den if y in z else zero
            total = total - torch.log(p + 1e-20)
        elif y in z:
            total = total + torch.log(sum((_exp(v) for v in z.values()), zero)) - z[y]
        else:
            total = total + float("inf")
    loss = total / b
    if lam:
        reg = zero
        for j in range(cn):
            q = [sum(((cols[j] * cols[m]).sum() for m in range(c * n, (c + 1) * n)), zero) for c in range(c_num)]
            reg = reg + torch.log(sum((_exp(v) for v in q), zero)) - q[j // n]
        loss = loss + lam * reg / cn
    return loss


def official_release(x, labels, P, n, k, lam):
    """The official code's computation (loss_specs §10), written from its equations: similarity x·p̂ on raw x,
    topk(s + 1000·own), z≠0 mask, softmax with 1e-8, log(p + 1e-20), regulariser CE over Q."""
    cn = P.shape[1]
    centers = torch.nn.functional.normalize(P, p=2, dim=0)
    sim = x @ centers
    cls = torch.arange(cn) // n
    own = (labels.view(-1, 1) == cls.view(1, -1)).to(sim.dtype)
    idx = torch.topk(sim + 1000 * own, k, dim=1).indices
    mask = torch.zeros_like(sim).scatter(1, idx, 1)
    onehot = torch.nn.functional.one_hot(cls, cn // n).to(sim.dtype)
    logits = (mask * sim) @ onehot
    e = torch.exp(logits) * (logits != 0).to(sim.dtype)
    pred = e / (1e-8 + e.sum(1, keepdim=True))
    loss = -torch.log(pred.gather(1, labels.view(-1, 1)).squeeze(1) + 1e-20).mean()
    if lam > 0:
        q = (centers.t() @ centers) @ onehot
        loss = loss + lam * torch.nn.functional.cross_entropy(q, cls)
    return loss


def data(b, c, n, d, *, labels=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    P = torch.randn(d, c * n, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g) if labels is None else torch.as_tensor(labels)
    return x, y, P


def grads(fn, x, P):
    x, P = x.clone().requires_grad_(), P.clone().requires_grad_()
    v = fn(x, P)
    gx, gp = torch.autograd.grad(v, (x, P))
    return v.detach(), gx, gp


def assert_same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


# (B, C, N, D, K, λ, options): K' = K − N others; absent classes (B < C), K < N, K' = 0, everything selected
CASES = [
    (7, 5, 3, 6, 7, 0.3, {}),
    (9, 4, 2, 5, 3, 0.0, {}),                                   # K' = 1
    (6, 11, 4, 8, 13, 0.5, {}),                                 # C > B: absent classes
    (5, 3, 4, 4, 2, 0.3, {}),                                   # K < N: own class only
    (5, 3, 3, 4, 3, 0.3, {}),                                   # K = N: K' = 0
    (5, 3, 2, 4, 6, 0.3, {}),                                   # K = C·N: every proxy selected
    (8, 6, 1, 5, 3, 0.3, {}),                                   # N = 1 (the SOP setting)
    (7, 5, 3, 6, 8, 0.3, {"release_eps": True}),
    (7, 5, 3, 6, 8, 0.3, {"class_mask": "nonzero"}),
    (7, 5, 3, 6, 8, 0.3, {"normalize_embeddings": False}),
    (7, 5, 3, 6, 8, 0.3, {"release_eps": True, "class_mask": "nonzero", "normalize_embeddings": False}),
]


def _fn(y, n, k, lam, opts, backend="reference"):
    return lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=k, weight_lambda=lam, backend=backend,
                                         **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_equals_naive_loops(case, backend):
    b, c, n, d, k, lam, opts = case
    x, y, P = data(b, c, n, d, seed=b * 100 + c)
    ours = grads(_fn(y, n, k, lam, opts, backend), x, P)
    naive = grads(lambda x, P: naive_proxy_gml(x, y, P, n, k, lam, normalize=opts.get("normalize_embeddings", True),
                                               class_mask=opts.get("class_mask", "selected"),
                                               release_eps=opts.get("release_eps", False)), x, P)
    assert_same(ours, naive)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_release_variant_equals_the_official_formula(lam):
    """normalize_embeddings=False, release_eps=True, class_mask="nonzero" is the official code (K >= N)."""
    b, c, n, d, k = 9, 6, 3, 7, 8
    x, y, P = data(b, c, n, d, seed=3)
    x = torch.nn.functional.normalize(x, dim=1)  # the official network's output
    ours = grads(lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=k, weight_lambda=lam,
                                               release_eps=True, class_mask="nonzero", normalize_embeddings=False,
                                               backend="reference"), x, P)
    assert_same(ours, grads(lambda x, P: official_release(x, y, P, n, k, lam), x, P))
    # and the seed's default differs from it (the epsilons only: with unit x the cosines are the same)
    seed = F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=k, weight_lambda=lam, backend="reference")
    assert abs(float(seed - ours[0])) > 0  # the release's 1e-8 / 1e-20 move the value
    assert abs(float(seed - ours[0])) < 1e-6


def test_r_gives_the_release_k():
    c, n = 100, 12  # CUB: K = ceil(0.05 · 1200) = 60; Cars (C = 98): ceil(58.8) = 59
    x, y, P = data(4, c, n, 8)
    a = F.proxy_gml_loss(x, y, P, proxies_per_class=n, r=0.05, backend="reference")
    assert torch.equal(a, F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=60, backend="reference"))
    from dml_kernels.functional.proxy_gml import resolve_top_k
    assert resolve_top_k(0.05, None, 98 * 12) == 59 and resolve_top_k(0.05, None, 11318) == 566


# ----------------------------------------------------------------------------------------- ties


def test_tie_rule_at_the_kth_value_takes_the_lower_index():
    """Candidates ordered by (value desc, index asc): of equal values at the K-th place the lower proxy index
    is selected — a handmade row, and a batch with duplicated proxy columns against the naive loops."""
    s = torch.tensor([[0.5, 0.1, 0.3, 0.3, 0.9, 0.3, 0.3, 0.2]], dtype=torch.float64)  # N = 2, C = 4, label 0
    sel = R.selection(s, torch.tensor([0]), 2, 2 + 2)  # own {0, 1} + K' = 2 others: 0.9 (4), then 0.3 at 2
    assert sel.tolist() == [[True, True, True, False, True, False, False, False]]
    sel = R.selection(s, torch.tensor([0]), 2, 2 + 4)  # K' = 4: 0.9, then the three 0.3 at 2, 3, 5
    assert sel.tolist() == [[True, True, True, True, True, True, False, False]]
    sel = R.selection(s, torch.tensor([1]), 2, 2 + 1)  # label 1: own {2, 3}; best other 0.9 at 4
    assert sel.tolist() == [[False, False, True, True, True, False, False, False]]


def tie_data(dtype=torch.float64):
    """Proxies that are exact copies of each other across classes: equal similarities at the K-th value."""
    b, c, n, d = 6, 5, 2, 4
    x, y, P = data(b, c, n, d, dtype=dtype, seed=11)
    P = P.clone()
    for dst, src in ((3, 0), (5, 0), (7, 0), (9, 2), (4, 2), (6, 1), (8, 1)):
        P[:, dst] = P[:, src]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return x, y, P, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_ties_equal_naive(k, backend):
    x, y, P, n = tie_data()
    s = R.similarities(x, P, dk.distances.parse_distance(None, True, default="dot"))
    assert (s[:, 3] == s[:, 5]).all() and (s[:, 5] == s[:, 7]).all()  # the ties are exact
    ours = grads(lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=k, weight_lambda=0.3,
                                               backend=backend), x, P)
    assert_same(ours, grads(lambda x, P: naive_proxy_gml(x, y, P, n, k, 0.3), x, P))


# ----------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("opts", [{}, {"release_eps": True, "normalize_embeddings": False}])
def test_gradcheck_reference(opts):
    x, y, P = data(5, 4, 3, 4, seed=5)
    x.requires_grad_()
    P.requires_grad_()
    fn = lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=3, top_k=6, weight_lambda=0.4,  # noqa: E731
                                       backend="reference", **opts)
    assert torch.autograd.gradcheck(fn, (x, P))


# ----------------------------------------------------------------------------------------- module


def test_module_parameter_name_layout_init_and_functional_equality():
    torch.manual_seed(0)
    m = dk.losses.ProxyGMLLoss(10, 8, proxies_per_class=4, top_k=7, backend="reference")
    assert list(dict(m.named_parameters())) == ["Proxies"]
    assert m.Proxies.shape == (8, 40) and m.Proxies.dtype == torch.float32
    torch.manual_seed(0)
    ref = torch.empty(8, 40)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert torch.equal(m.Proxies.detach(), ref)
    assert m.instance_label.tolist() == [j // 4 for j in range(40)]
    assert (m.num_classes, m.proxies_per_class, m.top_k, m.r, m.weight_lambda) == (10, 4, 7, 0.05, 0.3)
    m2 = dk.losses.ProxyGMLLoss(10, 8, 4, backend="reference")
    assert m2.top_k == 2  # ceil(0.05 · 40)
    m2.load_state_dict(m.state_dict(), strict=True)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    got = m(x, y)
    assert m.Proxies.dtype == torch.float64  # as PML's proxy losses: cast once for float64 embeddings
    assert torch.equal(got, F.proxy_gml_loss(x, y, m.Proxies, proxies_per_class=4, top_k=7, backend="reference"))


def test_module_reducers_and_regularizers():
    from dml_kernels import reducers, regularizers
    x, y, P = data(7, 5, 3, 6)
    kw = dict(proxies_per_class=3, top_k=7, weight_lambda=0.3, backend="reference")
    m = dk.losses.ProxyGMLLoss(5, 6, **kw)
    m.Proxies.data = P.clone()
    base = m(x, y)
    d = dk.losses.ProxyGMLLoss(5, 6, reducer=reducers.DoNothingReducer(), **kw)
    d.Proxies.data = P.clone()
    parts = d(x, y)
    assert set(parts) == {"loss", "reg_loss"} and parts["loss"]["losses"].shape == (7,)
    assert parts["reg_loss"]["losses"].shape == (15,)
    torch.testing.assert_close(parts["loss"]["losses"].mean() + parts["reg_loss"]["losses"].mean(), base, **TIGHT)
    s = dk.losses.ProxyGMLLoss(5, 6, reducer=reducers.SumReducer(), **kw)
    s.Proxies.data = P.clone()
    torch.testing.assert_close(s(x, y), parts["loss"]["losses"].sum() + parts["reg_loss"]["losses"].sum(), **TIGHT)
    w = dk.losses.ProxyGMLLoss(5, 6, weight_regularizer=regularizers.LpRegularizer(), weight_reg_weight=0.5, **kw)
    w.Proxies.data = P.clone()
    expect = base + 0.5 * regularizers.LpRegularizer()(P.t())
    torch.testing.assert_close(w(x, y), expect, **TIGHT)


# ----------------------------------------------------------------------------------------- errors, inputs


def test_errors_name_the_argument():
    x, y, P = data(5, 4, 3, 6)
    call = lambda **kw: F.proxy_gml_loss(x, kw.pop("y", y), kw.pop("P", P), backend="reference",  # noqa: E731
                                         **{"proxies_per_class": 3, **kw})
    for kw, word in [({"proxies_per_class": 5}, "proxies_per_class"), ({"proxies_per_class": 0}, "proxies_per_class"),
                     ({"top_k": 0}, "top_k"), ({"top_k": 13}, "top_k"), ({"top_k": 2.5}, "top_k"),
                     ({"r": 0}, "r must"), ({"r": 1.5}, "r must"), ({"class_mask": "any"}, "class_mask"),
                     ({"weight_lambda": -1}, "weight_lambda"), ({"distance": "euclidean"}, "similarity"),
                     ({"y": torch.tensor([0, 1, 2, 4, 0])}, "num_classes=4"),
                     ({"P": P[:5]}, "embedding_size=6")]:
        with pytest.raises((ValueError, TypeError), match=word):
            call(**kw)
    with pytest.raises(ValueError, match="indices_tuple"):
        F.proxy_gml_loss(x, y, P, (y, y, y), proxies_per_class=3)
    with pytest.raises(ValueError, match="ref_emb"):
        F.proxy_gml_loss(x, y, P, ref_emb=x, proxies_per_class=3)
    for kw, word in [({"proxies_per_class": 0}, "proxies_per_class"), ({"top_k": 100}, "top_k"),
                     ({"class_mask": "x"}, "class_mask"), ({"weight_lambda": -0.1}, "weight_lambda")]:
        with pytest.raises(ValueError, match=word):
            dk.losses.ProxyGMLLoss(4, 6, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched(backend):
    x, y, P = data(7, 5, 3, 6)
    copies = [t.clone() for t in (x, y, P)]
    xl, pl = x.clone().requires_grad_(), P.clone().requires_grad_()
    F.proxy_gml_loss(xl, y, pl, proxies_per_class=3, top_k=7, backend=backend).backward()
    for t, c in zip((xl.detach(), y, pl.detach()), copies):
        assert torch.equal(t, c)


# ----------------------------------------------------------------------------------------- Triton (interpreter)

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")


@pytest.fixture
def tuning():
    from dml_kernels.backends.triton import proxy_gml as TG
    saved = dict(TG.TUNING)
    yield TG.TUNING
    TG.TUNING.clear()
    TG.TUNING.update(saved)


# (B, C, N, D, K, tuning): odd B and C (not tile multiples), N not a power of 2 (padded slots), N = 1, N = 16
# (one class per tile), several tiles per row, K' = 0, every other proxy selected, wider tiles
TRITON_CASES = [
    (19, 7, 3, 20, 9, {}),
    (33, 13, 3, 5, 11, {"block_w": 32}),
    (17, 6, 1, 37, 4, {}),
    (9, 3, 16, 6, 20, {}),
    (21, 5, 5, 8, 5, {}),                          # K = N: own class only
    (21, 5, 2, 8, 10, {}),                         # K = C·N
    (40, 9, 2, 16, 7, {"block_b": 32, "block_k": 16, "block_d": 16}),
]


@needs_triton
@pytest.mark.parametrize("opts", [{}, {"release_eps": True, "class_mask": "nonzero", "normalize_embeddings": False},
                                  {"weight_lambda": 0.0}])
@pytest.mark.parametrize("case", TRITON_CASES, ids=[str(i) for i in range(len(TRITON_CASES))])
def test_triton_equals_reference(case, opts, tuning):
    b, c, n, d, k, tune = case
    tuning.update(tune)
    x, y, P = data(b, c, n, d, seed=b + c)
    if c > b:
        y = torch.randint(0, c // 2, (b,))  # half the classes absent
    kw = {"proxies_per_class": n, "top_k": k, "weight_lambda": 0.3, **opts}
    got = grads(lambda x, P: F.proxy_gml_loss(x, y, P, backend="triton", **kw), x, P)
    assert_same(got, grads(lambda x, P: F.proxy_gml_loss(x, y, P, backend="reference", **kw), x, P))


@needs_triton
def test_triton_ties_across_tiles(tuning):
    """Exact ties at the K-th value spread over several class tiles (duplicated proxy columns): the kernel
    keeps the lower index, as the reference."""
    tuning.update(block_w=16)
    b, c, n, d = 18, 12, 4, 5
    x, y, P = data(b, c, n, d, seed=4)
    P = P.clone()
    for dst in (9, 17, 26, 33, 47):  # copies of proxy 1 in classes 2, 4, 6, 8, 11
        P[:, dst] = P[:, 1]
    y = torch.arange(b) % c
    y[y == 0] = 3  # no row of class 0: proxy 1 and its copies compete as other-class candidates
    s = R.similarities(x, P, dk.distances.parse_distance(None, True, default="dot"))
    assert (s[:, 9] == s[:, 1]).all() and (s[:, 47] == s[:, 1]).all()
    for k in (n + 1, n + 3, n + 6):
        fn = lambda be: (lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=n, top_k=k,  # noqa: E731
                                                       weight_lambda=0.0, backend=be))
        got, want = grads(fn("triton"), x, P), grads(fn("reference"), x, P)
        assert_same(got, want)
        assert_same(got, grads(lambda x, P: naive_proxy_gml(x, y, P, n, k, 0.0), x, P))


@needs_triton
def test_triton_gradcheck():
    x, y, P = data(3, 2, 2, 3, seed=8)
    x.requires_grad_()
    P.requires_grad_()
    fn = lambda x, P: F.proxy_gml_loss(x, y, P, proxies_per_class=2, top_k=3, weight_lambda=0.4,  # noqa: E731
                                       backend="triton")
    assert torch.autograd.gradcheck(fn, (x, P))


@needs_triton
def test_triton_float32_close_to_reference():
    x, y, P = data(19, 7, 3, 20, dtype=torch.float32, seed=2)
    kw = dict(proxies_per_class=3, top_k=9, weight_lambda=0.3)
    got = grads(lambda x, P: F.proxy_gml_loss(x, y, P, backend="triton", **kw), x, P)
    want = grads(lambda x, P: F.proxy_gml_loss(x, y, P, backend="reference", **kw), x, P)
    assert got[0].dtype == torch.float32
    assert_same(got, want, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_unsupported_k_falls_back(monkeypatch):
    from dml_kernels.backends.triton import proxy_gml as TG
    x, y, P = data(5, 40, 4, 6)
    with pytest.raises(_registry.Unsupported, match="registers"):
        F.proxy_gml_loss(x, y, P, proxies_per_class=4, top_k=4 + TG.MAX_OTHER + 1, backend="triton")
    monkeypatch.setattr(_registry, "auto_candidates", lambda device_type: ("triton", "reference"))
    monkeypatch.setattr(_registry, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = F.proxy_gml_loss(x, y, P, proxies_per_class=4, top_k=4 + TG.MAX_OTHER + 1, backend="auto")
    assert torch.equal(got, F.proxy_gml_loss(x, y, P, proxies_per_class=4, top_k=4 + TG.MAX_OTHER + 1,
                                             backend="reference"))


_Watch = TensorWatch  # tests/memory.py


@needs_triton
def test_no_batch_by_proxy_buffer_and_no_sync(tuning):
    """Forward + backward (both gradients, regulariser included) never allocate B×(C·N) elements and never
    sync; the same watch sees the reference's B×(C·N) buffers, so it can fail."""
    tuning.update(block_b=32, block_w=64)
    b, c, n, d = 64, 96, 4, 4  # B·C·N = 24576 elements vs the largest legitimate buffer C·N·D = 1536
    x, y, P = data(b, c, n, d)

    def watched(backend):
        xx, pp = x.clone().requires_grad_(), P.clone().requires_grad_()
        with _Watch() as w:
            F.proxy_gml_loss(xx, y, pp, proxies_per_class=n, top_k=n + 6, backend=backend,
                             check_inputs=False).backward()
        return w

    assert watched("reference").largest >= b * c * n * 8
    w = watched("triton")
    assert w.largest <= max(b, c * n) * d * 8, w.largest
    assert not w.syncs, w.syncs


@needs_triton
def test_no_tensor_to_python_conversions(monkeypatch):
    """CPU stand-in for CUDA's sync check: with check_inputs=False nothing turns a tensor into a Python value."""
    x, y, P = data(10, 6, 3, 8)
    xx, pp = x.clone().requires_grad_(), P.clone().requires_grad_()
    calls = []
    names = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")
    for name in names:
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda o, nm: lambda self, *a, **k: (calls.append(nm),
                                                                                      o(self, *a, **k))[1])(orig, name))
    F.proxy_gml_loss(xx, y, pp, proxies_per_class=3, top_k=7, backend="triton", check_inputs=False).backward()
    assert calls == []
    F.proxy_gml_loss(x, y, P, proxies_per_class=3, top_k=7, backend="triton")  # validation converts: detector works
    monkeypatch.undo()
    assert calls
