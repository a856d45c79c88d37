"""Class-weight losses with the weights sharded across ranks: exactly the unsharded loss of the global batch.

Rank r holds rows [r·⌈C/W⌉, min((r+1)·⌈C/W⌉, C)) of the C×D weights (a rank may hold none when C < W).
Per step: the embeddings are gathered (B_global × D; their gradient is summed back to the owners); each
rank computes its shard's statistics with the fused kernels (op ``proxy_nca_row_stats`` /
``proxy_anchor_class_terms``: O(B_global) or O(C/W) values, never the B × C logits of the whole problem);
the statistics are merged across ranks (an all-gather of W × B_global values for ProxyNCA's log-sum-exp,
all-reduces of scalars for Proxy Anchor) inside autograd. Every rank returns the same value, the loss of
the global batch; backward leaves on each rank the gradient of that loss with respect to its weight shard
and to its local embeddings.

The margin-softmax family (second half of this module) keeps PML's D × C·K weight layout: a shard is the block
of columns of the rank's classes. Op ``margin_softmax_row_stats`` gives per row of the global batch the target
logit (margin applied, on the rank owning the target class) and the LSE of the shard's other logits; the ranks
merge them with an all-reduce MAX of the B_global row maxima and one all-reduce SUM of 2·B_global values.
``sample_rate=`` (Partial FC) computes the statistics over a sampled subset of the shard's classes only.

DDP note: a DDP-wrapped backbone *averages* its gradients over ranks, so with this loss it receives
(1/W)·∂L/∂θ; multiply the loss by W (what PML's DistributedLossWrapper does) if you want ∂L/∂θ — the shard
gradients then scale by W too. The shards must not be DDP-wrapped (each rank owns different rows).
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .. import _registry
from .._validation import check_embeddings, check_labels, check_proxy_labels
from ..distances import parse_distance
from .collectives import _world, all_gather, all_reduce_sum

__all__ = ["shard_range", "shard_rows", "gather_full_weight", "sharded_proxy_nca_loss", "sharded_proxy_anchor_loss",
           "shard_columns", "sample_classes", "sample_generator", "sharded_margin_softmax_loss", "sharded_p2sgrad_loss",
           "gather_full_state_dict", "load_full_state_dict"]


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


def gather_full_weight(shard: torch.Tensor, group=None, *, dim: int = 0) -> torch.Tensor:
    """The full weight from every rank's shard (for a checkpoint; no gradient): the C × D proxies (``dim=0``), or
    with ``dim=1`` the D × C·K weight of the margin-softmax family (its shards are blocks of columns)."""
    if dim == 1:
        return all_gather(shard.detach().t().contiguous(), group)[0].t().contiguous()
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
                           process_group=None, sample_rate=None, generator=None):
    """ProxyNCA (``exclude_positive=False``: the target in the denominator, PML's form) over the global batch,
    with ``proxies`` this rank's shard of the C = ``num_classes`` proxies. ``labels`` are global class ids.

    ``sample_rate`` (Partial FC, as :func:`sharded_margin_softmax_loss`): each rank keeps the classes
    :func:`sample_classes` draws from its shard with ``generator`` (every positive of the global batch is kept);
    the value is the unsharded loss restricted to the union of the sampled classes."""
    if exclude_positive and num_classes < 2:
        raise ValueError("exclude_positive=True needs at least 2 classes")
    if sample_rate is not None and not 0 < float(sample_rate) <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    group = process_group
    start = _check_shard(proxies, num_classes, group, embeddings.shape[1])
    x, y = _gather_batch(embeddings, labels, num_classes, group, check_inputs)
    dist_ = parse_distance(distance, normalize_embeddings, default="squared_euclidean")
    y, columns = y - start, None
    if sample_rate is not None and float(sample_rate) < 1 and proxies.shape[0] > 0:
        rows, y, columns, _ = _sampled(proxies.t(), y, proxies.shape[0], 1, float(sample_rate), generator)
        proxies = rows.t()
    target, has_target, rest, has_rest = _registry.call(
        "proxy_nca_row_stats", backend, x.device.type, x, y, proxies, softmax_scale=float(softmax_scale),
        distance=dist_, columns=columns)
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


# ------------------------------------------------------------------- the margin-softmax family (D×C weights)
#
# PML's layout: W is D×(C·K), column c·K + k is centre k of class c (K = 1 but for SubCenterArcFace's sub_centers
# and SoftTriple's centers_per_class). Rank r holds the columns of its classes [start, stop) of shard_range.

MARGIN_SOFTMAX_LOSSES = ("normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
                         "sphereface_loss", "subcenter_arcface_loss", "soft_triple_loss")


def shard_columns(full_weight: torch.Tensor, group=None, *, group_size: int = 1) -> torch.Tensor:
    """This rank's columns of a full (PML-shaped, D × C·K) weight, as a new tensor; ``group_size`` = K."""
    k = int(group_size)
    if full_weight.dim() != 2 or full_weight.shape[1] % k:
        raise ValueError(f"full_weight has shape {tuple(full_weight.shape)}: expected (embedding_size, "
                         f"num_classes·{k})")
    start, stop = shard_range(full_weight.shape[1] // k, group)
    return full_weight[:, start * k: stop * k].detach().clone()


def _check_column_shard(W, num_classes, group, dim, k, name="W", check_values=True):
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor (this rank's weight shard)")
    start, stop = shard_range(num_classes, group)
    if W.dim() != 2 or tuple(W.shape) != (dim, (stop - start) * k):
        raise ValueError(f"the weight shard {name} has shape {tuple(W.shape)}; with num_classes={num_classes} this "
                         f"rank holds classes [{start}, {stop}) of embedding size {dim}: expected "
                         f"{(dim, (stop - start) * k)} (shard_columns(full_weight) gives it)")
    if check_values and W.numel() and not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or inf (pass check_inputs=False to skip this check)")
    return start, stop


def sample_classes(local_labels, num_local, sample_rate, *, generator=None):
    """Partial FC's class sampling on one shard, on the device: every positive (a class in [0, num_local) that
    ``local_labels`` — the global batch's labels minus the shard's first class — holds) plus randomly drawn
    negatives, int(sample_rate · num_local) classes in all (only the positives if there are more).

    Returns (classes (k,) ascending, in [0, num_local); taking_part (k,) bool) with the static size
    k = min(num_local, max(int(sample_rate · num_local), len(local_labels))); a class drawn beyond the
    positives' need has taking_part False. The draw is ``torch.rand(num_local, generator=generator)`` on the
    labels' device (the global RNG without a generator): the same generator state, labels and device type give the
    same classes."""
    num_sample = int(sample_rate * num_local)
    k = min(num_local, max(num_sample, local_labels.shape[0]))
    device = local_labels.device
    inside = (local_labels >= 0) & (local_labels < num_local)
    positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device)
    positive[torch.where(inside, local_labels, num_local)] = True
    positive = positive[:num_local]
    score = torch.rand(num_local, generator=generator, device=device)
    order = torch.topk(torch.where(positive, 2.0, score), k).indices  # the positives first, then the draws
    taking_part = positive[order] | (torch.arange(k, device=device) < num_sample)
    order, perm = torch.sort(order)
    return order, taking_part[perm]


def sample_generator(seed, rank, step, device):
    """The generator ``process_group=`` losses draw step ``step``'s classes of rank ``rank`` with: a
    ``torch.Generator`` on ``device`` seeded from a hash of (seed, rank, step) — reproducible, independent of
    torch's global RNG and different for every rank and step."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(rank)}/{int(step)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)
    return generator


def _sampled(W, y_local, num_local, k, sample_rate, generator):
    """(the sampled classes' columns of W, labels as positions among them or -1, their taking-part mask,
    the sampled classes)."""
    classes, taking_part = sample_classes(y_local, num_local, sample_rate, generator=generator)
    if classes.shape[0] == num_local:  # every class drawn (sorted: classes = arange): W as is, a mask only
        return W, y_local, taking_part, classes
    position = torch.full((num_local,), -1, dtype=torch.long, device=y_local.device)
    position[classes] = torch.arange(classes.shape[0], device=y_local.device)
    inside = (y_local >= 0) & (y_local < num_local)
    y = torch.where(inside, position[y_local.clamp(0, num_local - 1)], -1)
    cols = (classes.unsqueeze(1) * k + torch.arange(k, device=W.device)).flatten()
    return W.index_select(1, cols), y, taking_part, classes


def _merge_lse(target, has_target, rest, has_rest, group):
    """mean_i (log Σ_ranks Σ_shard-classes e^{logit} − target logit_i): the row max over ranks (all-reduce MAX,
    no gradient needed: the LSE does not depend on its shift), then one all-reduce of the B_global sums of
    e^{shard LSE − max} and target logits."""
    local = torch.where(has_target & has_rest, torch.logaddexp(target, rest), torch.where(has_target, target, rest))
    has_local = has_target | has_rest
    with torch.no_grad():
        row_max = torch.where(has_local, local, float("-inf")).contiguous()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    part = torch.where(has_local, torch.exp(torch.where(has_local, local, row_max) - row_max), 0)
    total = all_reduce_sum(torch.stack([part, torch.where(has_target, target, 0)]), group)
    return (row_max + torch.log(total[0]) - total[1]).mean()


def sharded_margin_softmax_loss(embeddings, labels, W, *, loss, num_classes, group_size=1, backend="auto",
                                check_inputs=True, process_group=None, sample_rate=None, generator=None, **params):
    """A margin-softmax loss (``loss``: the name of its op, e.g. ``"arcface_loss"``) over the global batch, with
    ``W`` this rank's shard (D × (classes of shard_range)·``group_size``); ``labels`` are global class ids and
    ``params`` the op's keyword arguments (``dml_kernels/_ops.py``: the ArcFace margins in radians, distances as
    :class:`dml_kernels.Distance`).

    ``sample_rate`` (Partial FC; 0 < rate ≤ 1): each rank keeps the classes :func:`sample_classes` draws from its
    shard with ``generator`` (every positive of the global batch is kept); the value is then the unsharded loss
    restricted to the union of the ranks' sampled classes, and the classes not drawn get a zero gradient."""
    if loss not in MARGIN_SOFTMAX_LOSSES:
        raise ValueError(f"loss must be one of {MARGIN_SOFTMAX_LOSSES}, got {loss!r}")
    if sample_rate is not None and not 0 < float(sample_rate) <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    group, k = process_group, int(group_size)
    check_embeddings(embeddings, check_values=False)  # its shape, before the shard's
    start, stop = _check_column_shard(W, num_classes, group, embeddings.shape[1], k, check_values=check_inputs)
    x, y = _gather_batch(embeddings, labels, num_classes, group, check_inputs)
    y = y - start
    columns = None
    if sample_rate is not None and float(sample_rate) < 1 and stop > start:
        W, y, columns, _ = _sampled(W, y, stop - start, k, float(sample_rate), generator)
    stats = _registry.call("margin_softmax_row_stats", backend, x.device.type, x, y, W, loss=loss, columns=columns,
                           **params)
    return _merge_lse(*stats, group)


def sharded_p2sgrad_loss(embeddings, labels, weight, *, num_classes, backend="auto", check_inputs=True,
                         process_group=None):
    """P2SGrad over the global batch with ``weight`` this rank's D × (shard classes) columns (used as given):
    the mean over B_global · C of (clamp(cos, −1, 1) − one-hot)², each rank summing its columns' terms. The
    reference backend forms the B_global × (shard classes) cosines as PML; any other uses the unsharded fused
    path's form, Σ_c cos² = x̂ᵀ(W Wᵀ)x̂ (a D×D Gram) and an O(B·D) target gather (no clamp: it acts only on
    cosines rounding past ±1)."""
    group = process_group
    check_embeddings(embeddings, check_values=False)  # its shape, before the shard's
    start, stop = _check_column_shard(weight, num_classes, group, embeddings.shape[1], 1, "weight", check_inputs)
    x, y = _gather_batch(embeddings, labels, num_classes, group, check_inputs)
    w, y, n = weight.to(x.dtype), y - start, stop - start
    norm = x.pow(2).sum(1).pow(0.5)  # PML's modulus (no eps)
    if backend == "reference":
        cos = (x.mm(w) / norm.unsqueeze(1)).clamp(-1, 1)
        onehot = y.unsqueeze(1) == torch.arange(n, device=x.device).unsqueeze(0)
        part = (cos - onehot.to(cos.dtype)).pow(2).sum()
    else:
        inside = (y >= 0) & (y < n)
        rows = w.t()[torch.where(inside, y, 0)] if n else torch.zeros_like(x)
        target = torch.where(inside, (x * rows).sum(1) / norm, 0)
        part = (((x @ (w @ w.t())) * x).sum(1) / norm ** 2).sum() - 2 * target.sum() + inside.sum()
    return all_reduce_sum(part, group) / (x.shape[0] * num_classes)


def _weight_layout(module):
    """(parameter name, shard dimension, group size K) of a class-weight loss module."""
    if isinstance(getattr(module, "proxies", None), torch.nn.Parameter):
        return "proxies", 0, 1
    name = getattr(module, "_weight_name", "weight")
    k = getattr(module, "sub_centers", None) or getattr(module, "centers_per_class", None) or 1
    return name, 1, int(k)


def gather_full_state_dict(module, group=None):
    """``module.state_dict()`` with its sharded class weight replaced by the full, PML-shaped weight (rows of the
    proxies, columns of W / fc / weight in class order) — for a checkpoint. Every rank must call it."""
    name, dim, _ = _weight_layout(module)
    group = getattr(module, "process_group", None) if group is None else group
    state = module.state_dict()
    state[name] = gather_full_weight(state[name], group, dim=dim)
    return state


def load_full_state_dict(module, state_dict, group=None, strict=True):
    """Load a full (PML-shaped) state_dict into a sharded module: its class weight is cut to this rank's shard."""
    name, dim, k = _weight_layout(module)
    group = getattr(module, "process_group", None) if group is None else group
    state = dict(state_dict)
    full = state[name]
    state[name] = shard_rows(full, group) if dim == 0 else shard_columns(full, group, group_size=k)
    return module.load_state_dict(state, strict=strict)
