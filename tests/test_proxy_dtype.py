"""The learnable weights' dtype (a deliberate rule, README "Deliberate differences"): float64 embeddings make the
proxies float64 (as PML's cast_types does), fp16 / bf16 embeddings never cast the fp32 proxies (PML #293, #309)."""
import pytest
import torch

import dml_kernels as dk

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss"])
def test_float64_embeddings_make_the_proxies_float64_like_pml(name):
    torch.manual_seed(0)
    ours = getattr(dk.losses, name)(5, 8, backend="reference")
    theirs = getattr(pml_losses, name)(5, 8)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(12, 8, dtype=torch.float64), torch.arange(12) % 5
    v_ours, v_theirs = ours(x, y), theirs(x, y)
    assert ours.proxies.dtype == theirs.proxies.dtype == torch.float64
    torch.testing.assert_close(v_ours, v_theirs, rtol=1e-9, atol=1e-12)
    # what PML's own ProxyNCA test then does with the proxies works
    torch.cdist(x, ours.proxies)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_never_casts_the_proxies(dtype):
    loss = dk.losses.ProxyAnchorLoss(5, 8, backend="reference")
    x, y = torch.randn(12, 8, dtype=dtype), torch.arange(12) % 5
    loss(x, y)
    assert loss.proxies.dtype == torch.float32
