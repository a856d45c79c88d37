"""The public API contract: PML names and defaults, graph-attached zero losses, proxies as parameters,
no input mutation, the packed pair mask, and the backend registry's fallback rules."""
import inspect
import warnings

import pytest
import torch

import dml_kernels as dk
from dml_kernels import _registry, _pairs
from patterns import make

F = dk.functional
ALL_LOSSES = ["MultiSimilarityLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss", "NPairsLoss",
              "ContrastiveLoss", "TripletMarginLoss", "ProxyNCALoss", "ProxyNCAPlusPlusLoss", "ProxyAnchorLoss"]


def build(name, **kw):
    args = (4, 5) if "Proxy" in name else ()
    return getattr(dk.losses, name)(*args, backend="reference", **kw).double()


def test_pml_defaults():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    for name in ALL_LOSSES + ["MultiSimilarityMiner", "BatchHardMiner", "TripletMarginMiner"]:
        if name == "ProxyNCAPlusPlusLoss":
            continue  # not in PML (issue #103)
        ours = getattr(dk.losses if "Loss" in name else dk.miners, name)
        theirs = getattr(pml if "Loss" in name else pytest.importorskip("pytorch_metric_learning.miners"), name)
        for param, spec in inspect.signature(theirs.__init__).parameters.items():
            if spec.default is not inspect.Parameter.empty:
                assert inspect.signature(ours.__init__).parameters[param].default == spec.default, (name, param)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("pattern", ["one_sample", "all_distinct"])
def test_zero_loss_is_graph_attached(name, pattern):
    x, y = make(pattern, n=5, d=5)
    if "Proxy" in name and pattern == "all_distinct":
        y = y % 4
    x.requires_grad_()
    loss = build(name)(x, y)
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_functional_and_module_agree_and_inputs_untouched(name):
    x, y = make("random", n=9, d=5)
    x0, y0 = x.clone(), y.clone()
    fn = build(name)
    p0 = fn.proxies.detach().clone() if hasattr(fn, "proxies") else None
    x.requires_grad_()
    fn(x, y).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(y, y0)
    if p0 is not None:
        assert torch.equal(fn.proxies.detach(), p0) and fn.proxies.dtype == torch.float64


@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss", "ProxyNCAPlusPlusLoss"])
def test_proxies_are_settable_parameters_in_state_dict(name):
    fn = getattr(dk.losses, name)(7, 3, backend="reference")
    assert isinstance(fn.proxies, torch.nn.Parameter) and fn.proxies.shape == (7, 3)
    assert "proxies" in fn.state_dict()
    assert any(p is fn.proxies for p in fn.parameters())
    new = torch.nn.Parameter(torch.randn(7, 3))
    fn.proxies = new
    assert fn.proxies is new
    fn2 = getattr(dk.losses, name)(7, 3)
    fn2.load_state_dict(fn.state_dict())
    assert torch.equal(fn2.proxies, new)


def test_proxy_init_matches_pml():
    torch.manual_seed(1)
    pa = dk.losses.ProxyAnchorLoss(1000, 64)
    assert abs(pa.proxies.std().item() - (2 / 1000) ** 0.5) < 0.002  # kaiming_normal_(fan_out): std √(2/C)
    pn = dk.losses.ProxyNCALoss(1000, 64)
    assert abs(pn.proxies.std().item() - 1.0) < 0.05


def test_low_precision_embeddings_never_cast_the_proxies():
    """PML bugs #293/#309: fp16 embeddings permanently converted the proxies. Ours stay fp32."""
    fn = dk.losses.ProxyAnchorLoss(4, 5, backend="reference")
    x = torch.randn(6, 5, dtype=torch.bfloat16, requires_grad=True)
    fn(x, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert fn.proxies.dtype == torch.float32 and fn.proxies.grad.dtype == torch.float32


def test_proxy_nca_plus_plus_is_scaled_proxy_nca():
    x, y = make("random", n=8, d=5)
    pp = dk.losses.ProxyNCAPlusPlusLoss(4, 5, temperature=0.25, backend="reference").double()
    pn = dk.losses.ProxyNCALoss(4, 5, softmax_scale=4.0, backend="reference").double()
    pn.proxies = pp.proxies
    torch.testing.assert_close(pp(x, y % 4), pn(x, y % 4))


def test_packed_pair_mask_round_trip():
    pos = torch.rand(7, 19) > 0.5
    neg = torch.rand(7, 19) > 0.7
    mask = dk.PackedPairMask.from_dense(pos, neg)
    assert mask.pos_bits.shape == (7, 3) and mask.pos_bits.dtype == torch.uint8
    p2, n2 = mask.to_dense()
    assert torch.equal(p2, pos) and torch.equal(n2, neg)
    a1, p, a2, n = mask.to_indices()
    again = dk.PackedPairMask.from_indices((a1, p, a2, n), 7, 19)
    assert torch.equal(again.pos_bits, mask.pos_bits) and torch.equal(again.neg_bits, mask.neg_bits)
    assert [int(c) for c in mask.count()] == [int(pos.sum()), int(neg.sum())]


def test_packed_mask_as_indices_tuple_equals_pml_tuple():
    x, y = make("random", n=10, d=4)
    mask = F.multi_similarity_mask(x, y, epsilon=0.2, backend="reference")
    a = F.multi_similarity_loss(x, y, mask, backend="reference")
    b = F.multi_similarity_loss(x, y, mask.to_indices(), backend="reference")
    c = F.multi_similarity_loss(x, y, epsilon=0.2, backend="reference")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(_registry, "_WARNED", set())
    monkeypatch.setattr(_registry, "auto_candidates", lambda device_type: ("triton", "reference"))
    _registry._load("triton")  # so its registrations happen now, before the one below is removed
    monkeypatch.delitem(_registry._IMPLS, ("multi_similarity_loss", "triton"), raising=False)
    x, y = make("random", n=6, d=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.multi_similarity_loss(x, y)
        F.multi_similarity_loss(x, y)
    assert len([w for w in caught if "falling back to the reference" in str(w.message)]) == 1


def test_unsupported_combination_falls_back_under_auto(monkeypatch):
    calls = []

    def picky(*args, **kwargs):
        calls.append(1)
        raise dk.Unsupported("no pair tuples here")

    monkeypatch.setitem(_registry._IMPLS, ("multi_similarity_loss", "cpu"), picky)
    monkeypatch.setattr(_registry, "unavailable_reason", lambda b, d: None if b in ("cpu", "reference") else "x")
    x, y = make("random", n=6, d=4)
    expected = F.multi_similarity_loss(x, y, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(F.multi_similarity_loss(x, y), expected)
    assert calls == [1]
    with pytest.raises(dk.Unsupported, match="no pair tuples here"):
        F.multi_similarity_loss(x, y, backend="cpu")


def test_every_loss_has_a_functional_form():
    for name in ["multi_similarity_loss", "lifted_structure_loss", "generalized_lifted_structure_loss",
                 "n_pairs_loss", "contrastive_loss", "triplet_margin_loss", "proxy_nca_loss",
                 "proxy_nca_plus_plus_loss", "proxy_anchor_loss", "pairwise_similarity", "multi_similarity_mask",
                 "batch_hard_mining", "multi_similarity_thresholds"]:
        assert callable(getattr(F, name))


def test_reference_registers_every_op():
    from dml_kernels._ops import OPS
    for op in OPS:
        assert "reference" in _registry.implemented(op), op


def test_self_mode_when_ref_is_the_embeddings_object():
    """PML excludes self-pairs when ref_emb is embeddings and ref_labels is labels (same objects)."""
    x, y = make("random", n=8, d=4)
    torch.testing.assert_close(F.multi_similarity_loss(x, y, None, x, y, backend="reference"),
                               F.multi_similarity_loss(x, y, backend="reference"))


def test_batch_hard_mining_device_form():
    x, y = make("singletons_and_pairs", n=9, d=4)
    hard_pos, hard_neg = F.batch_hard_mining(x, y, backend="reference")
    assert hard_pos.shape == (9,) and hard_neg.shape == (9,)
    singles = [i for i in range(9) if (y == y[i]).sum() == 1]
    assert all(hard_pos[i] == -1 and hard_neg[i] == -1 for i in singles)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_public_api_compiles_fullgraph_without_checks(backend):
    """With check_inputs=False nothing syncs with the host, so torch.compile(fullgraph=True) traces the
    whole public call (validation, dispatch, the op) and agrees with eager."""
    x, y = make("random", n=12, d=6, dtype=torch.float32)
    p = torch.randn(4, 6)

    def losses(e, lab, prox):
        return (F.multi_similarity_loss(e, lab, epsilon=0.1, backend=backend, check_inputs=False)
                + F.proxy_anchor_loss(e, lab % 4, prox, backend=backend, check_inputs=False))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(losses, fullgraph=True)
        torch.testing.assert_close(compiled(x, y, p), losses(x, y, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 31])
def test_n_pairs_block(n, exact, monkeypatch):
    """PML's pairs (anchor = lowest index of a label with ≥ 2 samples, positive = second lowest), and a block
    that holds every anchor row and every positive column: exactly K of each, or ceil(N/2) of each."""
    monkeypatch.setattr(_pairs, "N_PAIRS_EXACT_ON_CPU", exact)
    y = torch.randint(0, max(1, n // 3), (n,))
    is_anchor, is_positive = _pairs.n_pairs_flags(y)
    for i in range(n):
        same = (y == y[i]).nonzero().flatten().tolist()
        assert bool(is_anchor[i]) == (len(same) >= 2 and i == same[0])
        assert bool(is_positive[i]) == (len(same) >= 2 and i == same[1])
    rows, cols, row_is_anchor, col_is_positive = _pairs.n_pairs_block(y)
    k = int(is_anchor.sum())
    assert len(rows) == len(cols) == (k if exact else (n + 1) // 2)
    assert set(rows[row_is_anchor].tolist()) == set(is_anchor.nonzero().flatten().tolist())
    assert set(cols[col_is_positive].tolist()) == set(is_positive.nonzero().flatten().tolist())
    assert torch.equal(row_is_anchor, is_anchor[rows]) and torch.equal(col_is_positive, is_positive[cols])
