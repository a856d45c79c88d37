"""Triplet margin loss on the tiled engine, over every valid triplet without the N×M×M set.

With sg = +1 for a similarity and −1 for a distance, the violation of (a, p, n) is
t = sg(v_an − v_ap) + margin and the loss is AvgNonZero over valid triplets of h(t) (relu, or softplus
with ``smooth_loss``). Per anchor block I the forward streams a positive tile J and, inside it, a
negative tile K, and reduces the (BA, BB, BB) block of violations to per-row sums and counts.

The gradient of a pair (a, k) is (1/count)·sg·(Σ_{p} h'(t_apk) [k negative] − Σ_{n} h'(t_akn) [k positive]),
a sum over the anchor's other references, so it is not an O(1) row statistic: the engine's gradient
kernel runs with :func:`_triplet_grad_tile` as its tile gradient, which computes the (I, J) weights by
streaming K tiles. Its row form accumulates dX_I; its column form the reference side (dRef, or the Gᵀ
half of dX in self mode). Both cost about one forward each; no atomics.

``mining="batch_hard"``: the fused batch-hard miner gives one (p, n) per anchor; the O(N·D) tail
(gathered pair distances, hinge, AvgNonZero) is plain autograd, so the backward is a gather/scatter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pair_engine
from .similarity import batch_hard_indices


@triton.jit
def _hinge(t, SMOOTH: tl.constexpr):
    """(h(t), h'(t)): relu, or torch's softplus (threshold 20) with an accurate log1p."""
    if SMOOTH:
        e = tl.exp(tl.minimum(t, 20.0))
        u = 1.0 + e
        log1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        h = tl.where(t > 20.0, t, log1p)
        dh = tl.where(t > 20.0, 1.0, e / u)
    else:
        h = tl.maximum(t, 0.0)
        dh = tl.where(t > 0, 1.0, 0.0)
    return h, dh


@triton.jit
def _triplet_fwd_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                        out_ptr, N, M, D, stride_x, stride_r, margin,
                        SMOOTH: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
                        HAS_PAIRS: tl.constexpr, DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                        BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    sg = pair_engine.sim_sign(DIST)
    total = tl.zeros((BA,), CT)
    count = tl.zeros((BA,), CT)
    for j0 in range(0, M, BB):
        offs_j = j0 + tl.arange(0, BB)
        s_j, n_j, lab_j = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_j, M, HAS_LABELS)
        v_j = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_j, s_a, s_j, n_a, n_j, N, M, D, stride_x, stride_r,
                                DIST, BA, BB, BD, PREC)
        pos_j, neg_j = pair_engine.pair_masks(lab_a, lab_j, offs_a, offs_j, N, M, pos_bits, neg_bits, nbytes,
                                     SELF, HAS_LABELS, HAS_PAIRS, False)
        for k0 in range(0, M, BB):
            offs_k = k0 + tl.arange(0, BB)
            s_k, n_k, lab_k = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_k, M, HAS_LABELS)
            v_k = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_k, s_a, s_k, n_a, n_k, N, M, D, stride_x,
                                    stride_r, DIST, BA, BB, BD, PREC)
            pos_k, neg_k = pair_engine.pair_masks(lab_a, lab_k, offs_a, offs_k, N, M, pos_bits, neg_bits, nbytes,
                                         SELF, HAS_LABELS, HAS_PAIRS, False)
            t = sg * (v_k[:, None, :] - v_j[:, :, None]) + margin
            h, dh = _hinge(t, SMOOTH)
            act = pos_j[:, :, None] & neg_k[:, None, :] & (h > 0)
            total += tl.sum(tl.sum(tl.where(act, h, 0.0), axis=2), axis=1)
            count += tl.sum(tl.sum(act.to(CT), axis=2), axis=1)
    inside = offs_a < N
    tl.store(out_ptr + offs_a, total, mask=inside)
    tl.store(out_ptr + N + offs_a, count, mask=inside)


@triton.jit
def _pair_weights(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, pos_bits, neg_bits, nbytes, N, M, D, stride_x, stride_r,
                  offs_a, offs_j, s_a, n_a, lab_a, v_j, pos_j, neg_j, margin,
                  SMOOTH: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr,
                  DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dL/dv for the (I, J) tile up to the 1/count factor, streaming the anchors' other references K."""
    CT: tl.constexpr = v_j.dtype
    sg = pair_engine.sim_sign(DIST)
    as_pos = tl.zeros((BA, BB), CT)  # Σ_n h'(t_a j n) for j a positive
    as_neg = tl.zeros((BA, BB), CT)  # Σ_p h'(t_a p j) for j a negative
    for k0 in range(0, M, BB):
        offs_k = k0 + tl.arange(0, BB)
        s_k, n_k, lab_k = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_k, M, HAS_LABELS)
        v_k = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_k, s_a, s_k, n_a, n_k, N, M, D, stride_x, stride_r,
                                DIST, BA, BB, BD, PREC)
        pos_k, neg_k = pair_engine.pair_masks(lab_a, lab_k, offs_a, offs_k, N, M, pos_bits, neg_bits, nbytes,
                                         SELF, HAS_LABELS, HAS_PAIRS, False)
        h1, d1 = _hinge(sg * (v_k[:, None, :] - v_j[:, :, None]) + margin, SMOOTH)  # (a, j positive, k negative)
        as_pos += tl.sum(tl.where(pos_j[:, :, None] & neg_k[:, None, :] & (h1 > 0), d1, 0.0), axis=2)
        h2, d2 = _hinge(sg * (v_j[:, None, :] - v_k[:, :, None]) + margin, SMOOTH)  # (a, k positive, j negative)
        as_neg += tl.sum(tl.where(pos_k[:, :, None] & neg_j[:, None, :] & (h2 > 0), d2, 0.0), axis=1)
    return sg * (as_neg - as_pos)


@triton.jit
def _triplet_grad_tile(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_a, offs_j, s_a, s_j, n_a, n_j, lab_a, lab_j,
                       pos_bits, neg_bits, nbytes, st_ptr, nst, sc_ptr, N, M, D, stride_x, stride_r,
                       margin, p1, p2, p3, BWD: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
                       HAS_PAIRS: tl.constexpr, DIST: tl.constexpr, SMOOTH: tl.constexpr, BA: tl.constexpr,
                       BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """The ``TILE_GRAD`` of the engine's gradient kernel for all triplets: recompute the (I, J) tile, weigh
    it by streaming the anchors' other references K (:func:`_pair_weights`), scale by 1/count (``sc``),
    chain through the distance. (p0 = margin, FLAG = smooth_loss; ``BWD`` and the statistics are unused.)"""
    v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_j, s_a, s_j, n_a, n_j, N, M, D, stride_x, stride_r,
                          DIST, BA, BB, BD, PREC)
    pos, neg = pair_engine.pair_masks(lab_a, lab_j, offs_a, offs_j, N, M, pos_bits, neg_bits, nbytes,
                                 SELF, HAS_LABELS, HAS_PAIRS, False)
    w = _pair_weights(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, pos_bits, neg_bits, nbytes, N, M, D, stride_x,
                      stride_r, offs_a, offs_j, s_a, n_a, lab_a, v, pos, neg, margin, SMOOTH, SELF,
                      HAS_LABELS, HAS_PAIRS, DIST, BA, BB, BD, PREC) * tl.load(sc_ptr)
    return pair_engine.chain(w, v, DIST)


class AllTriplets(pair_engine.PairLossImpl):
    def __init__(self, margin, smooth_loss):
        self.margin, self.smooth = margin, smooth_loss

    def forward(self, tiles, xs):
        c = tiles._common(*xs)
        out = torch.empty(2, tiles.n, dtype=tiles.ct, device=tiles.device)
        _triplet_fwd_kernel[(triton.cdiv(tiles.n, tiles.blocks("triplet").ba),)](
            *c, out, tiles.n, tiles.m, tiles.d, c[0].stride(0), c[1].stride(0), float(self.margin),
            SMOOTH=self.smooth, **tiles.launch("triplet"), **tiles._flags())
        total, count = out.sum(1)
        scale = (count > 0).to(tiles.ct) / count.clamp_min(1)
        return total * scale, torch.zeros(1, 1, dtype=tiles.ct, device=tiles.device), scale.reshape(1)

    def grad_scalars(self, g, aux):
        return g.reshape(1) * aux

    def grad(self, tiles, xs, stats, sc, need_x, need_r):
        def side(columns):
            return tiles.grad_side(xs, columns, None, stats, sc, (self.margin, 0.0, 0.0, 0.0), int(self.smooth),
                                   tile_grad=_triplet_grad_tile, kind="triplet")

        acc = dn = acc_r = dn_r = None
        if need_x:
            acc, dn = side(False)
            if tiles.self_mode:  # the reference side of every pair is x too
                acc_c, dn_c = side(True)
                acc, dn = acc + acc_c, dn + dn_c
        if need_r:
            acc_r, dn_r = side(True)
        return acc, dn, acc_r, dn_r


def pair_values(x, r, i, k, distance):
    """v(x_i, r_k) for index vectors (O(len·D), plain autograd), the same formula as the kernels."""
    ct = pair_engine.compute_dtype(x.dtype)
    q, p = x[i].to(ct), r[k].to(ct)
    if distance.normalize:
        q, p = F.normalize(q, dim=1), F.normalize(p, dim=1)
    c = (q * p).sum(1)
    if distance.is_similarity:
        return c
    sq = ((q * q).sum(1) + (p * p).sum(1) - 2 * c).clamp_min(0)
    if distance.squared:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


def _batch_hard_loss(x, labels, ref, ref_labels, margin, swap, smooth_loss, distance):
    hard_pos, hard_neg = batch_hard_indices(x.detach(), labels, None if ref is None else ref.detach(), ref_labels,
                                            distance)
    r = x if ref is None else ref
    a = torch.arange(x.shape[0], device=x.device)
    p, n = hard_pos.clamp_min(0), hard_neg.clamp_min(0)
    ap, an = pair_values(x, r, a, p, distance), pair_values(x, r, a, n, distance)
    if swap:
        pn = pair_values(r, r, p, n, distance)
        an = torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)
    sg = 1.0 if distance.is_similarity else -1.0
    t = sg * (an - ap) + margin
    losses = (F.softplus(t) if smooth_loss else F.relu(t)) * (hard_pos >= 0)
    active = losses > 0
    count = active.sum()
    total = losses.where(active, 0).sum()
    zero = (x * 0).sum().to(total.dtype) + (0 if ref is None else (ref * 0).sum().to(total.dtype))
    return torch.where(count > 0, total / count.clamp_min(1), zero)


def triplet_margin_loss(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                        distance, triplets=None):
    if triplets is not None:
        raise pair_engine.Unsupported("the triton triplet_margin_loss has no explicit-triplet form")
    if mining == "batch_hard":
        return _batch_hard_loss(x, labels, ref, ref_labels, margin, swap, smooth_loss, distance)
    if swap:
        raise pair_engine.Unsupported("the triton all-triplets triplet_margin_loss does not support swap=True")
    return pair_engine.fused_loss(AllTriplets(margin, smooth_loss), x, labels, ref, ref_labels, distance)
