"""The CPU class engine (backends/cpp/class_losses._class_ce): the margin-softmax family and ProxyNCA with the
gradient formed in the forward (row blocks of all C logits, 3 GEMMs, a per-column normalisation scale instead of
a normalised C×D copy). Exact against the reference in float64 (values, embedding and class-weight gradients,
miner weights, frozen inputs, no-grad calls, C = 1), against a plain-loop CosFace, memory bounded by one row block
(never B×C), no host sync, a clear refusal of create_graph=True, retain_graph backwards, fp16 embeddings with fp32
weights left untouched."""
import math

import pytest
import torch

import dml_kernels.functional as F
from dml_kernels import _registry
from dml_kernels.backends.cpp import class_losses as cl
from memory import TensorWatch

pytestmark = pytest.mark.skipif(_registry.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable")

LOSSES = {
    "normalized_softmax": lambda x, y, W, b, **kw: F.normalized_softmax_loss(x, y, W, backend=b, **kw),
    "normalized_softmax_T": lambda x, y, W, b, **kw: F.normalized_softmax_loss(x, y, W, temperature=0.3, backend=b,
                                                                               **kw),
    "cosface": lambda x, y, W, b, **kw: F.cosface_loss(x, y, W, backend=b, **kw),
    "arcface": lambda x, y, W, b, **kw: F.arcface_loss(x, y, W, margin=40.0, backend=b, **kw),
    "large_margin_softmax": lambda x, y, W, b, **kw: F.large_margin_softmax_loss(x, y, W, backend=b, **kw),
    "sphereface": lambda x, y, W, b, **kw: F.sphereface_loss(x, y, W, margin=3, backend=b, **kw),
    "proxy_nca": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), backend=b, **kw),
    "proxy_nca_cosine": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), distance="cosine", softmax_scale=4,
                                                                  backend=b, **kw),
    "proxy_nca_exclude": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), exclude_positive=True,
                                                                   softmax_scale=3, backend=b, **kw),
    "proxy_nca_dot": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), distance="dot", backend=b, **kw),
}


def _grads(name, backend, B=29, D=7, C=23, seed=0, x_grad=True, w_grad=True, miner=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    if name not in ("large_margin_softmax", "sphereface"):  # (these two take x·w_c unnormalised: at x = 0 the
        x[3] = 0  # zero embedding  # cpu backend's subgradient differs from the reference's, as before this engine)
    W = torch.randn(D, C, generator=g, dtype=dtype)
    if name != "large_margin_softmax" and C > 5:  # (same: LargeMargin's raw x·w_c at a clamped column, as before)
        W[:, 5] *= 1e-14  # a column below the normalisation eps (no projection in its gradient)
    y = torch.randint(0, C, (B,), generator=g)
    x.requires_grad_(x_grad)
    W.requires_grad_(w_grad)
    kw = {}
    if miner:  # a pair miner's indices: PML weights each row by how often it appears as an anchor
        a = torch.randint(0, B, (40,), generator=g)
        kw["indices_tuple"] = (a, torch.randint(0, B, (40,), generator=g), a, torch.randint(0, B, (40,), generator=g))
    loss = LOSSES[name](x, y, W, backend, **kw)
    wrt = [t for t in (x, W) if t.requires_grad and torch.is_grad_enabled()]
    return [loss.detach()] + list(torch.autograd.grad(loss, wrt)) if wrt else [loss]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("variant", ["plain", "miner", "frozen_x", "frozen_W"])
def test_exact_against_reference_fp64(name, variant):
    kw = {"miner": variant == "miner", "x_grad": variant != "frozen_x", "w_grad": variant != "frozen_W"}
    if variant == "miner" and name.startswith("proxy_nca"):
        kw["miner"] = False  # (ProxyNCA's miner weights: covered by the plain-op test below)
    want, got = _grads(name, "reference", **kw), _grads(name, "cpu", **kw)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_block_boundaries_and_weights(monkeypatch):
    """Several row blocks (a 5-row block size: 29 rows = 6 blocks), explicit per-row weights on the raw ops."""
    from dml_kernels.backends.cpp import margin_softmax as cms
    from dml_kernels.backends.reference import class_losses as rcl, margin_softmax as rms
    from dml_kernels.distances import parse_distance
    monkeypatch.setattr(cl, "_BLOCK_ELEMS", 5 * 23)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 7, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(7, 23, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 23, (29,), generator=g)
    w = torch.rand(29, dtype=torch.float64, generator=g)
    dist = parse_distance(None, True, default="squared_euclidean")
    for ours, ref, kw in ((cms.cosface_loss, rms.cosface_loss, dict(margin=0.35, scale=64.0)),
                          (cms.large_margin_softmax_loss, rms.large_margin_softmax_loss, dict(margin=4, scale=1.0)),
                          (lambda x, y, W, **k: cl.proxy_nca_loss(x, y, W.t(), **k),
                           lambda x, y, W, **k: rcl.proxy_nca_loss(x, y, W.t(), **k),
                           dict(softmax_scale=2.0, distance=dist))):
        a = ours(x, y, W, weights=w, **kw)
        b = ref(x, y, W, weights=w, **kw)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        for u, v in zip(torch.autograd.grad(a, (x, W)), torch.autograd.grad(b, (x, W))):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)


def test_cosface_against_plain_loops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    W = torch.randn(4, 5, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    m, s = 0.35, 64.0
    want = 0.0
    for i in range(6):
        xn = math.sqrt(sum(float(v) ** 2 for v in x[i]))
        logits = []
        for c in range(5):
            wn = math.sqrt(sum(float(W[k, c]) ** 2 for k in range(4)))
            cos = sum(float(x[i, k]) * float(W[k, c]) for k in range(4)) / (xn * wn)
            logits.append(s * (cos - m) if c == int(y[i]) else s * cos)
        top = max(logits)
        want += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[int(y[i])]
    got = F.cosface_loss(x, y, W, margin=m, scale=s, backend="cpu")
    assert abs(float(got) - want / 6) < 1e-9 * max(1.0, abs(want))


@pytest.mark.parametrize("name", ["cosface", "proxy_nca"])
def test_no_grad_and_single_class(name):
    with torch.no_grad():
        got = _grads(name, "cpu")
        assert len(got) == 1 and got[0].grad_fn is None
        torch.testing.assert_close(got[0], _grads(name, "reference")[0], rtol=1e-9, atol=1e-9)
    for a, b in zip(_grads(name, "cpu", C=1), _grads(name, "reference", C=1)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["normalized_softmax", "arcface", "sphereface", "proxy_nca"])
def test_memory_one_row_block_and_no_sync(name, monkeypatch):
    """B = 256, C = 512, D = 8 with 16-row blocks: no tensor of B×C entries (the reference's logits) is formed, in
    the forward or the backward, and nothing syncs with the host."""
    monkeypatch.setattr(cl, "_BLOCK_ELEMS", 16 * 512)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g, requires_grad=True)
    W = torch.randn(8, 512, generator=g, requires_grad=True)
    y = torch.randint(0, 512, (256,), generator=g)
    with TensorWatch() as watch:
        LOSSES[name](x, y, W, "cpu", check_inputs=False).backward()
    assert watch.largest <= 16 * 512 * 4, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


def test_double_backward_refused_and_retain_graph_repeatable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (9,), generator=g)
    loss = F.cosface_loss(x, y, W, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = F.arcface_loss(x, y, W, backend="cpu")
    first = [t.clone() for t in torch.autograd.grad(loss * 3, (x, W), retain_graph=True)]
    second = torch.autograd.grad(loss * 3, (x, W), retain_graph=True)  # (the first's buffers went to autograd)
    third = torch.autograd.grad(loss * 2, (x, W))
    want = torch.autograd.grad(F.arcface_loss(x, y, W, backend="reference") * 3, (x, W))
    for a, b, c, d in zip(first, second, third, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(c * 1.5, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cosface", "large_margin_softmax", "proxy_nca"])
def test_fp16_embeddings_fp32_weights_not_cast(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=g).half().requires_grad_()
    W = torch.randn(8, 10, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (12,), generator=g)
    x0, W0 = x.detach().clone(), W.detach().clone()
    loss = LOSSES[name](x, y, W, "cpu")
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float16 and W.grad.dtype == torch.float32
    assert W.dtype == torch.float32 and torch.equal(W.detach(), W0) and torch.equal(x.detach(), x0)
    xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()  # same values, fp64
    ref = LOSSES[name](xr, y, Wr, "reference")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    scale = float(Wr.grad.abs().max())  # fp32 arithmetic (ProxyNCA: 2 − 2cos cancels; pair_reduce: 2.8e-4·scale too)
    torch.testing.assert_close(W.grad.double(), Wr.grad, rtol=0, atol=5e-4 * scale)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-3 * float(xr.grad.abs().max()))


# ----------------------------------------------------------------- the fused row op (csrc/cpu/class_ops.cpp)

def _naive_class_rows(A, y, scale, cs=None, qn=None, rn=None):
    """Plain loops over class_rows' formula: (written block, stats rows [v, m, S, W])."""
    n, C = A.shape
    rows, stats = [], []
    for i in range(n):
        yi = int(y[i])
        raw = ([float(qn[i]) + float(rn[c]) - 2 * float(A[i, c]) * (1.0 if cs is None else float(cs[c]))
                for c in range(C)] if rn is not None else None)
        if raw is not None:
            value = [max(r, 0.0) for r in raw]
        else:
            value = [float(A[i, c]) * (1.0 if cs is None else float(cs[c])) for c in range(C)]
        logits = [scale * value[c] for c in range(C)]
        others = [logits[c] for c in range(C) if c != yi]
        m = max(others) if others else 0.0
        row = []
        for c in range(C):
            cut = raw is not None and raw[c] < 0
            row.append(0.0 if c == yi or cut else math.exp(logits[c] - m))
        rows.append(row)
        stats.append([raw[yi] if raw is not None else value[yi], m, sum(math.exp(t - m) for t in others), sum(row)])
    return torch.tensor(rows, dtype=torch.float64).reshape(n, C), torch.tensor(stats, dtype=torch.float64).reshape(n, 4).t()


def _class_rows_case(variant, dtype, n=7, C=37):
    g = torch.Generator().manual_seed(4)
    A = torch.randn(n, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (n,), generator=g)
    y[0] = 0
    y[1] = C - 1
    cs = qn = rn = None
    if variant in ("col_scale", "sq_col_scale"):
        cs = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if variant in ("sq_euclid", "sq_col_scale"):
        qn = torch.rand(n, generator=g, dtype=torch.float64) * 4
        rn = torch.rand(C, generator=g, dtype=torch.float64) * 4
        A[2, min(3, C - 1)] = A[2, y[2]] = 100.0  # clamped squared distances, one at the target (raw < 0)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(A), y, cast(cs), cast(qn), cast(rn)


@pytest.mark.parametrize("variant", ["plain", "col_scale", "sq_euclid", "sq_col_scale"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [37, 1, 2500])
def test_class_rows_op_against_plain_loops(variant, dtype, C):
    if not cl._has_class_rows():
        pytest.skip("the loaded extension has no class_rows")
    A, y, cs, qn, rn = _class_rows_case(variant, dtype, C=C)
    if C == 1:
        y.zero_()
    scale = -1.7 if variant.startswith("sq") else 2.5
    want_rows, want_stats = _naive_class_rows(A, y, scale, cs, qn, rn)
    got = A.clone()
    stats = torch.ops.dml_kernels.class_rows(got, y, scale, cs, qn, rn)
    if cs is not None:  # scale_out: the written row times the column scale, the statistics unchanged
        got2 = A.clone()
        stats2 = torch.ops.dml_kernels.class_rows(got2, y, scale, cs, qn, rn, True)
        torch.testing.assert_close(stats2, stats, rtol=0, atol=0)
        torch.testing.assert_close(got2, got * cs, rtol=0, atol=0)
    # fp32: exp(x) of an fp32 argument |x| ≤ ~40 carries |x|·2^-24 ≈ 2.4e-6 relative error (torch's exp alike)
    tol = dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(stats.double(), want_stats, **tol)
    torch.testing.assert_close(got.double(), want_rows, **tol)


def test_class_rows_opcheck_and_errors():
    if not cl._has_class_rows():
        pytest.skip("the loaded extension has no class_rows")
    op = torch.ops.dml_kernels.class_rows
    for variant in ("plain", "col_scale", "sq_euclid", "sq_col_scale"):
        A, y, cs, qn, rn = _class_rows_case(variant, torch.float64)
        torch.library.opcheck(op.default, (A, y, 1.5, cs, qn, rn, cs is not None))
    A, y, *_ = _class_rows_case("plain", torch.float64)
    with pytest.raises(RuntimeError, match="outside"):
        op(A, torch.full_like(y, 37), 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(A, y.int(), 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="qn and rn"):
        op(A, y, 1.0, None, torch.zeros(7, dtype=torch.float64), None)


def test_far_apart_classes_exact():
    """Logits thousands apart (ProxyNCA's squared distances to far proxies): the row maximum over the non-target
    columns is the stabiliser — a maximum over every column (the target's ≈ 0) or none underflows every exp."""
    g = torch.Generator().manual_seed(5)
    P = torch.randn(7, 4, generator=g, dtype=torch.float64) * 30
    y = torch.randint(0, 7, (9,), generator=g)
    x = (P[y] + 0.1 * torch.randn(9, 4, generator=g, dtype=torch.float64)).requires_grad_()
    P.requires_grad_()
    for kw in (dict(exclude_positive=True), dict(exclude_positive=True, softmax_scale=0.5), {}):
        a = F.proxy_nca_loss(x, y, P, backend="cpu", normalize_embeddings=False, **kw)
        b = F.proxy_nca_loss(x, y, P, backend="reference", normalize_embeddings=False, **kw)
        assert torch.isfinite(b) and float(b) < -500 if kw else True
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        for u, v in zip(torch.autograd.grad(a, (x, P)), torch.autograd.grad(b, (x, P))):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["normalized_softmax", "cosface", "proxy_nca", "proxy_nca_exclude"])
def test_torch_fallback_without_the_op(name, monkeypatch):
    """An extension built before class_rows: the same engine in torch passes, still exact."""
    monkeypatch.setattr(cl, "_has_class_rows", lambda: False)
    for a, b in zip(_grads(name, "cpu"), _grads(name, "reference")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["DxC", "CxD_view"])
def test_p2sgrad_gram_function_first_and_second_order(layout):
    """P2SGrad's Gram Function (two D×D×C GEMMs): values, gradients and second-order gradients equal the reference
    (fp64, 1e-10), W as PML's D×C leaf or as the transposed view of a C×D leaf (the benchmark's proxies)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    base = 0.9 * torch.nn.functional.normalize(torch.randn(4, 9, generator=g, dtype=torch.float64), dim=0)
    leaf = (base if layout == "DxC" else base.t().contiguous()).requires_grad_()
    y = torch.tensor([0, 8, 2, 2, 1, 8, 3])
    out = []
    for backend in ("cpu", "reference"):
        W = leaf if layout == "DxC" else leaf.t()
        loss = F.p2sgrad_loss(x, y, W, backend=backend)
        gx, gw = torch.autograd.grad(loss, (x, leaf), create_graph=True)
        hx, hw = torch.autograd.grad(gw.pow(2).sum() + gx.pow(3).sum(), (x, leaf))
        out.append([loss, gx, gw, hx, hw])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_proxy_nca_normalisation_is_a_column_scale(distance, monkeypatch):
    """ProxyNCA with normalised embeddings: the proxies are never copied normalised (C×D) — their normalisation is
    the engine's per-column scale (squared euclidean: in class_rows) — and the result is the reference's."""
    shapes = []
    real = cl._NormalizeRows.apply
    monkeypatch.setattr(cl._NormalizeRows, "apply", lambda t, eps: shapes.append(tuple(t.shape)) or real(t, eps))
    from dml_kernels.backends.cpp import common
    monkeypatch.setattr(common._NormalizeRows, "apply", cl._NormalizeRows.apply)
    kw = {"distance": distance} if distance == "cosine" else {}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    P = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (13,), generator=g)
    out = []
    for backend in ("cpu", "reference"):
        shapes.clear()
        loss = F.proxy_nca_loss(x, y, P, backend=backend, **kw)
        out.append([loss, *torch.autograd.grad(loss, (x, P))])
        if backend == "cpu":
            assert (11, 5) not in shapes and (13, 5) in shapes, shapes
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
