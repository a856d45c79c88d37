"""TupletMargin, MarginLoss and the SNR contrastive loss on the Triton pair engine: O(N) row statistics per anchor
from tiles, backward by recomputed tiles (the engine's row kernel, and its column kernel with a reference set),
no atomics, no N×M buffer, no host sync.

As in ``contrastive_losses.py`` each loss is a *row-statistics op* (its ``_Rows``, one autograd Function over the
engine) plus O(N) PyTorch on its outputs; the Function gets one upstream gradient per statistic and row, and a
per-row input ``extra`` (β per anchor, 1/‖c‖²) whose gradient comes from per-row sums saved in the forward.

* TupletMargin (cosine; s = v): pass 1 (``TUP1``) A_a = LSE_{N_a} scale·s, |P_a|, |N_a|; pass 2 (``TUP2``)
  T_a = Σ_{P_a} softplus(z) and W_a = Σ_{P_a} σ(z) with z = A_a − scale·cos(acos s − m) = A_a − scale·(s cos m +
  √(1−s²) sin m), over the anchors with a negative. Loss Σ_a T_a / #P; dL/ds = −g σ(z)·scale·(cos m − s sin m /
  √(1−s²)) on P, g·W_a·scale·e^{scale·s − A_a} on N.
* MarginLoss (``MARGIN``, any engine distance): β_a = beta[labels[a]] (or the one β), h⁺ = [sg(β_a − v) + m]₊
  on P, h⁻ = [sg(v − β_a) + m]₊ on N (sg = +1 similarity, −1 distance: PML's ``margin``). All triplets (a, p, n)
  count each (a, p) pair |N_a| times and each (a, n) pair |P_a| times, so per row: S⁺, #[h⁺>0], S⁻, #[h⁻>0],
  |P_a|, |N_a|; loss = Σ_a (|N_a|S⁺_a + |P_a|S⁻_a) / Σ_a (|N_a|#⁺_a + |P_a|#⁻_a) (PML's DivisorReducer: the
  number of non-zero terms; 0 when none) plus ν·β (``learn_beta``; per class: ν Σ_a |P_a||N_a| β_a / divisor).
  ∂S⁺_a/∂β_a = sg·#⁺_a, ∂S⁻_a/∂β_a = −sg·#⁻_a: the β gradient is O(N) (autograd scatters it by class). Given
  triplets (a miner's, or ``triplets_per_anchor``'s sample) are computed per triplet in PyTorch (O(T·D), no
  kernel and no N×M matrix).
* SNR contrastive (``SNR``): PML's SNRDistance var(x_i − r_k) / var(x_i) = ‖c_i − c'_k‖² / ‖c_i‖² with c the
  row-centred (L2-normalised first when ``normalize``) rows — the engine's squared euclidean tile of the centred
  rows times the per-row q_i = 1/‖c_i‖² (``extra``). Per row: Σ_P h⁺, Σ_N h⁻, #[h⁺>0], #[h⁻>0] with h⁺ = [d − m⁺]₊,
  h⁻ = [m⁻ − d]₊, and Σ_P[h⁺>0] v, Σ_N[h⁻>0] v (the gradient of q). Loss: AvgNonZero over P + over N. PML 2.9's
  SignalToNoiseRatioContrastiveLoss has no regulariser term (its ``embedding_regularizer`` is the module's).

PML's "≤1 positive and ≤1 negative pair → 0" needs the pair counts only when there are at most 2 pairs in all (a
shape, known on the host): then they are counted on that tiny matrix. A PML 4-tuple with a repeated pair is
Unsupported (these forms count each pair once; ``auto`` falls back). Tested under the interpreter, compiled for
sm_90 (``aot_check``), not yet run on a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ...distances import Distance
from . import pair_engine
from .contrastive_losses import _par, _row, _Rows, _sigmoid, _softplus, _st, _tuple_mask, _zero
from .pair_engine import LSE, NONE, SUM

TUP1, TUP2, MARGIN, SNR = range(4)


@triton.jit
def _tuplet_pos(v, pos, st):
    """(scale·cos(acos v − m), its derivative in v) on the positive pairs (NaN outside [−1, 1], as acos)."""
    k = _par(st, 0)
    cm = _par(st, 1)
    sm = _par(st, 2)
    root = tl.sqrt(tl.where(pos, 1.0 - v * v, 1.0))
    return k * (v * cm + root * sm), k * (cm - v * sm / root)


@triton.jit
def pm_fwd(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    fp = pos.to(v.dtype)
    fn = neg.to(v.dtype)
    if FLAG == 0:  # TupletMargin pass 1: LSE_N scale·v, |P|, |N|
        return tl.where(neg, _par(st, 0) * v, float("-inf")), fp, fn, v, v, v
    elif FLAG == 1:  # TupletMargin pass 2, rows: A, has_neg
        c, dc = _tuplet_pos(v, pos, st)
        keep = pos & (_row(st, nst, 1, ia, na) > 0)
        z = _row(st, nst, 0, ia, na) - c
        return tl.where(keep, _softplus(z), 0.0), tl.where(keep, _sigmoid(z), 0.0), v, v, v, v
    elif FLAG == 2:  # MarginLoss, rows: beta
        sg = pair_engine.sim_sign(DIST)
        b = _row(st, nst, 0, ia, na)
        m = _par(st, 0)
        hp = tl.where(pos, tl.maximum(sg * (b - v) + m, 0.0), 0.0)
        hn = tl.where(neg, tl.maximum(sg * (v - b) + m, 0.0), 0.0)
        return hp, (hp > 0).to(v.dtype), hn, (hn > 0).to(v.dtype), fp, fn
    else:  # SNR, rows: q = 1/‖c‖² (v: the squared distance of the centred rows)
        d = v * _row(st, nst, 0, ia, na)
        hp = tl.where(pos, tl.maximum(d - _par(st, 0), 0.0), 0.0)
        hn = tl.where(neg, tl.maximum(_par(st, 1) - d, 0.0), 0.0)
        return hp, hn, (hp > 0).to(v.dtype), (hn > 0).to(v.dtype), tl.where(hp > 0, v, 0.0), tl.where(hn > 0, v, 0.0)


@triton.jit
def pm_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """dL/dv of a tile from the anchors' forward statistics and upstream gradients (rows of st)."""
    if FLAG == 1:  # rows: A, has_neg, g·W, g
        c, dc = _tuplet_pos(v, pos, st)
        a = _row(st, nst, 0, ia, na)
        keep = pos & (_row(st, nst, 1, ia, na) > 0)
        w = tl.where(keep, -_row(st, nst, 3, ia, na) * _sigmoid(a - c) * dc, 0.0)
        w += tl.where(neg, _row(st, nst, 2, ia, na) * _par(st, 0) * tl.exp(_par(st, 0) * v - a), 0.0)
        return w
    elif FLAG == 2:  # rows: beta, g_S+, g_S-
        sg = pair_engine.sim_sign(DIST)
        b = _row(st, nst, 0, ia, na)
        m = _par(st, 0)
        ap = pos & (sg * (b - v) + m > 0)
        an = neg & (sg * (v - b) + m > 0)
        w = tl.where(an, _row(st, nst, 2, ia, na), 0.0) - tl.where(ap, _row(st, nst, 1, ia, na), 0.0)
        return sg * w
    else:  # SNR, rows: q, g_P, g_N
        q = _row(st, nst, 0, ia, na)
        d = v * q
        ap = pos & (d - _par(st, 0) > 0)
        an = neg & (_par(st, 1) - d > 0)
        return q * (tl.where(ap, _row(st, nst, 1, ia, na), 0.0) - tl.where(an, _row(st, nst, 2, ia, na), 0.0))


# ---------------------------------------------------------------------------------------------- host side


class _Tuplet:
    """vals: (Σ_P softplus(z),); counts: (|P|, |N|)."""
    bwd_flag, bwd_epilogue = TUP2, pm_bwd

    def __init__(self, scale, margin):
        self.params = (scale, math.cos(margin), math.sin(margin))

    def forward(self, tiles, xs, extra):
        one = tiles.row_stats(xs, pm_fwd, (LSE, SUM, SUM), stats=_st(tiles, self.params), flag=TUP1)
        has_neg = one[2] > 0
        a = torch.where(has_neg, one[0], 0)
        two = tiles.row_stats(xs, pm_fwd, (SUM, SUM), stats=_st(tiles, self.params, (a, has_neg)), flag=TUP2)
        saved = torch.stack([a, has_neg.to(a.dtype), two[1]])
        return two[0].unsqueeze(0).clone(), one[1:3].round().long(), saved

    def backward(self, tiles, saved, g, extra):
        a, has_neg, w = saved
        return _st(tiles, self.params, (a, has_neg, g[0] * w, g[0])), None


class _Margin:
    """extra: β per anchor row; vals: (S⁺, S⁻); counts: (#⁺, #⁻, |P|, |N|)."""
    bwd_flag, bwd_epilogue = MARGIN, pm_bwd

    def __init__(self, margin, sg):
        self.params, self.sg = (margin,), sg

    def forward(self, tiles, xs, extra):
        out = tiles.row_stats(xs, pm_fwd, (SUM,) * 6, stats=_st(tiles, self.params, (extra,)), flag=MARGIN)
        return out[[0, 2]].clone(), out[[1, 3, 4, 5]].round().int(), out[[1, 3]].clone()  # int32: (4, N) stays small

    def backward(self, tiles, saved, g, extra):
        d_extra = self.sg * (g[0] * saved[0] - g[1] * saved[1])
        return _st(tiles, self.params, (extra, g[0], g[1])), d_extra


class _SNR:
    """extra: q = 1/‖c‖² per row; vals: (Σ_P h⁺, Σ_N h⁻); counts: (#[h⁺>0], #[h⁻>0])."""
    bwd_flag, bwd_epilogue = SNR, pm_bwd

    def __init__(self, pos_margin, neg_margin):
        self.params = (pos_margin, neg_margin)

    def forward(self, tiles, xs, extra):
        out = tiles.row_stats(xs, pm_fwd, (SUM,) * 6, stats=_st(tiles, self.params, (extra,)), flag=SNR)
        return out[:2].clone(), out[2:4].round().long(), out[4:6].clone()

    def backward(self, tiles, saved, g, extra):
        return _st(tiles, self.params, (extra, g[0], g[1])), g[0] * saved[0] - g[1] * saved[1]


def _run(spec, x, labels, ref, ref_labels, distance, pairs, extra_fn=None):
    """The row statistics of ``spec``; ``extra_fn(tiles, x, ref)`` gives the per-row input (or none)."""
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance, pairs)
    s, n, sr, nr = tiles.embed(x, ref)
    extra = torch.zeros(0, dtype=tiles.ct, device=x.device) if extra_fn is None else extra_fn(tiles, n)
    vals, counts = _Rows.apply(spec, tiles, x, s, n, ref, sr, nr, extra)
    return vals, counts, tiles.ct


def _few_label_pairs(labels, ref_labels, n, m, self_mode, pair_rule, device):
    """PML's ≤1-pair rule (device bool). It can hold only with at most 2 pairs in all, a shape known here: then
    the pairs are counted on that (≤ 2 × 2) matrix; otherwise it is False without looking at the labels."""
    total = n * (n - 1) if self_mode else n * m
    if not pair_rule or labels is None or total > 2:
        return torch.zeros((), dtype=torch.bool, device=device)
    same = labels.unsqueeze(1) == (labels if self_mode else ref_labels).unsqueeze(0)
    off = ~torch.eye(n, dtype=torch.bool, device=device) if self_mode else torch.ones_like(same)
    return ((same & off).sum() <= 1) & ((~same & off).sum() <= 1)


# ---------------------------------------------------------------------------------------------- the ops


@register("tuplet_margin_loss", "triton")
def tuplet_margin_loss(x, labels, ref, ref_labels, *, margin, scale, distance, pairs=None, pair_rule=True):
    if distance.name != "cosine" or not distance.normalize:
        raise Unsupported("the triton tuplet_margin_loss is the cosine form")
    m = x.shape[0] if ref is None else ref.shape[0]
    pairs = _tuple_mask(pairs, x.shape[0], m, x.device)
    x, ref = pair_engine.autocast_inputs(x, ref)
    vals, counts, ct = _run(_Tuplet(float(scale), float(margin)), x, labels, ref, ref_labels, distance, pairs)
    tp, tn = counts[0].sum(), counts[1].sum()
    few = ((tp <= 1) & (tn <= 1)) if pair_rule else torch.zeros((), dtype=torch.bool, device=x.device)
    zero = _zero(x, ref, ct)
    return torch.where(few | (tp == 0) | (tn == 0), zero, vals[0].sum() / tp.clamp_min(1).to(ct))


def _centred(x, normalize, ct):
    x = x.to(ct)
    if normalize:
        x = F.normalize(x, dim=1)
    return x - x.mean(1, keepdim=True)


@register("snr_contrastive_loss", "triton")
def snr_contrastive_loss(x, labels, ref, ref_labels, *, pos_margin, neg_margin, normalize=True, pairs=None,
                         pair_rule=True):
    if x.shape[1] < 2:
        raise Unsupported("the SNR distance of 1-feature rows is 0/0 (an unbiased variance of one value)")
    n, m = x.shape[0], (x.shape[0] if ref is None else ref.shape[0])
    pairs = _tuple_mask(pairs, n, m, x.device)
    x, ref = pair_engine.autocast_inputs(x, ref)
    ct = pair_engine.compute_dtype(x.dtype)
    xc = _centred(x, normalize, ct)
    rc = None if ref is None else _centred(ref, normalize, ct)
    dist = Distance("squared_euclidean", False)
    vals, counts, ct = _run(_SNR(float(pos_margin), float(neg_margin)), xc, labels, rc, ref_labels, dist, pairs,
                            extra_fn=lambda tiles, sq: 1.0 / sq)
    cp, cn = counts[0].sum(), counts[1].sum()
    zero = _zero(x, ref, ct)
    loss = zero + torch.where(cp > 0, vals[0].sum() / cp.clamp_min(1).to(ct), 0)
    loss = loss + torch.where(cn > 0, vals[1].sum() / cn.clamp_min(1).to(ct), 0)
    few = _few_label_pairs(labels, ref_labels, n, m, ref is None, pair_rule and pairs is None, x.device)
    return torch.where(few, zero, loss)


def _pair_values(x, ref, a, b, distance, ct):
    """v(x_a, r_b) per listed pair, in PyTorch (O(len(a)·D))."""
    r = x if ref is None else ref
    if distance.normalize:
        xa, rb = F.normalize(x.to(ct), dim=1)[a], F.normalize(r.to(ct), dim=1)[b]
    else:
        xa, rb = x.to(ct)[a], r.to(ct)[b]
    if distance.is_similarity:
        return (xa * rb).sum(1)
    sq = ((xa - rb) ** 2).sum(1)
    if distance.name == "squared_euclidean":
        return sq
    pos = sq > 0
    return torch.where(pos, sq.where(pos, 1).sqrt(), 0)


@register("margin_loss", "triton")
def margin_loss(x, labels, ref, ref_labels, beta, *, margin, nu, learn_beta, distance, triplets=None):
    if distance.name not in ("cosine", "dot", "euclidean", "squared_euclidean"):
        raise Unsupported(f"the triton margin_loss has no {distance.name!r} distance")
    x, ref = pair_engine.autocast_inputs(x, ref)
    ct = pair_engine.compute_dtype(x.dtype)
    sg = 1.0 if distance.is_similarity else -1.0
    per_class = beta.numel() != 1
    b = beta.to(device=x.device, dtype=ct)
    zero = _zero(x, ref, ct) + (b * 0).sum()
    if triplets is not None:
        a, p, n = (t.to(x.device) for t in triplets)
        if len(a) == 0:
            return zero
        bt = b[labels[a]] if per_class else b.reshape(()).expand(len(a))
        hp = torch.relu(sg * (bt - _pair_values(x, ref, a, p, distance, ct)) + margin)
        hn = torch.relu(sg * (_pair_values(x, ref, a, n, distance, ct) - bt) + margin)
        num, div, reg_num = (hp + hn).sum(), (hp > 0).sum() + (hn > 0).sum(), bt.sum()
        any_triplet = torch.ones((), dtype=torch.bool, device=x.device)
    else:
        if labels is None:
            raise ValueError("margin_loss needs labels or triplets")
        rows = b[labels] if per_class else b.reshape(()).expand(x.shape[0])
        vals, counts, ct = _run(_Margin(float(margin), sg), x, labels, ref, ref_labels, distance, None,
                                extra_fn=lambda tiles, sq: rows)
        act_p, act_n, np_, nn_ = (c.long() for c in counts)
        num = (nn_.to(ct) * vals[0] + np_.to(ct) * vals[1]).sum()
        div = (nn_ * act_p + np_ * act_n).sum()
        per_anchor = np_ * nn_
        reg_num = (per_anchor.to(ct) * rows).sum()
        any_triplet = per_anchor.sum() > 0
    divf = div.clamp_min(1).to(ct)
    loss = torch.where(div > 0, num / divf, 0)
    if learn_beta:
        reg = torch.where(div > 0, nu * reg_num / divf, 0) if per_class else nu * b.reshape(())
        loss = loss + reg
    return torch.where(any_triplet, zero + loss, zero)


# ---------------------------------------------------------------------------------------------- AOT check


def aot_variants():
    """(dtype, kernel, signature, constexprs, options) of every CUDA launch above, for ``aot_check.py``: TupletMargin
    (cosine; label masks and packed pairs) and MarginLoss (euclidean, PML's default) in the four input dtypes, SNR
    (squared euclidean of the centred rows, which are fp32 / fp64: the compute dtype) in two; forward kernels with
    their kinds, row and column gradient kernels."""
    from .aot_signatures import _pair_signature

    for dtype, ct, group in (("fp16", "fp32", "half"), ("bf16", "fp32", "half"), ("fp32", "fp32", "fp32"),
                             ("fp64", "fp64", "fp64")):
        ptr = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "pos_bits": "*u8",
               "neg_bits": "*u8"}

        def kw(kind, flag, dist, pairs=False, **extra):
            ba, bb, bd, bdo, warps = pair_engine.gpu_blocks(group, kind, pairs)
            consts = dict(SELF=True, HAS_LABELS=not pairs, HAS_PAIRS=pairs, DIST=dist, PREC="ieee", BA=ba, BB=bb,
                          BD=bd, FLAG=flag)
            if "COLUMNS" in extra:
                consts.update(BDO=bdo, GPREC="tf32" if group == "half" else "ieee", TILE_GRAD=pair_engine.grad_tile,
                              BWD=pm_bwd)
            consts.update(extra)
            return consts, warps

        def fwd(flag, dist, kinds, pairs=False):
            kinds = tuple(kinds) + (NONE,) * (6 - len(kinds))
            return (pair_engine._row_stats_kernel,
                    *kw("fwd", flag, dist, pairs, FWD=pm_fwd, **{f"K{i}": k for i, k in enumerate(kinds)}))

        forms = [(TUP1, 0, (LSE, SUM, SUM)), (TUP2, 0, (SUM, SUM)), (MARGIN, 2, (SUM,) * 6)]
        if dtype in ("fp32", "fp64"):
            forms.append((SNR, 1, (SUM,) * 6))
        launches = []
        for flag, dist, kinds in forms:
            launches.append(fwd(flag, dist, kinds))
            if flag != TUP1:
                launches.append((pair_engine._grad_kernel, *kw("rows", flag, dist, COLUMNS=False)))
                launches.append((pair_engine._grad_kernel, *kw("cols", flag, dist, COLUMNS=True, SELF=False)))
        launches += [fwd(TUP1, 0, (LSE, SUM, SUM), True), fwd(TUP2, 0, (SUM, SUM), True),
                     (pair_engine._grad_kernel, *kw("rows", TUP2, 0, True, COLUMNS=False))]
        for fn, consts, warps in launches:
            yield dtype, fn, _pair_signature(fn, ct, ptr, consts), consts, {"num_warps": warps}
