"""Checkpoints: for every dml_kernels loss that owns parameters, a PML module's ``state_dict`` loads into ours
with ``strict=True`` and back, with equal names, shapes and dtypes, and the loaded losses give PML's values
(float64). Also CrossBatchMemory's buffers."""
import pytest
import torch

import dml_kernels as dk

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pl  # noqa: E402

C, D = 7, 5
# dk class name → (PML class name, positional args, PML kwargs, dk kwargs) of the same loss. PML has no
# ProxyNCA++: it is PML's ProxyNCALoss at softmax_scale = 1 / temperature. Entries whose dk class does not
# exist (yet) are left out; test_every_parameterised_loss_is_covered makes sure none is missing.
TABLE = {
    "ProxyNCALoss": ("ProxyNCALoss", (C, D), dict(softmax_scale=3.0), dict(softmax_scale=3.0)),
    "ProxyNCAPlusPlusLoss": ("ProxyNCALoss", (C, D), dict(softmax_scale=4.0), dict(temperature=0.25)),
    "ProxyAnchorLoss": ("ProxyAnchorLoss", (C, D), dict(margin=0.2, alpha=16), dict(margin=0.2, alpha=16)),
    "NormalizedSoftmaxLoss": ("NormalizedSoftmaxLoss", (C, D), {}, {}),
    "CosFaceLoss": ("CosFaceLoss", (C, D), {}, {}),
    "ArcFaceLoss": ("ArcFaceLoss", (C, D), {}, {}),
    "LargeMarginSoftmaxLoss": ("LargeMarginSoftmaxLoss", (C, D), {}, {}),
    "SphereFaceLoss": ("SphereFaceLoss", (C, D), {}, {}),
    "SubCenterArcFaceLoss": ("SubCenterArcFaceLoss", (), dict(num_classes=C, embedding_size=D),
                             dict(num_classes=C, embedding_size=D)),
    "SoftTripleLoss": ("SoftTripleLoss", (C, D), dict(centers_per_class=3), dict(centers_per_class=3)),
    "P2SGradLoss": ("P2SGradLoss", (D, C), {}, {}),
    "MarginLoss": ("MarginLoss", (), dict(learn_beta=True, num_classes=C), dict(learn_beta=True, num_classes=C)),
    "ManifoldLoss": ("ManifoldLoss", (), dict(l=D, K=3), dict(l=D, K=3)),
}
# dml_kernels' own parameterised losses (the seeds' methods; PML has no counterpart): name → a constructor.
OWN = {
    "ProxyGMLLoss": lambda: dk.losses.ProxyGMLLoss(C, D, proxies_per_class=2, backend="reference"),
    "DensityAdaptivityLoss": lambda: dk.losses.DensityAdaptivityLoss(C, torch.linspace(0.5, 1.5, C),
                                                                      backend="reference"),
}
WRAPPERS = {"CrossBatchMemory", "MultipleLosses", "SelfSupervisedLoss"}
PRESENT = [n for n in TABLE if n in dk.losses.__all__]


def _make(name):
    pml_name, args, pml_kw, dk_kw = TABLE[name]
    ours = getattr(dk.losses, name)(*args, backend="reference", **dk_kw)
    return ours, getattr(pl, pml_name)(*args, **pml_kw), (lambda: getattr(pl, pml_name)(*args, **pml_kw))


def _entries(sd):
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def _values(ours, theirs, name):
    """Both losses on the same float64 batch: equal values and embedding gradients (PML casts its weights to
    float64 in place here), unless PML itself cannot compute this loss on a plain labelled batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, D, generator=g, dtype=torch.float64), torch.randint(0, C, (12,), generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        b = theirs(xb, y)
    except Exception as e:  # e.g. ManifoldLoss wants meta-classes through indices_tuple
        pytest.skip(f"PML's {name} does not compute on (embeddings, labels): {e}")
    a = ours(xa, y)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)


def test_every_parameterised_loss_is_covered():
    """A dk loss that owns parameters must be in TABLE, so that its checkpoint format is tested here."""
    owning = set()
    for name in set(dk.losses.__all__) - WRAPPERS:
        cls = getattr(dk.losses, name)
        if name in TABLE:
            module = _make(name)[0]
        elif name in OWN:
            module = OWN[name]()
        else:
            try:
                module = cls()
            except TypeError:
                try:
                    module = cls(C, D)
                except TypeError as e:
                    raise AssertionError(f"add {name} to TABLE (its constructor takes neither () nor (C, D): {e})")
        if list(module.parameters()) or list(module.buffers()):
            owning.add(name)
    assert owning <= set(TABLE) | set(OWN), f"add to TABLE (or OWN): {sorted(owning - set(TABLE) - set(OWN))}"


@pytest.mark.parametrize("name", [n for n in OWN if n in dk.losses.__all__])
def test_own_losses_round_trip(name):
    """dk-only parameterised losses: a state_dict loads into a fresh instance with strict=True, same values."""
    torch.manual_seed(0)
    a = OWN[name]()
    for p in a.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(1)
    b = OWN[name]()
    sd = a.state_dict()
    assert sd and _entries(b.state_dict()) == _entries(sd)
    b.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, D, generator=g, dtype=torch.float64), torch.randint(0, C, (12,), generator=g)
    torch.testing.assert_close(a(x, y), b(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESENT)
def test_pml_state_dict_loads_strict_and_back(name):
    ours, theirs, fresh_pml = _make(name)
    assert _entries(ours.state_dict()) == _entries(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k

    # ... and back: ours (moved a step) into a fresh PML module, strict.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    back = fresh_pml()
    back.load_state_dict(ours.state_dict(), strict=True)
    assert _entries(back.state_dict()) == _entries(ours.state_dict())
    for (k, a), (_, b) in zip(back.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), k
    _values(ours, back, name)


@pytest.mark.parametrize("name", PRESENT)
def test_loaded_values_equal_pml(name):
    ours, theirs, _ = _make(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _values(ours, theirs, name)


@pytest.mark.parametrize("name", PRESENT)
def test_float64_modules_round_trip(name):
    ours, theirs, _ = _make(name)
    ours, theirs = ours.double(), theirs.double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert _entries(ours.state_dict()) == _entries(theirs.state_dict())
    _values(ours, theirs, name)


def test_cross_batch_memory_state_dict_round_trip():
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(), D, memory_size=16)
    theirs(torch.randn(6, D), torch.randint(0, 3, (6,)))
    ours = dk.losses.CrossBatchMemory(dk.losses.ContrastiveLoss(), D, memory_size=16)
    assert _entries(ours.state_dict()) == _entries(pl.CrossBatchMemory(pl.ContrastiveLoss(), D, 16).state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)
    assert ours.queue_idx == 0 and not ours.has_been_filled  # not saved, as in PML
    back = pl.CrossBatchMemory(pl.ContrastiveLoss(), D, memory_size=16)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back.embedding_memory, theirs.embedding_memory)
