"""fp32 Proxy Anchor on oneDNN class blocks (backends/cpp/class_losses._ProxyAnchor): the same loss and gradients
as pair_reduce's form (the old path, oneDNN switched off) at fp32 rounding and as the float64 reference, over one
and many class blocks, cosine and raw dot products, label patterns with classes lacking positives or negatives,
frozen inputs, no-grad; float64 keeps the exact path; memory stays one block (never B×C); no host sync; double
backward raises, a retained second backward repeats the first."""
import pytest
import torch

import dml_kernels.functional as F
from dml_kernels import _registry
from dml_kernels._registry import Unsupported
from dml_kernels.backends.cpp import class_losses as cl
from memory import TensorWatch

pytestmark = [
    pytest.mark.skipif(_registry.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable"),
    pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                       reason="torch without oneDNN (mkldnn) matmul"),
]

DIST = {"cosine": {}, "dot_raw": {"distance": "dot", "normalize_embeddings": False}}


def _labels(pattern, B, C, g):
    if pattern == "random":
        return torch.randint(0, C, (B,), generator=g)
    if pattern == "one_class":  # class 3: positives only (no negatives); every other class: no positives
        return torch.full((B,), 3)
    return torch.arange(B) % 2  # two classes hold all rows; the rest have no positives


def _run(x, y, p, backend, dtype=torch.float32, x_grad=True, p_grad=True, **kw):
    x = x.to(dtype).requires_grad_(x_grad)
    p = p.detach().to(dtype).requires_grad_(p_grad)
    loss = F.proxy_anchor_loss(x, y, p, backend=backend, **kw)
    wrt = [t for t in (x, p) if t.requires_grad]
    return [loss.detach()] + list(torch.autograd.grad(loss, wrt))


def _close(got, want, tol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol * max(scale, 1e-3))


def _counting(monkeypatch):
    calls = []
    real = cl._lin
    monkeypatch.setattr(cl, "_lin", lambda a, b: calls.append(1) or real(a, b))
    return calls


@pytest.mark.parametrize("dist", sorted(DIST))
@pytest.mark.parametrize("pattern", ["random", "one_class", "two_classes"])
@pytest.mark.parametrize("block", [None, 5], ids=["one_block", "blocks_of_5_classes"])
def test_equals_old_path_and_reference(dist, pattern, block, monkeypatch):
    B, D, C = 37, 11, 23
    if block:
        monkeypatch.setattr(cl, "_BLOCK_ELEMS", block * (B + 1))
    g = torch.Generator().manual_seed(5)
    x, p = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g) * 2
    y = _labels(pattern, B, C, g)
    kw = dict(DIST[dist], margin=0.2, alpha=16)
    calls = _counting(monkeypatch)
    got = _run(x, y, p, "cpu", **kw)
    n_blocks = -(-C // block) if block else 1
    assert len(calls) == 3 * n_blocks  # per block: the logits, dq's and dP's products
    ref64 = _run(x, y, p, "reference", dtype=torch.float64, **kw)
    monkeypatch.setattr(cl, "_ONEDNN", False)
    calls.clear()
    old = _run(x, y, p, "cpu", **kw)
    assert not calls
    _close(got, old, 2e-5)
    _close(got, ref64, 2e-5)


@pytest.mark.parametrize("shape", [(1, 4, 6), (9, 5, 1), (64, 16, 3)], ids=["B=1", "C=1", "C<B"])
def test_small_shapes(shape):
    B, D, C = shape
    g = torch.Generator().manual_seed(2)
    x, p = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    _close(_run(x, y, p, "cpu"), _run(x, y, p, "reference", dtype=torch.float64), 2e-5)


@pytest.mark.parametrize("frozen", ["x", "proxies", "both"])
def test_frozen_inputs_and_no_grad(frozen):
    g = torch.Generator().manual_seed(3)
    x, p = torch.randn(20, 7, generator=g), torch.randn(30, 7, generator=g)
    y = torch.randint(0, 30, (20,), generator=g)
    kw = {"x_grad": frozen == "proxies", "p_grad": frozen == "x"}
    if frozen == "both":
        with torch.no_grad():
            got = F.proxy_anchor_loss(x, y, p, backend="cpu")
        torch.testing.assert_close(got.double(), F.proxy_anchor_loss(x.double(), y, p.double(), backend="reference"),
                                   rtol=2e-6, atol=0)
        return
    _close(_run(x, y, p, "cpu", **kw), _run(x, y, p, "reference", dtype=torch.float64, **kw), 2e-5)


def test_float64_stays_on_the_exact_path(monkeypatch):
    calls = _counting(monkeypatch)
    g = torch.Generator().manual_seed(4)
    x, p = torch.randn(12, 5, generator=g), torch.randn(9, 5, generator=g)
    y = torch.randint(0, 9, (12,), generator=g)
    got = _run(x, y, p, "cpu", dtype=torch.float64)
    assert not calls
    _close(got, _run(x, y, p, "reference", dtype=torch.float64), 1e-9)


def test_miner_weights_stay_unsupported():
    x, p = torch.randn(6, 4), torch.randn(5, 4)
    from dml_kernels.distances import parse_distance
    with pytest.raises(Unsupported):
        cl.proxy_anchor_loss(x, torch.arange(6) % 5, p, margin=0.1, alpha=32.0,
                             distance=parse_distance(None, default="cosine"), weights=torch.ones(6))


def test_memory_one_block_and_no_sync(monkeypatch):
    """B = 256, C = 512, D = 8 in 16-class blocks: the largest tensor is one block (B×C would be 32× that)."""
    B, C, D = 256, 512, 8
    monkeypatch.setattr(cl, "_BLOCK_ELEMS", 16 * (B + 1))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, D, generator=g).requires_grad_()
    p = torch.randn(C, D, generator=g).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    calls = _counting(monkeypatch)
    with TensorWatch() as watch:
        F.proxy_anchor_loss(x, y, p, backend="cpu", check_inputs=False).backward()
    assert len(calls) == 3 * (C // 16)
    assert watch.largest <= 16 * (B + 1) * 4, (watch.largest, watch.largest_op)
    assert not watch.syncs, watch.syncs


def test_double_backward_raises_and_retained_backward_repeats():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 6, generator=g).requires_grad_()
    p = torch.randn(8, 6, generator=g).requires_grad_()
    y = torch.randint(0, 8, (10,), generator=g)
    loss = F.proxy_anchor_loss(x, y, p, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = F.proxy_anchor_loss(x, y, p, backend="cpu")
    first = torch.autograd.grad(loss, (x, p), retain_graph=True)
    second = torch.autograd.grad(loss * 2, (x, p))
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b)
