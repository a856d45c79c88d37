"""The contrastive family on the C++ kernels: NCA is one ``pair_reduce`` call (per-row LSE over the positive
pairs and over the negative pairs; the all-pairs LSE is their logaddexp) plus O(N) tensor ops — no N×M
buffer, forward or backward. SupCon (cpu) is the same call plus the positive-pair row sums, which are
linear in per-class sums of the reference vectors for a similarity or the squared euclidean distance.
NT-Xent (cpu) is the negative-set LSE of the same call plus one term per positive pair (O(P) memory)."""
from __future__ import annotations

import torch

from ..._registry import Unsupported, register
from .common import _LSE, _both, _need, _out, _prep, _sg, _zero


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
    self mode (the (i, i) pair is not a positive); squared euclidean expands the same way. Differentiable."""
    self_mode = r is None
    rr = q if self_mode else r
    rl = labels if self_mode else ref_labels
    _, inv = torch.unique(torch.cat([labels, rl]), return_inverse=True)
    inv_q, inv_r = inv[: labels.shape[0]], inv[labels.shape[0]:]
    k = int(inv.max()) + 1 if inv.numel() else 1
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


@register("supcon_loss", "cpu")
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


def _positive_pairs(labels, ref_labels, self_mode):
    """Every positive (query, reference) pair in row-major order, from the sorted reference labels: O(P)."""
    rl = labels if self_mode else ref_labels
    srt, order = torch.sort(rl, stable=True)
    lo = torch.searchsorted(srt, labels, right=False)
    hi = torch.searchsorted(srt, labels, right=True)
    counts = hi - lo
    a = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts)
    start = torch.cumsum(counts, 0) - counts
    offset = torch.arange(a.shape[0], device=labels.device) - start[a]
    p = order[lo[a] + offset]
    if self_mode:
        keep = p != a
        a, p = a[keep], p[keep]
    # row-major order within a row: by reference index (the sort is stable, so it already is)
    return a, p


@register("ntxent_loss", "cpu")
def ntxent_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    """Mean over positive pairs (a, p) of softplus(A_a − s_ap), A_a = LSE over row a's negatives of s/τ (one
    pair_reduce call); the positive pairs are enumerated from the sorted labels (O(P)) and their values are
    sparse dot products (``_PairDots``): memory O(P + (N + M)·D), no N×M buffer."""
    if pairs is not None:
        raise Unsupported("the C++ ntxent_loss takes no explicit pairs (PML counts duplicate pairs)")
    _need(x, "pair_reduce")
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    s = sg / float(temperature)
    _, neg_lse, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    rr = q if r is None else r
    a, p = _positive_pairs(labels, ref_labels, r is None)
    zero = _zero(x).to(neg_lse.dtype)
    total_neg = cnt[1].sum()
    if a.shape[0] == 0 or int(total_neg) == 0 or (pair_rule and a.shape[0] <= 1 and int(total_neg) <= 1):
        return _out(zero, x)
    dot = _PairDots.apply(q, rr, a, p)
    if code == 0:
        v = dot
    else:
        sq = (torch.linalg.vecdot(q, q)[a] + torch.linalg.vecdot(rr, rr)[p] - 2 * dot).clamp_min(0)
        if code == 2:
            v = sq
        else:
            positive = sq > 0
            v = torch.where(positive, sq.where(positive, 1).sqrt(), 0)
    sp = s * v
    has_neg = cnt[1][a] > 0
    losses = torch.where(has_neg, torch.logaddexp(torch.zeros_like(sp), neg_lse[a] - sp), 0)
    return _out(losses.mean(), x)
