"""Multi-similarity loss (plain, fused MS mining, packed pairs) and the MS miner's two device forms.

With ``sg = +1`` for a similarity and ``-1`` for a distance and d = v − λ:

    loss = (1/N) Σ_i [(1/α) log(1 + Σ_{P_i} e^{−sg·α·d}) + (1/β) log(1 + Σ_{N_i} e^{sg·β·d})]

Fused mining (``epsilon``) is two passes: per-row hardest positive / hardest negative (min/max), then the
two online LSEs (implicit zero term) over the kept pairs. Per-row statistics saved for the backward:
[hardest pos, hardest neg, L_pos, L_neg].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._pairs import PackedPairMask
from . import pair_engine
from .pair_engine import LSE1, MAX, MIN, SUM


@triton.jit
def thresholds_fwd(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """Hardest positive / negative values: similarity → (min over P, max over N), distance → (max, min)."""
    if DIST == 0:
        hp = tl.where(pos, v, float("inf"))
        hn = tl.where(neg, v, float("-inf"))
    else:
        hp = tl.where(pos, v, float("-inf"))
        hn = tl.where(neg, v, float("inf"))
    return hp, hn, v, v, v, v


@triton.jit
def mined_masks(v, pos, neg, ia, na, st, nst, eps, DIST: tl.constexpr):
    """PML's MultiSimilarityMiner on a tile, from the row thresholds in st[0] (hardest pos), st[1] (neg)."""
    inside = ia < na
    hp = tl.load(st + ia, mask=inside, other=0.0)
    hn = tl.load(st + nst + ia, mask=inside, other=0.0)
    if DIST == 0:
        pos = pos & (v - eps < hn)
        neg = neg & (v + eps > hp)
    else:
        pos = pos & (v + eps > hn)
        neg = neg & (v - eps < hp)
    return pos, neg


@triton.jit
def ms_fwd(v, pos, neg, ia, ib, na, nb, st, nst, alpha, beta, base, eps, DIST: tl.constexpr, FLAG: tl.constexpr):
    if FLAG:
        pos, neg = mined_masks(v, pos, neg, ia, na, st, nst, eps, DIST)
    sg = pair_engine.sim_sign(DIST)
    d = v - base
    tp = tl.where(pos, -sg * alpha * d, float("-inf"))
    tn = tl.where(neg, sg * beta * d, float("-inf"))
    return tp, tn, pos.to(v.dtype), neg.to(v.dtype), v, v


@triton.jit
def ms_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, alpha, beta, base, eps, DIST: tl.constexpr,
           FLAG: tl.constexpr):
    if FLAG:
        pos, neg = mined_masks(v, pos, neg, ia, na, st, nst, eps, DIST)
    sg = pair_engine.sim_sign(DIST)
    inside = ia < na
    lp = tl.load(st + 2 * nst + ia, mask=inside, other=0.0)
    ln = tl.load(st + 3 * nst + ia, mask=inside, other=0.0)
    d = v - base
    wp = tl.where(pos, tl.exp(-sg * alpha * d - lp), 0.0)
    wn = tl.where(neg, tl.exp(sg * beta * d - ln), 0.0)
    return (wn - wp) * (sg * tl.load(sc))


@triton.jit
def _pack_bits(bits, BA: tl.constexpr, BB: tl.constexpr):
    """BA×BB bool → BA×(BB/8) uint8, column k in bit k % 8 of byte k // 8 (PackedPairMask's layout)."""
    shifts = tl.arange(0, 8)[None, None, :]
    return tl.sum(tl.reshape(bits.to(tl.int32), (BA, BB // 8, 8)) << shifts, axis=2).to(tl.uint8)


@triton.jit
def _mask_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                 st_ptr, nst, out_pos, out_neg, N, M, D, stride_x, stride_r, eps,
                 SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr,
                 BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Write the mined pairs straight into packed bits: a program owns BA rows × BB/8 whole bytes."""
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    s_b, n_b, lab_b = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
    v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                          DIST, BA, BB, BD, PREC)
    pos, neg = pair_engine.pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                                 SELF, HAS_LABELS, HAS_PAIRS, False)
    pos, neg = mined_masks(v, pos, neg, offs_a[:, None], N, st_ptr, nst, eps, DIST)
    pos_packed = _pack_bits(pos, BA, BB)
    neg_packed = _pack_bits(neg, BA, BB)
    offs_y = tl.program_id(1) * (BB // 8) + tl.arange(0, BB // 8)
    nout = (M + 7) // 8
    where = offs_a.to(tl.int64)[:, None] * nout + offs_y[None, :]
    inside = (offs_a < N)[:, None] & (offs_y < nout)[None, :]
    tl.store(out_pos + where, pos_packed, mask=inside)
    tl.store(out_neg + where, neg_packed, mask=inside)


def _thresholds(tiles, xs):
    kinds = (MIN, MAX) if tiles.dist == 0 else (MAX, MIN)
    return tiles.row_stats(xs, thresholds_fwd, kinds)[:2]


class MultiSimilarity(pair_engine.PairLossImpl):
    BWD = ms_bwd

    def __init__(self, alpha, beta, base, epsilon, pair_rule):
        self.params = (alpha, beta, base, 0.0 if epsilon is None else epsilon)
        self.alpha, self.beta = alpha, beta
        self.flag = int(epsilon is not None)
        self.pair_rule = pair_rule

    def forward(self, tiles, xs):
        th = _thresholds(tiles, xs).contiguous() if self.flag else None
        out = tiles.row_stats(xs, ms_fwd, (LSE1, LSE1, SUM, SUM), self.params, stats=th, flag=self.flag)
        lp, ln = out[0], out[1]
        keep = pair_engine.few_pairs_keep(out[2].sum(), out[3].sum(), self.pair_rule)
        loss = (lp / self.alpha + ln / self.beta).mean() * keep
        if th is None:
            th = torch.zeros(2, tiles.n, dtype=tiles.ct, device=tiles.device)
        stats = torch.cat([th, out[:2]]).contiguous()
        return loss, stats, (keep / tiles.n).reshape(1)

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux


def multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, epsilon=None, distance,
                          pairs=None, pair_rule=True):
    if pairs is not None and not isinstance(pairs, PackedPairMask):
        raise pair_engine.Unsupported("the triton multi_similarity_loss takes pairs as a PackedPairMask")
    impl = MultiSimilarity(alpha, beta, base, epsilon, pair_rule)
    return pair_engine.fused_loss(impl, x, labels, ref, ref_labels, distance, pairs)


@torch.no_grad()
def multi_similarity_thresholds(x, labels, ref, ref_labels, *, distance):
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance)
    s, n, sr, nr = tiles.embed(x, ref)
    hp, hn = _thresholds(tiles, (x, s, n, ref, sr, nr))
    return hp.to(x.dtype), hn.to(x.dtype)


@torch.no_grad()
def multi_similarity_mask(x, labels, ref, ref_labels, *, epsilon, distance) -> PackedPairMask:
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance)
    s, n, sr, nr = tiles.embed(x, ref)
    xs = (x, s, n, ref, sr, nr)
    th = _thresholds(tiles, xs).contiguous()
    nout = (tiles.m + 7) // 8
    out_pos = torch.empty(tiles.n, nout, dtype=torch.uint8, device=x.device)
    out_neg = torch.empty_like(out_pos)
    c = tiles._common(*xs)
    kw = tiles.launch("tile")
    grid = (triton.cdiv(tiles.n, kw["BA"]), triton.cdiv(tiles.m, kw["BB"]))
    _mask_kernel[grid](*c, th, th.shape[-1], out_pos, out_neg, tiles.n, tiles.m, tiles.d, c[0].stride(0),
                       c[1].stride(0), float(epsilon), **kw, **tiles._flags())
    return PackedPairMask(out_pos, out_neg, tiles.m)
