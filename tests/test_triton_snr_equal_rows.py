"""A deliberate difference of the Triton SNR contrastive form (``backends/triton/pair_margin_losses.py``), pinned:
the fused SNR distance of two equal rows is the expansion (‖c_q‖² + ‖c_r‖² − 2·c_q·c_r)/‖c_q‖², a rounding
residue instead of PML's exact 0 (var(q − r) of a zero vector). Where the residue rounds above 0 and
pos_margin = 0 (PML's default), AvgNonZero counts the pair: the positive part is averaged over more terms. (The
cpu form is exact for equal rows: tests/test_cpu_contrastive_sweeps.py.) Tested under the interpreter.
"""
import pytest
import torch

import dml_kernels as dk
from conftest import DEVICE, HAS_CUDA
from dml_kernels import _registry

F = dk.functional
HAS_TRITON = ("triton" in _registry.implemented("snr_contrastive_loss")
              and _registry.unavailable_reason("triton", DEVICE) is None)
pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available here"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, dtype=torch.float64, generator=g)
    x[1] = x[0]
    return x.to(DEVICE), torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_rows_residue_counted(seed):
    """neg_margin = 0 leaves only the positive AvgNonZero: the reference averages the 4 non-zero positive terms
    (the equal pair (0, 1), (1, 0) is exactly 0); the Triton form, where the residue rounds above 0, averages 6
    (the residue terms themselves ~1e-16): its loss is the reference's × 4/6. Under the interpreter on these
    seeds it does; on a GPU the residue may round to 0 instead (then the two agree)."""
    x, y = _batch(seed)
    want = F.signal_to_noise_ratio_contrastive_loss(x, y, neg_margin=0.0, backend="reference")
    got = F.signal_to_noise_ratio_contrastive_loss(x, y, neg_margin=0.0, backend="triton")
    counted = want * 4 / 6
    exact = abs(float(got - want)) <= 1e-9 * float(want)
    assert exact or abs(float(got - counted)) <= 1e-9 * float(want), (float(got), float(want))
    if not HAS_CUDA:
        assert not exact  # the interpreter's rounding leaves a positive residue on these seeds


def test_pos_margin_above_residue_agrees():
    """A positive pos_margin (any margin above the ~1e-16 residue) makes the difference vanish."""
    x, y = _batch(0)
    want = F.signal_to_noise_ratio_contrastive_loss(x, y, pos_margin=0.01, backend="reference")
    got = F.signal_to_noise_ratio_contrastive_loss(x, y, pos_margin=0.01, backend="triton")
    assert abs(float(got - want)) <= 1e-9 * max(1.0, float(want))
