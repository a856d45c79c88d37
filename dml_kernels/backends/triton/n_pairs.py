"""N-pairs loss on the tiled engine, without a host sync.

Per label with ≥2 samples the anchor is its lowest index and the positive its second lowest. Only the
anchors × positives block of the tile space matters, so the engine runs on ``rows`` (anchors first) against
``cols`` (positives first) of :func:`dml_kernels._pairs.n_pairs_block` — h × h with h = ceil(N/2) on the GPU
(a bound needing no sync; N²/4 instead of N²), h = K on the CPU — as a query set against a reference set, both
gathered from x (autograd sums both gradients back into x). With sv = v for a similarity and −v for a
distance, for each anchor row i: LSE_i over the positive columns of sv and the target sv(i, its positive);
loss = (1/K) Σ_anchors (LSE_i − target_i). Per-row statistics: [row is an anchor, column is a positive, LSE].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._pairs import n_pairs_block
from . import pair_engine
from .pair_engine import LSE, SUM


@triton.jit
def npairs_fwd(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    is_pos = tl.load(st + nst + ib, mask=ib < nb, other=0.0) > 0
    sv = pair_engine.sim_sign(DIST) * v
    cols = (pos | neg) & is_pos
    return tl.where(cols, sv, float("-inf")), tl.where(pos & is_pos, sv, 0.0), v, v, v, v


@triton.jit
def npairs_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    is_pos = tl.load(st + nst + ib, mask=ib < nb, other=0.0) > 0
    is_anchor = tl.load(st + ia, mask=ia < na, other=0.0) > 0
    lse = tl.load(st + 2 * nst + ia, mask=ia < na, other=0.0)
    sg = pair_engine.sim_sign(DIST)
    cols = (pos | neg) & is_pos & is_anchor
    w = tl.where(cols, tl.exp(sg * v - tl.where(is_anchor, lse, 0.0)), 0.0)
    w = w - tl.where(pos & is_pos & is_anchor, 1.0, 0.0)
    return w * (sg * tl.load(sc))


class NPairs(pair_engine.PairLossImpl):
    BWD = npairs_bwd
    NARROW = True  # the epilogue gathers per-column flags

    def __init__(self, row_is_anchor, col_is_positive):
        self.is_anchor, self.is_positive = row_is_anchor, col_is_positive

    def forward(self, tiles, xs):
        a = self.is_anchor.to(tiles.ct)
        flags = torch.stack([a, self.is_positive.to(tiles.ct)]).contiguous()
        out = tiles.row_stats(xs, npairs_fwd, (LSE, SUM), stats=flags)
        k = a.sum()
        scale = (k > 0).to(tiles.ct) / k.clamp_min(1)
        loss = torch.where(self.is_anchor, out[0] - out[1], 0).sum() * scale
        return loss, torch.cat([flags, out[:1]]).contiguous(), scale.reshape(1)

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux


def n_pairs_loss(x, labels, *, distance, pairs=None):
    if pairs is not None:
        raise pair_engine.Unsupported("the triton n_pairs_loss has no explicit-pair form")
    rows, cols, row_is_anchor, col_is_positive = n_pairs_block(labels)
    if rows.numel() == 0:  # no label has two samples (known on the host: the exact CPU cut)
        return (x * 0).sum().to(pair_engine.compute_dtype(x.dtype))
    return pair_engine.fused_loss(NPairs(row_is_anchor, col_is_positive), x[rows], labels[rows], x[cols], labels[cols],
                             distance)
