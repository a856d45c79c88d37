"""The contrastive family on the ``pair_terms`` op (csrc/pair_terms.h): NT-Xent, Circle, ThresholdConsistentMargin,
IntraPairVariance, TupletMargin, SNR contrastive and MarginLoss, registered for the ``cuda`` backend.

One engine, one switch over a loss code: per pair (i, k) of the label masks (or a PackedPairMask's bits) a
loss-specific term of the pair value and the row's statistics ``row_stats[:, i]``, reduced per row and set by a sum
or a log-sum-exp, with pair and active-term counts — O(N) outputs, no N×M buffer, tiles recomputed in backward, no
atomics, no host sync. Two-pass losses compose in Python: pass 1 a ``pair_reduce`` (NT-Xent's and TupletMargin's
negative LSE per row) or a ``pair_terms`` (IntraPairVariance's global means, loss code ``kValues``), pass 2 a
``pair_terms`` reading them as row statistics; their gradient flows back through pass 1 by autograd (the op's
backward returns dL/d row_stats). SNR's anchor variance and MarginLoss's β of the anchor are O(N) differentiable
row statistics as well.

The loss functions are device-agnostic: on CPU tensors they run the op's CPU implementation
(csrc/cpu/pair_terms_ops.cpp), which is how they are tested without a GPU; the CUDA kernels
(csrc/cuda/pair_terms_ops.cu) share the per-pair math header with it. Explicit PML index tuples: NT-Xent,
ThresholdConsistentMargin, IntraPairVariance and MarginLoss (triplets) take the cpu forms' O(T) torch paths;
Circle / TupletMargin / SNR raise ``Unsupported`` for them (``auto`` falls back to the reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._pairs import PackedPairMask
from ..._registry import Unsupported, register
from . import contrastive_losses as _cl
from . import intra_pair_variance as _ipv
from . import pair_margin_losses as _pm
from .common import _LSE, _bits, _kernel_dtype, _need, _out, _prep, _sg, _zero
from .library import refuse_double_backward

# loss codes of csrc/pair_terms.h
VALUES, NTXENT, CIRCLE, TCM, IPV, TUPLET, SNR, MARGIN = range(8)
_NSTATS = {NTXENT: 1, TUPLET: 1, SNR: 1, MARGIN: 1, IPV: 2}
_REGISTERED = False


def ensure_registered():
    """register_fake and register_autograd of pair_terms (once; the library must be loaded)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    lib = torch.library

    @lib.register_fake("dml_kernels::pair_terms")
    def _(q, r, labels, ref_labels, pos_bits, neg_bits, dist, loss, params, row_stats):
        n = q.shape[0]
        return q.new_empty(2, n), q.new_empty(4, n, dtype=torch.long)

    @lib.register_fake("dml_kernels::pair_terms_backward")
    def _(grad_sums, q, r, labels, ref_labels, pos_bits, neg_bits, dist, loss, params, row_stats, sums, need_r):
        dr = q.new_empty((0, q.shape[1]) if r is None or not need_r else r.shape)
        return q.new_empty(q.shape), dr, q.new_empty(_NSTATS.get(loss, 0), q.shape[0])

    def setup(ctx, inputs, output):
        q, r, labels, ref_labels, pos_bits, neg_bits, dist, loss, params, row_stats = inputs
        ctx.params = (dist, loss, params)
        ctx.has_r = r is not None
        ctx.save_for_backward(q, r, labels, ref_labels, pos_bits, neg_bits, row_stats, output[0])

    def backward(ctx, g_sums, _g_counts):
        refuse_double_backward("C++ op dml_kernels::pair_terms")
        q, r, labels, ref_labels, pos_bits, neg_bits, row_stats, sums = ctx.saved_tensors
        g_sums = torch.zeros_like(sums) if g_sums is None else g_sums
        need_r = ctx.has_r and ctx.needs_input_grad[1]
        dq, dr, ds = torch.ops.dml_kernels.pair_terms_backward(
            g_sums, q, r if ctx.has_r else None, labels, ref_labels, pos_bits, neg_bits, *ctx.params, row_stats,
            sums, need_r)
        return (dq, dr if need_r else None) + (None,) * 7 + (ds.to(row_stats.dtype),)

    lib.register_autograd("dml_kernels::pair_terms", backward, setup_context=setup)


def pair_terms(q, r, labels, ref_labels, bits, dist, loss, params, row_stats=None):
    """(sums (2, N), counts (4, N)) of the op; ``bits`` = (pos_bits, neg_bits) or (None, None)."""
    _need(q, "pair_terms")
    ensure_registered()
    if row_stats is None:
        row_stats = q.new_zeros(0, q.shape[0])
    return torch.ops.dml_kernels.pair_terms(q, r, labels, None if r is None else ref_labels, bits[0], bits[1], dist,
                                            loss, [float(p) for p in params], row_stats)


def _neg_lse(q, r, labels, ref_labels, bits, code, k):
    """Pass 1 of NT-Xent / TupletMargin: per row the LSE of k·v over its negatives (−inf: none)."""
    _need(q, "pair_reduce")
    _, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(q, r, labels, None if r is None else ref_labels, bits[0],
                                                      bits[1], code, _LSE, k, 0.0, k, 0.0, None)
    return torch.where(cnt[1] > 0, ln, float("-inf"))


def _few(tp, tn, pair_rule):
    return (tp <= 1) & (tn <= 1) if pair_rule else torch.zeros((), dtype=torch.bool, device=tp.device)


def _listed(pairs):
    return pairs is not None and not isinstance(pairs, PackedPairMask)


@register("ntxent_loss", "cuda")
def ntxent_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    """Mean over positive pairs of softplus(A_a − l_ap), l = ±v/τ, A_a = LSE over row a's negatives of l (pass 1,
    pair_reduce); pass 2 the per-row sums of the positive terms (pair_terms)."""
    if _listed(pairs):  # PML 4-tuple: the O(T) torch path (duplicates count)
        return _cl.ntxent_loss(x, labels, ref, ref_labels, temperature=temperature, distance=distance, pairs=pairs,
                               pair_rule=pair_rule)
    q, r, code = _prep(x, ref, distance)
    bits = _bits(pairs, q.device)
    k = _sg(distance) / float(temperature)
    a = _neg_lse(q, r, labels, ref_labels, bits, code, k)
    sums, cnt = pair_terms(q, r, labels, ref_labels, bits, code, NTXENT, [k], a[None])
    tp, tn = cnt[0].sum(), cnt[1].sum()
    zero = _zero(x).to(sums.dtype)
    empty = (tp == 0) | (tn == 0) | _few(tp, tn, pair_rule)
    return _out(torch.where(empty, zero, sums[0].sum() / tp.clamp_min(1) + zero), x)


@register("circle_loss", "cuda")
def circle_loss(x, labels, ref, ref_labels, *, m, gamma, distance, pairs=None, pair_rule=True):
    """Per row softplus(LSE_P + LSE_N) of Circle's pair terms (one pair_terms call, LSE reduction); AvgNonZero over
    the rows with a positive and a negative."""
    q, r, code = _prep(x, ref, distance)
    bits = _bits(pairs, q.device)
    sums, cnt = pair_terms(q, r, labels, ref_labels, bits, code, CIRCLE, [m, gamma])
    both = (cnt[0] > 0) & (cnt[1] > 0)
    value = F.softplus(torch.where(both, sums[0] + sums[1], 0)) * both
    count = (value > 0).sum()
    zero = _zero(x).to(value.dtype)
    loss = torch.where(count > 0, value.sum() / count.clamp_min(1), zero) + zero
    return _out(torch.where(_few(cnt[0].sum(), cnt[1].sum(), pair_rule), zero, loss), x)


@register("threshold_consistent_margin_loss", "cuda")
def threshold_consistent_margin_loss(x, labels, *, lambda_plus, lambda_minus, margin_plus, margin_minus,
                                     pairs=None):
    """λ⁺·mean of the active positive terms + λ⁻·mean of the active negative terms (cosine, self mode)."""
    if _listed(pairs):
        return _cl.threshold_consistent_margin_loss(x, labels, lambda_plus=lambda_plus, lambda_minus=lambda_minus,
                                                    margin_plus=margin_plus, margin_minus=margin_minus, pairs=pairs)
    q, _, code = _prep(x, None, _cl._COSINE)
    sums, cnt = pair_terms(q, None, labels, None, _bits(pairs, q.device), code, TCM, [margin_plus, margin_minus])
    cp, cn = cnt[2].sum(), cnt[3].sum()
    total = _zero(x).to(sums.dtype)
    total = total + torch.where(cp > 0, lambda_plus * sums[0].sum() / cp.clamp_min(1), 0)
    return _out(total + torch.where(cn > 0, lambda_minus * sums[1].sum() / cn.clamp_min(1), 0), x)


@register("intra_pair_variance_loss", "cuda")
def intra_pair_variance_loss(x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance, pairs=None, pair_rule=True):
    """mean_P h_P² + mean_N h_N² around the global means μ_P, μ_N (pass 1: per-row value sums, kValues; not
    detached), pass 2 the hinges' squares with μ as row statistics."""
    if _listed(pairs):
        return _ipv.intra_pair_variance_loss(x, labels, ref, ref_labels, pos_eps=pos_eps, neg_eps=neg_eps,
                                            distance=distance, pairs=pairs, pair_rule=pair_rule)
    q, r, code = _prep(x, ref, distance)
    bits = _bits(pairs, q.device)
    s1, c1 = pair_terms(q, r, labels, ref_labels, bits, code, VALUES, [])
    tp, tn = c1[0].sum(), c1[1].sum()
    mu = torch.stack([s1[0].sum() / tp.clamp_min(1), s1[1].sum() / tn.clamp_min(1)])
    pe, ne = float(pos_eps), float(neg_eps)
    coef = [-1.0, 1 - pe, 1.0, -(1 + ne)] if distance.is_similarity else [1.0, -(1 + pe), -1.0, 1 - ne]
    s2, _ = pair_terms(q, r, labels, ref_labels, bits, code, IPV, coef, mu[:, None].expand(2, q.shape[0]))
    zero = _zero(x).to(s2.dtype)
    loss = (torch.where(tp > 0, s2[0].sum() / tp.clamp_min(1), 0)
            + torch.where(tn > 0, s2[1].sum() / tn.clamp_min(1), 0))
    return _out(torch.where(_few(tp, tn, pair_rule), zero, loss + zero), x)


@register("tuplet_margin_loss", "cuda")
def tuplet_margin_loss(x, labels, ref, ref_labels, *, margin, scale, distance, pairs=None, pair_rule=True):
    """Mean over positive pairs of softplus(L_a − scale·cos(acos s_ap − margin)), L_a = LSE over row a's negatives
    of scale·s (pass 1, pair_reduce)."""
    if pairs is not None:
        raise Unsupported("the cuda tuplet_margin_loss takes no explicit pairs (PML counts duplicated pairs); "
                          "backend='auto' runs the reference")
    if not distance.is_similarity:
        raise Unsupported("the cuda tuplet_margin_loss takes a similarity (PML asserts CosineSimilarity)")
    q, r, code = _prep(x, ref, distance)
    bits = (None, None)
    scale, margin = float(scale), float(margin)
    a = _neg_lse(q, r, labels, ref_labels, bits, code, scale)
    sums, cnt = pair_terms(q, r, labels, ref_labels, bits, code, TUPLET, [scale, math.cos(margin), math.sin(margin)],
                           a[None])
    n_pos, n_neg = cnt[0].sum(), cnt[1].sum()
    zero = _zero(x).to(sums.dtype)
    bad = (n_pos == 0) | (n_neg == 0) | _few(n_pos, n_neg, pair_rule)
    return _out(torch.where(bad, zero, sums[0].sum() / n_pos.clamp_min(1) + zero), x)


@register("snr_contrastive_loss", "cuda")
def snr_contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize=True, pairs=None,
                         pair_rule=True):
    """AvgNonZero of relu(d − m⁺) over the positive pairs + of relu(m⁻ − d) over the negatives, d = ‖c_q − c_r‖² /
    ‖c_q‖² (c: the rows centred; PML's SNRDistance): the squared euclidean distance of the centred rows, the
    anchor's ‖c_q‖² a row statistic."""
    if pairs is not None:
        raise Unsupported("the cuda snr_contrastive_loss takes no explicit pairs (PML counts duplicated pairs); "
                          "backend='auto' runs the reference")
    dt = _kernel_dtype(x)
    cq, nq, _ = _pm._centred(x.to(dt), normalize)
    cr = None if ref is None else _pm._centred(ref.to(dt), normalize)[0]
    sums, cnt = pair_terms(cq, cr, labels, ref_labels, (None, None), 2, SNR, [pos_margin, neg_margin], nq[None])
    zero = _zero(x).to(sums.dtype)
    loss = zero
    for s in (0, 1):
        k = cnt[2 + s].sum()
        loss = loss + torch.where(k > 0, sums[s].sum() / k.clamp_min(1), zero)
    return _out(torch.where(_few(cnt[0].sum(), cnt[1].sum(), pair_rule), zero, loss), x)


@register("margin_loss", "cuda")
def margin_loss(x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance, triplets=None):
    """All triplets without the triplet set: (a, p) appears |N_a| times and (a, n) |P_a| times, so the loss is
    Σ_a |N_a|·Σ_P h⁺ + |P_a|·Σ_N h⁻ over Σ_a |N_a|·#{h⁺ > 0} + |P_a|·#{h⁻ > 0} (exact int64 counts), β_a the anchor's
    row statistic (gradient to β through the gather). Given triplets: the cpu form's O(T) path."""
    if triplets is not None:
        return _pm.margin_loss(x, labels, ref, ref_labels, beta, margin=margin, nu=nu, learn_beta=learn_beta,
                               distance=distance, triplets=triplets)
    q, r, code = _prep(x, ref, distance)
    n = q.shape[0]
    beta_c = beta.to(q.dtype)
    per_class = beta.numel() != 1
    b_row = beta_c[labels] if per_class else beta_c.reshape(1).expand(n)
    sg = -1.0 if distance.is_similarity else 1.0
    sums, cnt = pair_terms(q, r, labels, ref_labels, (None, None), code, MARGIN, [sg, margin], b_row[None])
    n_pos, n_neg, k_pos, k_neg = cnt
    total = (n_neg * sums[0] + n_pos * sums[1]).sum()
    divisor = (n_neg * k_pos).sum() + (n_pos * k_neg).sum()
    mult = n_pos * n_neg
    zero = _zero(x).to(q.dtype) + (beta * 0).sum().to(q.dtype)
    if learn_beta and per_class:
        total = total + float(nu) * (mult.to(b_row.dtype) * b_row).sum()
    loss = torch.where(divisor > 0, total / divisor.clamp_min(1).to(total.dtype), zero)
    if learn_beta and not per_class:
        loss = loss + float(nu) * beta_c.reshape(())
    return _out(torch.where(mult.sum() > 0, loss, zero), x)
