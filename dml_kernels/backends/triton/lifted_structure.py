"""Lifted-structure losses on the tiled engine: the generalized form (row LSEs) and PML's original
pair form, exact in O(B²) through per-row negative LSEs.

Generalized (sg = +1 similarity, −1 distance; margin(v, m_p) = −sg(v − m_p), margin(m_n, v) = sg(v − m_n)):

    loss = (1/N) Σ_i relu(LSE_{P_i} −sg(v − m_p) + LSE_{N_i} sg(v − m_n)),   empty LSE = 0

Lifted (self mode only): A_i = LSE_{N_i} sg(v − m_n); for an ordered positive pair (i, j),
T_ij = logaddexp(A_i, A_j) over the anchors that have negatives (0 if neither), h_ij = relu(T_ij − sg(v_ij − m_p)),
loss = (1/P) Σ ½ h_ij². The backward needs C_i = Σ_{j∈P_i} h_ij ∂T_ij/∂A_i, gathered in a second row pass;
pairs (i, j) and (j, i) both depend on A_i, so dL/dA_i = 2 C_i / P.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._pairs import PackedPairMask
from . import pair_engine
from .pair_engine import LSE, SUM


# -------------------------------------------------------------------------------- generalized lifted


@triton.jit
def gls_fwd(v, pos, neg, ia, ib, na, nb, st, nst, neg_margin, pos_margin, p2, p3, DIST: tl.constexpr,
            FLAG: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    tp = tl.where(pos, -sg * (v - pos_margin), float("-inf"))
    tn = tl.where(neg, sg * (v - neg_margin), float("-inf"))
    return tp, tn, pos.to(v.dtype), neg.to(v.dtype), v, v


@triton.jit
def gls_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, neg_margin, pos_margin, p2, p3, DIST: tl.constexpr,
            FLAG: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    inside = ia < na
    lp = tl.load(st + ia, mask=inside, other=0.0)
    ln = tl.load(st + nst + ia, mask=inside, other=0.0)
    gate = tl.load(st + 2 * nst + ia, mask=inside, other=0.0)
    wp = tl.where(pos, tl.exp(-sg * (v - pos_margin) - lp), 0.0)
    wn = tl.where(neg, tl.exp(sg * (v - neg_margin) - ln), 0.0)
    return (wn - wp) * (sg * gate * tl.load(sc))


class GeneralizedLifted(pair_engine.PairLossImpl):
    BWD = gls_bwd

    def __init__(self, neg_margin, pos_margin, pair_rule):
        self.params = (neg_margin, pos_margin, 0.0, 0.0)
        self.pair_rule = pair_rule

    def forward(self, tiles, xs):
        out = tiles.row_stats(xs, gls_fwd, (LSE, LSE, SUM, SUM), self.params)
        lp, ln = out[0], out[1]
        row = torch.where(out[2] > 0, lp, 0) + torch.where(out[3] > 0, ln, 0)
        keep = pair_engine.few_pairs_keep(out[2].sum(), out[3].sum(), self.pair_rule)
        loss = torch.relu(row).mean() * keep
        stats = torch.stack([lp, ln, (row > 0).to(row.dtype)])
        return loss, stats, (keep / tiles.n).reshape(1)

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux


def generalized_lifted_structure_loss(x, labels, ref, ref_labels, *, neg_margin, pos_margin, distance, pairs=None,
                                      pair_rule=True):
    if pairs is not None and not isinstance(pairs, PackedPairMask):
        raise pair_engine.Unsupported("the triton generalized_lifted_structure_loss takes pairs as a PackedPairMask")
    return pair_engine.fused_loss(GeneralizedLifted(neg_margin, pos_margin, pair_rule), x, labels, ref, ref_labels,
                             distance, pairs)


# ------------------------------------------------------------------------------------ lifted (pairs)


@triton.jit
def lifted_neg_fwd(v, pos, neg, ia, ib, na, nb, st, nst, neg_margin, pos_margin, p2, p3, DIST: tl.constexpr,
                   FLAG: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    tn = tl.where(neg, sg * (v - neg_margin), float("-inf"))
    return tn, neg.to(v.dtype), pos.to(v.dtype), v, v, v


@triton.jit
def _pair_term(ia, ib, na, nb, st, nst):
    """(T, ∂T/∂A_anchor): logaddexp over {A_a if a has negatives, A_b if b has negatives}, 0 if neither."""
    a_a = tl.load(st + ia, mask=ia < na, other=0.0)
    h_a = tl.load(st + nst + ia, mask=ia < na, other=0.0) > 0
    a_b = tl.load(st + ib, mask=ib < nb, other=0.0)
    h_b = tl.load(st + nst + ib, mask=ib < nb, other=0.0) > 0
    a_a = tl.where(h_a, a_a, float("-inf"))
    a_b = tl.where(h_b, a_b, float("-inf"))
    top = tl.maximum(a_a, a_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    e_a = tl.exp(a_a - top)
    e_b = tl.exp(a_b - top)
    total = e_a + e_b
    any_neg = h_a | h_b
    t = tl.where(any_neg, top + tl.log(tl.where(any_neg, total, 1.0)), 0.0)
    w_a = tl.where(any_neg, e_a / tl.where(any_neg, total, 1.0), 0.0)
    return t, w_a


@triton.jit
def lifted_pos_fwd(v, pos, neg, ia, ib, na, nb, st, nst, neg_margin, pos_margin, p2, p3, DIST: tl.constexpr,
                   FLAG: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    t, w_a = _pair_term(ia, ib, na, nb, st, nst)
    h = tl.where(pos, tl.maximum(t - sg * (v - pos_margin), 0.0), 0.0)
    return 0.5 * h * h, h * w_a, v, v, v, v


@triton.jit
def lifted_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, neg_margin, pos_margin, p2, p3, DIST: tl.constexpr,
               FLAG: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    t, w_a = _pair_term(ia, ib, na, nb, st, nst)
    h = tl.where(pos, tl.maximum(t - sg * (v - pos_margin), 0.0), 0.0)
    inside = ia < na
    a_a = tl.load(st + ia, mask=inside, other=0.0)
    c_a = tl.load(st + 2 * nst + ia, mask=inside, other=0.0)
    wn = tl.where(neg, 2.0 * c_a * tl.exp(sg * (v - neg_margin) - a_a), 0.0)
    return (wn - h) * (sg * tl.load(sc))


class Lifted(pair_engine.PairLossImpl):
    BWD = lifted_bwd

    def __init__(self, neg_margin, pos_margin, pair_rule):
        self.params = (neg_margin, pos_margin, 0.0, 0.0)
        self.pair_rule = pair_rule

    def forward(self, tiles, xs):
        first = tiles.row_stats(xs, lifted_neg_fwd, (LSE, SUM, SUM), self.params)
        a, n_neg, n_pos = first[0], first[1], first[2]
        st = torch.stack([a, n_neg]).contiguous()
        second = tiles.row_stats(xs, lifted_pos_fwd, (SUM, SUM), self.params, stats=st)
        total_pos, total_neg = n_pos.sum(), n_neg.sum()
        keep = ((total_pos > 0) & (total_neg > 0)).to(a.dtype) * pair_engine.few_pairs_keep(total_pos, total_neg,
                                                                                       self.pair_rule)
        scale = keep / total_pos.clamp_min(1)
        loss = second[0].sum() * scale
        stats = torch.stack([a, n_neg, second[1]])
        return loss, stats, scale.reshape(1)

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux


def lifted_structure_loss(x, labels, *, neg_margin, pos_margin, distance, pairs=None, pair_rule=True, ref=None,
                          ref_labels=None):
    if ref is not None:
        raise pair_engine.Unsupported("the triton lifted_structure_loss has no reference-set form")
    if pairs is not None:
        raise pair_engine.Unsupported("the triton lifted_structure_loss has no explicit-pair form")
    return pair_engine.fused_loss(Lifted(neg_margin, pos_margin, pair_rule), x, labels, None, None, distance)
