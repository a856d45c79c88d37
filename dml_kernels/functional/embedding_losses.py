"""PML 2.9's AngularLoss, InstanceLoss, ManifoldLoss and VICRegLoss as functions (PML's arguments, defaults,
input rules and reductions; ``reducer=`` and ``_extra`` as in ``pair_losses.py``).

AngularLoss is a pairwise loss (per positive pair, a log-sum-exp over the anchor's negative references).
InstanceLoss is a softmax over the batch itself (an N×N row cross-entropy). ManifoldLoss (a random walk on
the affinity graph of batch + proxies, solved with a dense matrix inverse) and VICRegLoss (per-feature
variances and a D×D covariance of two views) are not pairwise-similarity losses; all four are computed on
the reference backend (``dml_kernels/backends/reference/embedding_losses.py``).
"""
from __future__ import annotations

import math

import torch

from .._validation import check_embeddings, check_labels, check_ref
from ..distances import Distance, parse_distance
from ._common import _loss, _num_refs, _pair_list, _prepare


class ArgumentError(ValueError, AssertionError):
    """A bad argument where PML asserts: a ``ValueError`` that is also the ``AssertionError`` PML raises (so
    code and tests written against PML's assertion keep working)."""


def _no(value, what, loss):
    if value is not None:
        raise ValueError(f"{loss} does not support {what} (as in PML)")


# --------------------------------------------------------------------------------------------- AngularLoss

def angular_distance(distance, normalize_embeddings=True):
    """AngularLoss only normalises with the distance: PML asserts LpDistance(p=2, power=1, normalized)."""
    try:
        dist = parse_distance(distance, normalize_embeddings, default="euclidean")
    except ValueError:
        dist = None
    if dist != Distance("euclidean", True):
        raise ArgumentError(f"AngularLoss needs distance=LpDistance(p=2, power=1, normalize_embeddings=True) (the "
                            f"default, as PML asserts), got {distance!r}")
    return dist


def angular_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, alpha=40, distance=None,
                 normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's AngularLoss (``alpha`` in degrees): mean over positive pairs (a, p) of
    log(1 + Σ_{k: y_k ≠ y_a} exp(4 tan²α (x̂_a + r̂_p)·r_k − 2 (1 + tan²α) x̂_a·r̂_p)).

    As in PML the anchor and positive are normalised and the negatives r_k are **not**; an ``indices_tuple``
    only supplies the positive pairs (a, p), duplicates counting (its negatives are ignored; with none the
    loss is 0); labels are required."""
    angular_distance(distance, normalize_embeddings)
    labels, ref, ref_labels = _prepare(embeddings, labels, ref_emb, ref_labels, check_inputs, labels_required=True)
    n, m = embeddings.shape[0], _num_refs(embeddings, ref)
    pairs, _, _ = _pair_list(indices_tuple, n, m, embeddings.device, check_inputs)
    few = pairs is not None and (len(pairs[0]) == 0 or len(pairs[2]) == 0)
    return _loss("angular_loss", backend, embeddings, labels, ref, ref_labels, alpha=math.radians(float(alpha)),
                 pairs=pairs, reducer=reducer, extra=_extra, few=few)


# -------------------------------------------------------------------------------------------- InstanceLoss

def instance_distance(distance, normalize_embeddings=True):
    """InstanceLoss needs the cosine similarity (PML asserts CosineSimilarity)."""
    try:
        dist = parse_distance(distance, normalize_embeddings, default="cosine")
    except ValueError:
        dist = None
    if dist != Distance("cosine", True):
        raise ArgumentError(f"InstanceLoss needs the cosine similarity (PML asserts CosineSimilarity), got "
                            f"{distance!r}")
    return dist


def instance_loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, gamma=64, distance=None,
                  normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's InstanceLoss: mean over rows i of the cross-entropy of γ·cos(x_i, x_j) over all j (the diagonal
    included) with target column rank(y_i) — the rank of y_i among the batch's sorted distinct labels, used as a
    sample index exactly as PML (and the layumi code it follows) does. Labels required; no ``indices_tuple``,
    no ``ref_emb``."""
    instance_distance(distance, normalize_embeddings)
    _no(indices_tuple, "indices_tuple", "InstanceLoss")
    if not (ref_emb is None and ref_labels is None) and not (ref_emb is embeddings and ref_labels is labels):
        raise ValueError("InstanceLoss does not support ref_emb / ref_labels (as in PML)")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    return _loss("instance_loss", backend, embeddings, labels, gamma=float(gamma), reducer=reducer, extra=_extra)


# -------------------------------------------------------------------------------------------- ManifoldLoss

def random_meta_classes(n, k, device):
    """PML's assignment when no ``indices_tuple`` is given: every proxy once plus n − k uniform draws, shuffled
    (torch's global CPU generator, the same calls in the same order as PML: one seed, PML's assignment)."""
    if n < k:
        raise ValueError(f"ManifoldLoss without indices_tuple assigns every one of the K={k} proxies to a sample, "
                         f"so it needs at least K rows (got {n}); pass the meta-classes as indices_tuple")
    draws = torch.randint(0, k, (n - k,))
    assigned = torch.cat((torch.arange(k), draws))
    return assigned[torch.randperm(n)].to(device)


def manifold_distance(distance, normalize_embeddings=True):
    """A Distance, or a distance object the engines do not express (the reference calls it as PML does)."""
    try:
        return parse_distance(distance, normalize_embeddings, default="cosine")
    except ValueError:
        if isinstance(distance, torch.nn.Module) and callable(distance):
            return distance
        raise


def manifold_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, proxies,
                  lambdaC=1.0, alpha=0.8, margin=5e-4, inverse_dtype=torch.float32, distance=None,
                  normalize_embeddings=True, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's ManifoldLoss (Aziere & Todorovic 2019): ``proxies`` (K×l) join the batch in an affinity graph
    S = exp(2·max(sim, 0)) (zero diagonal), normalised S̄ = D^-½ S D^-½; F = (1 − α)(I − α S̄)⁻¹. Per sample i with
    meta-class m_i (``indices_tuple``: a length-N LongTensor in [0, K); a random assignment as PML's without it),
    intrinsic log(1 + Σ_{k ≠ m_i, v ≥ 0} e^v) with v = F[i, N+k] − F[i, N+m_i] + margin, and the same on the
    cosines of F's rows (context); loss = mean intrinsic + λ_C · mean context.

    ``inverse_dtype``: the dtype of the inverse — PML's float32 by default, for every input dtype (PML's
    values); ``None`` inverts in the working dtype (exact float64, e.g. for gradcheck). ``lambdaC=inf`` is
    the context loss alone (PML's documented meaning; PML 2.9 returns inf / NaN there)."""
    if labels is not None or ref_labels is not None:
        raise ValueError("ManifoldLoss does not support labels / ref_labels (as in PML: its meta-classes are "
                         "passed as indices_tuple)")
    if ref_emb is not None and ref_emb is not embeddings:
        raise ValueError("ManifoldLoss does not support ref_emb (as in PML)")
    check_lambda(lambdaC)
    check_embeddings(embeddings, check_values=check_inputs)
    check_embeddings(proxies, "proxies", check_values=check_inputs)
    if proxies.shape[1] != embeddings.shape[1]:
        raise ArgumentError(f"embeddings have size {embeddings.shape[1]} but ManifoldLoss was built with "
                            f"l={proxies.shape[1]}")
    if proxies.device != embeddings.device:
        raise ValueError(f"proxies are on {proxies.device} but the embeddings are on {embeddings.device}")
    n, k = embeddings.shape[0], proxies.shape[0]
    if indices_tuple is None:
        meta = random_meta_classes(n, k, embeddings.device)
    else:
        meta = check_labels(indices_tuple, n, embeddings.device, "indices_tuple (ManifoldLoss's meta-classes)")
        if check_inputs and len(meta) and (bool(meta.min() < 0) or bool(meta.max() >= k)):
            raise ValueError(f"indices_tuple (ManifoldLoss's meta-classes) must lie in [0, K={k})")
    dist = manifold_distance(distance, normalize_embeddings)
    return _loss("manifold_loss", backend, embeddings, None, proxies, meta, lambdaC=float(lambdaC),
                 alpha=float(alpha), margin=float(margin), inverse_dtype=inverse_dtype, distance=dist,
                 reducer=reducer, extra=_extra)


def check_lambda(lambdaC):
    if not lambdaC >= 0:
        raise ValueError(f"Incorrect value for lambdaC argument: given lambdaC={lambdaC!r} but only non-negative "
                         "values are accepted")


# ---------------------------------------------------------------------------------------------- VICRegLoss

def vicreg_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, invariance_lambda=25,
                variance_mu=25, covariance_v=1, eps=1e-4, backend="auto", check_inputs=True, reducer=None,
                _extra=None):
    """PML's VICRegLoss (Bardes et al. 2022) of two views z = ``embeddings``, z' = ``ref_emb`` (row i of one
    is a view of row i of the other): λ·mean_i mean_d (z − z')² + μ·(mean_d relu(1 − √(Var z + ε))/2 + the same
    for z') + ν·Σ_{i≠j} (C(z)_ij² + C(z')_ij²)/D, C the unbiased feature covariance. Without ``ref_emb`` the
    reference is ``embeddings`` (as in PML: the invariance term is then 0). No labels, no ``indices_tuple``."""
    _no(indices_tuple, "indices_tuple", "VICRegLoss")
    if labels is not None or ref_labels is not None:
        raise ValueError("VICRegLoss does not support labels / ref_labels (as in PML)")
    check_embeddings(embeddings, check_values=check_inputs)
    ref = embeddings if ref_emb is None else ref_emb
    check_ref(embeddings, None, ref, None, check_values=check_inputs)
    if ref.shape[0] != embeddings.shape[0]:
        raise ValueError(f"ref_emb has {ref.shape[0]} rows but the embeddings have {embeddings.shape[0]}: VICReg "
                         "pairs row i of one view with row i of the other")
    if embeddings.shape[0] < 2:
        raise ValueError("VICRegLoss needs at least 2 rows (its variances and covariances are unbiased; PML "
                         "returns NaN for one row)")
    return _loss("vicreg_loss", backend, embeddings, None, ref, invariance_lambda=float(invariance_lambda),
                 variance_mu=float(variance_mu), covariance_v=float(covariance_v), eps=float(eps), reducer=reducer,
                 extra=_extra)


__all__ = ["angular_loss", "instance_loss", "manifold_loss", "vicreg_loss"]
