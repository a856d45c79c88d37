"""The cpu backend's row-block engine, in torch (no C++): for losses whose per-row terms are a function of the row's
similarities (its LSEs, hardest pairs, mining thresholds, hinge sums), a block of rows meets all M references
through BLAS tiles (``values``: G = Q_blk·Rᵀ and the distance's values) and forms its row terms while the tile
is hot.

* :class:`_Blocks` — ``out[rows] += fn(block's slices)`` over row blocks, the forward under ``no_grad`` keeping
  only O(N) outputs; the backward recomputes each block with autograd on the block's slices (leaves) and pulls
  ``grad[rows]`` through it — the same arithmetic as the forward, so a mining or selection decision taken on
  the recomputed values is the forward's.
* :class:`ColumnLSE` — the transposed shape (few rows × many columns): a row LSE over column chunks.
* :class:`GradInForward` — a scalar loss whose gradients its forward forms (backward = upstream × saved).

Peak extra memory: a few tiles of ≤ :data:`TILE` elements (and at most 1/16 of N×M, so a block is never the
whole matrix) plus O((N + M)·D) gradients, never N×M. Double backward raises (the blocks are recomputed
under ``enable_grad`` but their graph is not kept). Users: ``direction.py``, ``proxy_gml.py`` and the
contrastive / class families' row-block forms.
"""
from __future__ import annotations

import torch

from .library import refuse_double_backward  # noqa: F401  (re-exported: the row-block engines call it)

TILE = 1 << 20  # elements of one block's tile (ROWS × M, or c × J × K for all triplets)


def block_rows(n, m):
    """Rows per block: a tile of ≤ TILE elements and ≤ 1/16 of the N×M matrix (at least one row)."""
    return max(1, min(n, TILE // max(m, 1), n // 16))


def spans(n, step):
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


class _Blocks(torch.autograd.Function):
    """(out (n,), aux (k, n)): ``out[rows] += value`` and ``aux[:, rows] += stats`` of ``fn(*slices)`` per block.

    ``blocks`` = [((r0, r1), (slice of each tensor: (a, b) rows or None = the whole tensor)), ...]; ``fn``
    returns (value (r1 − r0,), stats (k, r1 − r0)) and must be a pure function of its slices (closure
    constants aside). ``aux`` is not differentiable."""

    @staticmethod
    def forward(ctx, fn, blocks, n, k, *tensors):
        out = tensors[0].new_zeros(n)
        aux = tensors[0].new_zeros(k, n)
        for (r0, r1), sl in blocks:
            value, stats = fn(*_slices(tensors, sl))
            out[r0:r1] += value
            aux[:, r0:r1] += stats
        ctx.fn, ctx.blocks = fn, blocks
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(aux)
        return out, aux

    @staticmethod
    def backward(ctx, g, _g_aux):
        refuse_double_backward("cpu row-block loss")
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(t) if nd else None for t, nd in zip(tensors, need)]
        for (r0, r1), sl in ctx.blocks:
            args = _slices(tensors, sl)
            leaves = []
            for i, nd in enumerate(need):
                if nd:
                    args[i] = args[i].detach().requires_grad_()
                    leaves.append(i)
            with torch.enable_grad():
                value, _ = ctx.fn(*args)
                got = torch.autograd.grad(value, [args[i] for i in leaves], g[r0:r1], allow_unused=True)
            for i, gi in zip(leaves, got):
                if gi is not None:
                    if sl[i] is None:
                        grads[i] += gi
                    else:
                        grads[i][sl[i][0]:sl[i][1]] += gi
        return (None, None, None, None, *grads)


class GradInForward(torch.autograd.Function):
    """A scalar loss whose input gradients are formed in its forward (one sweep: no recomputing backward).
    ``run(tensors, needs)`` → (loss, grad of each tensor or None), ``needs[i]`` = whether tensor i wants its
    gradient (never for a None tensor); the backward is the upstream scalar × the saved gradients and refuses
    double backward (the saved gradients are constants). Call through :func:`grad_in_forward`."""

    @staticmethod
    def forward(ctx, run, what, want, *tensors):
        needs = [bool(want) and t is not None and nd for t, nd in zip(tensors, ctx.needs_input_grad[3:])]
        loss, *grads = run(tensors, needs)
        ctx.what = what
        ctx.save_for_backward(*(d if nd else None for d, nd in zip(grads, needs)))
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward(f"cpu {ctx.what}")
        return (None, None, None, *(None if d is None else g * d for d in ctx.saved_tensors))


def grad_in_forward(run, what, *tensors):
    """:class:`GradInForward` of ``run`` on ``tensors`` (None allowed); gradients are formed only under grad
    mode (inside an autograd Function's forward grad mode is off, so the caller's mode is read here)."""
    return GradInForward.apply(run, what, torch.is_grad_enabled(), *tensors)


def _slices(tensors, sl):
    return [t if s is None else t[s[0]:s[1]] for t, s in zip(tensors, sl)]


def row_blocks(n, m, n_tensors, rowwise):
    """Row blocks of n rows against m columns; ``rowwise[i]`` says whether tensor i is cut by the block."""
    return [((r0, r1), tuple((r0, r1) if rw else None for rw in rowwise)) for r0, r1 in spans(n, block_rows(n, m))]


def values(q, r, distance):
    """(G = q·rᵀ, the distance's values, ‖q‖², ‖r‖²) of a tile (euclidean: zero gradient at 0, as the reference)."""
    g = q @ r.T
    qq, rr = (q * q).sum(1), (r * r).sum(1)
    if distance.is_similarity:
        return g, g, qq, rr
    sq = (qq[:, None] + rr[None, :] - 2 * g).clamp_min(0)
    if distance.squared:
        return g, sq, qq, rr
    positive = sq > 0
    return g, torch.where(positive, sq.where(positive, 1).sqrt(), 0), qq, rr


class ColumnLSE(torch.autograd.Function):
    """LSE_j of ``fn(*slices)`` (n × chunk tiles) over column chunks: (n,). The forward merges the chunks' row
    LSEs (``logaddexp``); the backward recomputes each chunk with autograd and pulls e^{tile − LSE}·grad through
    it, so a chunk's sliced leaves (the proxies) get a chunk-sized gradient — right for few rows × many columns.
    ``chunks`` = [slice of each tensor: (a, b) columns or None = the whole tensor, ...]."""

    @staticmethod
    def forward(ctx, fn, chunks, n, *tensors):
        lse = tensors[0].new_full((n,), float("-inf"))
        for sl in chunks:
            lse = torch.logaddexp(lse, torch.logsumexp(fn(*_slices(tensors, sl)), 1))
        ctx.fn, ctx.chunks = fn, chunks
        ctx.save_for_backward(lse, *tensors)
        return lse

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("cpu row-block LSE")
        lse, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        grads = [torch.zeros_like(t) if nd else None for t, nd in zip(tensors, need)]
        for sl in ctx.chunks:
            args = _slices(tensors, sl)
            leaves = [i for i, nd in enumerate(need) if nd]
            for i in leaves:
                args[i] = args[i].detach().requires_grad_()
            with torch.enable_grad():
                tile = ctx.fn(*args)
                w = torch.exp(tile.detach() - lse[:, None]) * g[:, None]
                got = torch.autograd.grad(tile, [args[i] for i in leaves], w, allow_unused=True)
            for i, gi in zip(leaves, got):
                if gi is not None:
                    if sl[i] is None:
                        grads[i] += gi
                    else:
                        grads[i][sl[i][0]:sl[i][1]] += gi
        return (None, None, None, *grads)


def column_chunks(n, m):
    """Columns per chunk: a tile of ≤ TILE elements and ≤ 1/16 of the N×M matrix (at least one column)."""
    return spans(m, max(1, min(m, TILE // max(n, 1), m // 16)))
