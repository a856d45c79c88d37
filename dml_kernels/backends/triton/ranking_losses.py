"""FastAP and RankedList on the pair engine: per-row soft distance histograms / four per-row sums, no N×N buffer.

Forward (one pass over the tiles): for a block of query rows, every reference tile's distances D (the engine's
``value_tile``, squared or plain euclidean on normalised rows) are soft-binned into ``NE = num_bins + 1``
triangular bins, pulse_l = max(1 − |D − z_l| / δ, 0) with PML's centres z_l (``torch.linspace``, passed in, so
the reference's bin arithmetic is used op for op), and summed per row over the positives and the negatives:
h⁺, h⁻ (N × NE, ``NE`` a constexpr) plus the positive count. AP per row from (h⁺, h⁻) is O(N·NE) torch code
shared with the reference (``fastap_ap``), so autograd differentiates it and hands the kernel dL/dh⁺, dL/dh⁻.

Backward (recomputed tiles): the engine's gradient kernel with an epilogue that, per pair (i, j), sums over the
bins dL/dh_il · dpulse_l/dD (−sign(D − z_l)/δ where the pulse is active), the rows' dL/dh read from the stats;
in self mode the same tile also gives the transposed role, so a row block owns its rows (no atomics).

Tested under the interpreter, not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ..reference.ranking_losses import fastap_ap, fastap_bin_centres
from . import pair_engine
from .pair_engine import embedding_grads, load_rows, pair_masks, refuse_double_backward, value_tile


@triton.jit
def _fastap_hist_kernel(x_ptr, sx_ptr, nx_ptr, lab_ptr, z_ptr, hp_ptr, hn_ptr, cnt_ptr, N, D, stride_x,
                        NE: tl.constexpr, NEP: tl.constexpr, DIST: tl.constexpr,
                        BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = load_rows(x_ptr, sx_ptr, nx_ptr, lab_ptr, offs_a, N, True)
    bins = tl.arange(0, NEP)
    delta = tl.load(z_ptr + NE)
    hp = tl.zeros((BA, NEP), CT)
    hn = tl.zeros((BA, NEP), CT)
    cnt = tl.zeros((BA,), CT)
    for b0 in range(0, N, BB):
        offs_b = b0 + tl.arange(0, BB)
        s_b, n_b, lab_b = load_rows(x_ptr, sx_ptr, nx_ptr, lab_ptr, offs_b, N, True)
        v = value_tile(x_ptr, x_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, N, D, stride_x, stride_x,
                       DIST, BA, BB, BD, PREC)
        pos, neg = pair_masks(lab_a, lab_b, offs_a, offs_b, N, N, lab_ptr, lab_ptr, 1, True, True, False, False)
        cnt += tl.sum(pos.to(CT), axis=1)
        for l in tl.static_range(NE):
            z = tl.load(z_ptr + l)
            pulse = tl.maximum(1 - tl.abs(v - z) / delta, 0.0)
            sp = tl.sum(tl.where(pos, pulse, 0.0), axis=1)
            sn = tl.sum(tl.where(neg, pulse, 0.0), axis=1)
            hp = tl.where(bins[None, :] == l, hp + sp[:, None], hp)
            hn = tl.where(bins[None, :] == l, hn + sn[:, None], hn)
    inside = offs_a < N
    off2 = offs_a.to(tl.int64)[:, None] * NE + bins[None, :]
    m2 = inside[:, None] & (bins[None, :] < NE)
    tl.store(hp_ptr + off2, hp, mask=m2)
    tl.store(hn_ptr + off2, hn, mask=m2)
    tl.store(cnt_ptr + offs_a, cnt, mask=inside)


@triton.jit
def fastap_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """dL/dD of the tile: Σ_l (dL/dh⁺_il [pos] + dL/dh⁻_il [neg]) · d pulse_l/dD; FLAG = NE. Stats rows 0..NE−1:
    dL/dh⁺ per bin, NE..2NE−1: dL/dh⁻, row 2NE: the centres z_0..z_{NE−1} and δ."""
    w = v * 0.0
    row_in = ia < na
    zrow = st + 2 * FLAG * nst
    delta = tl.load(zrow + FLAG)
    for l in tl.static_range(FLAG):
        t = v - tl.load(zrow + l)
        active = (1 - tl.abs(t) / delta) > 0
        sign = tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
        dpulse = tl.where(active, -sign / delta, 0.0)
        gp = tl.load(st + l * nst + ia, mask=row_in, other=0.0)
        gn = tl.load(st + (FLAG + l) * nst + ia, mask=row_in, other=0.0)
        w += (tl.where(pos, gp, 0.0) + tl.where(neg, gn, 0.0)) * dpulse
    return w


class _Histograms(torch.autograd.Function):
    """(h⁺, h⁻, n⁺) of every row from (x, s, n); backward by recomputed tiles."""

    @staticmethod
    def forward(ctx, tiles, zd, x, s, n):
        ne = zd.numel() - 1
        hp = torch.empty(tiles.n, ne, dtype=tiles.ct, device=x.device)
        hn = torch.empty_like(hp)
        cnt = torch.empty(tiles.n, dtype=tiles.ct, device=x.device)
        kw = tiles.launch("fwd")
        grid = (triton.cdiv(tiles.n, kw["BA"]),)
        xc = x.contiguous()
        _fastap_hist_kernel[grid](xc, s.contiguous(), n.contiguous(), tiles.labels, zd, hp, hn, cnt, tiles.n, tiles.d,
                                  xc.stride(0), NE=ne, NEP=triton.next_power_of_2(ne), DIST=tiles.dist, **kw)
        ctx.tiles = tiles
        ctx.save_for_backward(x, s, n, zd)
        ctx.mark_non_differentiable(cnt)
        return hp, hn, cnt

    @staticmethod
    def backward(ctx, gp, gn, _gcnt):
        refuse_double_backward()
        x, s, n, zd = ctx.saved_tensors
        tiles = ctx.tiles
        ne = zd.numel() - 1
        width = max(tiles.n, ne + 1)
        st = torch.zeros(2 * ne + 1, width, dtype=tiles.ct, device=x.device)
        st[:ne, :tiles.n] = gp.t()
        st[ne:2 * ne, :tiles.n] = gn.t()
        st[2 * ne, :ne + 1] = zd
        sc = torch.zeros(1, dtype=tiles.ct, device=x.device)
        acc, dn, _, _ = tiles.grad((x, s, n, None, None, None), fastap_bwd, st, sc, flag=ne, need_x=True)
        dx, ds, dnx = embedding_grads(x, s, acc, dn, ctx.needs_input_grad[2:5])
        return None, None, dx, ds, dnx


def fastap_loss(x, labels, *, num_bins, distance, weights=None):
    if distance.name not in ("euclidean", "squared_euclidean") or not distance.normalize:
        raise Unsupported("fastap_loss: the fused form takes the normalised euclidean distances only")
    x, _ = pair_engine.autocast_inputs(x, None)
    tiles = pair_engine.Tiles(x, labels, None, None, distance)
    z, delta = fastap_bin_centres(num_bins, 2 if distance.squared else 1, tiles.ct, x.device)
    zd = torch.cat([z, torch.full((1,), delta, dtype=tiles.ct, device=x.device)])
    s, n, _, _ = tiles.embed(x, None)
    h_pos, h_neg, n_pos = _Histograms.apply(tiles, zd, x, s, n)
    ap, any_safe = fastap_ap(h_pos, h_neg, n_pos)
    has = n_pos > 0
    w = torch.ones_like(ap) if weights is None else weights.to(ap.dtype)
    per_row = torch.where(has, (1 - ap) * w, 0)
    loss = per_row.sum() / has.sum().clamp_min(1).to(ap.dtype)
    zero = (x * 0).sum().to(loss.dtype)
    return torch.where(has.any() & any_safe, loss, zero)


register("fastap_loss", "triton")(fastap_loss)


# ------------------------------------------------------------------------------------------ RankedList
# Per row i, with D the engine's value (any engine distance; PML sets the diagonal to 0, which the self-mode masks
# exclude anyway), c = α − margin, P*_i = {j: same label, j ≠ i, D > c, D > 0}, N*_i = {j: other label, D < α,
# D > 0}, w⁺ = e^{Tp(D − c)}, w⁻ = e^{Tn(α − D)}: four per-row sums in one pass of the engine's row statistics,
#   A⁺ = Σ_{P*} w⁺(D − c), B⁺ = Σ_{P*} w⁺, A⁻ = Σ_{N*} w⁻(α − D), B⁻ = Σ_{N*} w⁻,
# loss_i = (1−λ)·A⁺/(B⁺ + N·1e-5) + λ·A⁻/(B⁻ + N·1e-5) (PML's Σ_j (w + 1e-5) over all N columns), mean over rows.
# Backward (recomputed tiles): dloss⁺/dD = [P*] w⁺(Tp(D − c) + 1 − Tp·loss⁺)/B'⁺,
# dloss⁻/dD = −[N*] w⁻(Tn(α − D) + 1 − Tn·loss⁻)/B'⁻. The parameters travel as a compute-dtype tensor (a Python
# float kernel argument would be fp32), so fp64 matches the reference op for op.


@triton.jit
def _rll_sets(v, pos, neg, alpha, c):
    in_p = pos & (v > c) & (v > 0)
    in_n = neg & (v < alpha) & (v > 0)
    return in_p, in_n


@triton.jit
def rll_fwd(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """Slots 0..3: A⁺, B⁺, A⁻, B⁻ terms of the tile; ``st`` holds (α, c, Tp, Tn)."""
    alpha = tl.load(st)
    c = tl.load(st + 1)
    tp = tl.load(st + 2)
    tn = tl.load(st + 3)
    in_p, in_n = _rll_sets(v, pos, neg, alpha, c)
    wp = tl.where(in_p, tl.exp(tp * (v - c)), 0.0)
    wn = tl.where(in_n, tl.exp(tn * (alpha - v)), 0.0)
    return tl.where(in_p, wp * (v - c), 0.0), wp, tl.where(in_n, wn * (alpha - v), 0.0), wn, v, v


@triton.jit
def rll_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """dL/dD of the tile from the rows' loss⁺, loss⁻, (1−λ)/B'⁺, λ/B'⁻ (stats rows 0..3; row 4: α, c, Tp, Tn)."""
    prm = st + 4 * nst
    alpha = tl.load(prm)
    c = tl.load(prm + 1)
    tp = tl.load(prm + 2)
    tn = tl.load(prm + 3)
    in_p, in_n = _rll_sets(v, pos, neg, alpha, c)
    row_in = ia < na
    lp = tl.load(st + ia, mask=row_in, other=0.0)
    ln = tl.load(st + nst + ia, mask=row_in, other=0.0)
    kp = tl.load(st + 2 * nst + ia, mask=row_in, other=0.0)
    kn = tl.load(st + 3 * nst + ia, mask=row_in, other=0.0)
    wp = tl.where(in_p, tl.exp(tp * (v - c)), 0.0)
    wn = tl.where(in_n, tl.exp(tn * (alpha - v)), 0.0)
    gp = tl.where(in_p, wp * (tp * (v - c) + 1 - tp * lp) * kp, 0.0)
    gn = tl.where(in_n, wn * (tn * (alpha - v) + 1 - tn * ln) * kn, 0.0)
    return (gp - gn) * tl.load(sc)


class RankedList(pair_engine.PairLossImpl):
    BWD = rll_bwd

    def __init__(self, margin, Tn, imbalance, alpha, Tp):
        self.values = (alpha, alpha - margin, Tp, Tn)
        self.imbalance = imbalance

    def forward(self, tiles, xs):
        n, ct, dev = tiles.n, tiles.ct, tiles.device
        prm = torch.empty(4, dtype=ct, device=dev)
        for k, value in enumerate(self.values):  # filled on the device: no host-to-device copy
            prm[k] = value
        out = tiles.row_stats(xs, rll_fwd, (pair_engine.SUM,) * 4, stats=prm)
        lam = self.imbalance
        bp, bn = out[1] + n * 1e-5, out[3] + n * 1e-5
        lp, ln = out[0] / bp, out[2] / bn
        loss = ((1 - lam) * lp + lam * ln).mean()
        width = max(n, 4)
        stats = torch.zeros(5, width, dtype=ct, device=dev)
        stats[0, :n], stats[1, :n], stats[2, :n], stats[3, :n] = lp, ln, (1 - lam) / bp, lam / bn
        stats[4, :4] = prm
        return loss, stats, torch.full((1,), 1.0 / n, dtype=ct, device=dev)

    def grad_scalars(self, g, aux):
        return g.reshape(1).to(aux.dtype) * aux


def ranked_list_loss(x, labels, *, margin, Tn, imbalance, alpha, Tp, distance):
    impl = RankedList(float(margin), float(Tn), float(imbalance), float(alpha), float(Tp))
    return pair_engine.fused_loss(impl, x, labels, None, None, distance)


register("ranked_list_loss", "triton")(ranked_list_loss)


# ------------------------------------------------------------------------------------------- Histogram
# PML's two node histograms over the unique unordered pairs {i < j} of cosine similarities s, positive (same label)
# and negative, where i or j is an anchor (a row with a positive and a negative). Each program keeps partial
# histograms of its row block (NODES = round(1 + 2/Δ) nodes as a constexpr) and the pair counts; the host sums
# them (O(programs · NODES)). PML's node arithmetic op for op: r = floor((float32(s) + 1) / float32(Δ)), r·Δ and
# (r+1)·Δ − 1 in float32, upper = (s + 1 − rΔ)/Δ to node r+1, lower = ((r+1)Δ − 1 − s)/Δ to node r. Backward:
# per pair dL/ds = (g[r+1] − g[r]) / Δ with g = dL/d(histogram) of its set, on recomputed tiles (the pair counted
# in the orientation i < j only, so the engine's G + Gᵀ counts it once).


@triton.jit
def _hist_split(v, delta32, delta):
    r = tl.floor((v.to(tl.float32) + 1.0) / delta32)
    upper = (v + 1 - (r * delta32).to(v.dtype)) / delta
    lower = (((r + 1.0) * delta32 - 1.0).to(v.dtype) - v) / delta
    return r.to(tl.int32), upper, lower


@triton.jit
def _hist_pairs(pos, neg, ia, ib, anc_a, anc_b):
    keep = (ia < ib) & (anc_a | anc_b)
    return pos & keep, neg & keep


@triton.jit
def _histogram_kernel(x_ptr, sx_ptr, nx_ptr, lab_ptr, anc_ptr, dd_ptr, hp_ptr, hn_ptr, cnt_ptr, N, D, stride_x,
                      delta32, NODES: tl.constexpr, NP: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                      BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_a = pid * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = load_rows(x_ptr, sx_ptr, nx_ptr, lab_ptr, offs_a, N, True)
    anc_a = tl.load(anc_ptr + offs_a, mask=offs_a < N, other=0.0) != 0
    delta = tl.load(dd_ptr)
    bins = tl.arange(0, NP)[None, None, :]
    hp = tl.zeros((NP,), CT)
    hn = tl.zeros((NP,), CT)
    cp = tl.zeros((BA,), CT)
    cn = tl.zeros((BA,), CT)
    for b0 in range(0, N, BB):
        offs_b = b0 + tl.arange(0, BB)
        s_b, n_b, lab_b = load_rows(x_ptr, sx_ptr, nx_ptr, lab_ptr, offs_b, N, True)
        anc_b = tl.load(anc_ptr + offs_b, mask=offs_b < N, other=0.0) != 0
        v = value_tile(x_ptr, x_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, N, D, stride_x, stride_x,
                       0, BA, BB, BD, PREC)
        pos, neg = pair_masks(lab_a, lab_b, offs_a, offs_b, N, N, lab_ptr, lab_ptr, 1, True, True, False, False)
        pos, neg = _hist_pairs(pos, neg, offs_a[:, None], offs_b[None, :], anc_a[:, None], anc_b[None, :])
        r, upper, lower = _hist_split(v, delta32, delta)
        r3 = r[:, :, None]
        add = tl.where(r3 + 1 == bins, upper[:, :, None], 0.0) + tl.where(r3 == bins, lower[:, :, None], 0.0)
        hp += tl.sum(tl.sum(tl.where(pos[:, :, None], add, 0.0), axis=0), axis=0)
        hn += tl.sum(tl.sum(tl.where(neg[:, :, None], add, 0.0), axis=0), axis=0)
        cp += tl.sum(pos.to(CT), axis=1)
        cn += tl.sum(neg.to(CT), axis=1)
    nodes = tl.arange(0, NP)
    tl.store(hp_ptr + pid * NODES + nodes, hp, mask=nodes < NODES)
    tl.store(hn_ptr + pid * NODES + nodes, hn, mask=nodes < NODES)
    tl.store(cnt_ptr + pid * 2, tl.sum(cp, axis=0))
    tl.store(cnt_ptr + pid * 2 + 1, tl.sum(cn, axis=0))


@triton.jit
def histogram_bwd(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST: tl.constexpr, FLAG: tl.constexpr):
    """Stats rows: 0 dL/dh⁺ per node, 1 dL/dh⁻, 2 the anchor flags, 3 [Δ]; p0 = float32(Δ); FLAG = NODES."""
    anc_a = tl.load(st + 2 * nst + ia, mask=ia < na, other=0.0) != 0
    anc_b = tl.load(st + 2 * nst + ib, mask=ib < nb, other=0.0) != 0
    pos, neg = _hist_pairs(pos, neg, ia, ib, anc_a, anc_b)
    r, upper, lower = _hist_split(v, p0, tl.load(st + 3 * nst))
    lo_in = (pos | neg) & (r >= 0) & (r < FLAG)
    hi_in = (pos | neg) & (r + 1 >= 0) & (r + 1 < FLAG)
    row = tl.where(pos, 0, nst)
    g_hi = tl.load(st + row + r + 1, mask=hi_in, other=0.0)
    g_lo = tl.load(st + row + r, mask=lo_in, other=0.0)
    return (g_hi - g_lo) / tl.load(st + 3 * nst)


def _anchor_flags(labels, ct):
    """1.0 for rows with a positive and a negative: 2 ≤ |class| < N, counted on sorted labels (no sync)."""
    srt = torch.sort(labels).values
    count = torch.searchsorted(srt, labels, right=True) - torch.searchsorted(srt, labels)
    return ((count >= 2) & (count < labels.shape[0])).to(ct)


class _NodeHistograms(torch.autograd.Function):
    """(h⁺, h⁻, |S⁺|, |S⁻|): node histograms (sums, not yet divided) and pair counts; backward by recomputed tiles."""

    @staticmethod
    def forward(ctx, tiles, dd, delta32, anchors, nodes, x, s, n):
        # the (BA, BB, NP) one-hot tile takes the engine's small "triplet" tile on a GPU (16 × 16, 8 warps): the
        # 64 × 64 forward tile did not compile in 5 minutes (sm_90 aot_check); the interpreter's tiles are the same
        kw = tiles.launch("triplet")
        programs = triton.cdiv(tiles.n, kw["BA"])
        hp = torch.empty(programs, nodes, dtype=tiles.ct, device=x.device)
        hn = torch.empty_like(hp)
        cnt = torch.empty(programs, 2, dtype=tiles.ct, device=x.device)
        xc = x.contiguous()
        _histogram_kernel[(programs,)](xc, s.contiguous(), n.contiguous(), tiles.labels, anchors, dd, hp, hn, cnt,
                                       tiles.n, tiles.d, xc.stride(0), delta32, NODES=nodes,
                                       NP=triton.next_power_of_2(nodes + 1), **kw)
        ctx.tiles, ctx.nodes, ctx.delta32 = tiles, nodes, delta32
        ctx.save_for_backward(x, s, n, dd, anchors)
        counts = cnt.sum(0)
        ctx.mark_non_differentiable(counts)
        return hp.sum(0), hn.sum(0), counts

    @staticmethod
    def backward(ctx, gp, gn, _gc):
        refuse_double_backward()
        x, s, n, dd, anchors = ctx.saved_tensors
        tiles, nodes = ctx.tiles, ctx.nodes
        st = torch.zeros(4, max(tiles.n, nodes), dtype=tiles.ct, device=x.device)
        st[0, :nodes], st[1, :nodes], st[2, :tiles.n], st[3, :1] = gp, gn, anchors, dd
        sc = torch.zeros(1, dtype=tiles.ct, device=x.device)
        acc, dnx, _, _ = tiles.grad((x, s, n, None, None, None), histogram_bwd, st, sc, params=(ctx.delta32, 0, 0, 0),
                                    flag=nodes, need_x=True)
        dx, ds, dn = embedding_grads(x, s, acc, dnx, ctx.needs_input_grad[5:8])
        return None, None, None, None, None, dx, ds, dn


def histogram_loss(x, labels, *, delta, distance, triplets=None):
    if triplets is not None or labels is None:
        raise Unsupported("histogram_loss: the fused form takes labels (all triplets), not a tuple")
    if distance.name != "cosine":
        raise Unsupported("histogram_loss: the fused form takes the cosine similarity only")
    x, _ = pair_engine.autocast_inputs(x, None)
    tiles = pair_engine.Tiles(x, labels, None, None, distance)
    nodes = round(1 + 2 / delta)
    dd = torch.full((1,), delta, dtype=tiles.ct, device=x.device)
    s, n, _, _ = tiles.embed(x, None)
    anchors = _anchor_flags(tiles.labels, tiles.ct)
    hp, hn, counts = _NodeHistograms.apply(tiles, dd, float(delta), anchors, nodes, x, s, n)
    p_pos, p_neg = hp / counts[0].clamp_min(1), hn / counts[1].clamp_min(1)
    loss = torch.sum(p_neg * torch.cumsum(p_pos, dim=0))
    zero = (x * 0).sum().to(loss.dtype)
    return torch.where((counts[0] > 0) & (counts[1] > 0), loss, zero)


register("histogram_loss", "triton")(histogram_loss)
