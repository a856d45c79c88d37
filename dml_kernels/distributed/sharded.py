"""Class-weight losses with the weights sharded across ranks: exactly the unsharded loss of the global batch.

Rank r holds rows [r·⌈C/W⌉, min((r+1)·⌈C/W⌉, C)) of the C×D weights (a rank may hold none when C < W).
Per step: the embeddings are gathered (B_global × D; their gradient is summed back to the owners); each
rank computes its shard's statistics with the fused kernels (op ``proxy_nca_row_stats`` /
``proxy_anchor_class_terms``: O(B_global) or O(C/W) values, never the B × C logits of the whole problem);
the statistics are merged across ranks (an all-gather of W × B_global values for ProxyNCA's log-sum-exp,
all-reduces of scalars for Proxy Anchor) inside autograd. Every rank returns the same value, the loss of
the global batch; backward leaves on each rank the gradient of that loss with respect to its weight shard
and to its local embeddings.

DDP note: a DDP-wrapped backbone *averages* its gradients over ranks, so with this loss it receives
(1/W)·∂L/∂θ; multiply the loss by W (what PML's DistributedLossWrapper does) if you want ∂L/∂θ — the shard
gradients then scale by W too. The shards must not be DDP-wrapped (each rank owns different rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _registry
from .._validation import check_embeddings, check_labels, check_proxy_labels
from ..distances import parse_distance
from .collectives import _world, all_gather, all_reduce_sum

__all__ = ["shard_range", "shard_rows", "gather_full_weight", "sharded_proxy_nca_loss", "sharded_proxy_anchor_loss"]


def shard_range(num_classes: int, group=None, rank: int | None = None, world_size: int | None = None):
    """[start, stop) of the classes rank ``rank`` (default: this rank of ``group``) holds among ``world_size``
    ranks (default: the group's size; pass both to ask without a process group)."""
    world, me = (world_size, rank) if world_size is not None and rank is not None else _world(group)
    rank = me if rank is None else rank
    per = -(-int(num_classes) // world)
    start = min(rank * per, num_classes)
    return start, min(start + per, num_classes)


def shard_rows(full_weight: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's rows of a full (PML-shaped, C × D) weight, as a new tensor."""
    start, stop = shard_range(full_weight.shape[0], group)
    return full_weight[start:stop].detach().clone()


def gather_full_weight(shard: torch.Tensor, group=None) -> torch.Tensor:
    """The full C × D weight from every rank's shard (for a checkpoint; no gradient)."""
    return all_gather(shard.detach(), group)[0]


def _check_shard(proxies, num_classes, group, dim):
    start, stop = shard_range(num_classes, group)
    if tuple(proxies.shape) != (stop - start, dim):
        raise ValueError(f"the weight shard has shape {tuple(proxies.shape)}; with num_classes={num_classes} this "
                         f"rank holds classes [{start}, {stop}) of embedding size {dim}: expected "
                         f"{(stop - start, dim)} (shard_rows(full_weight) gives it)")
    return start


def _gather_batch(embeddings, labels, num_classes, group, check_inputs):
    check_embeddings(embeddings, check_values=check_inputs)
    labels = check_labels(labels, embeddings.shape[0], embeddings.device)
    check_proxy_labels(labels, num_classes, check_values=check_inputs)
    x, sizes = all_gather(embeddings, group, mean=False)  # each rank's gradient of x is a part of the total
    return x, all_gather(labels, group, sizes=sizes)[0]


def _per_rank(v, group):
    """W × len(v): every rank's ``v`` (rows in rank order), differentiable."""
    world, _ = _world(group)
    return all_gather(v.unsqueeze(0), group, sizes=[1] * world)[0]


def sharded_proxy_nca_loss(embeddings, labels, proxies, *, num_classes, softmax_scale=1, exclude_positive=False,
                           distance=None, normalize_embeddings=True, backend="auto", check_inputs=True,
                           process_group=None):
    """ProxyNCA (``exclude_positive=False``: the target in the denominator, PML's form) over the global batch,
    with ``proxies`` this rank's shard of the C = ``num_classes`` proxies. ``labels`` are global class ids."""
    if exclude_positive and num_classes < 2:
        raise ValueError("exclude_positive=True needs at least 2 classes")
    group = process_group
    start = _check_shard(proxies, num_classes, group, embeddings.shape[1])
    x, y = _gather_batch(embeddings, labels, num_classes, group, check_inputs)
    dist_ = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    target, has_target, rest, has_rest = _registry.call(
        "proxy_nca_row_stats", backend, x.device.type, x, y - start, proxies, softmax_scale=float(softmax_scale),
        distance=dist_)
    target = torch.where(has_target, target, 0)  # the target logit lives on exactly one rank
    rest = torch.where(has_rest, rest, 0)
    if exclude_positive:
        local, has_local = rest, has_rest
    else:  # this shard's LSE over all its classes
        local = torch.where(has_target & has_rest, torch.logaddexp(target, rest), torch.where(has_target, target, rest))
        has_local = has_target | has_rest
    stacked = _per_rank(local, group)
    present = _per_rank(has_local.to(torch.uint8), group).bool()
    lse = torch.logsumexp(stacked.masked_fill(~present, float("-inf")), dim=0)
    return (lse - all_reduce_sum(target, group)).mean()


def sharded_proxy_anchor_loss(embeddings, labels, proxies, *, num_classes, margin=0.1, alpha=32, distance=None,
                              normalize_embeddings=True, backend="auto", check_inputs=True, process_group=None):
    """Proxy Anchor over the global batch with ``proxies`` this rank's shard; the per-class terms stay local,
    their sums and |C⁺| are all-reduced."""
    group = process_group
    start = _check_shard(proxies, num_classes, group, embeddings.shape[1])
    x, y = _gather_batch(embeddings, labels, num_classes, group, check_inputs)
    dist_ = parse_distance(distance, normalize_embeddings, default="cosine")
    pos_term, has_pos, neg_term = _registry.call(
        "proxy_anchor_class_terms", backend, x.device.type, x, y - start, proxies, margin=float(margin),
        alpha=float(alpha), distance=dist_)
    pos_sum = all_reduce_sum(torch.where(has_pos, pos_term, 0).sum(), group)
    with torch.no_grad():
        num_with_pos = has_pos.sum().to(pos_sum.dtype)
        dist.all_reduce(num_with_pos, group=group)
    pos_loss = torch.where(num_with_pos > 0, pos_sum / num_with_pos.clamp_min(1), 0)
    return pos_loss + all_reduce_sum(neg_term.sum(), group) / num_classes
