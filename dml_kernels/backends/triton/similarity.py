"""The materialised similarity / distance matrix and batch-hard mining on the tiled pair engine."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register
from . import pair_engine


@triton.jit
def _similarity_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, out_ptr, N, M, D, stride_x, stride_r,
                       DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
                       PREC: tl.constexpr):
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    s_a, n_a, _ = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, x_ptr, offs_a, N, False)
    s_b, n_b, _ = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, r_ptr, offs_b, M, False)
    v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                          DIST, BA, BB, BD, PREC)
    tl.store(out_ptr + offs_a.to(tl.int64)[:, None] * M + offs_b[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(offs_a < N)[:, None] & (offs_b < M)[None, :])


@triton.jit
def dout_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """The upstream gradient of the materialised matrix, read at (anchor, reference)."""
    return tl.load(st + ia.to(tl.int64) * nst + ib, mask=(ia < na) & (ib < nb), other=0.0)


class _Similarity(pair_engine.PairLossImpl):
    BWD = dout_bwd


class PairwiseSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles, x, s, n, r, sr, nr):
        xs = (x, s, n, r, sr, nr)
        c = tiles._common(*xs)
        out = torch.empty(tiles.n, tiles.m, dtype=x.dtype, device=x.device)
        kw = tiles.launch("tile")
        grid = (triton.cdiv(tiles.n, kw["BA"]), triton.cdiv(tiles.m, kw["BB"]))
        _similarity_kernel[grid](c[0], c[1], c[2], c[3], c[4], c[5], out, tiles.n, tiles.m, tiles.d,
                                 c[0].stride(0), c[1].stride(0), DIST=tiles.dist, **kw)
        ctx.tiles = tiles
        ctx.save_for_backward(x, s, n, r, sr, nr)
        return out

    @staticmethod
    def backward(ctx, g):
        pair_engine.refuse_double_backward()
        x, s, n, r, sr, nr = ctx.saved_tensors
        tiles = ctx.tiles
        needs = ctx.needs_input_grad
        need_x, need_r = any(needs[1:4]), (r is not None and any(needs[4:7]))
        g = g.to(tiles.ct).contiguous()
        sc = torch.zeros(1, dtype=tiles.ct, device=g.device)
        acc, dn, acc_r, dn_r = _Similarity().grad(tiles, (x, s, n, r, sr, nr), g, sc, need_x, need_r)
        dx, ds, dnx = pair_engine.embedding_grads(x, s, acc, dn, needs[1:4])
        dr = dsr = dnr = None
        if need_r:
            dr, dsr, dnr = pair_engine.embedding_grads(r, sr, acc_r, dn_r, needs[4:7])
        return None, dx, ds, dnx, dr, dsr, dnr


def pairwise_similarity(x, ref=None, *, distance):
    x, ref = pair_engine.autocast_inputs(x, ref)
    tiles = pair_engine.Tiles(x, None, ref, None, distance, use_labels=False, narrow=True)  # dout_bwd gathers
    s, n, sr, nr = tiles.embed(x, ref)
    return PairwiseSimilarity.apply(tiles, x, s, n, ref, sr, nr)


# ------------------------------------------------------------------------------------------ batch hard


@triton.jit
def _best(best, idx, score, offs_b, LARGEST: tl.constexpr):
    """Row-wise running arg-best with ties to the lowest index (tiles arrive in increasing index order)."""
    big = 2147483647
    if LARGEST:
        top = tl.max(score, axis=1)
        better = top > best
    else:
        top = tl.min(score, axis=1)
        better = top < best
    arg = tl.min(tl.where(score == top[:, None], offs_b[None, :], big), axis=1)
    return tl.where(better, top, best), tl.where(better, arg, idx)


@triton.jit
def _batch_hard_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                       out_ptr, N, M, D, stride_x, stride_r,
                       SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr,
                       BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Hardest positive (largest distance / smallest similarity) and hardest negative per row; -1 if a set
    is empty. Ties go to the lowest index."""
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    sign = -pair_engine.sim_sign(DIST)  # the hardest positive has the largest distance / the smallest similarity
    best_p = tl.full((BA,), float("-inf"), CT)
    best_n = tl.full((BA,), float("inf"), CT)
    idx_p = tl.full((BA,), -1, tl.int32)
    idx_n = tl.full((BA,), -1, tl.int32)
    any_p = tl.zeros((BA,), tl.int32)
    any_n = tl.zeros((BA,), tl.int32)
    for b0 in range(0, M, BB):
        offs_b = b0 + tl.arange(0, BB)
        s_b, n_b, lab_b = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
        v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                              DIST, BA, BB, BD, PREC)
        pos, neg = pair_engine.pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                                     SELF, HAS_LABELS, HAS_PAIRS, False)
        score = sign * v
        any_p = tl.maximum(any_p, tl.max(pos.to(tl.int32), axis=1))
        any_n = tl.maximum(any_n, tl.max(neg.to(tl.int32), axis=1))
        best_p, idx_p = _best(best_p, idx_p, tl.where(pos, score, float("-inf")), offs_b, True)
        best_n, idx_n = _best(best_n, idx_n, tl.where(neg, score, float("inf")), offs_b, False)
    valid = (any_p > 0) & (any_n > 0)
    inside = offs_a < N
    tl.store(out_ptr + offs_a, tl.where(valid, idx_p, -1).to(tl.int64), mask=inside)
    tl.store(out_ptr + N + offs_a, tl.where(valid, idx_n, -1).to(tl.int64), mask=inside)


def batch_hard_indices(x, labels, ref, ref_labels, distance):
    """(hard_pos, hard_neg) int64 (N,) device vectors, -1 for rows lacking a positive or a negative."""
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance)
    with torch.no_grad():
        s, n, sr, nr = tiles.embed(x, ref)
        c = tiles._common(x, s, n, ref, sr, nr)
        out = torch.empty(2, tiles.n, dtype=torch.int64, device=x.device)
        kw = tiles.launch("tile")
        _batch_hard_kernel[(triton.cdiv(tiles.n, kw["BA"]),)](
            *c, out, tiles.n, tiles.m, tiles.d, c[0].stride(0), c[1].stride(0), **kw, **tiles._flags())
    return out[0], out[1]


def batch_hard_mining(x, labels, ref, ref_labels, *, distance):
    return batch_hard_indices(x, labels, ref, ref_labels, distance)


register("pairwise_similarity", "triton")(pairwise_similarity)
register("batch_hard_mining", "triton")(batch_hard_mining)
