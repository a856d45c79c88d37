"""TupletMargin, Margin and SNR-contrastive losses on the CPU in O(block × M) memory: the ``cpu`` forms of
``tuplet_margin_loss``, ``margin_loss`` and ``snr_contrastive_loss`` (semantics: PML 2.9, as the reference
backend's ``contrastive_losses.py``).

No C++ is needed: every term is a function of one query row's own similarities plus O(N) row statistics, so
row blocks meet all M references through one BLAS tile and form their row terms while it is hot:

* TupletMargin — per anchor a: L_a = LSE over its negatives of scale·s_an; per positive pair (a, p)
  softplus(L_a − scale·cos(acos s_ap − margin)) (0 without a negative), summed in the block: never a
  per-pair (O(P)) buffer. Mean over the positive pairs.
* MarginLoss over all triplets — triplet (a, p, n) contributes relu(margin(d_ap, β_a) + m) +
  relu(margin(β_a, d_an) + m), so the pair (a, p) appears |N_a| times and (a, n) |P_a| times: a row's value is
  |N_a|·Σ_P h⁺ + |P_a|·Σ_N h⁻, and PML's divisor (the number of nonzero terms over the triplets) is
  Σ_a |N_a|·#{h⁺ > 0} + |P_a|·#{h⁻ > 0}, from exact per-row counts (int64 totals). β_a = beta[labels[a]] for
  a per-class β (gradient to β through the gather); ν·β as PML's regulariser (already reduced for a scalar
  β; Σ_triplets ν·β_a / divisor per class). Given triplets: O(T) gathers (``_PairDots``), T being the input.

* SNR contrastive — var(q − r)/var(q) (PML's SNRDistance: unbiased variances; the ÷(D − 1) cancels) is
  (‖c_q‖² + ‖c_r‖² − 2·c_q·c_r)/‖c_q‖² with c the row minus its mean: a tile of centred dot products plus O(N)
  row norms; exactly 0 for bitwise-equal rows, as PML's (``_equal_row_ids``: else a rounding residue that
  pos_margin = 0 would count in AvgNonZero). Two AvgNonZero means (positive and negative pairs): each block returns both row sums, laid out
  as out[2·r0 : 2·r1] = (positive sums, negative sums).

TupletMargin and Margin form their gradient while each tile is hot (the loss is a scalar; three GEMMs a block,
no recompute; O((N + M)·D) kept), SNR recomputes its blocks backward on the engine.

Explicit pair tuples for TupletMargin / SNR (PML counts duplicated pairs) raise ``Unsupported`` (``auto`` →
reference). No host sync; double backward raises (the engine's rule).
"""
from __future__ import annotations

import math

import torch

from ..._registry import Unsupported, register
from .common import _NormalizeRows, _kernel_dtype, _out, _prep, _zero
from .contrastive_losses import _PairDots
from .library import refuse_double_backward
from .row_blocks import _Blocks, block_rows, spans


def _engine_blocks(n, m, part):
    """Row spans of 1/part of the engine's block (≤ 1/16 of N×M; a block keeps several tiles alive, so at
    N = 2048 a full block would peak near one N×M matrix), yet ≥ 2^16 elements where the engine's block allows
    (tiny blocks cost more in per-op overhead than their GEMMs)."""
    full = block_rows(n, m)
    return spans(n, max(1, full // part, min(full, (1 << 16) // max(m, 1))))


def _no_pairs(op, pairs):
    if pairs is not None:
        raise Unsupported(f"the cpu {op} takes no explicit pairs (PML counts duplicated pairs); "
                          "backend='auto' runs the reference")


def _masks(lb, ib, lr, self_mode):
    """(pos, neg) of a block: same label (the (i, i) pair excluded in self mode) / different label."""
    same = lb[:, None] == lr[None, :]
    pos = same & (ib[:, None] != torch.arange(lr.shape[0])[None, :]) if self_mode else same
    return pos, ~same


def _setup(q, r, labels, ref_labels):
    self_mode = r is None
    return self_mode, (q if self_mode else r), (labels if self_mode else ref_labels)


# ----------------------------------------------------------------------------------------- TupletMargin


class _Tuplet(torch.autograd.Function):
    """(Σ over positive pairs of softplus(L_a − scale·c_ap), counts (2, N): positives, negatives per row) with
    c = cos(acos s − margin) = s·cos m + √(1 − s²)·sin m and L_a = LSE_{N_a} scale·s_an; s a similarity tile.

    The loss is a scalar, so its gradient is formed while each tile is hot (no recompute, three GEMMs a block):
    ∂/∂s_an = scale·A_a·softmax_{N_a}(scale·s)_n with A_a = Σ_{P_a} σ(u_ap), u = L_a − scale·c_ap, and
    ∂/∂s_ap = −scale·σ(u_ap)·(cos m − s·sin m / √(1 − s²)); then dq = W·R, dR = Wᵀ·Q_blk. Kept: O((N + M)·D)."""

    @staticmethod
    def forward(ctx, q, r, labels, lr, self_mode, scale, margin):
        n, m = q.shape[0], r.shape[0]
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = torch.zeros_like(q) if need_q else None
        dr = torch.zeros_like(r) if need_r else None
        cm, sm = math.cos(margin), math.sin(margin)
        total = q.new_zeros(())
        cnt = q.new_zeros(2, n)
        for r0, r1 in _engine_blocks(n, m, 2):  # ~7 tiles live
            qb, lb = q[r0:r1], labels[r0:r1]
            s = qb @ r.T
            same = lb[:, None] == lr[None, :]
            n_same = same.sum(1)
            e = torch.where(same, float("-inf"), s).mul_(scale)
            mx = e.amax(1, keepdim=True)
            has_neg = mx > float("-inf")
            e.sub_(mx.where(has_neg, 0)).exp_()  # e^{z − max} on the negatives, 0 elsewhere
            se = e.sum(1, keepdim=True)
            lse = (mx + se.log()).where(has_neg, 0)  # a row without a negative has no term
            if self_mode:
                k = torch.arange(r1 - r0)
                same[k, k + r0] = False
            pos = same.logical_and_(has_neg).to(s.dtype)  # the positive pairs that carry a term
            del same
            sp = s.mul_(pos)  # s on them, a safe 0 elsewhere
            sin_t = sp.square().neg_().add_(1).sqrt_()
            u = torch.mul(sp, cm).add_(sin_t, alpha=sm).mul_(-scale).add_(lse)  # L − scale·c
            t = torch.logaddexp(u, torch.zeros((), dtype=u.dtype)).mul_(pos)
            total = total + t.sum()
            del t
            cnt[0, r0:r1] = n_same - 1 if self_mode else n_same
            cnt[1, r0:r1] = m - n_same
            if need_q or need_r:
                sig = u.sigmoid_().mul_(pos)
                del pos
                big_a = sig.sum(1, keepdim=True)
                # W = scale·A·e/se (negatives) − scale·σ·(cos m − s·sin m/√(1 − s²)) (positives)
                w = e.mul_(scale * big_a / se.where(has_neg, 1))
                w.addcmul_(sig, sp.div_(sin_t).mul_(sm).sub_(cm), value=scale)
                del sig, sin_t, sp
                if need_q:
                    dq[r0:r1] = w @ r
                if need_r:
                    dr.addmm_(w.T, qb)
        ctx.save_for_backward(dq, dr)
        ctx.mark_non_differentiable(cnt)
        return total, cnt

    @staticmethod
    def backward(ctx, g, _g_cnt):
        refuse_double_backward("cpu tuplet_margin_loss")
        dq, dr = ctx.saved_tensors
        return (None if dq is None else dq * g, None if dr is None else dr * g, None, None, None, None, None)


@register("tuplet_margin_loss", "cpu")
def tuplet_margin_loss(x, labels, ref, ref_labels, *, margin, scale, distance, pairs=None, pair_rule=True):
    _no_pairs("tuplet_margin_loss", pairs)
    if not distance.is_similarity:
        raise Unsupported("the cpu tuplet_margin_loss takes a similarity (PML asserts CosineSimilarity)")
    q, r, _ = _prep(x, ref, distance)
    self_mode, rr, lr = _setup(q, r, labels, ref_labels)
    total, cnt = _Tuplet.apply(q, rr, labels, lr, self_mode, float(scale), float(margin))
    n_pos, n_neg = cnt[0].sum(), cnt[1].sum()
    zero = _zero(x).to(total.dtype)
    loss = total / n_pos.clamp_min(1)
    bad = (n_pos == 0) | (n_neg == 0)
    if pair_rule:
        bad = bad | ((n_pos <= 1) & (n_neg <= 1))
    return _out(torch.where(bad, zero, loss), x)


# ----------------------------------------------------------------------------------------- MarginLoss


def _pair_values(q, r, a, b, distance):
    """The distance's value of the listed pairs (q[a_t], r[b_t]): O(T) memory (``_PairDots``)."""
    dot = _PairDots.apply(q, r, a, b)
    if distance.is_similarity:
        return dot
    sq = (torch.linalg.vecdot(q, q)[a] + torch.linalg.vecdot(r, r)[b] - 2 * dot).clamp_min(0)
    if distance.squared:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


def _margin_given(q, rr, labels, beta_c, per_class, triplets, *, margin, nu, learn_beta, distance, zero):
    a, p, n = (t.to(q.device) for t in triplets)
    if a.shape[0] == 0:
        return zero
    b = beta_c[labels[a]] if per_class else beta_c
    pos_loss = torch.relu(distance.margin(_pair_values(q, rr, a, p, distance), b) + margin)
    neg_loss = torch.relu(distance.margin(b, _pair_values(q, rr, a, n, distance)) + margin)
    divisor = (pos_loss > 0).sum() + (neg_loss > 0).sum()
    total = pos_loss.sum() + neg_loss.sum()
    if learn_beta and per_class:
        total = total + nu * b.sum()
    loss = torch.where(divisor > 0, total / divisor.clamp_min(1), zero)
    if learn_beta and not per_class:
        loss = loss + nu * beta_c.reshape(())
    return loss


class _MarginAll(torch.autograd.Function):
    """(Σ_a |N_a|·Σ_{P_a} h⁺ + |P_a|·Σ_{N_a} h⁻, int64 counts (4, N): |P_a|, |N_a|, #{h⁺ > 0}, #{h⁻ > 0}) over all
    triplets, h⁺ = relu(margin(d, β_a) + m), h⁻ = relu(margin(β_a, d) + m) = relu(2m − (margin(d, β_a) + m)).

    A scalar, so the gradient is formed while each tile is hot (three GEMMs a block, no recompute): ∂/∂d is
    sg·[h > 0]·(|N_a| on a positive, −|P_a| on a negative) (sg = +1 for a distance, −1 for a similarity), chained
    through the distance (euclidean: /2d, 0 at d = 0; squared: the ‖·‖² terms as row / column sums);
    ∂/∂β_a = −sg·(|N_a|·#{h⁺ > 0} − |P_a|·#{h⁻ > 0})."""

    @staticmethod
    def forward(ctx, q, r, b_row, labels, lr, self_mode, margin, distance):
        n, m = q.shape[0], r.shape[0]
        need_q, need_r, need_b = ctx.needs_input_grad[:3]
        grads = need_q or need_r
        dq = torch.zeros_like(q) if need_q else None
        dr = torch.zeros_like(r) if need_r else None
        db = torch.zeros_like(b_row) if need_b else None
        sg = -1.0 if distance.is_similarity else 1.0
        rr = torch.linalg.vecdot(r, r)
        total = q.new_zeros(())
        cnt = torch.zeros(4, n, dtype=torch.int64)
        for r0, r1 in _engine_blocks(n, m, 2):
            qb, lb, bb = q[r0:r1], labels[r0:r1], b_row[r0:r1]
            g = qb @ r.T
            if distance.is_similarity:
                d = g
            else:
                pre = g.mul_(-2).add_(torch.linalg.vecdot(qb, qb)[:, None]).add_(rr[None, :])
                live = pre >= 0  # the clamp's gradient mask (torch's clamp_min passes at equality)
                d = pre.clamp_min_(0)
                if not distance.squared:
                    d = d.sqrt_()
            same = lb[:, None] == lr[None, :]
            n_same = same.sum(1)
            n_pos = n_same - 1 if self_mode else n_same
            n_neg = m - n_same
            a = torch.mul(d, sg).add_((margin - sg * bb)[:, None])  # margin(d, β) + m
            h = torch.where(same, a, 2 * margin - a).clamp_min_(0)  # each pair's hinge in its role
            del a
            if self_mode:
                k = torch.arange(r1 - r0)
                h[k, k + r0] = 0  # (a, a) is neither a positive nor a negative pair
            act = h > 0
            hp = h * same
            k_pos = (hp > 0).sum(1)
            k_neg = act.sum(1) - k_pos
            total = total + (n_neg * hp.sum(1) + n_pos * h.sub_(hp).sum(1)).sum()  # h − hp: exact negatives' part
            del h, hp
            cnt[0, r0:r1], cnt[1, r0:r1], cnt[2, r0:r1], cnt[3, r0:r1] = n_pos, n_neg, k_pos, k_neg
            if need_b:
                db[r0:r1] = -sg * (n_neg * k_pos - n_pos * k_neg).to(q.dtype)
            if not grads:
                continue
            w = torch.where(same, n_neg[:, None].to(q.dtype), -n_pos[:, None].to(q.dtype)).mul_(act).mul_(sg)
            del act, same
            if not distance.is_similarity:
                if distance.squared:
                    w.mul_(live)
                else:
                    nz = d > 0
                    w.div_(torch.where(nz, 2 * d, 1)).mul_(nz)
                w.mul_(-2)  # ∂‖q − r‖²/∂(q·r); the ‖q‖², ‖r‖² terms: row / column sums below
            if need_q:
                dq[r0:r1] = w @ r
                if not distance.is_similarity:
                    dq[r0:r1] -= w.sum(1)[:, None] * qb
            if need_r:
                dr.addmm_(w.T, qb)
                if not distance.is_similarity:
                    dr -= w.sum(0)[:, None] * r
        ctx.save_for_backward(dq, dr, db)
        ctx.mark_non_differentiable(cnt)
        return total, cnt

    @staticmethod
    def backward(ctx, g, _g_cnt):
        refuse_double_backward("cpu margin_loss")
        return tuple(None if t is None else t * g for t in ctx.saved_tensors) + (None,) * 5


@register("margin_loss", "cpu")
def margin_loss(x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance, triplets=None):
    q, r, _ = _prep(x, ref, distance)
    self_mode, rr, lr = _setup(q, r, labels, ref_labels)
    beta_c = beta.to(q.dtype)
    per_class = beta.numel() != 1
    margin, nu = float(margin), float(nu)
    zero = _zero(x).to(q.dtype) + (beta * 0).sum().to(q.dtype)
    if triplets is not None:
        loss = _margin_given(q, rr, labels, beta_c, per_class, triplets, margin=margin, nu=nu, learn_beta=learn_beta,
                             distance=distance, zero=zero)
        return _out(loss, x)
    n = q.shape[0]
    b_row = beta_c[labels] if per_class else beta_c.reshape(1).expand(n)
    total, cnt = _MarginAll.apply(q, rr, b_row, labels, lr, self_mode, margin, distance)
    c = cnt
    mult = c[0] * c[1]  # triplets per anchor
    divisor = (c[1] * c[2]).sum() + (c[0] * c[3]).sum()
    if learn_beta and per_class:
        total = total + nu * (mult.to(b_row.dtype) * b_row).sum()
    loss = torch.where(divisor > 0, total / divisor.clamp_min(1).to(total.dtype), zero)
    if learn_beta and not per_class:
        loss = loss + nu * beta_c.reshape(())
    return _out(torch.where(mult.sum() > 0, loss, zero), x)


# ----------------------------------------------------------------------------------------- SNR contrastive


def _centred(v, normalize):
    """(centred rows, their squared norms, the rows PML's SNRDistance subtracts: normalised or raw)."""
    if normalize:
        v = _NormalizeRows.apply(v, 1e-12)
    c = v - v.mean(1, keepdim=True)
    return c, torch.linalg.vecdot(c, c), v


def _equal_row_ids(q, r):
    """int64 ids of the rows of q (and r) such that bitwise-equal rows share an id and different rows never do:
    the rows sorted by a fingerprint (a weighted row sum), each compared exactly with its predecessor (O((N + M)·D),
    a sort, no host sync). Equal rows whose fingerprints tie with a different row's may get different ids (then
    their distance is the expansion's rounding residue, as without ids) — never a false match."""
    rows = (q if r is None else torch.cat([q, r])).detach()
    key = (rows * torch.linspace(1, 2, rows.shape[1], dtype=rows.dtype)).sum(1)
    order = torch.argsort(key, stable=True)
    srt = rows[order]
    new = torch.ones(rows.shape[0], dtype=torch.long)
    new[1:] = (srt[1:] != srt[:-1]).any(1)
    ids = torch.empty_like(new).scatter_(0, order, torch.cumsum(new, 0) - 1)
    return ids[: q.shape[0]], (ids if r is None else ids[q.shape[0]:])


@register("snr_contrastive_loss", "cpu")
def snr_contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize=True, pairs=None,
                         pair_rule=True):
    _no_pairs("snr_contrastive_loss", pairs)
    dt = _kernel_dtype(x)
    cq, nq, vq = _centred(x.to(dt), normalize)
    self_mode = ref is None
    cr, nr, vr = (cq, nq, None) if self_mode else _centred(ref.to(dt), normalize)
    lr = labels if self_mode else ref_labels
    n, m = cq.shape[0], cr.shape[0]
    pos_margin, neg_margin = float(pos_margin), float(neg_margin)
    eq_q, eq_r = _equal_row_ids(vq, vr)  # equal rows: PML's var(q − r) is exactly 0, the expansion a residue

    def fn(cb, nb, lb, ib, eb, cv, nv, lv, ev):
        d = (nb[:, None] + nv[None, :] - 2 * (cb @ cv.T)).clamp_min(0) / nb[:, None]
        d = d.masked_fill(eb[:, None] == ev[None, :], 0)
        pos, neg = _masks(lb, ib, lv, self_mode)
        hp = torch.relu(d - pos_margin).where(pos, 0)
        hn = torch.relu(neg_margin - d).where(neg, 0)
        stats = torch.stack([torch.cat([(hp > 0).sum(1), (hn > 0).sum(1)]), torch.cat([pos.sum(1), neg.sum(1)])])
        return torch.cat([hp.sum(1), hn.sum(1)]), stats.to(d.dtype)

    # out[2·r0 : 2·r1] = (the block's positive-pair row sums, its negative-pair row sums)
    blocks = [((2 * r0, 2 * r1), ((r0, r1),) * 5 + (None,) * 4) for r0, r1 in _engine_blocks(n, m, 4)]
    sums, cnt = _Blocks.apply(fn, blocks, 2 * n, 2, cq, nq, labels, torch.arange(n), eq_q, cr, nr, lr, eq_r)
    first = torch.cat([torch.arange(r0, r1) + r0 for r0, r1 in _engine_blocks(n, m, 4)])
    is_pos = torch.zeros(2 * n, dtype=torch.bool).index_fill_(0, first, True)
    zero = _zero(x).to(sums.dtype)
    loss = zero
    for part in (is_pos, ~is_pos):
        k = cnt[0].where(part, 0).sum()
        loss = loss + torch.where(k > 0, sums.where(part, 0).sum() / k.clamp_min(1), zero)
    if pair_rule:
        loss = torch.where((cnt[1].where(is_pos, 0).sum() <= 1) & (cnt[1].where(~is_pos, 0).sum() <= 1), zero, loss)
    return _out(loss, x)
