"""Details of the cpu contrastive forms that the family tests (tests/test_cpu_contrastive_rowblocks.py) do not reach.

* IntraPairVariance's one-sweep block (``backends/cpp/intra_pair_variance.py``): the (i, i) pair is neither
  positive nor negative even where its hinge would count (an un-normalised dot similarity whose own-row value
  |q_i|² is below (1 − ε)·μ_P); in self mode its symmetric dL/dv goes back through ONE GEMM per block.
* SupCon (``contrastive_losses.supcon_loss``, registered for cpu and cuda): no host sync forward or backward (the
  GPU checks are in tests/test_cuda_supcon.py).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry
from dml_kernels.backends.cpp import contrastive_losses as CL

F = dk.functional
TOL = 1e-9
pytestmark = [pytest.mark.skipif(_registry.unavailable_reason("cpu", "cpu") is not None, reason="no cpu backend"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


def _loss_and_grad(fn, x, backend, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _assert_close(got, want):
    (v1, g1), (v2, g2) = got, want
    assert abs(float(v1) - float(v2)) <= TOL * max(1.0, abs(float(v2))), (float(v1), float(v2))
    assert float((g1 - g2).abs().max()) <= TOL * max(1.0, float(g2.abs().max()))


def test_ipv_own_pair_excluded_where_its_hinge_would_count():
    """Dot similarity, rows of very different norms: for a small-norm row i, q_i·q_i < (1 − ε)·μ_P, so a
    positive (i, i) pair would add a hinge term (and its sum to the means' gradient). The cpu form equals the
    reference, which never counts the (i, i) pair."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g)
    x = x * torch.tensor([0.05, 4.0, 3.0, 0.1, 5.0, 2.0, 0.2, 3.5, 1.0], dtype=torch.float64)[:, None]
    x[1], x[2] = x[0] * 80, x[0] * 60  # big rows along the small row 0: μ_P ≫ |q_0|²
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    kw = dict(labels=y, distance="dot", normalize_embeddings=False, pos_eps=0.2, neg_eps=0.1)
    fn = lambda x, **k: F.intra_pair_variance_loss(x, **k)  # noqa: E731
    positive = (y[:, None] == y[None, :]) & ~torch.eye(9, dtype=torch.bool)
    mu_p = float((x @ x.T)[positive].mean())
    assert int(((x * x).sum(1) < 0.8 * mu_p).sum()) >= 2  # the case the test is about
    _assert_close(_loss_and_grad(fn, x, "cpu", **kw), _loss_and_grad(fn, x, "reference", **kw))


@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
def test_ipv_self_mode_one_gemm_per_block(monkeypatch, distance):
    """Self mode: every block's dL/dv goes back through the query side only (the reference side's share is the
    same by symmetry, doubled); with ref_emb both sides run. Values and gradients equal the reference."""
    calls = []
    real = CL._Sweep.accumulate

    def spy(self, w, r0, r1, dq, dr, symmetric=False):
        calls.append((self.self_mode, symmetric))
        return real(self, w, r0, r1, dq, dr, symmetric)

    monkeypatch.setattr(CL._Sweep, "accumulate", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (33,), generator=g)
    fn = lambda x, **k: F.intra_pair_variance_loss(x, y, distance=distance, **k)  # noqa: E731
    _assert_close(_loss_and_grad(fn, x, "cpu"), _loss_and_grad(fn, x, "reference"))
    assert calls and all(c == (True, True) for c in calls)


# ------------------------------------------------------------------------------- SupCon: no host sync

def _supcon_watch(backend, with_ref, distance):
    from memory import TensorWatch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(30, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y, ry = torch.randint(0, 5, (40,), generator=g), torch.randint(2, 8, (30,), generator=g)
    extra = dict(ref_emb=r, ref_labels=ry) if with_ref else {}
    with TensorWatch() as w:
        F.supcon_loss(x, y, distance=distance, backend=backend, check_inputs=False, **extra).backward()
    return w


@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_supcon_no_host_sync(with_ref, distance):
    """Forward + backward of the cpu SupCon (the form the cuda backend runs too): no host-syncing op — the
    positive-pair sums' class slots are sized N + M, not by the largest label id read from the device. The
    same watch sees the reference's syncs (it can fail)."""
    assert _supcon_watch("reference", with_ref, distance).syncs
    w = _supcon_watch("cpu", with_ref, distance)
    assert not w.syncs, w.syncs


def test_supcon_registered_for_cuda():
    """SupCon is registered for the cuda backend as well (its pair_reduce has CUDA kernels), like NCA."""
    assert "cuda" in _registry.implemented("nca_loss")
    assert "cuda" in _registry.implemented("supcon_loss")


# ---------------------------------------------------------------------------- SNR contrastive: equal rows

def _dup_batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, dtype=dtype, generator=g)
    x[1] = x[0]  # a duplicated row: PML's var(q − r) is exactly 0 for the pair (0, 1)
    return x, torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("neg_margin", [1.0, 0.0])
def test_snr_equal_rows_distance_exactly_zero(seed, dtype, neg_margin):
    """pos_margin = 0 (PML's default): the pair of equal rows has distance exactly 0, so AvgNonZero does not count
    it — the cpu form equals the reference and PML 2.9 (without the equal-row ids its rounding residue > 0 is
    counted where it rounds above 0: 6 positive terms instead of 4 — caught on two of these cases)."""
    x, y = _dup_batch(dtype, seed)
    kw = dict(neg_margin=neg_margin)
    fn = lambda x, **k: F.signal_to_noise_ratio_contrastive_loss(x, y, **k)  # noqa: E731
    got, want = _loss_and_grad(fn, x, "cpu", **kw), _loss_and_grad(fn, x, "reference", **kw)
    if dtype == torch.float64:
        _assert_close(got, want)
    else:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    from pytorch_metric_learning import losses as pl

    pml = pl.SignalToNoiseRatioContrastiveLoss(neg_margin=neg_margin)(x, y)
    torch.testing.assert_close(got[0], pml, rtol=1e-9 if dtype == torch.float64 else 1e-5, atol=1e-12)


def test_snr_equal_rows_with_ref_emb():
    """A query row repeated in ref_emb (a memory bank holding the batch): that pair's distance is exactly 0."""
    x, y = _dup_batch()
    r = torch.cat([x[:3], torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))])
    ry = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    kw = dict(ref_emb=r, ref_labels=ry)
    fn = lambda x, **k: F.signal_to_noise_ratio_contrastive_loss(x, y, **k)  # noqa: E731
    _assert_close(_loss_and_grad(fn, x, "cpu", **kw), _loss_and_grad(fn, x, "reference", **kw))


def test_equal_row_ids():
    """Bitwise-equal rows share an id (−0.0 equals 0.0, as q − r = 0 there); rows one ulp apart never do."""
    from dml_kernels.backends.cpp.pair_margin_losses import _equal_row_ids

    a = torch.randn(5, dtype=torch.float64)
    b = a.clone()
    b[-1] = torch.nextafter(a[-1], torch.tensor(float("inf"), dtype=torch.float64))
    z, nz = torch.zeros(5, dtype=torch.float64), torch.full((5,), -0.0, dtype=torch.float64)
    q = torch.stack([a, b, a, z, torch.randn(5, dtype=torch.float64)])
    r = torch.stack([nz, b, a])
    iq, ir = _equal_row_ids(q, r)
    assert iq[0] == iq[2] == ir[2] and iq[1] == ir[1] and iq[3] == ir[0]
    assert len({int(iq[0]), int(iq[1]), int(iq[3]), int(iq[4])}) == 4
    iq_self, ir_self = _equal_row_ids(q, None)
    assert torch.equal(iq_self, ir_self) and iq_self[0] == iq_self[2] and iq_self[0] != iq_self[1]
