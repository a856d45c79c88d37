"""DML-DA's density regulariser (seed 001, Li et al. eq. 5–9) against naive loops over its equations in float64:
values and gradients (embeddings and the learnable target densities α), gradcheck, the O(C) closed form of
eq. 8's double sum, label patterns, no host sync, no B×C buffer, errors, the module (parameter, buffer, λ,
beside a base loss)."""
import pytest
import torch

import dml_kernels as dk
from patterns import PATTERNS
from dml_kernels.backends.reference.seed_methods import correlation_penalty
from memory import TensorWatch

F = dk.functional
TOL = dict(rtol=1e-9, atol=1e-9)
C = 12  # num_classes of the label patterns below (labels >= C are remapped)


def _labels(pattern, n=9):
    y = PATTERNS[pattern](n)
    return torch.unique(y, return_inverse=True)[1]  # 0 .. (#classes − 1) < C


# ----------------------------------------------------------------------------- naive loops over eq. 5–8


def naive_density(vectors):
    """Eq. 5 for one class: the mean over its samples of ‖f_i − μ_c‖², μ_c their mean (plain loops)."""
    n = len(vectors)
    dim = vectors[0].shape[0]
    mu = [sum(v[k] for v in vectors) / n for k in range(dim)]
    total = 0
    for v in vectors:
        total = total + sum((v[k] - mu[k]) ** 2 for k in range(dim))
    return total / n


def naive_da(x, labels, alpha, d0=None, eta=0.5, normalize=True):
    """Eq. 8 (eq. 6 without d0) over the classes present, double sum over (c_i, c_j) written out."""
    rows = []
    for i in range(x.shape[0]):
        v = x[i]
        if normalize:
            v = v / torch.sqrt(sum(v[k] ** 2 for k in range(v.shape[0])))
        rows.append(v)
    classes = sorted(set(int(c) for c in labels))
    big_c = len(classes)
    loss = 0
    for c in classes:
        dens = naive_density([rows[i] for i in range(len(rows)) if int(labels[i]) == c])
        loss = loss + (dens - alpha[c]) ** 2 / big_c
    for c in classes:
        loss = loss - alpha[c] / big_c
    if d0 is not None:
        for ci in classes:
            for cj in classes:
                term = d0[cj] ** eta * alpha[ci] - d0[ci] ** eta * alpha[cj]
                loss = loss + term ** 2 / big_c ** 2
    return loss


def _value_and_grads(fn, x, alpha):
    x, alpha = x.detach().clone().requires_grad_(), alpha.detach().clone().requires_grad_()
    v = fn(x, alpha)
    gx, ga = torch.autograd.grad(v, (x, alpha))
    return v.detach(), gx, ga


def _inputs(pattern, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = _labels(pattern)
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64)
    alpha = 0.2 + torch.rand(C, generator=g, dtype=torch.float64)
    d0 = 0.1 + torch.rand(C, generator=g, dtype=torch.float64)
    return x, y, alpha, d0


@pytest.mark.parametrize("with_d0", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_reference_equals_naive_loops(pattern, normalize, with_d0):
    x, y, alpha, d0 = _inputs(pattern)
    d0 = d0 if with_d0 else None
    ours = _value_and_grads(lambda e, a: F.density_adaptivity_loss(e, y, a, original_densities=d0, eta=0.7,
                                                                   normalize_embeddings=normalize,
                                                                   backend="reference"), x, alpha)
    naive = _value_and_grads(lambda e, a: naive_da(e, y, a, d0, 0.7, normalize), x, alpha)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_closed_form_equals_double_sum(dtype, spread):
    """Eq. 8's Σ_{ci,cj} (d_cj α_ci − d_ci α_cj)² in O(C) equals the double sum (in float64), also when α is
    nearly proportional to d (spread 1e-3: the penalty is ~1e-6 of its terms). In float32 the closed form keeps
    ~1e-5 relative accuracy there, where (Σd²)(Σα²) − (Σdα)² loses it to cancellation."""
    g = torch.Generator().manual_seed(1)
    d = 0.1 + torch.rand(C, generator=g, dtype=torch.float64)
    alpha = 0.3 * d * (1 + spread * torch.randn(C, generator=g, dtype=torch.float64))
    want = sum(float(d[j] * alpha[i] - d[i] * alpha[j]) ** 2 for i in range(C) for j in range(C))
    got = float(correlation_penalty(alpha.to(dtype), d.to(dtype)))
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    assert abs(got - want) <= rel * want
    if dtype == torch.float32 and spread < 1:
        a, dd = alpha.float(), d.float()
        lagrange = float(2 * ((dd * dd).sum() * (a * a).sum() - (dd * a).sum() ** 2))
        assert abs(lagrange - want) > 1e-2 * want  # the naive closed form is off by more than 1 %


def test_gradcheck():
    x, y, alpha, d0 = _inputs("random", d=3)
    x, alpha = x.requires_grad_(), alpha.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e, a: F.density_adaptivity_loss(e, y, a, original_densities=d0, backend="reference"), (x, alpha))


def test_absent_classes_get_no_gradient_and_count_not():
    y = torch.tensor([1, 1, 4, 4, 4])
    x = torch.randn(5, 3, dtype=torch.float64)
    alpha = torch.full((C,), 0.5, dtype=torch.float64, requires_grad=True)
    F.density_adaptivity_loss(x, y, alpha, original_densities=torch.ones(C, dtype=torch.float64)).backward()
    absent = [c for c in range(C) if c not in (1, 4)]
    assert torch.all(alpha.grad[absent] == 0) and torch.all(alpha.grad[[1, 4]] != 0)


def test_class_densities_eq5():
    x, y, _, _ = _inputs("random")
    got = F.class_densities(x, y, C)
    for c in range(C):
        members = [x[i] for i in range(len(y)) if int(y[i]) == c]
        want = naive_density(members) if members else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(got[c], want, **TOL)
    assert torch.allclose(F.class_densities(x, y, C, normalize=True),
                          F.class_densities(torch.nn.functional.normalize(x), y, C), **TOL)


# ----------------------------------------------------------------------------- module


def test_module_parameter_buffer_and_weight():
    d0 = torch.rand(C, dtype=torch.float64) + 0.1
    mod = dk.losses.DensityAdaptivityLoss(C, original_densities=d0, eta=0.5, weight=10).double()
    assert isinstance(mod.alpha, torch.nn.Parameter) and torch.all(mod.alpha == 0.5) and mod.alpha.shape == (C,)
    assert set(mod.state_dict()) == {"alpha", "original_densities"}
    x, y, _, _ = _inputs("pairs")
    x.requires_grad_()
    got = mod(x, y)
    got.backward()
    want = _value_and_grads(lambda e, a: 10 * naive_da(e, y, a, d0, 0.5), x, mod.alpha.detach())
    torch.testing.assert_close(got.detach(), want[0], **TOL)
    torch.testing.assert_close(x.grad, want[1], **TOL)
    torch.testing.assert_close(mod.alpha.grad, want[2], **TOL)
    assert set(dk.losses.DensityAdaptivityLoss(3).state_dict()) == {"alpha"}  # no D⁽⁰⁾: eq. 6


def test_beside_a_base_loss():
    """Eq. 9: loss=ContrastiveLoss(), weight=λ gives L_pair + λ L_DA; MultipleLosses gives the same and passes a
    miner's tuple to the base loss only."""
    x, y, _, d0 = _inputs("random")
    base = dk.losses.ContrastiveLoss()
    da = dk.losses.DensityAdaptivityLoss(C, original_densities=d0).double()
    want = base(x, y) + 10 * da(x, y)
    plugged = dk.losses.DensityAdaptivityLoss(C, original_densities=d0, loss=base, weight=10).double()
    torch.testing.assert_close(plugged(x, y), want, **TOL)
    torch.testing.assert_close(dk.losses.MultipleLosses([base, da], weights=[1, 10])(x, y), want, **TOL)
    tup = dk.miners.MultiSimilarityMiner()(x, y)
    torch.testing.assert_close(plugged(x, y, tup), base(x, y, tup) + 10 * da(x, y), **TOL)
    with pytest.raises(ValueError, match="indices_tuple"):
        da(x, y, tup)


# ----------------------------------------------------------------------------- memory, syncs, inputs, errors


_Watch = TensorWatch  # tests/memory.py


def test_no_host_sync_and_no_batch_by_class_buffer():
    """O(C·D + B·D): B = 2048, C = 1024, D = 2 → a B×C fp32 buffer takes 8 MiB; the largest tensor must stay under
    1/16 of that. No op that syncs with the host (check_inputs=False)."""
    n, c, d = 2048, 1024, 2
    mod = dk.losses.DensityAdaptivityLoss(c, original_densities=torch.rand(c) + 0.1, check_inputs=False)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, c, (n,))
    with _Watch() as watch:
        mod(x, y).backward()
    assert not watch.syncs, watch.syncs
    assert watch.largest < n * c * 4 // 16, watch.largest
    with _Watch() as watch:
        torch.ones(3).sum().item()
    assert watch.syncs  # the watch can fail


def test_inputs_untouched():
    x, y, alpha, d0 = _inputs("random")
    copies = [t.clone() for t in (x, y, alpha, d0)]
    F.density_adaptivity_loss(x.requires_grad_(), y, alpha.requires_grad_(), original_densities=d0).backward()
    for t, c in zip((x.detach(), y, alpha.detach(), d0), copies):
        assert torch.equal(t, c)


def test_errors_name_the_argument():
    x, y, alpha, d0 = _inputs("random")
    with pytest.raises(ValueError, match="num_classes"):
        dk.losses.DensityAdaptivityLoss(0)
    with pytest.raises(ValueError, match="original_densities"):
        dk.losses.DensityAdaptivityLoss(C, original_densities=torch.ones(C + 1))
    with pytest.raises(ValueError, match="original_densities"):
        dk.losses.DensityAdaptivityLoss(C, original_densities=-torch.ones(C))
    with pytest.raises(ValueError, match="eta"):
        dk.losses.DensityAdaptivityLoss(C, eta=float("nan"))
    with pytest.raises(ValueError, match="labels"):
        F.density_adaptivity_loss(x, y + C, alpha)
    with pytest.raises(ValueError, match="labels"):
        F.density_adaptivity_loss(x, y[:-1], alpha)
    with pytest.raises(TypeError, match="alpha"):
        F.density_adaptivity_loss(x, y, alpha[None])
    with pytest.raises(ValueError, match="embeddings"):
        F.density_adaptivity_loss(x[:, :0], y, alpha)
    with pytest.raises(TypeError, match="loss"):
        dk.losses.DensityAdaptivityLoss(C, loss="contrastive")
