"""Second-order gradients (``create_graph=True``, e.g. a gradient penalty) through every fused backend: the
result equals the reference's exact second-order gradient, or the backward raises a clear RuntimeError —
never a wrong number (a kernel backward run under create_graph=True returns a gradient that is not itself
differentiable, which PyTorch only warns about)."""
import warnings

import pytest
import torch

import dml_kernels.functional as F
from conftest import HAS_CUDA
from dml_kernels import _registry
from patterns import make

DEVICE_OF = {"cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}

LOSSES = {
    "ms": lambda x, y, p, **kw: F.multi_similarity_loss(x, y, **kw),
    "ms_mining": lambda x, y, p, **kw: F.multi_similarity_loss(x, y, epsilon=0.1, **kw),
    "generalized_lifted": lambda x, y, p, **kw: F.generalized_lifted_structure_loss(x, y, **kw),
    "lifted": lambda x, y, p, **kw: F.lifted_structure_loss(x, y, **kw),
    "contrastive": lambda x, y, p, **kw: F.contrastive_loss(x, y, **kw),
    "n_pairs": lambda x, y, p, **kw: F.n_pairs_loss(x, y, **kw),
    "triplet_all": lambda x, y, p, **kw: F.triplet_margin_loss(x, y, margin=0.3, **kw),
    "triplet_batch_hard": lambda x, y, p, **kw: F.triplet_margin_loss(x, y, margin=0.3, mining="batch_hard", **kw),
    "proxy_nca": lambda x, y, p, **kw: F.proxy_nca_loss(x, y, p, **kw),
    "proxy_anchor": lambda x, y, p, **kw: F.proxy_anchor_loss(x, y, p, **kw),
    "similarity": lambda x, y, p, **kw: (F.pairwise_similarity(x, **kw) ** 2).sum(),
}


def _second_order(loss, backend, device):
    """∂/∂x of ⟨∂loss/∂x, v⟩ (a Hessian-vector product), or the RuntimeError the backend raises."""
    x, y = make("pairs", n=12, d=6, device=device)
    p = torch.randn(int(y.max()) + 2, 6, dtype=x.dtype, device=device)  # one class absent from the batch
    v = torch.randn_like(x)
    x.requires_grad_()
    with warnings.catch_warnings():
        # PyTorch's "an autograd kernel was not registered" means a wrong number: make it an error.
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        try:
            (g,) = torch.autograd.grad(LOSSES[loss](x, y, p, backend=backend), x, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), x, allow_unused=True)
        except RuntimeError as e:
            return e
    return torch.zeros_like(x) if h is None else h


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_second_order_exact_or_refused(loss, backend):
    device = DEVICE_OF[backend]
    why = _registry.unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    want = _second_order(loss, "reference", device)
    assert not isinstance(want, Exception), want
    torch.manual_seed(0)
    got = _second_order(loss, backend, device)
    if isinstance(got, Exception):
        assert "double backward" in str(got), got  # a clear refusal, not some other failure
        return
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_plain_backward_unaffected():
    """The refusal is for create_graph=True only: a plain backward of a refusing op still works."""
    if _registry.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    x, y = make("pairs", n=12, d=6)
    x.requires_grad_()
    (g,) = torch.autograd.grad(F.multi_similarity_loss(x, y, backend="cpu"), x)
    (w,) = torch.autograd.grad(F.multi_similarity_loss(x, y, backend="reference"), x)
    torch.testing.assert_close(g, w)
