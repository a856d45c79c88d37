"""Collectives with autograd on torch.distributed (NCCL or gloo): gathers of uneven row counts, sums."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _local_sizes(n: int, device, group) -> list[int]:
    """Every rank's local row count (one all-gather of one integer per rank, read on the host)."""
    world, _ = _world(group)
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (no autograd); rows padded to the largest size."""
    world, _ = _world(group)
    width = max(sizes)
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _refuse_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError("double backward (create_graph=True) through dml_kernels' distributed collectives "
                           "is not supported")


class _AllGather(torch.autograd.Function):
    """Gather with autograd. Backward all-reduces the gathered tensor's gradient and returns this rank's rows,
    summed over ranks (``mean=False``: each rank's upstream gradient is a part of the total) or averaged
    (``mean=True``: every rank computed the same loss, so each upstream gradient is already the total)."""

    @staticmethod
    def forward(ctx, x, sizes, group, mean):
        ctx.sizes, ctx.group, ctx.mean = sizes, group, mean
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        world, rank = _world(ctx.group)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:rank])
        mine = grad[start: start + ctx.sizes[rank]]
        return (mine / world if ctx.mean else mine), None, None, None


def all_gather(x: torch.Tensor, group=None, *, sizes: list[int] | None = None, mean: bool = True):
    """(every rank's ``x`` in rank order, the ranks' row counts). Differentiable when ``x`` requires grad; see
    :class:`_AllGather` for ``mean``."""
    if sizes is None:
        sizes = _local_sizes(x.shape[0], x.device, group)
    if x.requires_grad:
        return _AllGather.apply(x, sizes, group, mean), sizes
    return _gather_rows(x, sizes, group), sizes


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks of a value every rank holds a part of, inside a loss every rank computes identically:
    the gradient of each part is the (replicated) upstream gradient, averaged over ranks to stay exact."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable Σ over ranks (for terms of one loss that every rank computes identically)."""
    if x.requires_grad:
        return _AllReduceSum.apply(x, group)
    out = x.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
