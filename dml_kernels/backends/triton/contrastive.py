"""Contrastive loss on the tiled engine: AvgNonZero_pos[−sg(v − m_p)]₊ + AvgNonZero_neg[sg(v − m_n)]₊.

Per-row sums and counts of the strictly positive hinge terms (and pair counts for PML's ≤1-pair rule)
are reduced on the device; the backward weight of a pair is ±1/count where its hinge is active.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pair_engine
from .pair_engine import SUM


@triton.jit
def _hinges(v, pos, neg, pos_margin, neg_margin, DIST: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    hp = tl.where(pos, tl.maximum(-sg * (v - pos_margin), 0.0), 0.0)
    hn = tl.where(neg, tl.maximum(sg * (v - neg_margin), 0.0), 0.0)
    return hp, hn


@triton.jit
def contrastive_fwd(v, pos, neg, ia, ib, na, nb, st, nst, pos_margin, neg_margin, p2, p3, DIST: tl.constexpr,
                    FLAG: tl.constexpr):
    hp, hn = _hinges(v, pos, neg, pos_margin, neg_margin, DIST)
    return hp, (hp > 0).to(v.dtype), hn, (hn > 0).to(v.dtype), pos.to(v.dtype), neg.to(v.dtype)


@triton.jit
def contrastive_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, pos_margin, neg_margin, p2, p3, DIST: tl.constexpr,
                    FLAG: tl.constexpr):
    hp, hn = _hinges(v, pos, neg, pos_margin, neg_margin, DIST)
    sg = pair_engine.sim_sign(DIST)
    return sg * (tl.where(hn > 0, tl.load(sc + 1), 0.0) - tl.where(hp > 0, tl.load(sc), 0.0))


class Contrastive(pair_engine.PairLossImpl):
    BWD = contrastive_bwd

    def __init__(self, pos_margin, neg_margin, pair_rule):
        self.params = (pos_margin, neg_margin, 0.0, 0.0)
        self.pair_rule = pair_rule

    def forward(self, tiles, xs):
        out = tiles.row_stats(xs, contrastive_fwd, (SUM,) * 6, self.params).sum(1)
        keep = pair_engine.few_pairs_keep(out[4], out[5], self.pair_rule)
        inv = keep / out[[1, 3]].clamp_min(1)  # AvgNonZero: a term with no active hinge is 0
        loss = out[0] * inv[0] + out[2] * inv[1]
        return loss, torch.zeros(1, 1, dtype=tiles.ct, device=tiles.device), inv

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux


def contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs=None, pair_rule=True):
    if pairs is not None:
        raise pair_engine.Unsupported("the triton contrastive_loss has no explicit-pair form")
    return pair_engine.fused_loss(Contrastive(pos_margin, neg_margin, pair_rule), x, labels, ref, ref_labels, distance)
