"""The contrastive family on the Triton pair engine: NT-Xent, SupCon, NCA, Circle, ThresholdConsistentMargin and
IntraPairVariance as per-row statistics — no N×M buffer, no host sync, no atomics.

Every loss is split into a *row-statistics op* (one autograd Function, :class:`_Rows`, over the engine) and O(N)
PyTorch on its outputs (the reductions, PML's zero rules, softplus): autograd differentiates the O(N) part
exactly as the reference does, and hands the Function one upstream gradient per statistic and row. The
Function's forward streams the tiles once (twice for a loss that needs a row statistic before its per-pair
term) and saves O(N) values; its backward recomputes the tiles with the engine's row kernel (and, with a
reference set, its column kernel), reading the forward statistics and the upstream gradients through the
engine's statistics pointer ``st``. With the logit l = sg·k·v (sg = +1 for a similarity, −1 for a distance):

* SupCon (``FLAG`` 0): L_i = LSE_{P∪N} l, S_i = Σ_P l; dl = g_L·e^{l−L}[P∪N] + g_S[P].
* NCA (1): L_i = LSE_{P∪N} l, LP_i = LSE_P l; dl = g_L·e^{l−L}[P∪N] + g_P·e^{l−LP}[P].
* Circle (2, cosine): LSE_P of −γ[1+m−s]₊(s−1+m), LSE_N of γ[s+m]₊(s−m) (weights detached).
* ThresholdConsistentMargin (3, cosine): Σ_P [s ≤ m⁺](m⁺ − s), Σ_N [s ≥ m⁻](s − m⁻) and their counts.
* NT-Xent: pass 1 (4) A_i = LSE_N l; pass 2 (5) T_i = Σ_P softplus(A_i − l) and W_i = Σ_P σ(A_i − l);
  dl = −g_i·σ(A_i − l)[P] + g_i·W_i·e^{l−A_i}[N].
* IntraPairVariance: pass 1 (6) Σ_P v, Σ_N v (the global means, differentiable); pass 2 (7) Σ_P h_P², Σ_N h_N²
  with h the hinge around (1∓ε)·mean, plus Σ ∂h²/∂mean per row for the means' gradient.

Float parameters (1/τ, σ, γ, m, ...) reach the kernels as row 0 of ``st`` in the compute dtype (a Python float
argument would be fp32: 1e-9 errors in fp64). ``st`` rows 1.. hold the per-row statistics / gradients.
Explicit pairs: a PackedPairMask (SupCon, Circle) or PML's 4-tuple (NT-Xent, TCM, IPV; duplicates count there,
so a tuple with a duplicate pair is Unsupported and ``auto`` falls back). Tested under the interpreter, not yet
run on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._pairs import PackedPairMask
from ..._registry import Unsupported, register
from ...distances import Distance
from . import pair_engine
from .pair_engine import LSE, NONE, SUM

SUPCON, NCA, CIRCLE, TCM, NTX1, NTX2, IPV1, IPV2 = range(8)
_NP = 8  # parameter slots in row 0 of st


@triton.jit
def _par(st, j):
    return tl.load(st + j)


@triton.jit
def _row(st, nst, r, ia, na):
    """Per-row statistic r (row r + 1 of st, row 0 holds the parameters) of the anchors ia."""
    return tl.load(st + (r + 1) * nst + ia, mask=ia < na, other=0.0)


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _circle_logits(v, gamma, m):
    wp = tl.maximum(1.0 + m - v, 0.0)
    wn = tl.maximum(v + m, 0.0)
    return -gamma * wp * (v - (1.0 - m)), gamma * wn * (v - m), wp, wn


@triton.jit
def _ipv_hinges(v, st, DIST: tl.constexpr):
    """(h_P, ∂h_P/∂mean_P, h_N, ∂h_N/∂mean_N) with ∂h/∂v = ∓1: similarity h_P = (1−ε⁺)μ_P − v, h_N = v − (1+ε⁻)μ_N;
    a distance the other way round (PML's IntraPairVarianceLoss)."""
    ep = _par(st, 1)
    en = _par(st, 2)
    mp = _par(st, 4)
    mn = _par(st, 5)
    if DIST == 0:
        hp = tl.maximum((1.0 - ep) * mp - v, 0.0)
        hn = tl.maximum(v - (1.0 + en) * mn, 0.0)
        return hp, 1.0 - ep, hn, -(1.0 + en)
    hp = tl.maximum(v - (1.0 + ep) * mp, 0.0)
    hn = tl.maximum((1.0 - en) * mn - v, 0.0)
    return hp, -(1.0 + ep), hn, 1.0 - en


@triton.jit
def cf_fwd(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    k = _par(st, 0)
    lg = pair_engine.sim_sign(DIST) * k * v
    both = pos | neg
    fp = pos.to(v.dtype)
    fn = neg.to(v.dtype)
    ninf = float("-inf")
    if FLAG == 0:  # SupCon
        return tl.where(both, lg, ninf), tl.where(pos, lg, 0.0), fp, fn, v, v
    elif FLAG == 1:  # NCA
        return tl.where(both, lg, ninf), tl.where(pos, lg, ninf), fp, fn, v, v
    elif FLAG == 2:  # Circle
        lp, ln, wp, wn = _circle_logits(v, k, _par(st, 1))
        return tl.where(pos, lp, ninf), tl.where(neg, ln, ninf), fp, fn, v, v
    elif FLAG == 3:  # ThresholdConsistentMargin
        ap = pos & (v <= _par(st, 1))
        an = neg & (v >= _par(st, 2))
        return (tl.where(ap, _par(st, 1) - v, 0.0), tl.where(an, v - _par(st, 2), 0.0), ap.to(v.dtype),
                an.to(v.dtype), v, v)
    elif FLAG == 4:  # NT-Xent pass 1
        return tl.where(neg, lg, ninf), v, fp, fn, v, v
    elif FLAG == 5:  # NT-Xent pass 2
        z = _row(st, nst, 0, ia, na) - lg
        keep = pos & (_row(st, nst, 1, ia, na) > 0)
        return tl.where(keep, _softplus(z), 0.0), tl.where(keep, _sigmoid(z), 0.0), v, v, v, v
    elif FLAG == 6:  # IntraPairVariance pass 1
        return tl.where(pos, v, 0.0), tl.where(neg, v, 0.0), fp, fn, v, v
    else:  # IntraPairVariance pass 2
        hp, cp, hn, cn = _ipv_hinges(v, st, DIST)
        return (tl.where(pos, hp * hp, 0.0), tl.where(neg, hn * hn, 0.0), tl.where(pos, 2.0 * cp * hp, 0.0),
                tl.where(neg, 2.0 * cn * hn, 0.0), v, v)


@triton.jit
def cf_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """dL/dv of a tile from the anchors' forward statistics and upstream gradients (rows of st)."""
    k = _par(st, 0)
    sg = pair_engine.sim_sign(DIST)
    lg = sg * k * v
    both = pos | neg
    if FLAG == 0:  # rows: L, g_L, g_S
        w = tl.where(both, _row(st, nst, 1, ia, na) * tl.exp(lg - _row(st, nst, 0, ia, na)), 0.0)
        w += tl.where(pos, _row(st, nst, 2, ia, na), 0.0)
        return w * (sg * k)
    elif FLAG == 1:  # rows: L, LP, g_L, g_P
        w = tl.where(both, _row(st, nst, 2, ia, na) * tl.exp(lg - _row(st, nst, 0, ia, na)), 0.0)
        w += tl.where(pos, _row(st, nst, 3, ia, na) * tl.exp(lg - _row(st, nst, 1, ia, na)), 0.0)
        return w * (sg * k)
    elif FLAG == 2:  # rows: Lp, Ln, g_p, g_n
        lp, ln, wp, wn = _circle_logits(v, k, _par(st, 1))
        w = tl.where(pos, _row(st, nst, 2, ia, na) * tl.exp(lp - _row(st, nst, 0, ia, na)) * (-k * wp), 0.0)
        w += tl.where(neg, _row(st, nst, 3, ia, na) * tl.exp(ln - _row(st, nst, 1, ia, na)) * (k * wn), 0.0)
        return w
    elif FLAG == 3:  # rows: g_p, g_n
        ap = pos & (v <= _par(st, 1))
        an = neg & (v >= _par(st, 2))
        return tl.where(an, _row(st, nst, 1, ia, na), 0.0) - tl.where(ap, _row(st, nst, 0, ia, na), 0.0)
    elif FLAG == 5:  # rows: A, has_neg, g·W, g
        a = _row(st, nst, 0, ia, na)
        w = tl.where(pos & (_row(st, nst, 1, ia, na) > 0), -_row(st, nst, 3, ia, na) * _sigmoid(a - lg), 0.0)
        w += tl.where(neg, _row(st, nst, 2, ia, na) * tl.exp(lg - a), 0.0)
        return w * (sg * k)
    elif FLAG == 6:  # rows: g_P, g_N
        return tl.where(pos, _row(st, nst, 0, ia, na), 0.0) + tl.where(neg, _row(st, nst, 1, ia, na), 0.0)
    else:  # IntraPairVariance pass 2, rows: g_P, g_N (∂h/∂v = −1 for h_P of a similarity, ...)
        hp, cp, hn, cn = _ipv_hinges(v, st, DIST)
        w = tl.where(pos, _row(st, nst, 0, ia, na) * 2.0 * hp, 0.0)
        w -= tl.where(neg, _row(st, nst, 1, ia, na) * 2.0 * hn, 0.0)
        if DIST == 0:
            return -w
        return w


# ---------------------------------------------------------------------------------------------- host side


def _st(tiles, params, rows=()):
    """Row 0: the float parameters (compute dtype; ``torch.full``: a fill on the device, no host-to-device copy);
    rows 1..: per-row statistics (N,). Width max(N, _NP)."""
    width = max(tiles.n, _NP)
    out = torch.zeros(1 + len(rows), width, dtype=tiles.ct, device=tiles.device)
    kw = dict(dtype=tiles.ct, device=tiles.device)
    out[0, :len(params)] = torch.stack([p.to(**kw).reshape(()) if torch.is_tensor(p) else torch.full((), float(p), **kw)
                                        for p in params])
    for j, r in enumerate(rows):
        out[j + 1, :tiles.n] = r.to(tiles.ct)
    return out


def _finite(t):
    return torch.where(torch.isfinite(t), t, 0)


class _Rows(torch.autograd.Function):
    """(vals (K, N), counts (2, N)) = spec.forward(x, ref, extra); backward: the engine's gradient kernels with
    the epilogue ``spec.bwd_epilogue`` (default :func:`cf_bwd`; the pair-margin losses' ``pm_bwd``), ``spec``'s st
    (forward statistics + upstream gradients) and the gradient of the per-row / scalar input ``extra``. The one
    row-statistics Function of the Triton contrastive and pair-margin families."""

    @staticmethod
    def forward(ctx, spec, tiles, x, s, n, r, sr, nr, extra):
        xs = (x, s, n, r, sr, nr)
        vals, counts, saved = spec.forward(tiles, xs, extra)
        ctx.spec, ctx.tiles = spec, tiles
        ctx.save_for_backward(x, s, n, r, sr, nr, extra, saved)
        ctx.mark_non_differentiable(counts)
        return vals, counts

    @staticmethod
    def backward(ctx, g_vals, _g_counts):
        pair_engine.refuse_double_backward()
        x, s, n, r, sr, nr, extra, saved = ctx.saved_tensors
        spec, tiles = ctx.spec, ctx.tiles
        needs = ctx.needs_input_grad
        need_x, need_r = any(needs[2:5]), (r is not None and any(needs[5:8]))
        g_vals = g_vals.to(tiles.ct)
        st, d_extra = spec.backward(tiles, saved, g_vals, extra)
        sc = torch.zeros(1, dtype=tiles.ct, device=tiles.device)
        acc, dn, acc_r, dn_r = tiles.grad((x, s, n, r, sr, nr), getattr(spec, "bwd_epilogue", cf_bwd), st, sc,
                                          flag=spec.bwd_flag, need_x=need_x, need_r=need_r)
        dx, ds, dnx = pair_engine.embedding_grads(x, s, acc, dn, needs[2:5])
        dr = dsr = dnr = None
        if need_r:
            dr, dsr, dnr = pair_engine.embedding_grads(r, sr, acc_r, dn_r, needs[5:8])
        return None, None, dx, ds, dnx, dr, dsr, dnr, (d_extra.to(extra.dtype) if needs[8] else None)


class _OnePass:
    """A loss whose statistics are one forward pass: two differentiable slots (kinds) and the pos / neg counts
    (or, for TCM, the counts of the active terms)."""

    def __init__(self, flag, kinds, params):
        self.flag = self.bwd_flag = flag
        self.kinds, self.params = kinds, params

    def forward(self, tiles, xs, extra):
        st = _st(tiles, self.params)
        out = tiles.row_stats(xs, cf_fwd, self.kinds + (SUM, SUM), stats=st, flag=self.flag)
        return out[:2].clone(), out[2:4].round().long(), _finite(out[:2])

    def backward(self, tiles, saved, g, extra):
        if self.flag == TCM:  # rows: g_p, g_n
            rows = (g[0], g[1])
        elif self.flag == SUPCON:  # rows: L, g_L, g_S
            rows = (saved[0], g[0], g[1])
        else:  # NCA / Circle, rows: the two LSEs, their gradients
            rows = (saved[0], saved[1], g[0], g[1])
        return _st(tiles, self.params, rows), None


class _NTXent:
    """vals: (Σ_P softplus(A − l), A (the negative LSE, -inf without negatives)); counts: (#P, #N)."""
    bwd_flag = NTX2

    def __init__(self, k):
        self.params = (k,)

    def forward(self, tiles, xs, extra):
        one = tiles.row_stats(xs, cf_fwd, (LSE, NONE, SUM, SUM), stats=_st(tiles, self.params), flag=NTX1)
        has_neg = one[3] > 0
        a = torch.where(has_neg, one[0], 0)
        two = tiles.row_stats(xs, cf_fwd, (SUM, SUM), stats=_st(tiles, self.params, (a, has_neg)), flag=NTX2)
        saved = torch.stack([a, has_neg.to(a.dtype), two[1]])
        return two[0].unsqueeze(0).clone(), one[2:4].round().long(), saved

    def backward(self, tiles, saved, g, extra):
        a, has_neg, w = saved
        return _st(tiles, self.params, (a, has_neg, g[0] * w, g[0])), None


class _IPVSums:
    flag = bwd_flag = IPV1

    def forward(self, tiles, xs, extra):
        out = tiles.row_stats(xs, cf_fwd, (SUM, SUM, SUM, SUM), stats=_st(tiles, (1.0,)), flag=IPV1)
        return out[:2].clone(), out[2:4].round().long(), out[:0]

    def backward(self, tiles, saved, g, extra):
        return _st(tiles, (1.0,), (g[0], g[1])), None


class _IPVTerms:
    """vals: (Σ_P h_P², Σ_N h_N²) given extra = (mean_P, mean_N); saves Σ ∂h²/∂mean per row for their gradient."""
    bwd_flag = IPV2

    def __init__(self, pos_eps, neg_eps):
        self.eps = (pos_eps, neg_eps)

    def _params(self, extra):
        return (1.0, self.eps[0], self.eps[1], 0.0, extra[0], extra[1])

    def forward(self, tiles, xs, extra):
        out = tiles.row_stats(xs, cf_fwd, (SUM,) * 4, stats=_st(tiles, self._params(extra)), flag=IPV2)
        zeros = torch.zeros(2, tiles.n, dtype=torch.long, device=tiles.device)
        return out[:2].clone(), zeros, out[2:4].clone()

    def backward(self, tiles, saved, g, extra):
        d_extra = (g * saved).sum(1).to(extra.dtype)
        return _st(tiles, self._params(extra), (g[0], g[1])), d_extra


def _rows(spec, x, labels, ref, ref_labels, distance, pairs, extra=None):
    x, ref = pair_engine.autocast_inputs(x, ref)
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance, pairs)
    s, n, sr, nr = tiles.embed(x, ref)
    if extra is None:
        extra = torch.zeros(0, dtype=tiles.ct, device=x.device)
    vals, counts = _Rows.apply(spec, tiles, x, s, n, ref, sr, nr, extra)
    return vals, counts, tiles.ct


def _zero(x, ref, ct):
    z = (x * 0).sum().to(ct)
    return z if ref is None else z + (ref * 0).sum().to(ct)


def _avg_nonzero(losses, zero):
    active = losses > 0
    count = active.sum()
    return torch.where(count > 0, losses.where(active, 0).sum() / count.clamp_min(1), zero)


def _tuple_mask(pairs, n, m, device):
    """PML's 4-tuple → PackedPairMask when no pair repeats (these losses count repeats: Unsupported then).
    Checking for repeats syncs with the host (an explicit tuple is data the host already produced)."""
    if pairs is None or isinstance(pairs, PackedPairMask):
        return pairs
    for a, b in (pairs[:2], pairs[2:]):
        key = a.to(device) * m + b.to(device)
        if key.numel() > 1 and int(torch.unique(key).numel()) != key.numel():
            raise Unsupported("the triton form counts each pair once; this indices_tuple repeats a pair")
    return PackedPairMask.from_indices(pairs, n, m, device)


def _pair_counts_rule(counts, pair_rule):
    """(#P, #N, PML's ≤1-pair rule as a device bool: True = the loss is its zero)."""
    tp, tn = counts[0].sum(), counts[1].sum()
    few = (tp <= 1) & (tn <= 1) if pair_rule else torch.zeros((), dtype=torch.bool, device=tp.device)
    return tp, tn, few


# ---------------------------------------------------------------------------------------------- the ops


@register("supcon_loss", "triton")
def supcon_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    if pairs is not None and not isinstance(pairs, PackedPairMask):
        raise Unsupported("the triton supcon_loss takes pairs as a PackedPairMask")
    vals, counts, ct = _rows(_OnePass(SUPCON, (LSE, SUM), (1.0 / temperature,)), x, labels, ref, ref_labels,
                             distance, pairs)
    npos = counts[0]
    losses = torch.where(npos > 0, vals[0] - vals[1] / npos.clamp_min(1).to(ct), 0)
    zero = _zero(x, ref, ct)
    tp, tn, few = _pair_counts_rule(counts, pair_rule)
    return torch.where(few | (tp == 0) | (tn == 0), zero, _avg_nonzero(losses, zero))


@register("nca_loss", "triton")
def nca_loss(x, labels, ref, ref_labels, *, softmax_scale, distance, weights=None):
    ct = pair_engine.compute_dtype(x.dtype)
    if x.shape[0] <= 1:  # PML's zero loss for a batch of one (a shape: no sync)
        return _zero(x, ref, ct)
    vals, counts, ct = _rows(_OnePass(NCA, (LSE, LSE), (softmax_scale,)), x, labels, ref, ref_labels, distance, None)
    has_pos = counts[0] > 0
    losses = torch.where(has_pos, vals[0] - vals[1], 0)
    if weights is not None:
        losses = losses * weights.to(ct)
    k = has_pos.sum()
    return torch.where(k > 0, losses.sum() / k.clamp_min(1), _zero(x, ref, ct))


@register("circle_loss", "triton")
def circle_loss(x, labels, ref, ref_labels, *, m, gamma, distance, pairs=None, pair_rule=True):
    if pairs is not None and not isinstance(pairs, PackedPairMask):
        raise Unsupported("the triton circle_loss takes pairs as a PackedPairMask")
    if distance.name != "cosine":
        raise Unsupported("the triton circle_loss is the cosine form")
    vals, counts, ct = _rows(_OnePass(CIRCLE, (LSE, LSE), (gamma, m)), x, labels, ref, ref_labels, distance, pairs)
    hp, hn = counts[0] > 0, counts[1] > 0
    both = hp & hn
    z = torch.where(both, vals[0], 0) + torch.where(both, vals[1], 0)
    losses = F.softplus(z) * both
    zero = _zero(x, ref, ct)
    _, _, few = _pair_counts_rule(counts, pair_rule)
    return torch.where(few, zero, _avg_nonzero(losses, zero))


@register("threshold_consistent_margin_loss", "triton")
def threshold_consistent_margin_loss(x, labels, *, lambda_plus, lambda_minus, margin_plus, margin_minus, pairs=None):
    pairs = _tuple_mask(pairs, x.shape[0], x.shape[0], x.device)
    dist = Distance("cosine", True)
    vals, counts, ct = _rows(_OnePass(TCM, (SUM, SUM), (1.0, margin_plus, margin_minus)), x, labels, None, None,
                             dist, pairs)
    cp, cn = counts[0].sum(), counts[1].sum()
    total = _zero(x, None, ct)
    total = total + torch.where(cp > 0, lambda_plus * vals[0].sum() / cp.clamp_min(1), 0)
    return total + torch.where(cn > 0, lambda_minus * vals[1].sum() / cn.clamp_min(1), 0)


@register("ntxent_loss", "triton")
def ntxent_loss(x, labels, ref, ref_labels, *, temperature, distance, pairs=None, pair_rule=True):
    m = x.shape[0] if ref is None else ref.shape[0]
    pairs = _tuple_mask(pairs, x.shape[0], m, x.device)
    vals, counts, ct = _rows(_NTXent(1.0 / temperature), x, labels, ref, ref_labels, distance, pairs)
    tp, tn, few = _pair_counts_rule(counts, pair_rule)
    zero = _zero(x, ref, ct)
    return torch.where(few | (tp == 0) | (tn == 0), zero, vals[0].sum() / tp.clamp_min(1).to(ct))


@register("intra_pair_variance_loss", "triton")
def intra_pair_variance_loss(x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance, pairs=None, pair_rule=True):
    m = x.shape[0] if ref is None else ref.shape[0]
    pairs = _tuple_mask(pairs, x.shape[0], m, x.device)
    sums, counts, ct = _rows(_IPVSums(), x, labels, ref, ref_labels, distance, pairs)
    tp, tn, few = _pair_counts_rule(counts, pair_rule)
    cp, cn = tp.clamp_min(1).to(ct), tn.clamp_min(1).to(ct)
    means = torch.stack([sums[0].sum() / cp, sums[1].sum() / cn])
    terms, _, _ = _rows(_IPVTerms(pos_eps, neg_eps), x, labels, ref, ref_labels, distance, pairs, extra=means)
    zero = _zero(x, ref, ct)
    loss = zero + torch.where(tp > 0, terms[0].sum() / cp, 0) + torch.where(tn > 0, terms[1].sum() / cn, 0)
    return torch.where(few, zero, loss)


# ---------------------------------------------------------------------------------------------- AOT check


_FWD_KINDS = {SUPCON: (LSE, SUM), NCA: (LSE, LSE), CIRCLE: (LSE, LSE), TCM: (SUM, SUM), NTX1: (LSE, NONE),
              NTX2: (SUM, SUM), IPV1: (SUM, SUM), IPV2: (SUM, SUM)}


def aot_variants():
    """(dtype, kernel, signature, constexprs, options) of every launch above on CUDA, for ``aot_check.py``: the
    forward for each FLAG (with its kinds) and the row / column gradient kernels for each backward FLAG, label
    masks with the euclidean distance (cosine for Circle / TCM), plus packed-pair variants (SupCon, NT-Xent)."""
    from .aot_signatures import _pair_signature

    for dtype, ct, group in (("fp16", "fp32", "half"), ("bf16", "fp32", "half"), ("fp32", "fp32", "fp32"),
                             ("fp64", "fp64", "fp64")):
        ptr = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "pos_bits": "*u8",
               "neg_bits": "*u8"}

        def kw(kind, flag, pairs=False, **extra):
            ba, bb, bd, bdo, warps = pair_engine.gpu_blocks(group, kind, pairs)
            consts = dict(SELF=True, HAS_LABELS=not pairs, HAS_PAIRS=pairs, DIST=0 if flag in (CIRCLE, TCM) else 2,
                          PREC="ieee", BA=ba, BB=bb, BD=bd, FLAG=flag)
            if "COLUMNS" in extra:
                consts.update(BDO=bdo, GPREC="tf32" if group == "half" else "ieee", TILE_GRAD=pair_engine.grad_tile,
                              BWD=cf_bwd)
            consts.update(extra)
            return consts, warps

        launches = []
        for flag, kinds in _FWD_KINDS.items():
            kinds = kinds + (SUM, SUM, NONE, NONE)
            launches.append((pair_engine._row_stats_kernel, *kw("fwd", flag, FWD=cf_fwd,
                                                                **{f"K{i}": k for i, k in enumerate(kinds)})))
        for flag in (SUPCON, NCA, CIRCLE, TCM, NTX2, IPV1, IPV2):
            launches.append((pair_engine._grad_kernel, *kw("rows", flag, COLUMNS=False)))
            launches.append((pair_engine._grad_kernel, *kw("cols", flag, COLUMNS=True, SELF=False)))
        for flag in (SUPCON, NTX2):
            launches.append((pair_engine._grad_kernel, *kw("rows", flag, True, COLUMNS=False)))
        launches.append((pair_engine._row_stats_kernel, *kw("fwd", SUPCON, True, FWD=cf_fwd, K0=LSE, K1=SUM, K2=SUM,
                                                            K3=SUM, K4=NONE, K5=NONE)))
        for fn, consts, warps in launches:
            yield dtype, fn, _pair_signature(fn, ct, ptr, consts), consts, {"num_warps": warps}
