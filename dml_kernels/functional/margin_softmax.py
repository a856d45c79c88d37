"""The margin-softmax family: cross-entropy over class logits with a margin on the target logit
(NormalizedSoftmax, CosFace, ArcFace, LargeMarginSoftmax, SphereFace).

The class weight ``W`` has PML's layout, **D×C** (column c is class c), as PML's ``W`` parameter. Every loss
takes ``reducer=`` (PML's default: MeanReducer over the per-row ``element`` losses) and ``indices_tuple``
(PML's miner weights). ``ref_emb`` is not supported (a ``ValueError``, as PML)."""
from __future__ import annotations

import math

from .._validation import check_embeddings, check_proxy_labels, check_same_device
from ..distances import parse_distance
from ._common import _loss, _prepare
from .class_losses import _miner_weights


def _prepare_weight(embeddings, labels, W, ref_emb, ref_labels, check_inputs, name):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{name} does not support ref_emb / ref_labels")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    check_embeddings(W, "W", check_values=check_inputs)
    check_same_device(embeddings, W, "W")
    if W.shape[0] != embeddings.shape[1]:
        raise ValueError(f"W has shape {tuple(W.shape)}: expected (embedding_size={embeddings.shape[1]}, "
                         "num_classes), PML's D×C layout")
    check_proxy_labels(labels, W.shape[1], check_values=check_inputs)
    return labels


def _weights(indices_tuple, embeddings, check_inputs):
    return _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=False)


def normalized_softmax_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                            temperature=0.05, distance=None, normalize_embeddings=True, backend="auto",
                            check_inputs=True, reducer=None, _extra=None):
    """PML's NormalizedSoftmaxLoss: CE over distance(x, Ŵᵀ)/T (Ŵ: unit columns; negated for a distance)."""
    labels = _prepare_weight(embeddings, labels, W, ref_emb, ref_labels, check_inputs, "NormalizedSoftmaxLoss")
    dist = parse_distance(distance, normalize_embeddings, default="dot")
    return _loss("normalized_softmax_loss", backend, embeddings, labels, W, temperature=float(temperature),
                 distance=dist, weights=_weights(indices_tuple, embeddings, check_inputs), reducer=reducer,
                 extra=_extra)


def _cosine_only(distance, name):
    if distance is None:
        return
    d = parse_distance(distance, True, default="cosine")
    if d.name != "cosine":
        raise ValueError(f"{name} needs a cosine similarity (PML asserts CosineSimilarity), got {distance!r}")


def _margin_loss(op, name, embeddings, labels, W, indices_tuple, ref_emb, ref_labels, *, margin, scale,
                 distance, backend, check_inputs, reducer, _extra):
    _cosine_only(distance, name)
    labels = _prepare_weight(embeddings, labels, W, ref_emb, ref_labels, check_inputs, name)
    return _loss(op, backend, embeddings, labels, W, margin=margin, scale=float(scale),
                 weights=_weights(indices_tuple, embeddings, check_inputs), reducer=reducer, extra=_extra)


def cosface_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=0.35,
                 scale=64, distance=None, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's CosFaceLoss: CE over s·(cos − m·onehot)."""
    return _margin_loss("cosface_loss", "CosFaceLoss", embeddings, labels, W, indices_tuple, ref_emb, ref_labels,
                        margin=float(margin), scale=scale, distance=distance, backend=backend,
                        check_inputs=check_inputs, reducer=reducer, _extra=_extra)


def arcface_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=28.6,
                 scale=64, distance=None, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's ArcFaceLoss (``margin`` in degrees, as PML): CE over s·cos(θ_y + m) on the target (cos θ − m·sin m
    past θ > π − m), s·cos elsewhere."""
    return _margin_loss("arcface_loss", "ArcFaceLoss", embeddings, labels, W, indices_tuple, ref_emb, ref_labels,
                        margin=math.radians(margin), scale=scale, distance=distance, backend=backend,
                        check_inputs=check_inputs, reducer=reducer, _extra=_extra)


def _int_margin(margin, name):
    m = int(margin)
    if m < 1:
        raise ValueError(f"{name}: margin must be an integer >= 1 (PML truncates it with int()), got {margin}")
    return m


def large_margin_softmax_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                              margin=4, scale=1, distance=None, backend="auto", check_inputs=True, reducer=None,
                              _extra=None):
    """PML's LargeMarginSoftmaxLoss: target logit s·‖x‖‖w_y‖·ψ(θ), others s·x·w_c."""
    return _margin_loss("large_margin_softmax_loss", "LargeMarginSoftmaxLoss", embeddings, labels, W,
                        indices_tuple, ref_emb, ref_labels, margin=_int_margin(margin, "LargeMarginSoftmaxLoss"),
                        scale=scale, distance=distance, backend=backend, check_inputs=check_inputs,
                        reducer=reducer, _extra=_extra)


def sphereface_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=4,
                    scale=1, distance=None, backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's SphereFaceLoss: target logit s·‖x‖·ψ(θ), others s·‖x‖·cos (normalised weights)."""
    return _margin_loss("sphereface_loss", "SphereFaceLoss", embeddings, labels, W, indices_tuple, ref_emb,
                        ref_labels, margin=_int_margin(margin, "SphereFaceLoss"), scale=scale, distance=distance,
                        backend=backend, check_inputs=check_inputs, reducer=reducer, _extra=_extra)


def subcenter_arcface_loss(embeddings, labels, W, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                           sub_centers=3, margin=28.6, scale=64, distance=None, backend="auto", check_inputs=True,
                           reducer=None, _extra=None):
    """PML's SubCenterArcFaceLoss: ArcFace (``margin`` in degrees) on max_k x̂·ŵ_{cK+k}; W is D×(C·K)."""
    _cosine_only(distance, "SubCenterArcFaceLoss")
    sub_centers = int(sub_centers)
    if sub_centers < 1 or W.dim() != 2 or W.shape[1] % sub_centers:
        raise ValueError(f"W has shape {tuple(W.shape)}: expected (embedding_size, num_classes·sub_centers) with "
                         f"sub_centers={sub_centers}")
    labels = _prepare_weight(embeddings, labels, W, ref_emb, ref_labels, check_inputs, "SubCenterArcFaceLoss")
    check_proxy_labels(labels, W.shape[1] // sub_centers, check_values=check_inputs)
    return _loss("subcenter_arcface_loss", backend, embeddings, labels, W, margin=math.radians(margin),
                 scale=float(scale), sub_centers=sub_centers, weights=_weights(indices_tuple, embeddings, check_inputs),
                 reducer=reducer, extra=_extra)


def soft_triple_loss(embeddings, labels, fc, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                     centers_per_class=10, la=20, gamma=0.1, margin=0.01, distance=None, normalize_embeddings=True,
                     backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's SoftTripleLoss: CE(la·(S_c − margin·onehot)), S_c = Σ_k softmax_k(s_{cK+k}/γ)·s_{cK+k}; fc is
    D×(C·K). Any similarity (PML asserts an inverted distance)."""
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    if not dist.is_similarity:
        raise ValueError("SoftTripleLoss needs a similarity (PML asserts distance.is_inverted)")
    k = int(centers_per_class)
    if k < 1 or fc.dim() != 2 or fc.shape[1] % k:
        raise ValueError(f"fc has shape {tuple(fc.shape)}: expected (embedding_size, num_classes·centers_per_class) "
                         f"with centers_per_class={k}")
    labels = _prepare_weight(embeddings, labels, fc, ref_emb, ref_labels, check_inputs, "SoftTripleLoss")
    check_proxy_labels(labels, fc.shape[1] // k, check_values=check_inputs)
    return _loss("soft_triple_loss", backend, embeddings, labels, fc, centers_per_class=k, la=float(la),
                 gamma=float(gamma), margin=float(margin), distance=dist,
                 weights=_weights(indices_tuple, embeddings, check_inputs), reducer=reducer, extra=_extra)


def p2sgrad_loss(embeddings, labels, weight, indices_tuple=None, ref_emb=None, ref_labels=None, *, backend="auto",
                 check_inputs=True, reducer=None, _extra=None):
    """PML's P2SGradLoss: mean over all N·C entries of (clamp(x·w_c/‖x‖, −1, 1) − δ_{c,y})²; ``weight`` (D×C) as
    given (``P2SGradLoss`` re-normalises its columns on every call, as PML). No indices_tuple (as PML)."""
    if indices_tuple is not None:
        raise ValueError("P2SGradLoss does not support indices_tuple")
    labels = _prepare_weight(embeddings, labels, weight, ref_emb, ref_labels, check_inputs, "P2SGradLoss")
    return _loss("p2sgrad_loss", backend, embeddings, labels, weight, reducer=reducer, extra=_extra)
