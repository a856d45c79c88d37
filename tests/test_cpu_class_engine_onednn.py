"""The CPU class engine's fp32 products through oneDNN (backends/cpp/class_losses._Products): the same losses and
gradients as the torch.mm path and as the float64 reference (fp32 rounding), in both gradient layouts (W's D×C
columns: G written transposed; ProxyNCA's C×D proxies: G row-major), over several row blocks whose later blocks
accumulate G, C = 1, frozen inputs; the path is really taken when torch
has oneDNN, and memory stays one row block (never B×C)."""
import pytest
import torch

import dml_kernels.functional as F
from dml_kernels import _registry
from dml_kernels.backends.cpp import class_losses as cl
from memory import TensorWatch

pytestmark = [
    pytest.mark.skipif(_registry.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable"),
    pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                       reason="torch without oneDNN (mkldnn) matmul"),
]

LOSSES = {
    "normalized_softmax": lambda x, y, W, b, **kw: F.normalized_softmax_loss(x, y, W, backend=b, **kw),
    "cosface": lambda x, y, W, b, **kw: F.cosface_loss(x, y, W, backend=b, **kw),
    "arcface": lambda x, y, W, b, **kw: F.arcface_loss(x, y, W, backend=b, **kw),
    "large_margin_softmax": lambda x, y, W, b, **kw: F.large_margin_softmax_loss(x, y, W, backend=b, **kw),
    "sphereface": lambda x, y, W, b, **kw: F.sphereface_loss(x, y, W, backend=b, **kw),
    "proxy_nca": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), backend=b, **kw),
    "proxy_nca_dot": lambda x, y, W, b, **kw: F.proxy_nca_loss(x, y, W.t(), distance="dot", softmax_scale=3,
                                                               backend=b, **kw),
}


def _inputs(B, D, C, seed, proxies_rowmajor):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    if proxies_rowmajor:  # a C×D leaf seen as its D×C transposed view (ProxyNCA's proxies; the benchmark's W)
        leaf = torch.randn(C, D, generator=g)
        W = leaf.t()
    else:
        leaf = W = torch.randn(D, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return x, y, leaf, W


def _run(name, backend, x, y, leaf, rowmajor, dtype=torch.float32, x_grad=True, w_grad=True):
    x = x.to(dtype).requires_grad_(x_grad)
    leaf = leaf.detach().to(dtype).requires_grad_(w_grad)
    W = leaf.t() if rowmajor else leaf
    loss = LOSSES[name](x, y, W, backend)
    wrt = [t for t in (x, leaf) if t.requires_grad]
    return [loss.detach()] + list(torch.autograd.grad(loss, wrt))


def _close(got, want, rtol):
    for a, b in zip(got, want):
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=rtol * max(scale, 1e-3))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("rowmajor", [False, True], ids=["W_DxC", "proxies_CxD"])
def test_onednn_equals_torch_mm_and_reference(name, rowmajor, monkeypatch):
    """B = 37 rows in 6-row blocks (7 blocks: the later six accumulate G), C = 45, D = 11."""
    monkeypatch.setattr(cl, "_BLOCK_ELEMS", 6 * 45)
    x, y, leaf, _ = _inputs(37, 11, 45, 0, rowmajor)
    calls = []
    real = cl._lin
    monkeypatch.setattr(cl, "_lin", lambda a, b: calls.append(1) or real(a, b))
    got = _run(name, "cpu", x, y, leaf, rowmajor)
    assert len(calls) == 7 * 2 + (not rowmajor)  # logits and dq per block; G (D×C): the first block's
    ref64 = _run(name, "reference", x, y, leaf, rowmajor, dtype=torch.float64)
    monkeypatch.setattr(cl, "_ONEDNN", False)
    calls.clear()
    mm = _run(name, "cpu", x, y, leaf, rowmajor)
    assert not calls
    _close(got, mm, 2e-5)
    _close(got, ref64, 1e-4)


@pytest.mark.parametrize("variant", ["frozen_x", "frozen_W", "single_class", "one_block"])
def test_onednn_frozen_inputs_and_shapes(variant):
    C = 1 if variant == "single_class" else 300
    x, y, leaf, _ = _inputs(23, 9, C, 1, False)
    kw = {"x_grad": variant != "frozen_x", "w_grad": variant != "frozen_W"}
    for name in ("cosface", "proxy_nca"):
        got = _run(name, "cpu", x, y, leaf, False, **kw)
        want = _run(name, "reference", x, y, leaf, False, dtype=torch.float64, **kw)
        assert len(got) == len(want)
        _close(got, want, 1e-4)


def test_onednn_memory_one_row_block(monkeypatch):
    """B = 256, C = 512, D = 8 with 16-row blocks: the largest tensor is one block."""
    monkeypatch.setattr(cl, "_BLOCK_ELEMS", 16 * 512)
    x, y, leaf, W = _inputs(256, 8, 512, 2, False)
    x.requires_grad_()
    leaf.requires_grad_()
    for name in ("arcface", "proxy_nca"):
        with TensorWatch() as watch:
            LOSSES[name](x, y, W, "cpu", check_inputs=False).backward()
        assert watch.largest <= 16 * 512 * 4, (watch.largest, watch.largest_op)
        assert not watch.syncs, watch.syncs


def test_onednn_only_for_ieee_fp32_when_enabled():
    assert cl._onednn_ok(torch.float32) and not cl._onednn_ok(torch.float64)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cl._onednn_ok(torch.float32)


# ----------------------------------------------------------------- grouped columns (SubCenterArcFace, SoftTriple)

GROUPED = {
    "subcenter_arcface": lambda x, y, W, k, b: F.subcenter_arcface_loss(x, y, W, sub_centers=k, backend=b),
    "soft_triple": lambda x, y, W, k, b: F.soft_triple_loss(x, y, W, centers_per_class=k, backend=b),
}


@pytest.mark.parametrize("name", sorted(GROUPED))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layout", ["pml_DxCK", "CKxD_view"])
@pytest.mark.parametrize("stash", [True, False], ids=["B<=D", "B>D"])
def test_grouped_onednn_equals_torch_mm_and_reference(name, k, layout, stash, monkeypatch):
    """fp32, several whole-class chunks (a 60-element tile), W in PML's D×C·K layout (its padded column slices packed
    per chunk) or as the transposed view of a C·K×D leaf: all three products on oneDNN either way; B ≤ D keeps the
    tiles in dW's buffer, B > D recomputes them."""
    from dml_kernels.backends.cpp import grouped_columns as gc, row_blocks
    monkeypatch.setattr(row_blocks, "TILE", 60)
    B, D, n_cls = (6, 9, 13) if stash else (17, 5, 13)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, D, generator=g)
    leaf = torch.randn(D, n_cls * k, generator=g) if layout == "pml_DxCK" else torch.randn(n_cls * k, D, generator=g)
    y = torch.randint(0, n_cls, (B,), generator=g)
    calls = []
    real = cl._lin
    monkeypatch.setattr(gc, "_lin", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(cl, "_lin", gc._lin)  # (the tiles' products: class_losses._mm_nt)

    def run(dtype, backend):
        xr = x.to(dtype).requires_grad_()
        lr = leaf.to(dtype).requires_grad_()
        loss = GROUPED[name](xr, y, lr if layout == "pml_DxCK" else lr.t(), k, backend)
        return [loss.detach(), *torch.autograd.grad(loss, (xr, lr))]

    got = run(torch.float32, "cpu")
    n_chunks = -(-n_cls // max(1, 60 // (B * k)))
    # per chunk: the tile (twice when recomputed), dq's and dW's products
    assert len(calls) == n_chunks * (3 + (not stash)), len(calls)
    ref64 = run(torch.float64, "reference")
    monkeypatch.setattr(cl, "_ONEDNN", False)
    calls.clear()
    mm = run(torch.float32, "cpu")
    assert not calls
    _close(got, mm, 2e-5)
    _close(got, ref64, 1e-4)


def test_padded_weight_slice_stays_on_torch_mm(monkeypatch):
    """W a column slice of a wider matrix (padded rows): oneDNN's slow path for such a weight is never taken."""
    calls = []
    real = cl._lin
    monkeypatch.setattr(cl, "_lin", lambda a, b: calls.append(1) or real(a, b))
    x, y, leaf, _ = _inputs(19, 7, 40, 3, False)
    W = leaf[:, :30]
    xr = x.clone().requires_grad_()
    loss = F.cosface_loss(xr, y % 30, W, backend="cpu")
    gx = torch.autograd.grad(loss, xr)[0]
    assert not calls
    want = F.cosface_loss(x.double(), y % 30, W.double(), backend="reference")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    xd = x.double().requires_grad_()
    want_gx = torch.autograd.grad(F.cosface_loss(xd, y % 30, W.double(), backend="reference"), xd)[0]
    _close([gx], [want_gx], 1e-4)
