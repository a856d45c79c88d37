"""Reference proxy losses (PML 2.9 semantics): embeddings N×D against proxies C×D."""
from __future__ import annotations

import torch

from ...distances import Distance
from .similarity import masked_log1p_sum_exp, masked_logsumexp, pairwise_similarity


def proxy_logits(x, proxies, *, scale, distance: Distance):
    """scale · similarity (or scale · −distance) of every embedding to every proxy, N×C."""
    mat = pairwise_similarity(x, proxies.to(x.dtype), distance=distance)  # a cast, never in place
    return scale * (mat if distance.is_similarity else -mat)


def proxy_nca_loss(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance: Distance, weights=None):
    """mean_i w_i · −log softmax_c(σ·s(x_i, p_c))[y_i]; PML's default distance is squared euclidean on
    normalised vectors, i.e. CE over logits −σ‖x̂−p̂‖² (= 2σ·cos up to a per-row constant).

    ``exclude_positive=True`` drops the target class from the denominator ("No Fuss" ProxyNCA).
    ``weights`` are PML's miner weights (count / max count per sample, 0 for unmined samples).
    """
    logits = proxy_logits(x, proxies, scale=softmax_scale, distance=distance)
    target = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    if exclude_positive:
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
        lse = torch.logsumexp(logits.masked_fill(is_target, float("-inf")), dim=1)
    else:
        lse = torch.logsumexp(logits, dim=1)
    losses = lse - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.mean()


def proxy_anchor_loss(x, labels, proxies, *, margin, alpha, distance: Distance, weights=None):
    """(1/|C⁺|) Σ_{c∈C⁺} log(1+Σ_{y_i=c} e^{α·margin(s,δ)+w_i}) + (1/C) Σ_c log(1+Σ_{y_i≠c} e^{α·margin(−δ,s)+w_i}).

    C⁺ = proxies with at least one positive in the batch (counted on the device); w_i = miner weight − 1
    (0 without a miner). With C⁺ empty the positive term is 0 (PML's DivisorReducer with divisor 0).
    """
    num_classes = proxies.shape[0]
    mat = pairwise_similarity(x, proxies.to(x.dtype), distance=distance)
    offset = 0 if weights is None else (weights.to(mat.dtype) - 1).unsqueeze(1)
    pos = torch.zeros_like(mat, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    pos_term = masked_log1p_sum_exp(alpha * distance.margin(mat, margin) + offset, pos, dim=0)
    neg_term = masked_log1p_sum_exp(alpha * distance.margin(-margin, mat) + offset, ~pos, dim=0)
    num_with_pos = pos.any(0).sum()
    pos_loss = torch.where(num_with_pos > 0, pos_term.sum() / num_with_pos.clamp_min(1), 0)
    return pos_loss + neg_term.sum() / num_classes


# ----------------------------------------------------------------- statistics of one class shard (distributed)


def proxy_nca_row_stats(x, labels, proxies, *, softmax_scale, distance: Distance, columns=None):
    """Per row, over the C classes of ``proxies`` (a shard: labels outside [0, C) have no target here):
    (target logit or 0, has_target, LSE over the non-target classes or 0, has_rest); logits as ProxyNCA's.
    ``columns`` (C,) bool: only these classes take part (Partial FC's sampled classes)."""
    logits = proxy_logits(x, proxies, scale=softmax_scale, distance=distance)
    is_target = torch.arange(proxies.shape[0], device=x.device).unsqueeze(0) == labels.unsqueeze(1)
    taking_part = torch.ones_like(is_target) if columns is None else columns.to(x.device, torch.bool).unsqueeze(0)
    is_target = is_target & taking_part
    has_target = is_target.any(1)
    target = torch.where(is_target, logits, 0).sum(1)
    rest_mask = ~is_target & taking_part
    return target, has_target, masked_logsumexp(logits, rest_mask), rest_mask.any(1)


def proxy_anchor_class_terms(x, labels, proxies, *, margin, alpha, distance: Distance):
    """Per class of ``proxies`` (a shard: labels outside [0, C) are negatives of every class here):
    (positive term, has_positive, negative term) of Proxy Anchor, before the 1/|C⁺| and 1/C divisors."""
    mat = pairwise_similarity(x, proxies.to(x.dtype), distance=distance)
    pos = torch.arange(proxies.shape[0], device=x.device).unsqueeze(0) == labels.unsqueeze(1)
    pos_term = masked_log1p_sum_exp(alpha * distance.margin(mat, margin), pos, dim=0)
    neg_term = masked_log1p_sum_exp(alpha * distance.margin(-margin, mat), ~pos, dim=0)
    return pos_term, pos.any(0), neg_term
