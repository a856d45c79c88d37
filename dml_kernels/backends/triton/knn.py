"""k-nearest-neighbour search on the tiled pair engine: a similarity tile plus a running per-row top-k.

A program owns ``BA`` query rows and streams ``BB``-wide reference tiles (the engine's ``value_tile``:
fused normalisation, ``tl.dot`` over D-chunks). Its running top-k lives in registers as a ``BA × KP``
block of (score, index) pairs, sorted best first; the score is the similarity, or minus the distance, so
larger is always closer. A tile is merged only if one of its scores beats some row's current k-th best
(after the first tiles this is rare); the merge is ``k`` rounds of "take the best remaining candidate of
the running block and the tile, the smaller index among equal scores, and strike it out". Only the
``N × k`` result is written: the N×M matrix never exists.

Ties: equal values are ordered by the smaller reference index (the rule of ``dml_kernels/_ops.py``); a
tile's candidates tie with running ones only at larger indices, so they enter only when strictly better.
The values are this engine's (scaled dot products), equal to the reference's to rounding.

``k`` is limited to :data:`MAX_K` (the running block is held in registers); larger ``k`` raises
``Unsupported`` so ``backend="auto"`` moves on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ..reference.evaluation import _check_k
from . import pair_engine

MAX_K = 128

# GPU tile shapes per dtype group: (BA, BB, BD, num_warps); BA drops to 16 when KP >= 64. Compiled for sm_90
# (ptxas, every dtype, KP = 16 and 128, cosine and L2): at most 219 registers, no spill stack except 8 bytes
# for fp32 at KP = 128. Not yet run or timed on a GPU.
GPU_BLOCKS = {"half": (32, 64, 32, 4), "fp32": (32, 64, 32, 4), "fp64": (16, 32, 16, 4)}


@triton.jit
def _knn_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, val_ptr, idx_ptr, N, M, D, K, stride_x, stride_r,
                EXCLUDE: tl.constexpr, DIST: tl.constexpr, KP: tl.constexpr,
                BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    BIG: tl.constexpr = 2147483647
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, _rows = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, x_ptr, offs_a, N, False)
    sign = pair_engine.sim_sign(DIST)
    slot = tl.arange(0, KP)[None, :]
    best_s = tl.full((BA, KP), float("-inf"), CT)
    best_i = tl.full((BA, KP), BIG, tl.int32)
    kth = tl.full((BA,), float("-inf"), CT)  # the k-th best score so far (-inf until k candidates are held)
    for b0 in range(0, M, BB):
        offs_b = b0 + tl.arange(0, BB)
        s_b, n_b, _cols = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, r_ptr, offs_b, M, False)
        v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                                   DIST, BA, BB, BD, PREC)
        score = sign * v
        out = (offs_b >= M)[None, :] | (offs_a >= N)[:, None]
        if EXCLUDE:
            out = out | (offs_a[:, None] == offs_b[None, :])
        score = tl.where(out, float("-inf"), score)
        enter = score > kth[:, None]
        if tl.max(enter.to(tl.int32)) > 0:
            tile_i = tl.zeros((BA, BB), tl.int32) + offs_b[None, :]
            new_s = tl.full((BA, KP), float("-inf"), CT)
            new_i = tl.full((BA, KP), BIG, tl.int32)
            for j in range(0, K):
                top = tl.maximum(tl.max(best_s, axis=1), tl.max(score, axis=1))
                arg = tl.minimum(tl.min(tl.where(best_s == top[:, None], best_i, BIG), axis=1),
                                 tl.min(tl.where(score == top[:, None], tile_i, BIG), axis=1))
                arg = tl.where(top == float("-inf"), BIG, arg)  # nothing left: an empty slot
                new_s = tl.where(slot == j, top[:, None], new_s)
                new_i = tl.where(slot == j, arg[:, None], new_i)
                best_s = tl.where(best_i == arg[:, None], float("-inf"), best_s)
                score = tl.where(tile_i == arg[:, None], float("-inf"), score)
            best_s = new_s
            best_i = new_i
            kth = tl.max(tl.where(slot == K - 1, best_s, float("-inf")), axis=1)
    keep = (offs_a < N)[:, None] & (slot < K)
    dst = offs_a.to(tl.int64)[:, None] * K + slot
    tl.store(val_ptr + dst, (sign * best_s).to(val_ptr.dtype.element_ty), mask=keep)
    tl.store(idx_ptr + dst, best_i.to(tl.int64), mask=keep)


def knn(x, ref=None, *, k, distance, exclude_self=False):
    """(values N×k, indices N×k int64) of the k nearest references of every query (no gradient)."""
    if ref is None:
        exclude_self = True
    n, m = x.shape[0], (x if ref is None else ref).shape[0]
    _check_k(k, n, m, exclude_self)
    if k > MAX_K:
        raise Unsupported(f"the triton knn holds the running top-k in registers (k <= {MAX_K}); k={k}")
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if k == 0 or n == 0:
        return values, indices
    with torch.no_grad():
        tiles = pair_engine.Tiles(x, None, ref, None, distance, use_labels=False)
        s, nx, sr, nr = tiles.embed(x, ref)
        c = tiles._common(x, s, nx, ref, sr, nr)
        kp = max(16, triton.next_power_of_2(k))
        if tiles.gpu:
            ba, bb, bd, warps = GPU_BLOCKS[tiles.group]
            if kp >= 64:  # a wide running block: fewer rows per program (fp32 at BA=32, KP=128 spills)
                ba = min(ba, 16)
        else:  # the interpreter: small tiles so the tests' odd shapes span several of them
            ba, bb, bd, warps = 16, 16, 32, 1
        bd = min(bd, pair_engine._pow2(tiles.d))
        _knn_kernel[(triton.cdiv(n, ba),)](c[0], c[1], c[2], c[3], c[4], c[5], values, indices, n, m, tiles.d, k,
                                           c[0].stride(0), c[1].stride(0), EXCLUDE=bool(exclude_self),
                                           DIST=tiles.dist, KP=kp, BA=ba, BB=bb, BD=bd, PREC=tiles.prec,
                                           num_warps=warps)
    return values, indices


register("knn", "triton")(knn)
