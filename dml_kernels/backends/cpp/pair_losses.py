"""The pair family on the C++ kernels: each loss is one ``pair_reduce`` (per-row log-sum-exp or hinge sums
over positive and negative pairs, optional fused MS mining) plus a few O(N) tensor ops; lifted structure
and all triplets have their own kernels (``lifted_pos``, ``triplet_all``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._pairs import n_pairs_block
from ..._registry import Unsupported
from .common import _HINGE, _LSE, _LSE1, _both, _bits, _cpu_only, _few_pairs, _need, _out, _prep, _sg, _zero


@_both
def multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, epsilon=None, distance, pairs=None,
                          pair_rule=True):
    _need(x, "pair_reduce")
    pb, nb = _bits(pairs, x.device)
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, pb, nb, code, _LSE1, -sg * alpha, base, sg * beta, base,
        None if epsilon is None else float(epsilon))
    loss = (lp / alpha + ln / beta).mean()
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), _zero(x).to(loss.dtype), loss)
    return _out(loss, x)


@_both
def generalized_lifted_structure_loss(x, labels, ref, ref_labels, *, neg_margin, pos_margin, distance, pairs=None,
                                      pair_rule=True):
    _need(x, "pair_reduce")
    pb, nb = _bits(pairs, x.device)
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, pb, nb, code, _LSE, -sg, pos_margin, sg, neg_margin, None)
    loss = F.relu(lp + ln).mean()
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), _zero(x).to(loss.dtype), loss)
    return _out(loss, x)


@_both
def contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs=None, pair_rule=True):
    _need(x, "pair_reduce")
    if pairs is not None:
        raise Unsupported("the C++ contrastive_loss takes no explicit pairs (PML counts duplicate pairs)")
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    sp, sn, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _HINGE, -sg, pos_margin, sg, neg_margin, None)
    zero = _zero(x).to(sp.dtype)
    nzp, nzn = cnt[2].sum(), cnt[3].sum()
    pos_loss = torch.where(nzp > 0, sp.sum() / nzp.clamp_min(1), zero)
    neg_loss = torch.where(nzn > 0, sn.sum() / nzn.clamp_min(1), zero)
    loss = pos_loss + neg_loss
    if pair_rule:
        loss = torch.where(_few_pairs(cnt), zero, loss)
    return _out(loss, x)


@_cpu_only
def lifted_structure_loss(x, labels, *, neg_margin, pos_margin, distance, pairs=None, pair_rule=True, ref=None,
                          ref_labels=None):
    """Exact in O(N²): per-row negative LSEs A_i (pair_reduce), then one pass over the positive pairs."""
    if ref is not None:
        raise Unsupported("the C++ lifted_structure_loss has no reference-set form")
    if pairs is not None:
        raise Unsupported("the C++ lifted_structure_loss takes no explicit pairs (PML counts duplicates)")
    _need(x, "lifted_pos")
    q, _, code = _prep(x, None, distance)
    sg = _sg(distance)
    _, a, _, cnt = torch.ops.dml_kernels.pair_reduce(q, None, labels, None, None, None, code, _LSE, 0.0, 0.0, sg,
                                                     neg_margin, None)
    total, count = torch.ops.dml_kernels.lifted_pos(q, labels, a, cnt[1] > 0, code, float(pos_margin))
    npos, nneg = count.sum(), cnt[1].sum()
    zero = _zero(x).to(total.dtype)
    loss = torch.where((npos > 0) & (nneg > 0), total.sum() / npos.clamp_min(1), zero)
    if pair_rule:
        loss = torch.where((npos <= 1) & (nneg <= 1), zero, loss)
    return _out(loss, x)


@_both
def n_pairs_loss(x, labels, *, distance, pairs=None):
    """PML's NPairsLoss: anchors = lowest index of each label with ≥ 2 samples, positives = second lowest;
    CE of each anchor over the positives' logits. One pair_reduce over the anchors × positives block only
    (:func:`dml_kernels._pairs.n_pairs_block`), the positive columns masked."""
    if pairs is not None:
        raise Unsupported("the C++ n_pairs_loss takes no explicit pairs")
    _need(x, "pair_reduce")
    rows, cols, row_is_anchor, col_is_positive = n_pairs_block(labels)
    if rows.numel() == 0:  # no label has two samples (known on the host: the exact CPU cut)
        return _out(_zero(x), x)
    q, r, code = _prep(x[rows], x[cols], distance)
    s = _sg(distance)
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels[rows], labels[cols], None, None, code, _LSE, s, 0.0, s, 0.0, None, col_is_positive)
    per_row = torch.where(cnt[1] > 0, torch.logaddexp(target, rest), target) - target
    k = row_is_anchor.sum()
    total = torch.where(row_is_anchor, per_row, 0).sum()
    loss = torch.where(k > 0, total / k.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


def _pair_value(a, b, ia, ib, code):
    """Values of the pairs (a[ia], b[ib]) with the reference's formula (differentiable, O(len · D))."""
    qa, rb = a[ia], b[ib]
    dot = (qa * rb).sum(1)
    if code == 0:
        return dot
    sq = ((qa * qa).sum(1) + (rb * rb).sum(1) - 2 * dot).clamp_min(0)
    if code == 2:
        return sq
    positive = sq > 0
    return torch.where(positive, sq.where(positive, 1).sqrt(), 0)


@_both
def triplet_margin_loss(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                        distance, triplets=None):
    if triplets is not None:
        raise Unsupported("the C++ triplet_margin_loss takes no explicit triplets")
    if mining is None:
        return _triplet_all(x, labels, ref, ref_labels, margin=margin, swap=swap, smooth_loss=smooth_loss,
                            distance=distance)
    losses, valid = batch_hard_violations(x, labels, ref, ref_labels, margin=margin, swap=swap,
                                          smooth_loss=smooth_loss, distance=distance)
    losses = losses * valid
    positive = losses > 0
    count = positive.sum()
    total = losses.where(positive, 0).sum()
    loss = torch.where(count > 0, total / count.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)


def batch_hard_violations(x, labels, ref, ref_labels, *, margin, swap, smooth_loss, distance):
    """Per anchor, the hinge of its batch-hard triplet (hardest positive and negative from the C++ miner: O(N)
    tensor ops after it), and whether the anchor has one (``valid``; invalid anchors' values are meaningless)."""
    _need(x, "batch_hard")
    q, r, code = _prep(x, ref, distance)
    rr = q if r is None else r
    with torch.no_grad():
        hard_pos, hard_neg = torch.ops.dml_kernels.batch_hard(q.detach(), None if r is None else r.detach(), labels,
                                                              ref_labels, code)
    valid = hard_pos >= 0
    a = torch.arange(q.shape[0], device=q.device)
    p, n = hard_pos.clamp_min(0), hard_neg.clamp_min(0)
    ap, an = _pair_value(q, rr, a, p, code), _pair_value(q, rr, a, n, code)
    if swap:
        pn = _pair_value(rr, rr, p, n, code)
        an = torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)
    viol = distance.margin(ap, an) + margin
    return (F.softplus(viol) if smooth_loss else F.relu(viol)), valid


def _triplet_all(x, labels, ref, ref_labels, *, margin, swap, smooth_loss, distance):
    """Every valid triplet of every anchor, without the N×M×M set (per-anchor sort + prefix sums)."""
    if swap or smooth_loss:
        raise Unsupported("the C++ all-triplets triplet_margin_loss has no swap / smooth_loss")
    _need(x, "triplet_all")
    q, r, code = _prep(x, ref, distance)
    total, count = torch.ops.dml_kernels.triplet_all(q, r, labels, ref_labels, code, float(margin))
    c = count.sum()
    loss = torch.where(c > 0, total.sum() / c.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)
