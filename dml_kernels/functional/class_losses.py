"""The class-weight family: losses of embeddings against learnable per-class weights (proxies).

Every loss takes ``reducer=`` as in ``pair_losses.py`` (PML's default: MeanReducer for ProxyNCA over the rows,
DivisorReducer for Proxy Anchor's per-proxy pos_loss / neg_loss)."""
from __future__ import annotations

import torch

from .._pairs import PackedPairMask
from .._validation import check_indices_tuple, check_proxies, check_proxy_labels
from ..distances import parse_distance
from ._common import _loss, _prepare


def _miner_weights(indices_tuple, n, device, check_inputs, *, anchors_only):
    """PML's ``convert_to_weights``: count / max count per sample, 0 if absent; None without a tuple."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, PackedPairMask):
        indices_tuple = indices_tuple.to(device).to_indices()
    t = check_indices_tuple(indices_tuple, n, n, check_values=check_inputs, device=device)
    if all(len(i) == 0 for i in t):
        return None
    idx = torch.cat([t[0], t[2]] if (anchors_only and len(t) == 4) else ([t[0]] if anchors_only else list(t)))
    counts = torch.bincount(idx, minlength=n).double()
    return counts / counts.max()


def _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, name):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{name} does not support ref_emb / ref_labels")
    labels, _, _ = _prepare(embeddings, labels, None, None, check_inputs, labels_required=True)
    check_proxies(embeddings, proxies, check_values=check_inputs)
    check_proxy_labels(labels, proxies.shape[0], check_values=check_inputs)
    return labels


def proxy_nca_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                   softmax_scale=1, exclude_positive=False, distance=None, normalize_embeddings=True,
                   backend="auto", check_inputs=True, reducer=None, _extra=None):
    """PML's ProxyNCALoss = cross-entropy over logits −σ‖x̂ − p̂_c‖² (the positive proxy in the denominator,
    unless ``exclude_positive=True``: the original "No Fuss" form)."""
    labels = _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, "ProxyNCALoss")
    if exclude_positive and proxies.shape[0] < 2:
        raise ValueError("exclude_positive=True needs at least 2 classes")
    dist = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    weights = _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=True)
    return _loss("proxy_nca_loss", backend, embeddings, labels, proxies, softmax_scale=float(softmax_scale),
                 exclude_positive=bool(exclude_positive), distance=dist, weights=weights, reducer=reducer,
                 extra=_extra)


def proxy_nca_plus_plus_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                             temperature=1 / 9, **kwargs):
    """ProxyNCA++ (Teh et al.): ProxyNCA with softmax_scale = 1 / temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return proxy_nca_loss(embeddings, labels, proxies, indices_tuple, ref_emb, ref_labels,
                          softmax_scale=1.0 / temperature, **kwargs)


def proxy_anchor_loss(embeddings, labels, proxies, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                      margin=0.1, alpha=32, distance=None, normalize_embeddings=True, backend="auto",
                      check_inputs=True, reducer=None, _extra=None):
    """PML's ProxyAnchorLoss; |C⁺| (proxies with a positive in the batch) is counted on the device."""
    labels = _prepare_proxy(embeddings, labels, proxies, ref_emb, ref_labels, check_inputs, "ProxyAnchorLoss")
    dist = parse_distance(distance, normalize_embeddings, default="cosine")
    weights = _miner_weights(indices_tuple, embeddings.shape[0], embeddings.device, check_inputs, anchors_only=False)
    return _loss("proxy_anchor_loss", backend, embeddings, labels, proxies, margin=float(margin),
                 alpha=float(alpha), distance=dist, weights=weights, reducer=reducer, extra=_extra)
