"""The class-weight family (ProxyNCA, Proxy Anchor) on ``pair_reduce``: proxies are the references (ProxyNCA)
or the queries (Proxy Anchor: a per-proxy LSE is a row reduction of the transposed problem)."""
from __future__ import annotations

import torch

from ..._registry import Unsupported
from .common import _LSE, _LSE1, _both, _need, _out, _prep, _sg, _zero


@_both
def proxy_nca_loss(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance, weights=None):
    _need(x, "pair_reduce")
    q, r, code = _prep(x, proxies.to(x.dtype), distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    s = softmax_scale * _sg(distance)
    # "positive" = the target proxy (its logit), "negative" = every other proxy (their LSE).
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    if exclude_positive:
        losses = rest - target
    else:
        losses = torch.where(cnt[1] > 0, torch.logaddexp(target, rest), target) - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return _out(losses.mean(), x)


@_both
def proxy_anchor_loss(x, labels, proxies, *, margin, alpha, distance, weights=None):
    _need(x, "pair_reduce")
    if weights is not None:
        raise Unsupported("the C++ proxy_anchor_loss takes no miner weights")
    num_classes = proxies.shape[0]
    # Transposed: rows = proxies, columns = embeddings, so each proxy's LSE is a row reduction.
    q, r, code = _prep(proxies.to(x.dtype), x, distance)
    classes = torch.arange(num_classes, device=x.device)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, classes, labels, None, None, code, _LSE1, -sg * alpha, margin, sg * alpha, -margin, None)
    num_with_pos = (cnt[0] > 0).sum()
    pos_loss = torch.where(num_with_pos > 0, lp.sum() / num_with_pos.clamp_min(1), _zero(lp))
    return _out(pos_loss + ln.sum() / num_classes, x)
