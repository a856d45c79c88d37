"""Direction regularisation (seed 002 eq. 33–35) on the CPU in O(block × M) memory: the ``cpu`` forms of
``direction_multi_similarity_loss``, ``direction_proxy_nca_loss`` and ``direction_triplet_margin_loss``.

No C++ is needed: every term of these losses is *row-local* — a query row's loss depends on its own row of
similarities only (its hardest positive, its multi-similarity mining thresholds, its LSEs) — so a block of
rows meets all M references at once through two BLAS tiles, G = Q_blk·Rᵀ and H = F_blk·Rᵀ (F the rows'
"positive" vectors: the anchor's hardest positive for multi-similarity, its own proxy for ProxyNCA), and the
Cos of difference vectors is a function of dot products (the reference's ``diff_cos``). The block's row
losses are formed while its tiles are hot.

They run on the row-block engine of ``row_blocks.py`` (forward under ``no_grad``, backward recomputes each
block; O(block × M) tiles, never N×M).

All triplets: anchor blocks × (J, K) chunks of the references, the (c, J, K) tile of eq. 33 per chunk; the
AvgNonZero count is a non-differentiable O(N) output. Batch-hard and given triplets: O(T·D) gathers after the
cpu ``batch_hard`` kernel. Explicit pairs for multi-similarity raise ``Unsupported`` (``auto`` → reference).
"""
from __future__ import annotations

import math

import torch

from ..._registry import Unsupported, register
from ..reference.direction import diff_cos
from ..reference.mining import multi_similarity_select
from ..reference.similarity import masked_log1p_sum_exp
from . import row_blocks as RB
from .common import _prep
from .row_blocks import ColumnLSE, _Blocks, column_chunks, row_blocks, spans, values


def hardest_positive(mat, pos, distance):
    """Per row: the hardest positive's index (ties to the lowest: ``argmax`` returns the first maximum) and
    whether the row has one — the reference's rule without its N×M index tile."""
    score = (-mat if distance.is_similarity else mat).masked_fill(~pos, float("-inf"))
    return score.argmax(1), pos.any(1)


def _ct(x):
    if not x.is_floating_point():
        raise Unsupported(f"the cpu direction losses compute in float32 or float64, not {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero(x, *others):
    z = (x * 0).sum()
    for o in others:
        if o is not None:
            z = z + (o * 0).sum().to(z.dtype)
    return z


# ----------------------------------------------------------------------------------------- multi-similarity


@register("direction_multi_similarity_loss", "cpu")
def direction_multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon=None, distance,
                                    pairs=None, pair_rule=True):
    if pairs is not None:
        raise Unsupported("the cpu direction_multi_similarity_loss has no explicit-pair form")
    ct = _ct(x)
    q, r, _ = _prep(x.to(ct), None if ref is None else ref.to(ct), distance)
    self_mode = r is None
    r = q if self_mode else r
    lab_r = labels if self_mode else ref_labels
    n, m = q.shape[0], r.shape[0]

    def fn(qb, lb, ib, rv, lr):
        g, mat, qq, rr = values(qb, rv, distance)
        same = lb[:, None] == lr[None, :]
        pos = same & (ib[:, None] != torch.arange(m)[None, :]) if self_mode else same
        neg = ~same
        if epsilon is not None:
            pos, neg = multi_similarity_select(mat.detach(), pos, neg, epsilon, distance)
        hp, has_p = hardest_positive(mat.detach(), pos, distance)
        f = rv[hp]
        cos = diff_cos(f @ rv.T, g, (qb * f).sum(1, keepdim=True), qq[:, None], rr[None, :],
                       (f * f).sum(1, keepdim=True))
        reg = (gamma * cos) * has_p[:, None]
        losses = (masked_log1p_sum_exp(alpha * distance.margin(mat, base), pos) / alpha
                  + masked_log1p_sum_exp(beta * (distance.margin(base, mat) - reg), neg) / beta)
        return losses, torch.stack([pos.sum(1), neg.sum(1)]).to(losses.dtype)

    blocks = row_blocks(n, m, 5, (True, True, True, False, False))
    losses, cnt = _Blocks.apply(fn, blocks, n, 2, q, labels, torch.arange(n), r, lab_r)
    loss = losses.mean()
    zero = _zero(x, ref).to(loss.dtype)
    if pair_rule:
        return torch.where((cnt[0].sum() <= 1) & (cnt[1].sum() <= 1), zero, loss)
    return loss + zero


# ----------------------------------------------------------------------------------------- ProxyNCA


@register("direction_proxy_nca_loss", "cpu")
def direction_proxy_nca_loss(x, labels, proxies, *, softmax_scale, gamma, exclude_positive=False, distance,
                             weights=None):
    ct = _ct(x)
    q, p, _ = _prep(x.to(ct), proxies.to(ct), distance)
    n, c = q.shape[0], p.shape[0]
    sg = 1.0 if distance.is_similarity else -1.0
    f = p[labels]  # each row's own proxy, O(N·D)

    def fn(qv, fv, lab, pc, ic):  # the N × chunk tile of σ s(a, p_c) − γ Cos(p_c − f_a, p_y − f_a)
        g, v, qq, pp = values(qv, pc, distance)
        cos = diff_cos(fv @ pc.T, g, (qv * fv).sum(1, keepdim=True), qq[:, None], pp[None, :],
                       (fv * fv).sum(1, keepdim=True))
        den = (softmax_scale * sg) * v - gamma * cos
        if exclude_positive:
            den = den.masked_fill(ic[None, :] == lab[:, None], float("-inf"))
        return den

    chunks = [(None, None, None, sl, sl) for sl in column_chunks(n, c)]
    lse = ColumnLSE.apply(fn, chunks, n, q, f, labels, p, torch.arange(c))
    losses = lse - (softmax_scale * sg) * _pair_values(q, f, distance)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.mean()


# ----------------------------------------------------------------------------------------- triplet (eq. 33)


def _pair_values(a, b, distance):
    """The distance's value between matched rows a_i, b_i (O(T·D))."""
    dot = (a * b).sum(1)
    if distance.is_similarity:
        return dot
    sq = ((a * a).sum(1) + (b * b).sum(1) - 2 * dot).clamp_min(0)
    if distance.squared:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


def _swap(an, pn, distance):
    return torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)


def _hinge(t, smooth_loss):
    return torch.nn.functional.softplus(t) if smooth_loss else torch.relu(t)


def _indexed_triplets(q, r, a, p, n, *, margin, gamma, swap, smooth_loss, distance):
    """h(margin(D_ap, D_an) + m − γ Cos) of the triplets (a, p, n), O(T·D)."""
    qa, fp, fn = q[a], r[p], r[n]
    ap, an = _pair_values(qa, fp, distance), _pair_values(qa, fn, distance)
    if swap:
        an = _swap(an, _pair_values(fp, fn, distance), distance)
    cos = diff_cos((fn * fp).sum(1), (qa * fn).sum(1), (qa * fp).sum(1), (qa * qa).sum(1), (fn * fn).sum(1),
                   (fp * fp).sum(1))
    return _hinge(distance.margin(ap, an) + margin - gamma * cos, smooth_loss)


def _avg_nonzero(losses, valid, zero):
    active = (losses > 0) & valid
    count = active.sum()
    total = losses.where(active, 0).sum()
    return torch.where(count > 0, total / count.clamp_min(1), zero.to(total.dtype))


def _all_triplets(q, r, labels, lab_r, self_mode, *, margin, gamma, swap, smooth_loss, distance):
    n, m = q.shape[0], r.shape[0]
    budget = min(RB.TILE, max(64, n * m // 16))  # ≥ 64: tiny batches need no finer cut
    jk = min(m, max(1, math.isqrt(budget)))
    c = max(1, min(n, budget // (jk * jk)))

    def fn(qc, lc, ic, rj, lj, ij, rk, lk, _ik):
        gj, ap, qq, rrj = values(qc, rj, distance)
        gk, an, _, rrk = values(qc, rk, distance)
        an = an[:, None, :]
        if swap:
            an = _swap(an, values(rj, rk, distance)[1][None], distance)
        cos = diff_cos((rj @ rk.T)[None], gk[:, None, :], gj[:, :, None], qq[:, None, None], rrk[None, None, :],
                       rrj[None, :, None])
        losses = _hinge(distance.margin(ap[:, :, None], an) + margin - gamma * cos, smooth_loss)
        pos = lc[:, None] == lj[None, :]
        if self_mode:
            pos = pos & (ic[:, None] != ij[None, :])
        neg = lc[:, None] != lk[None, :]
        counted = pos[:, :, None] & neg[:, None, :] & (losses > 0)
        return losses.where(counted, 0).sum((1, 2)), counted.sum((1, 2)).to(losses.dtype)[None]

    blocks = [((a0, a1), ((a0, a1), (a0, a1), (a0, a1), (j0, j1), (j0, j1), (j0, j1), (k0, k1), (k0, k1), (k0, k1)))
              for a0, a1 in spans(n, c) for j0, j1 in spans(m, jk) for k0, k1 in spans(m, jk)]
    idx_r = torch.arange(m)
    totals, cnt = _Blocks.apply(fn, blocks, n, 1, q, labels, torch.arange(n), r, lab_r, idx_r, r, lab_r, idx_r)
    count = cnt.sum()
    return totals.sum(), count


@register("direction_triplet_margin_loss", "cpu")
def direction_triplet_margin_loss(x, labels, ref, ref_labels, *, margin, gamma, swap=False, smooth_loss=False,
                                  mining=None, distance, triplets=None):
    ct = _ct(x)
    q, r, _ = _prep(x.to(ct), None if ref is None else ref.to(ct), distance)
    self_mode = r is None
    r = q if self_mode else r
    zero = _zero(x, ref)
    kw = dict(margin=margin, gamma=gamma, swap=swap, smooth_loss=smooth_loss, distance=distance)
    if triplets is not None:
        a, p, n = (t.to(x.device) for t in triplets)
        if len(a) == 0:
            return zero.to(ct)
        losses = _indexed_triplets(q, r, a, p, n, **kw)
        return _avg_nonzero(losses, torch.ones((), dtype=torch.bool), zero)
    if mining == "batch_hard":
        from .similarity import batch_hard_mining

        hp, hn = batch_hard_mining(x.detach(), labels, None if ref is None else ref.detach(), ref_labels,
                                   distance=distance)
        valid = hp >= 0
        a = torch.arange(q.shape[0])
        losses = _indexed_triplets(q, r, a, hp.clamp_min(0), hn.clamp_min(0), **kw)
        return _avg_nonzero(losses, valid, zero)
    total, count = _all_triplets(q, r, labels, labels if self_mode else ref_labels, self_mode, **kw)
    return torch.where(count > 0, total / count.clamp_min(1), zero.to(total.dtype))
