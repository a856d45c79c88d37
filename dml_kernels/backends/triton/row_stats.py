"""Per-row reduction statistics on the tiled engine (``<loss>_row_stats``, SPEC §7 "Reductions are statistics").

For a non-default reducer of the contrastive or triplet loss the forward reduces, per anchor row, the sum and
count of its elements l and the sum and count of those inside a ThresholdReducer band low < l < high; the
reducer is applied to these O(N) vectors in Python (``dml_kernels/reducers.py``). No pair or triplet element
is stored. The backward gets one upstream gradient per statistic and row (g_all, g_band) and recomputes the
tiles: an element's weight is h'(t)·(g_all(anchor) + g_band(anchor)·[low < l < high]).

* contrastive: the pair engine's row statistics (six SUM slots: Σ, band Σ and band count of each side, the
  bands read from a device tensor); the pair counts per row come from the labels (sorted + searchsorted);
  the backward epilogue reads the four per-row gradients through the engine's statistics pointer.
* triplets over every valid triplet: the (anchor block, positive tile, negative tile) kernel of ``triplet.py``
  with per-row band statistics, and a tile gradient streaming the anchors' other references (per-anchor
  weights instead of one 1/count scalar).
* batch-hard triplets: one per anchor, O(N·D) autograd ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._registry import register
from . import margin_softmax as MS
from . import pair_engine
from .pair_engine import SUM
from .similarity import batch_hard_indices
from .triplet import _hinge, pair_values


def _bounds(band):
    low, high = band
    return (-math.inf if low is None else float(low)), (math.inf if high is None else float(high))


# ----------------------------------------------------------------------------------------------- contrastive


@triton.jit
def _hinge_terms(v, pos_margin, neg_margin, DIST: tl.constexpr):
    sg = pair_engine.sim_sign(DIST)
    return tl.maximum(-sg * (v - pos_margin), 0.0), tl.maximum(sg * (v - neg_margin), 0.0)


@triton.jit
def contrastive_stats_fwd(v, pos, neg, ia, ib, na, nb, st, nst, pos_margin, neg_margin, p2, p3, DIST: tl.constexpr,
                          FLAG: tl.constexpr):
    """(pos Σ, pos band Σ, pos band #, neg Σ, neg band Σ, neg band #); st = the bands (plo, phi, nlo, nhi)."""
    hp, hn = _hinge_terms(v, pos_margin, neg_margin, DIST)
    bp = pos & (hp > tl.load(st)) & (hp < tl.load(st + 1))
    bn = neg & (hn > tl.load(st + 2)) & (hn < tl.load(st + 3))
    return (tl.where(pos, hp, 0.0), tl.where(bp, hp, 0.0), bp.to(v.dtype),
            tl.where(neg, hn, 0.0), tl.where(bn, hn, 0.0), bn.to(v.dtype))


@triton.jit
def contrastive_stats_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, pos_margin, neg_margin, p2, p3,
                          DIST: tl.constexpr, FLAG: tl.constexpr):
    """dL/dv from the per-row upstream gradients st (4 rows of nst: pos Σ, pos band Σ, neg Σ, neg band Σ)
    of the anchor ia; sc = the bands."""
    hp, hn = _hinge_terms(v, pos_margin, neg_margin, DIST)
    sg = pair_engine.sim_sign(DIST)
    inside = ia < na
    g0 = tl.load(st + ia, mask=inside, other=0.0)
    g1 = tl.load(st + nst + ia, mask=inside, other=0.0)
    g2 = tl.load(st + 2 * nst + ia, mask=inside, other=0.0)
    g3 = tl.load(st + 3 * nst + ia, mask=inside, other=0.0)
    wp = g0 + tl.where((hp > tl.load(sc)) & (hp < tl.load(sc + 1)), g1, 0.0)
    wn = g2 + tl.where((hn > tl.load(sc + 2)) & (hn < tl.load(sc + 3)), g3, 0.0)
    return sg * (tl.where(neg & (hn > 0), wn, 0.0) - tl.where(pos & (hp > 0), wp, 0.0))


class _RowStats(torch.autograd.Function):
    """(sums (K, N), counts (K, N) int64) = impl(x, ref); backward: the engine's gradient kernels with the
    per-row upstream gradients of the sums as their statistics (no host sync)."""

    @staticmethod
    def forward(ctx, impl, tiles, x, s, n, r, sr, nr):
        sums, counts = impl.forward(tiles, (x, s, n, r, sr, nr))
        ctx.impl, ctx.tiles = impl, tiles
        ctx.save_for_backward(x, s, n, r, sr, nr)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, g_sums, _g_counts):
        pair_engine.refuse_double_backward()
        x, s, n, r, sr, nr = ctx.saved_tensors
        impl, tiles = ctx.impl, ctx.tiles
        needs = ctx.needs_input_grad
        need_x, need_r = any(needs[2:5]), (r is not None and any(needs[5:8]))
        stats = g_sums.to(tiles.ct).contiguous()
        acc, dn, acc_r, dn_r = impl.grad(tiles, (x, s, n, r, sr, nr), stats, need_x, need_r)
        dx, ds, dnx = pair_engine.embedding_grads(x, s, acc, dn, needs[2:5])
        dr = dsr = dnr = None
        if need_r:
            dr, dsr, dnr = pair_engine.embedding_grads(r, sr, acc_r, dn_r, needs[5:8])
        return None, None, dx, ds, dnx, dr, dsr, dnr


def _row_stats(impl, x, labels, ref, ref_labels, distance):
    x, ref = pair_engine.autocast_inputs(x, ref)
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance)
    s, n, sr, nr = tiles.embed(x, ref)
    return _RowStats.apply(impl, tiles, x, s, n, ref, sr, nr)


def _label_pair_counts(labels, ref_labels):
    """(#positive, #negative) reference rows of every query row from the labels, O((N + M) log M), no sync."""
    refs = labels if ref_labels is None else ref_labels
    ordered = torch.sort(refs).values
    same = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    pos = same - 1 if ref_labels is None else same
    return pos, refs.shape[0] - same


class ContrastiveStats:
    def __init__(self, pos_margin, neg_margin, bands, labels, ref_labels):
        self.params = (pos_margin, neg_margin, 0.0, 0.0)
        self.bands, self.labels, self.ref_labels = bands, labels, ref_labels

    def forward(self, tiles, xs):
        out = tiles.row_stats(xs, contrastive_stats_fwd, (SUM,) * 6, self.params, stats=self.bands)
        pos, neg = _label_pair_counts(self.labels, self.ref_labels)
        sums = out[[0, 1, 3, 4]]
        counts = torch.stack([pos, out[2].round().long(), neg, out[5].round().long()])
        return sums, counts

    def grad(self, tiles, xs, stats, need_x, need_r):
        return tiles.grad(xs, contrastive_stats_bwd, stats, self.bands, self.params, 0, need_x, need_r)


def contrastive_loss_row_stats(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs=None,
                               bands=((None, None), (None, None))):
    if pairs is not None or labels is None:
        raise pair_engine.Unsupported("the triton contrastive_loss_row_stats has no explicit-pair form")
    ct = pair_engine.compute_dtype(x.dtype)
    band_t = torch.tensor([*_bounds(bands[0]), *_bounds(bands[1])], dtype=ct, device=x.device)
    impl = ContrastiveStats(float(pos_margin), float(neg_margin), band_t, labels, ref_labels)
    return _row_stats(impl, x, labels, ref, ref_labels, distance)


# ----------------------------------------------------------------------------------------------- triplets


@triton.jit
def _triplet_stats_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                          sums_ptr, counts_ptr, N, M, D, stride_x, stride_r, margin, low, high,
                          SMOOTH: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
                          HAS_PAIRS: tl.constexpr, DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                          BD: tl.constexpr, PREC: tl.constexpr):
    """Per anchor: Σ h, Σ h·[low < h < high] (sums_ptr, 2×N) and their counts (counts_ptr, int64) over the
    valid triplets (a, p, n), streaming a positive tile J and, inside it, a negative tile K."""
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    sg = pair_engine.sim_sign(DIST)
    total = tl.zeros((BA,), CT)
    band_total = tl.zeros((BA,), CT)
    count = tl.zeros((BA,), tl.int64)
    band_count = tl.zeros((BA,), tl.int64)
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
            h, dh = _hinge(sg * (v_k[:, None, :] - v_j[:, :, None]) + margin, SMOOTH)
            valid = pos_j[:, :, None] & neg_k[:, None, :]
            banded = valid & (h > low) & (h < high)
            total += tl.sum(tl.sum(tl.where(valid, h, 0.0), axis=2), axis=1)
            band_total += tl.sum(tl.sum(tl.where(banded, h, 0.0), axis=2), axis=1)
            count += tl.sum(tl.sum(valid.to(tl.int64), axis=2), axis=1)
            band_count += tl.sum(tl.sum(banded.to(tl.int64), axis=2), axis=1)
    inside = offs_a < N
    tl.store(sums_ptr + offs_a, total, mask=inside)
    tl.store(sums_ptr + N + offs_a, band_total, mask=inside)
    tl.store(counts_ptr + offs_a, count, mask=inside)
    tl.store(counts_ptr + N + offs_a, band_count, mask=inside)


@triton.jit
def _triplet_stats_grad_tile(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_a, offs_j, s_a, s_j, n_a, n_j, lab_a, lab_j,
                             pos_bits, neg_bits, nbytes, st_ptr, nst, sc_ptr, N, M, D, stride_x, stride_r,
                             margin, low, high, p3, BWD: tl.constexpr, SELF: tl.constexpr,
                             HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr,
                             SMOOTH: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
                             PREC: tl.constexpr):
    """The engine's ``TILE_GRAD`` for the statistics: the (I, J) tile's dL/dv, streaming the anchors' other
    references K; anchor a's elements weigh h'(t)·(g_all[a] + g_band[a]·[low < h < high]) (st_ptr: 2 × nst)."""
    CT: tl.constexpr = s_a.dtype
    sg = pair_engine.sim_sign(DIST)
    v_j = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_j, s_a, s_j, n_a, n_j, N, M, D, stride_x, stride_r,
                                 DIST, BA, BB, BD, PREC)
    pos_j, neg_j = pair_engine.pair_masks(lab_a, lab_j, offs_a, offs_j, N, M, pos_bits, neg_bits, nbytes,
                                          SELF, HAS_LABELS, HAS_PAIRS, False)
    inside = offs_a < N
    g_all = tl.load(st_ptr + offs_a, mask=inside, other=0.0)[:, None, None]
    g_band = tl.load(st_ptr + nst + offs_a, mask=inside, other=0.0)[:, None, None]
    as_pos = tl.zeros((BA, BB), CT)  # j a positive: Σ_n weight of (a, j, n)
    as_neg = tl.zeros((BA, BB), CT)  # j a negative: Σ_p weight of (a, p, j)
    for k0 in range(0, M, BB):
        offs_k = k0 + tl.arange(0, BB)
        s_k, n_k, lab_k = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_k, M, HAS_LABELS)
        v_k = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_k, s_a, s_k, n_a, n_k, N, M, D, stride_x, stride_r,
                                     DIST, BA, BB, BD, PREC)
        pos_k, neg_k = pair_engine.pair_masks(lab_a, lab_k, offs_a, offs_k, N, M, pos_bits, neg_bits, nbytes,
                                              SELF, HAS_LABELS, HAS_PAIRS, False)
        h1, d1 = _hinge(sg * (v_k[:, None, :] - v_j[:, :, None]) + margin, SMOOTH)  # (a, j positive, k negative)
        w1 = d1 * (g_all + tl.where((h1 > low) & (h1 < high), g_band, 0.0))
        as_pos += tl.sum(tl.where(pos_j[:, :, None] & neg_k[:, None, :], w1, 0.0), axis=2)
        h2, d2 = _hinge(sg * (v_j[:, None, :] - v_k[:, :, None]) + margin, SMOOTH)  # (a, k positive, j negative)
        w2 = d2 * (g_all + tl.where((h2 > low) & (h2 < high), g_band, 0.0))
        as_neg += tl.sum(tl.where(pos_k[:, :, None] & neg_j[:, None, :], w2, 0.0), axis=1)
    return pair_engine.chain(sg * (as_neg - as_pos), v_j, DIST)


class TripletStats:
    def __init__(self, margin, smooth_loss, band):
        self.margin, self.smooth = margin, smooth_loss
        self.low, self.high = _bounds(band)

    def forward(self, tiles, xs):
        c = tiles._common(*xs)
        sums = torch.empty(2, tiles.n, dtype=tiles.ct, device=tiles.device)
        counts = torch.empty(2, tiles.n, dtype=torch.int64, device=tiles.device)
        _triplet_stats_kernel[(triton.cdiv(tiles.n, tiles.blocks("triplet").ba),)](
            *c, sums, counts, tiles.n, tiles.m, tiles.d, c[0].stride(0), c[1].stride(0), float(self.margin),
            self.low, self.high, SMOOTH=self.smooth, **tiles.launch("triplet"), **tiles._flags())
        return sums, counts

    def grad(self, tiles, xs, stats, need_x, need_r):
        sc = torch.zeros(1, dtype=tiles.ct, device=tiles.device)  # unused by the tile gradient

        def side(columns):
            return tiles.grad_side(xs, columns, None, stats, sc, (self.margin, self.low, self.high, 0.0),
                                   int(self.smooth), tile_grad=_triplet_stats_grad_tile, kind="triplet")

        acc = dn = acc_r = dn_r = None
        if need_x:
            acc, dn = side(False)
            if tiles.self_mode:  # the reference side of every pair is x too
                acc_c, dn_c = side(True)
                acc, dn = acc + acc_c, dn + dn_c
        if need_r:
            acc_r, dn_r = side(True)
        return acc, dn, acc_r, dn_r


def _batch_hard_stats(x, labels, ref, ref_labels, margin, swap, smooth_loss, distance, band):
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
    valid = hard_pos >= 0
    losses = (F.softplus(t) if smooth_loss else F.relu(t)).where(valid, 0)
    low, high = _bounds(band)
    banded = valid & (losses > low) & (losses < high)
    return torch.stack([losses, losses.where(banded, 0)]), torch.stack([valid, banded]).long()


def triplet_margin_loss_row_stats(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                                  distance, triplets=None, bands=((None, None),)):
    if triplets is not None:
        raise pair_engine.Unsupported("the triton triplet_margin_loss_row_stats has no explicit-triplet form")
    if mining == "batch_hard":
        return _batch_hard_stats(x, labels, ref, ref_labels, margin, swap, smooth_loss, distance, bands[0])
    if swap:
        raise pair_engine.Unsupported("the triton all-triplets triplet_margin_loss_row_stats has no swap")
    return _row_stats(TripletStats(float(margin), bool(smooth_loss), bands[0]), x, labels, ref, ref_labels, distance)


# ----------------------------------------------------------------------- margin softmax: one class shard's rows


def _shard_config(loss, p):
    """(the class engine's configuration for ``loss``'s values, the target logit from the target's value t, the
    raw dot ‖w_y‖² b and ‖x‖ — the reference's margin transforms)."""
    from ..reference.margin_softmax import arcface_target, cosface_target, large_margin_target

    if loss == "normalized_softmax_loss":
        dist = p["distance"]
        if dist.name not in MS.CL._KIND:
            raise pair_engine.Unsupported(f"margin_softmax_row_stats: distance {dist.name!r} is not on the class engine")
        k = (1.0 if dist.is_similarity else -1.0) / float(p["temperature"])
        cfg = dict(kind=MS.CL._KIND[dist.name], kc=1, norm_x=int(dist.normalize), norm_w=True, scale=k)
        return cfg, lambda t, b, xn: k * t
    if loss in ("cosface_loss", "arcface_loss", "subcenter_arcface_loss"):
        s, m = float(p["scale"]), p["margin"]
        f = cosface_target if loss == "cosface_loss" else arcface_target
        kc = int(p.get("sub_centers", 1))
        return (dict(kind=0, kc=kc, group=1 if kc > 1 else 0, norm_x=1, norm_w=True, scale=s),
                lambda t, b, xn: s * f(t, m))
    if loss == "soft_triple_loss":
        dist = p["distance"]
        if dist.name not in ("cosine", "dot"):
            raise pair_engine.Unsupported(f"margin_softmax_row_stats: soft_triple_loss with {dist.name!r}")
        kc, la = int(p["centers_per_class"]), float(p["la"])
        return (dict(kind=0, kc=kc, group=2 if kc > 1 else 0, norm_x=int(dist.normalize), norm_w=dist.normalize,
                     scale=la, inv_gamma=1.0 / float(p["gamma"])), lambda t, b, xn: la * (t - p["margin"]))
    s, m, lm = float(p["scale"]), p["margin"], loss == "large_margin_softmax_loss"

    def target(dot, wsq, xn):  # t = PML's cosine; LargeMargin: raw dots, SphereFace: dots with unit columns
        wn = wsq.sqrt() if lm else 1.0
        t = dot / (xn.clamp_min(MS._EPS) * (wn.clamp_min(MS._EPS) if lm else 1.0))
        return large_margin_target(t, m) * wn * xn * s
    return dict(kind=0, kc=1, norm_x=0, norm_w=not lm, wsq=lm, scale=s), target


def margin_softmax_row_stats(x, labels, W, *, loss, columns=None, **p):
    """One class shard's per-row statistics (the reference's contract, ``dml_kernels/_ops.py``) on the
    margin-softmax family's class engine (``margin_softmax._ClassStats`` with SHARD: the rest LSE for every row,
    over the classes of ``columns``): (target logit with the margin, or 0; has_target; LSE of the other taking-part
    classes' logits, or 0; has_rest), O(B) outputs, no B×C buffer, no host sync."""
    if loss not in MARGIN_SOFTMAX_ROW_STATS_LOSSES:
        raise ValueError(f"margin_softmax_row_stats: unknown loss {loss!r}; one of {MARGIN_SOFTMAX_ROW_STATS_LOSSES}")
    if W.shape[1] == 0:  # an empty shard (C < world size): nothing here, still graph-attached
        z = (x * 0).sum(1) + (W * 0).sum()
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return z, none, z, none
    cfg, target_of = _shard_config(loss, p)
    cfg = {**dict(loss=0, group=0, wsq=False, shard=True), **cfg}
    C = W.shape[1] // cfg["kc"]
    labels = labels.to(device=x.device, dtype=torch.long)
    inside = (labels >= 0) & (labels < C)
    acc = MS.CL._acc(MS.CL._compute_dtype(x))
    if columns is None:
        cm = torch.ones(C, dtype=acc, device=x.device)
        has_target, taking_part = inside, torch.full((), C, device=x.device)
    else:
        columns = columns.to(device=x.device, dtype=torch.bool)
        cm = columns.to(acc)
        has_target = inside & columns[labels.clamp(0, C - 1)]
        taking_part = columns.sum()
    t, rest, wsq = MS._stats(x, labels, W, cm=cm, **cfg)
    xn = torch.linalg.vector_norm(x.to(t.dtype), dim=1)
    wsq = torch.where(has_target, wsq, 1)  # rows without a target: finite (their target is zeroed below)
    target = torch.where(has_target, target_of(torch.where(has_target, t, 0), wsq, xn), 0)
    has_rest = taking_part - has_target.long() > 0
    rest = torch.where(has_rest, rest, 0)
    if x.dtype not in (torch.float16, torch.bfloat16):
        target, rest = target.to(x.dtype), rest.to(x.dtype)
    return target, has_target, rest, has_rest


MARGIN_SOFTMAX_ROW_STATS_LOSSES = ("normalized_softmax_loss", "cosface_loss", "arcface_loss",
                                   "large_margin_softmax_loss", "sphereface_loss", "subcenter_arcface_loss",
                                   "soft_triple_loss")

__all__ = ["contrastive_loss_row_stats", "triplet_margin_loss_row_stats", "margin_softmax_row_stats"]

for _name in __all__:
    register(_name, "triton")(globals()[_name])
