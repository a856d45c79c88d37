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


# ----------------------------------------------------------------- statistics of one class shard (distributed)


@_both
def proxy_nca_row_stats(x, labels, proxies, *, softmax_scale, distance, columns=None):
    """ProxyNCA's per-row statistics over this shard's classes: one pair_reduce (target = the "positive"
    LSE, rest = the "negative" LSE); labels outside [0, C) match no column; ``columns`` (C,) bool: the kernel's
    column mask (only these classes take part)."""
    _need(x, "pair_reduce")
    if proxies.shape[0] == 0:  # an empty shard (C < world size): nothing here, still graph-attached
        z = (x * 0).sum(1) + (proxies * 0).sum()
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return z, none, z, none
    q, r, code = _prep(x, proxies.to(x.dtype), distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    s = softmax_scale * _sg(distance)
    mask = None if columns is None else columns.to(device=x.device, dtype=torch.bool).contiguous()
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, s, 0.0, s, 0.0, None, mask)
    return _row(target, x), cnt[0] > 0, _row(rest, x), cnt[1] > 0


@_both
def proxy_anchor_class_terms(x, labels, proxies, *, margin, alpha, distance):
    """Proxy Anchor's per-class terms over this shard (the transposed pair_reduce of proxy_anchor_loss)."""
    _need(x, "pair_reduce")
    if proxies.shape[0] == 0:
        z = (proxies * 0).sum(1) + (x * 0).sum()
        return z, torch.zeros(0, dtype=torch.bool, device=x.device), z
    q, r, code = _prep(proxies.to(x.dtype), x, distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, classes, labels, None, None, code, _LSE1, -sg * alpha, margin, sg * alpha, -margin, None)
    return _row(lp, x), cnt[0] > 0, _row(ln, x)


def _row(v, x):
    """A per-row statistic in the dtype losses come back in (see _out)."""
    return v if x.dtype in (torch.float16, torch.bfloat16) else v.to(x.dtype)
