"""The contrastive family on the cpu backend, no N×M buffer forward or backward.

* NCA: one ``pair_reduce`` call (per-row LSE over the positive pairs and over the negative pairs; the all-pairs
  LSE is their logaddexp) plus O(N) tensor ops. SupCon: the same call plus the positive-pair row sums, linear
  in per-class sums of the reference vectors for a similarity or the squared euclidean distance.
* Circle, ThresholdConsistentMargin, NT-Xent (and IntraPairVariance, ``intra_pair_variance.py``): row blocks (:class:`_Sweep`, torch BLAS tiles of
  a block of rows × all M references, ``row_blocks.block_rows``) reduced to per-row statistics while the tile is
  hot (:class:`_RowTerms`, the Triton forms' statistics): O(N) outputs, forward under no_grad; the backward
  recomputes each tile, forms its dL/dv from the saved row statistics and the upstream gradients, and pulls it
  to q and r with two GEMMs accumulated in place. A row block holds each row's whole negative set, so NT-Xent's
  negative LSE and its per-positive terms are one pass; IntraPairVariance's global means are a first pass and
  their gradient is folded into the backward's one pass. No host sync.
* Explicit pairs: Circle takes a PackedPairMask (rows unpacked per block); NT-Xent, TCM, IPV take PML's 4-tuple
  (duplicates count) by its O(T) pair values (``_PairDots``, T the tuple's length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._pairs import PackedPairMask, unpack_bits
from ..._registry import Unsupported, register
from ...distances import Distance
from . import row_blocks as RB
from .common import _LSE, _bits, _both, _need, _out, _prep, _sg, _zero
from .library import refuse_double_backward

_COSINE = Distance("cosine", True)
_TILE = 1 << 18  # elements of a tile (≤ row_blocks.TILE): a block's handful of tile-sized temporaries stay ~1 MiB each


@_both
def nca_loss(x, labels, ref, ref_labels, *, softmax_scale, distance, weights=None):
    if x.shape[0] <= 1:  # PML's "len(embeddings) <= 1" zero loss (a shape: no sync)
        return _out(_zero(x), x)
    _need(x, "pair_reduce")
    q, r, code = _prep(x, ref, distance)
    s = _sg(distance) * float(softmax_scale)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    has_pos = cnt[0] > 0
    per_row = torch.where(cnt[1] > 0, torch.logaddexp(lp, ln), lp) - lp
    if weights is not None:
        per_row = per_row * weights.to(per_row.dtype)
    k = has_pos.sum()
    total = torch.where(has_pos, per_row, 0).sum()
    loss = torch.where(k > 0, total / k.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


def _positive_sums(q, r, labels, ref_labels, code):
    """Σ_{k ∈ P_i} v(q_i, r_k) for every row, in O((N + M)·D) without any N×M buffer: for a similarity (dot)
    v is linear in r_k, so the sum is q_i · (sum of the reference vectors of row i's class), minus q_i·q_i in
    self mode (the (i, i) pair is not a positive); squared euclidean expands the same way. Differentiable. No host
    sync (a CUDA form): the labels' dense ids come from a sort and the class-sum buffers have N + M slots (a bound
    on the number of classes), never a size read from the device."""
    self_mode = r is None
    rr = q if self_mode else r
    qid, rid = _dense_ids(labels, None if self_mode else ref_labels)
    inv_q, inv_r = qid.long(), rid.long()
    k = labels.shape[0] + rr.shape[0]
    class_sum = rr.new_zeros(k, rr.shape[1]).index_add(0, inv_r, rr)
    dot = torch.linalg.vecdot(q, class_sum[inv_q])
    qq = torch.linalg.vecdot(q, q)
    if self_mode:
        dot = dot - qq
    if code == 0:
        return dot
    # squared euclidean: Σ_k (|q_i|² + |r_k|² − 2 q_i·r_k) over the row's positives
    rsq = torch.linalg.vecdot(rr, rr)
    class_sq = rr.new_zeros(k).index_add(0, inv_r, rsq)[inv_q]
    if self_mode:
        class_sq = class_sq - qq
    count = rr.new_zeros(k).index_add(0, inv_r, torch.ones_like(rsq))[inv_q] - (1 if self_mode else 0)
    return count * qq + class_sq - 2 * dot


@_both
def supcon_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    """Per row: LSE over P_i ∪ N_i of s/τ (one pair_reduce: the positive-set and negative-set LSEs, then
    logaddexp) minus the mean over P_i of s/τ (a row sum, linear in the class sums: ``_positive_sums``);
    AvgNonZero over the rows. No N×M buffer. Euclidean (not squared) distances and explicit pairs are not
    linear / not label masks: Unsupported (``auto`` falls back to the reference)."""
    if pairs is not None:
        raise Unsupported("the C++ supcon_loss takes no explicit pairs")
    if distance.name == "euclidean":
        raise Unsupported("the C++ supcon_loss needs a similarity or the squared euclidean distance (its "
                          "positive-pair sum is computed from class sums)")
    _need(x, "pair_reduce")
    q, r, code = _prep(x, ref, distance)
    s = _sg(distance) / float(temperature)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    npos = cnt[0]
    lse = torch.where(npos > 0, torch.where(cnt[1] > 0, torch.logaddexp(lp, ln), lp), ln)
    mean_pos = s * _positive_sums(q, r, labels, ref_labels, code) / npos.clamp_min(1).to(lp.dtype)
    losses = torch.where(npos > 0, lse - mean_pos, 0)
    positive = losses > 0
    count = positive.sum()
    zero = _zero(x).to(losses.dtype)
    loss = torch.where(count > 0, losses.where(positive, 0).sum() / count.clamp_min(1), zero)
    total_pos, total_neg = npos.sum(), cnt[1].sum()
    loss = torch.where((total_pos > 0) & (total_neg > 0), loss, zero)
    if pair_rule:
        loss = torch.where((total_pos <= 1) & (total_neg <= 1), zero, loss)
    return _out(loss, x)


class _PairDots(torch.autograd.Function):
    """q[a_t] · r[p_t] for a list of pairs, in O(P + (N + M)·D) memory: the forward in chunks, the backward
    as two sparse (N×M with P entries) × dense products — never a P×D or an N×M buffer."""

    @staticmethod
    def forward(ctx, q, r, a, p):
        out = q.new_empty(a.shape[0])
        step = max(1, (1 << 20) // max(1, q.shape[1]))
        for s in range(0, a.shape[0], step):
            out[s:s + step] = torch.linalg.vecdot(q[a[s:s + step]], r[p[s:s + step]])
        ctx.save_for_backward(q, r, a, p)
        return out

    @staticmethod
    def backward(ctx, g):
        q, r, a, p = ctx.saved_tensors
        w = torch.sparse_coo_tensor(torch.stack([a, p]), g.to(q.dtype), (q.shape[0], r.shape[0]),
                                    check_invariants=False).coalesce()
        dq = torch.sparse.mm(w, r) if ctx.needs_input_grad[0] else None
        dr = torch.sparse.mm(w.t(), q) if ctx.needs_input_grad[1] else None
        return dq, dr, None, None



# --------------------------------------------------------------------------- row blocks: per-row statistics


def _dense_ids(labels, ref_labels):
    """Labels as int32 ids in [0, N + M) (a sort, no host sync): cheap tile comparisons, class-sum slots."""
    both = labels if ref_labels is None else torch.cat([labels, ref_labels])
    srt, order = torch.sort(both)
    new = torch.ones_like(srt)
    new[1:] = srt[1:] != srt[:-1]
    ids = torch.empty_like(srt).scatter_(0, order, torch.cumsum(new, 0) - 1).to(torch.int32)
    n = labels.shape[0]
    return ids[:n], (ids if ref_labels is None else ids[n:])


class _Sweep:
    """Row blocks of q (N×D) against all M references r (q itself in self mode, the (i, i) pair then no
    positive): each block's tile l = k·v of the distance's values and its positive / negative masks (labels,
    or the rows of a PackedPairMask); ``accumulate`` pulls a dL/dl tile back to q and r with two GEMMs
    accumulated in place. Blocks: ``row_blocks.block_rows`` (a tile of ≤ TILE elements, never the matrix)."""

    def __init__(self, q, r, labels, ref_labels, pairs, code, k=1.0):
        self.self_mode, self.code, self.k = r is None, code, float(k)
        self.bits = _bits(pairs, q.device)
        if self.bits[0] is None:
            self.qid, self.rid = _dense_ids(labels, None if r is None else ref_labels)
        self.set(q, r)

    def set(self, q, r):
        self.q, self.r = q, (q if r is None else r)
        self.n, self.m = q.shape[0], self.r.shape[0]
        if self.code:
            self.qq, self.rr = torch.linalg.vecdot(q, q), torch.linalg.vecdot(self.r, self.r)

    def counts(self):
        """(#P_i, #N_i) per row of a label sweep, from the class sizes (no tile)."""
        same = torch.zeros(self.n + self.m, dtype=torch.long).index_add_(0, self.rid.long(),
                                                                        torch.ones_like(self.rid, dtype=torch.long))
        same = same[self.qid.long()]
        return same - int(self.self_mode), self.m - same

    def blocks(self, tile=_TILE):
        return RB.spans(self.n, max(1, min(RB.block_rows(self.n, self.m), tile // max(self.m, 1))))

    def tile(self, r0, r1):
        """(l, pos, neg) of rows r0:r1; l = k·v, v the distance's values as the reference's pairwise matrix."""
        qb = self.q[r0:r1]
        if self.code == 0:
            v = (qb * self.k if self.k != 1 else qb) @ self.r.T
        else:  # (|q|² + |r|²) − 2 q·r, clamped at 0; euclidean: its square root
            raw = torch.addmm(self.qq[r0:r1, None] + self.rr[None, :], qb, self.r.T, alpha=-2)
            self.raw = raw
            self.v = raw.clamp_min(0) if self.code == 2 else raw.clamp_min(0).sqrt_()
            v = self.v * self.k if self.k != 1 else self.v
        if self.bits[0] is not None:
            return v, unpack_bits(self.bits[0][r0:r1], self.m), unpack_bits(self.bits[1][r0:r1], self.m)
        pos = self.qid[r0:r1, None] == self.rid[None, :]
        neg = pos.logical_not()
        if self.self_mode:
            pos[:, r0:r1].fill_diagonal_(False)
        return v, pos, neg

    def accumulate(self, w, r0, r1, dq, dr, symmetric=False):
        """dq[r0:r1] += ∂(Σ w·l)/∂q_b, dr += ∂(Σ w·l)/∂r for the last tile (dr is dq in self mode). ``symmetric``:
        the caller's whole dL/dl matrix is symmetric (w_ij = w_ji), so in self mode the reference side's share
        equals the query side's: twice the query side, one GEMM instead of two."""
        alpha = self.k
        if self.code:  # dv/d(sq): 1/(2v) (0 at v = 0, as the reference), or 1 where the clamp passes
            w = torch.where(self.v > 0, w / (2 * self.v), 0) if self.code == 1 else w.where(self.raw >= 0, 0)
            alpha = -2.0 * self.k
        if symmetric and self.self_mode:
            alpha, dr = 2 * alpha, None
        qb = self.q[r0:r1]
        if dq is not None:
            dq[r0:r1].addmm_(w, self.r, alpha=alpha)
            if self.code:
                dq[r0:r1].addcmul_(qb, w.sum(1, keepdim=True), value=-alpha)
        if dr is not None:
            dr.addmm_(w.T, qb, alpha=alpha)
            if self.code:
                dr.addcmul_(self.r, w.sum(0)[:, None], value=-alpha)

    def grads(self, need_q, need_r):
        dq = torch.zeros_like(self.q) if need_q or (self.self_mode and need_r) else None
        return dq, (dq if self.self_mode else (torch.zeros_like(self.r) if need_r else None))


def _eager_run(spec, sweep):
    """The ``row_blocks.grad_in_forward`` run of a scalar loss whose gradient is formed in the forward's one sweep:
    per block, the tile, its rows' statistics (complete: a block holds its rows' whole reference set) and dL/dl
    up to global factors, pulled to q and r at once (3 GEMMs in all — no recomputing sweep); ``spec.finish``
    scales by the global factors. The backward multiplies the saved O((N + M)·D) gradients by the upstream g."""

    def run(tensors, needs):
        dq, dr = sweep.grads(*needs)
        grad = dq is not None or dr is not None
        stats = []
        tile_block = getattr(spec, "tile_block", None)  # a spec that forms its own tile (fewer passes)
        for r0, r1 in sweep.blocks(getattr(spec, "tile", _TILE)):
            st, w = (tile_block(sweep, r0, r1, grad) if tile_block is not None
                     else spec.block(*sweep.tile(r0, r1), r0, r1, grad))
            stats.append(st)
            if grad:
                sweep.accumulate(w, r0, r1, dq, dr, getattr(spec, "symmetric", False))
        return spec.finish(sweep, torch.cat(stats, 1), dq, dr)
    return run


def _eager_apply(spec, sweep, q, r):
    return RB.grad_in_forward(_eager_run(spec, sweep), "contrastive loss", q, r)


class _RowTerms(torch.autograd.Function):
    """(vals (K, N), counts (2, N)) = spec.forward(sweep): O(N) outputs, forward under no_grad; backward: per
    block the tile recomputed and spec.backward's dL/dl pulled to q and r — for losses whose gradient has
    global factors the sweep cannot know (ThresholdConsistentMargin's counts of active terms)."""

    @staticmethod
    def forward(ctx, spec, sweep, q, r):
        vals, counts, saved = spec.forward(sweep)
        ctx.spec, ctx.sweep = spec, sweep
        ctx.save_for_backward(q, r, *saved)
        ctx.mark_non_differentiable(counts)
        return vals, counts

    @staticmethod
    def backward(ctx, g, _g_counts):
        refuse_double_backward("cpu contrastive loss")
        q, r, *saved = ctx.saved_tensors
        sweep = ctx.sweep
        sweep.set(q, r)
        weights = ctx.spec.backward(saved, g)
        dq, dr = sweep.grads(ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        for r0, r1 in sweep.blocks():
            sweep.accumulate(weights(*sweep.tile(r0, r1), r0, r1), r0, r1, dq, dr)
        return None, None, dq, (None if sweep.self_mode else dr)


def _sweep(x, labels, ref, ref_labels, distance, pairs=None, k=1.0):
    q, r, code = _prep(x, ref, distance)
    return _Sweep(q, r, labels, ref_labels, pairs, code, k), q, r


def _rows(spec, x, labels, ref, ref_labels, distance):
    sweep, q, r = _sweep(x, labels, ref, ref_labels, distance)
    return _RowTerms.apply(spec, sweep, q, r)


def _eager(spec, x, labels, ref, ref_labels, distance, pairs=None, k=1.0):
    sweep, q, r = _sweep(x, labels, ref, ref_labels, distance, pairs, k)
    return _out(_eager_apply(spec, sweep, q, r), x)


def _lse_parts(t):
    """Per row of t (−inf outside the set): (LSE, 0 for an empty row; e = exp(t − max) in place; Σ e ≥ 1, or 0
    for an empty row) — e / Σe is the LSE's gradient, so a caller reuses it instead of a second exp."""
    mx = t.amax(1)
    mx = torch.where(mx > float("-inf"), mx, 0)
    e = t.sub_(mx[:, None]).exp_()
    s = e.sum(1)
    return torch.where(s > 0, mx + torch.log(s.clamp_min(1)), 0), e, s


def _pair_rule_few(tp, tn, pair_rule):
    return (tp <= 1) & (tn <= 1) if pair_rule else torch.zeros((), dtype=torch.bool)


class _Circle:
    """Per row z = LSE_P(−γ[1+m−v]₊(v−1+m)) + LSE_N(γ[v+m]₊(v−m)) (the weights [·]₊ constant: PML detaches them),
    loss softplus(z) on rows with a positive and a negative; AvgNonZero over the rows."""

    def __init__(self, m, gamma, pair_rule, packed):
        self.m, self.gamma, self.pair_rule, self.packed = float(m), float(gamma), pair_rule, packed

    def block(self, v, pos, neg, r0, r1, grad):
        m, gamma = self.m, self.gamma
        wp, wn = torch.rsub(v, 1 + m).clamp_min_(0), (v + m).clamp_min_(0)
        lp, ep, sp = _lse_parts(torch.where(pos, (v - (1 - m)).mul_(wp).mul_(-gamma), float("-inf")))
        ln, en, sn = _lse_parts(torch.where(neg, (v - m).mul_(wn).mul_(gamma), float("-inf")))
        both = (sp > 0) & (sn > 0)
        z = torch.where(both, lp + ln, 0)
        value = F.softplus(z) * both  # torch's softplus, as the reference: z above 20 is returned as is
        st = torch.stack([value, pos.sum(1), neg.sum(1)]) if self.packed else value[None]
        if not grad:
            return st, None
        f = torch.where(z > 20, 1, torch.sigmoid(z)) * (both & (value > 0))
        ep.mul_(wp).mul_((-gamma * f / sp.clamp_min(1))[:, None])
        return st, ep.add_(en.mul_(wn).mul_((gamma * f / sn.clamp_min(1))[:, None]))

    def finish(self, sweep, st, dq, dr):
        value = st[0]
        count = (value > 0).sum()
        scale = torch.where(count > 0, 1 / count.clamp_min(1).to(value.dtype), 0)
        npos, nneg = (st[1], st[2]) if self.packed else sweep.counts()
        scale = torch.where(_pair_rule_few(npos.sum(), nneg.sum(), self.pair_rule), 0, scale)
        return value.sum() * scale, *_scaled(sweep, dq, dr, scale)


def _scaled(sweep, dq, dr, scale):
    """(dq, dr) times the global factor, in place (dr is dq in self mode: scaled once)."""
    return (None if dq is None else dq.mul_(scale),
            None if dr is None or sweep.self_mode else dr.mul_(scale))


@register("circle_loss", "cpu")
def circle_loss(x, labels, ref, ref_labels, *, m, gamma, distance, pairs=None, pair_rule=True):
    """One row-block sweep: per row LSE_P and LSE_N, the row loss and its dL/dv tile (the LSEs' softmax weights
    from the same exp), pulled to the embeddings at once; O(N) statistics. Pairs as a PackedPairMask."""
    if pairs is not None and not isinstance(pairs, PackedPairMask):
        raise Unsupported("the cpu circle_loss takes pairs as a PackedPairMask")
    return _eager(_Circle(m, gamma, pair_rule, pairs is not None), x, labels, ref, ref_labels, distance, pairs)


class _TCM:
    """vals: Σ_P [v ≤ m⁺](m⁺ − v), Σ_N [v ≥ m⁻](v − m⁻) per row; counts: the active terms per row."""

    def __init__(self, margin_plus, margin_minus):
        self.mp, self.mn = float(margin_plus), float(margin_minus)

    def active(self, v, pos, neg):
        return pos & (v <= self.mp), neg & (v >= self.mn)

    def forward(self, sweep):
        def fn(v, pos, neg, r0, r1):
            ap, an = self.active(v, pos, neg)
            return torch.stack([torch.where(ap, self.mp - v, 0).sum(1), torch.where(an, v - self.mn, 0).sum(1),
                                ap.sum(1), an.sum(1)])

        stats = torch.cat([fn(*sweep.tile(r0, r1), r0, r1) for r0, r1 in sweep.blocks()], 1)
        return stats[:2], stats[2:].long(), ()

    def backward(self, saved, g):
        def weights(v, pos, neg, r0, r1):
            ap, an = self.active(v, pos, neg)
            return torch.where(an, g[1, r0:r1, None], 0) - torch.where(ap, g[0, r0:r1, None], 0)
        return weights


def _segment_lse(vals, idx, n):
    """(LSE of vals grouped by idx (n groups; 0 for an empty one), whether a group is nonempty): O(len(vals))."""
    has = vals.new_zeros(n).index_add_(0, idx, torch.ones_like(vals)) > 0
    mx = vals.new_full((n,), float("-inf")).scatter_reduce_(0, idx, vals.detach(), "amax")
    mx = torch.where(has, mx, 0)
    total = vals.new_zeros(n).index_add(0, idx, torch.exp(vals - mx[idx]))
    return torch.where(has, mx + torch.log(torch.where(has, total, 1)), 0), has


def _listed_values(q, r, a, b, code):
    """The distance's value of each listed pair (q[a_t], r[b_t]) — O(T) memory (``_PairDots``), T the input's
    length; the euclidean root has a zero gradient at 0, as the reference's matrix."""
    dot = _PairDots.apply(q, r, a, b)
    if code == 0:
        return dot
    sq = (torch.linalg.vecdot(q, q)[a] + torch.linalg.vecdot(r, r)[b] - 2 * dot).clamp_min(0)
    if code == 2:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


def _listed(x, ref, distance, pairs):
    """(values of the positive pairs, anchors, values of the negative pairs, anchors) of PML's 4-tuple."""
    q, r, code = _prep(x, ref, distance)
    rr = q if r is None else r
    a1, p, a2, n = (t.to(x.device) for t in pairs)
    return _listed_values(q, rr, a1, p, code), a1, _listed_values(q, rr, a2, n, code), a2


@register("threshold_consistent_margin_loss", "cpu")
def threshold_consistent_margin_loss(x, labels, *, lambda_plus, lambda_minus, margin_plus, margin_minus,
                                     pairs=None):
    """λ⁺·mean of the active positive terms + λ⁻·mean of the active negative terms (cosine, self mode): one
    row-block pass of per-row sums and counts; a PML 4-tuple (duplicates count) by its O(T) pair values."""
    dist = _COSINE
    if pairs is not None:
        pv, _, nv, _ = _listed(x, None, dist, pairs)
        lo, hi = pv <= margin_plus, nv >= margin_minus
        sp, sn = torch.where(lo, margin_plus - pv, 0).sum(), torch.where(hi, nv - margin_minus, 0).sum()
        cp, cn = lo.sum(), hi.sum()
    else:
        vals, cnt = _rows(_TCM(margin_plus, margin_minus), x, labels, None, None, dist)
        sp, sn, cp, cn = vals[0].sum(), vals[1].sum(), cnt[0].sum(), cnt[1].sum()
    total = _zero(x).to(sp.dtype)
    total = total + torch.where(cp > 0, lambda_plus * sp / cp.clamp_min(1), 0)
    return _out(total + torch.where(cn > 0, lambda_minus * sn / cn.clamp_min(1), 0), x)


class _NTXent:
    """Per row T_i = Σ_P softplus(A_i − l), A_i = LSE_N l (l = ±v/τ), and dT_i/dl: −σ(A_i − l) on P,
    W_i·e^{l − A_i} on N (W_i = Σ_P σ(A_i − l)), e^{l − A_i} the negative LSE's own exp; loss Σ T / #P."""

    def __init__(self, pair_rule):
        self.pair_rule = pair_rule

    def block(self, l, pos, neg, r0, r1, grad):
        a, e, s = _lse_parts(torch.where(neg, l, float("-inf")))
        a = torch.where(s > 0, a, float("-inf"))  # no negative: every term of the row is 0
        z = torch.where(pos, a[:, None] - l, float("-inf"))
        value = F.softplus(z, 1.0, 40.0).sum(1)  # exact to e^-40 (the default threshold 20 is 2e-9 off)
        if not grad:
            return value[None], None
        sig = torch.sigmoid(z)
        return value[None], e.mul_((sig.sum(1) / s.clamp_min(1))[:, None]).sub_(sig)

    def finish(self, sweep, st, dq, dr):
        npos, nneg = sweep.counts()
        tp, tn = npos.sum(), nneg.sum()
        empty = (tp == 0) | (tn == 0) | _pair_rule_few(tp, tn, self.pair_rule)
        scale = torch.where(empty, 0, 1 / tp.clamp_min(1).to(st.dtype))
        return st[0].sum() * scale, *_scaled(sweep, dq, dr, scale)


@register("ntxent_loss", "cpu")
def ntxent_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    """Mean over positive pairs (a, p) of softplus(A_a − l_ap), A_a = LSE over row a's negatives of l = ±v/τ:
    a block holds its rows' whole negative sets, so one sweep gives the loss and its gradient (O(N) statistics,
    no N×M buffer, no host sync). A PML 4-tuple (duplicate pairs count): its O(T) pair values, per-anchor LSEs."""
    k = _sg(distance) / float(temperature)
    if pairs is None:
        return _eager(_NTXent(pair_rule), x, labels, ref, ref_labels, distance, k=k)
    pv, a1, nv, a2 = _listed(x, ref, distance, pairs)
    if len(a1) == 0 or len(a2) == 0 or (pair_rule and len(a1) <= 1 and len(a2) <= 1):
        return _out(_zero(x).to(pv.dtype), x)
    a, has = _segment_lse(k * nv, a2, x.shape[0])
    losses = torch.where(has[a1], F.softplus(a[a1] - k * pv, 1.0, 40.0), 0)
    return _out(losses.mean(), x)
