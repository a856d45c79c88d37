"""Equal rows in the ``pair_terms`` SNR contrastive form (the cuda backend's, run here on CPU tensors through the
op's CPU kernel). Its SNR distance is the expansion (‖c_q‖² + ‖c_r‖² − 2·c_q·c_r)/‖c_q‖², as on Triton, where a
rounding residue above 0 (instead of PML's exact var(q − r) = 0) makes AvgNonZero count the pair when pos_margin =
0 (tests/test_triton_snr_equal_rows.py). The op's CPU implementation rounds these cases to ≤ 0 (clamped): exact
here; the CUDA kernels (FMA) may not — README's deliberate differences. (The cpu backend's own form detects equal
rows: tests/test_cpu_contrastive_sweeps.py.)
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry

F = dk.functional


def _loaded():
    return (_registry.unavailable_reason("cpu", "cpu") is None
            and torch._C._dispatch_has_kernel_for_dispatch_key("dml_kernels::pair_terms", "CPU"))


pytestmark = [pytest.mark.skipif(not _loaded(), reason="no cpu extension with pair_terms"),
              pytest.mark.usefixtures("ours")]


@pytest.fixture
def ours(monkeypatch):
    """The pair_terms SNR form in the registry's "cpu" slot (backend="cpu" runs it on CPU tensors)."""
    from dml_kernels.backends.cpp import pair_terms as PT

    monkeypatch.setitem(_registry._IMPLS, ("snr_contrastive_loss", "cpu"), PT.snr_contrastive_loss)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, dtype=torch.float64, generator=g)
    x[1] = x[0]
    return x, torch.tensor([0, 0, 1, 1, 2, 2])


def _snr(x, y, **kw):
    return F.signal_to_noise_ratio_contrastive_loss(x, y, **kw, backend="cpu")


def _kw(pos_margin, neg_margin):
    return dict(pos_margin=pos_margin, neg_margin=neg_margin)


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_rows_residue(seed):
    """neg_margin = 0 leaves only the positive AvgNonZero: the reference averages the 4 non-zero positive terms (the
    equal pair is exactly 0); the op's CPU kernel rounds the equal pair to ≤ 0 as well, so it agrees (a residue
    counted would give the reference's × 4/6)."""
    x, y = _batch(seed)
    want = F.signal_to_noise_ratio_contrastive_loss(x, y, neg_margin=0.0, backend="reference")
    got = _snr(x, y, **_kw(0.0, 0.0))
    assert abs(float(got - want)) <= 1e-9 * float(want), (float(got), float(want), float(want * 4 / 6))


def test_pos_margin_above_residue_agrees():
    x, y = _batch(0)
    want = F.signal_to_noise_ratio_contrastive_loss(x, y, pos_margin=0.01, backend="reference")
    got = _snr(x, y, **_kw(0.01, 1.0))
    assert abs(float(got - want)) <= 1e-9 * max(1.0, float(want))
