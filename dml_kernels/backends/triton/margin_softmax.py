"""The margin-softmax family on the class engine (registered on import): NormalizedSoftmax, CosFace, ArcFace,
LargeMarginSoftmax, SphereFace, SubCenterArcFace, SoftTriple and P2SGrad, with no B×C buffer and no host sync.

The weight keeps PML's layout, **D×C·K** (column c·K + k is centre k of class c; K = 1 but for SubCenterArcFace
and SoftTriple); the kernels read its columns through strides (W itself, never a transposed or normalised copy):
column normalisation is fused as per-column reciprocal norms ``rw`` (O(C·K)), as the embeddings' ``rx`` (O(B)).

One autograd Function, :class:`_ClassStats`, gives per row (O(B) outputs, O(B + C·K) saved):

* ``t``    — the target class's value (cosine, similarity, raw dot, the sub-centre max or SoftTriple's relaxed
  similarity), taken from the tile that holds it (the target-logit gather, fused into the scan);
* ``r``    — the online LSE over the *other* classes of ``k·value`` (the non-target logits; ``k`` the scale),
  or for P2SGrad the row's Σ_c (clamp(cos, −1, 1) − δ_{c,y})²;
* ``b``    — LargeMarginSoftmax only: ‖w_y‖² of the target column.

The loss's margin (PML's target transform: cos − m, ArcFace's cos(θ + m) with PML's branch, the Chebyshev
ψ(θ) with its k-interval, ...) is then an O(B) torch expression of (t, r, b) — the reference's own functions
(``backends/reference/margin_softmax.py``), so the margin arithmetic is the oracle's op for op — and
CE_i = logaddexp(target'_i, r_i) − target'_i.

Tiles: a tile is BB rows × BG whole classes, each class's K centres in KP = next_pow2(K) adjacent slots (slots
k ≥ K masked), so the per-class value is a reshape-and-reduce of the slot tile in registers (max for
SubCenterArcFace, the first maximal centre getting the gradient as torch.max; softmax over k for SoftTriple).

Backward recomputes the tiles: dL/dvalue_ic = g_r,i·k·e^{k·v_ic − r_i} off the target plus g_t,i at the target
(P2SGrad: g_r,i·2(v − δ) inside the clamp), spread over the class's centres; the embedding gradient by row blocks
over class tiles, the weight gradient by class blocks over row tiles (each program owns its output: no atomics,
deterministic), the normalisations' chain rule by the class engine's ``_l2norm_bwd_kernel``. Per-split partials
(GPU parallelism) are merged by torch. Tested under the Triton interpreter, not yet run on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ...distances import Distance
from ..reference.margin_softmax import arcface_target, cosface_target, large_margin_target
from . import class_engine as K
from . import class_losses as CL
from .pair_engine import refuse_double_backward
from .tiles import dot_tile, load_rows, load_tile, lse_init, lse_update, store_tile, tile_values

_EPS = 1e-12
# tests shrink / vary the tiles and force splits; None: the defaults of _blocks
TUNING = {"block_b": None, "block_w": None, "block_k": None, "block_d": None, "splits": None}
# GPU tiles (block_b, slots per tile, block_k, block_d, num_warps): class_losses' ProxyNCA shapes, not yet timed
_GPU = {"half": (64, 128, 64, 128, 8), "fp32": (64, 64, 32, 64, 8), "fp64": (32, 32, 16, 32, 4)}


@triton.jit
def _tile(x_ptr, sxb, sxd, w_ptr, swc, swd, rw_ptr, bw_ptr, cm_ptr, rows, rmask, rx, ax, g0, c_end, D, KC, inv_gamma,
          KIND: tl.constexpr, GROUP: tl.constexpr, SHARD: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr, KP: tl.constexpr,
          BK: tl.constexpr, CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """Classes [g0, g0 + BG) ∩ [·, c_end) × rows: (slot values, unclamped squared distance, per-class value cv,
    slot column indices, valid slots, slot 1/‖w‖, class indices, valid classes — SHARD: only the classes whose
    cm_ptr flag is nonzero)."""
    W: tl.constexpr = BG * KP
    s = tl.arange(0, W)
    cls = g0 + s // KP
    col = cls * KC + s % KP
    svalid = (s % KP < KC) & (cls < c_end)
    rw = tl.load(rw_ptr + col, mask=svalid, other=0.0)
    bw = tl.load(bw_ptr + col, mask=svalid, other=0.0)
    raw = dot_tile(x_ptr, w_ptr, rows, rmask, col, svalid, D, sxb, sxd, swc, swd, BB, W, BK, CD, ACC, EMU_BF16, PREC)
    val, dd = tile_values(raw, rx, rw, ax, bw, KIND, False)
    gcls = g0 + tl.arange(0, BG)
    cmask = gcls < c_end
    if SHARD:  # margin_softmax_row_stats: the classes taking part (Partial FC's sampled ones)
        cmask = cmask & (tl.load(cm_ptr + gcls, mask=cmask, other=0.0) != 0)
    if GROUP == 0:
        cv = val
    elif GROUP == 1:  # SubCenterArcFace: the max over the class's centres
        cv = tl.max(tl.reshape(tl.where(svalid[None, :], val, float("-inf")), (BB, BG, KP)), axis=2)
        cv = tl.where(cmask[None, :], cv, 0.0)
    else:  # SoftTriple: Σ_k softmax_k(v/γ)·v
        e3, den = _softmax3(val, svalid, inv_gamma, BB, BG, KP)
        v3 = tl.reshape(tl.where(svalid[None, :], val, 0.0), (BB, BG, KP))
        cv = tl.sum(e3 * v3, axis=2) / den
    return val, dd, cv, col, svalid, rw, gcls, cmask


@triton.jit
def _softmax3(val, svalid, inv_gamma, BB: tl.constexpr, BG: tl.constexpr, KP: tl.constexpr):
    """(e^{v/γ − max} per slot as (BB, BG, KP), the per-class sum (1 for a class without slots))."""
    z3 = tl.reshape(tl.where(svalid[None, :], val * inv_gamma, float("-inf")), (BB, BG, KP))
    mz = tl.max(z3, axis=2)
    mz = tl.where(mz == float("-inf"), 0.0, mz)
    e3 = tl.exp(z3 - mz[:, :, None])
    den = tl.sum(e3, axis=2)
    return e3, tl.where(den > 0, den, 1.0)


@triton.jit
def _slot_grad(val, svalid, cv, gcv, inv_gamma, GROUP: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr,
               KP: tl.constexpr):
    """dL/d(slot value) from dL/d(class value) (BB, BG): the class's first maximal centre (GROUP 1) or
    p_k·(1 + (v_k − cv)/γ) (GROUP 2)."""
    W: tl.constexpr = BG * KP
    if GROUP == 0:
        return gcv
    elif GROUP == 1:
        v3 = tl.reshape(tl.where(svalid[None, :], val, float("-inf")), (BB, BG, KP))
        k3 = tl.reshape(tl.zeros((BB, W), tl.int32) + (tl.arange(0, W) % KP)[None, :], (BB, BG, KP))
        first = tl.min(tl.where(v3 == cv[:, :, None], k3, KP), axis=2)
        g3 = tl.where(k3 == first[:, :, None], gcv[:, :, None], 0.0)
        return tl.reshape(g3, (BB, W))
    else:
        e3, den = _softmax3(val, svalid, inv_gamma, BB, BG, KP)
        v3 = tl.reshape(tl.where(svalid[None, :], val, 0.0), (BB, BG, KP))
        g3 = (e3 / den[:, :, None]) * (1.0 + (v3 - cv[:, :, None]) * inv_gamma) * gcv[:, :, None]
        return tl.reshape(g3, (BB, W))


@triton.jit
def _fwd_kernel(x_ptr, sxb, sxd, w_ptr, swc, swd, y_ptr, rx_ptr, ax_ptr, rw_ptr, bw_ptr, cm_ptr,
                m_ptr, l_ptr, t_ptr, b_ptr, sc_ptr, B, C, D, KC, tiles_per_split,
                LOSS: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr, WSQ: tl.constexpr, SHARD: tl.constexpr,
                BB: tl.constexpr, BG: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """Program (row block, class split): the target's value t (0 if not in this split), the partial online LSE
    (m, l) of the other classes' k·value (LOSS 0) or Σ (clamp(v) − δ)² in l (LOSS 1), and ‖w_y‖² (WSQ). SHARD (one
    class shard's statistics): the LSE also for rows whose label is not a class here, over cm_ptr's classes."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    k = tl.load(sc_ptr)
    inv_gamma = tl.load(sc_ptr + 1)
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    rx, ax, y = load_rows(x_ptr, rx_ptr, ax_ptr, y_ptr, rows, B, True)
    valid = rmask & (y >= 0) & (y < C)
    m, l = lse_init(BB, ACC, False)
    t = tl.zeros((BB,), dtype=ACC)
    bt = tl.zeros((BB,), dtype=ACC)
    c_begin, c_end = K._split_range(pid_s, tiles_per_split, BG, C)
    for g0 in range(c_begin, c_end, BG):
        val, dd, cv, col, svalid, rw, gcls, cmask = _tile(
            x_ptr, sxb, sxd, w_ptr, swc, swd, rw_ptr, bw_ptr, cm_ptr, rows, rmask, rx, ax, g0, c_end, D, KC,
            inv_gamma, KIND, GROUP, SHARD, BB, BG, KP, BK, CD, ACC, EMU_BF16, PREC)
        is_tgt = (y[:, None] == gcls[None, :]) & valid[:, None] & cmask[None, :]
        t += tl.sum(tl.where(is_tgt, cv, 0.0), axis=1)
        if LOSS == 0:
            allowed = (rmask if SHARD else valid)[:, None] & cmask[None, :] & (~is_tgt)
            m, l = lse_update(m, l, tl.where(allowed, k * cv, float("-inf")), 1)
            if WSQ:  # K = 1: slots are classes
                bt += tl.sum(tl.where(is_tgt, tl.load(bw_ptr + col, mask=svalid, other=0.0)[None, :], 0.0), axis=1)
        else:
            dv = tl.minimum(tl.maximum(cv, -1.0), 1.0) - tl.where(is_tgt, 1.0, 0.0)
            l += tl.sum(tl.where(rmask[:, None] & cmask[None, :], dv * dv, 0.0), axis=1)
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(l_ptr + out, l, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)
    tl.store(b_ptr + out, bt, mask=rmask)


@triton.jit
def _bwd_kernel(x_ptr, sxb, sxd, w_ptr, swc, swd, y_ptr, rx_ptr, ax_ptr, rw_ptr, bw_ptr, cm_ptr,
                r_ptr, gr_ptr, gt_ptr, gb_ptr, out_ptr, sc_ptr, B, C, D, KC, tiles_per_split,
                COLUMNS: tl.constexpr, LOSS: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                WSQ: tl.constexpr, SHARD: tl.constexpr, NORM_TERM: tl.constexpr, SCALE_G: tl.constexpr,
                BB: tl.constexpr, BG: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """One program per (owned block, D chunk, split): dL/du of a row block over the split's class tiles (rows),
    or dL/dv of a class block's slots over the split's row tiles (COLUMNS); NORM_TERM adds the squared-norm
    terms (the euclidean distances' ‖u‖² / ‖v‖², LargeMarginSoftmax's ‖w_y‖²). Partial at out[split]."""
    W: tl.constexpr = BG * KP
    pid_o = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    k = tl.load(sc_ptr)
    inv_gamma = tl.load(sc_ptr + 1)
    ds = pid_d * BD + tl.arange(0, BD)
    dmask = ds < D
    if COLUMNS:
        g0 = pid_o * BG
        s = tl.arange(0, W)
        own = (g0 + s // KP) * KC + s % KP
        own_mask = (s % KP < KC) & (g0 + s // KP < C)
        r_own = tl.load(rw_ptr + own, mask=own_mask, other=0.0)
        acc = tl.zeros((W, BD), dtype=ACC)
        norm_sum = tl.zeros((W,), dtype=ACC)
        step: tl.constexpr = BB
        n_streamed = B
    else:
        rows = pid_o * BB + tl.arange(0, BB)
        rmask = rows < B
        own = rows
        own_mask = rmask
        rx, ax, y = load_rows(x_ptr, rx_ptr, ax_ptr, y_ptr, rows, B, True)
        r_own = rx
        acc = tl.zeros((BB, BD), dtype=ACC)
        norm_sum = tl.zeros((BB,), dtype=ACC)
        step: tl.constexpr = BG
        n_streamed = C
    begin, end = K._split_range(pid_s, tiles_per_split, step, n_streamed)
    for t0 in range(begin, end, step):
        if COLUMNS:
            rows = t0 + tl.arange(0, BB)
            rmask = rows < end
            rx, ax, y = load_rows(x_ptr, rx_ptr, ax_ptr, y_ptr, rows, end, True)
            c0 = g0
            c_end = C
        else:
            c0 = t0
            c_end = end
        r0 = tl.load(r_ptr + rows, mask=rmask, other=0.0)
        gr = tl.load(gr_ptr + rows, mask=rmask, other=0.0)
        val, dd, cv, col, svalid, rw, gcls, cmask = _tile(
            x_ptr, sxb, sxd, w_ptr, swc, swd, rw_ptr, bw_ptr, cm_ptr, rows, rmask, rx, ax, c0, c_end, D, KC,
            inv_gamma, KIND, GROUP, SHARD, BB, BG, KP, BK, CD, ACC, EMU_BF16, PREC)
        valid = rmask & (y >= 0) & (y < C)
        is_tgt = (y[:, None] == gcls[None, :]) & valid[:, None] & cmask[None, :]
        if LOSS == 0:
            gt = tl.load(gt_ptr + rows, mask=rmask, other=0.0)
            allowed = (rmask if SHARD else valid)[:, None] & cmask[None, :] & (~is_tgt)
            e = tl.exp(tl.where(allowed, k * cv - r0[:, None], float("-inf")))
            gcv = (gr * k)[:, None] * e + tl.where(is_tgt, gt[:, None], 0.0)
        else:  # d/dv (clamp(v, −1, 1) − δ)²: 2(v − δ) where −1 ≤ v ≤ 1 (torch's clamp passes the bounds)
            inside = rmask[:, None] & cmask[None, :] & (cv >= -1.0) & (cv <= 1.0)
            gcv = tl.where(inside, 2.0 * (cv - tl.where(is_tgt, 1.0, 0.0)) * gr[:, None], 0.0)
        gval = _slot_grad(val, svalid, cv, gcv, inv_gamma, GROUP, BB, BG, KP)
        gval = tl.where(rmask[:, None] & svalid[None, :], gval, 0.0)
        gs, gd = K._chain_value(gval, val, dd, KIND)
        if COLUMNS:  # dL/dv_j = Σ_i gs_ij · u_i (u = x·rx)
            acc = K._accumulate(acc, tl.trans(gs * rx[:, None]), x_ptr, sxb, sxd, rows, rmask, ds, dmask,
                                SCALE_G, CD, ACC, EMU_BF16, PREC)
            if KIND != 0:
                norm_sum += tl.sum(gd, axis=0)
            if WSQ:  # LargeMarginSoftmax's ‖w_y‖² (K = 1: slots are classes)
                gb = tl.load(gb_ptr + rows, mask=rmask, other=0.0)
                norm_sum += tl.sum(tl.where(is_tgt, gb[:, None], 0.0), axis=0)
        else:  # dL/du_i = Σ_j gs_ij · v_j (v = w·rw)
            acc = K._accumulate(acc, gs * rw[None, :], w_ptr, swc, swd, col, svalid, ds, dmask,
                                SCALE_G, CD, ACC, EMU_BF16, PREC)
            if KIND != 0:
                norm_sum += tl.sum(gd, axis=1)
    if COLUMNS:
        n_own = C * KC
        if NORM_TERM:
            acc += 2.0 * load_tile(w_ptr, own, own_mask, swc, ds, dmask, swd).to(ACC) * (r_own * norm_sum)[:, None]
    else:
        n_own = B
        if NORM_TERM:
            acc += 2.0 * load_tile(x_ptr, own, own_mask, sxb, ds, dmask, sxd).to(ACC) * (r_own * norm_sum)[:, None]
    store_tile(out_ptr + pid_s.to(tl.int64) * n_own * D, acc, own, own_mask, D, ds, dmask, 1)


# --------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class _Cfg:
    loss: int  # 0: CE over the class logits, 1: P2SGrad's squared errors
    kind: int  # the value: 0 similarity, 1 squared euclidean, 2 euclidean
    group: int  # 0: one column per class, 1: max over K centres, 2: SoftTriple's softmax over K
    kc: int  # K, columns per class
    norm_x: int  # 0 raw, 1 F.normalize (eps 1e-12), 2 x/‖x‖ without eps (P2SGrad)
    norm_w: bool
    wsq: bool  # also ‖w_y‖² of the target column (LargeMarginSoftmax)
    scale: float  # k: the non-target logits are k·value
    inv_gamma: float
    compute: torch.dtype
    shard: bool = False  # margin_softmax_row_stats: rest for every row, over the classes of a column mask


def _blocks(kc, D, compute, device):
    """(block_b, classes per tile, slots per class, block_k, block_d, num_warps)."""
    interp = CL._interpreting() or device.type != "cuda"
    if interp:
        bb, w, bk, bd, nw = 16, 32, 32, 32, 4
    else:
        group = "fp64" if compute == torch.float64 else ("fp32" if compute == torch.float32 else "half")
        bb, w, bk, bd, nw = _GPU[group]
    kp = CL._p2(kc)
    dp = max(16, CL._p2(D))
    w = max(TUNING["block_w"] or w, kp, 16)  # tl.dot needs >= 16 columns
    return (TUNING["block_b"] or bb, max(1, w // kp), kp, min(dp, TUNING["block_k"] or bk),
            min(dp, TUNING["block_d"] or bd), nw)


def _splits(n_tiles, n_programs, partial_bytes, device):
    if TUNING["splits"] is not None:
        s = int(TUNING["splits"])
    elif device.type == "cuda" and not CL._interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        s = min(triton.cdiv(4 * sms, max(1, n_programs)), max(1, (256 << 20) // max(1, partial_bytes)))
    else:
        s = 1
    s = max(1, min(s, n_tiles))
    tps = triton.cdiv(n_tiles, s)
    return triton.cdiv(n_tiles, tps), tps


def _norms(t, acc, mode, bd):
    """(r, a, nrm, pr) of the rows of ``t`` (a view): the scale r (1, 1/max(‖t‖, eps) or 1/‖t‖), ‖t·r‖², ‖t‖, and
    the chain rule's r³ factor (0 where the norm is clamped). O(rows)."""
    r, a, nrm = CL._norm_stats(t, acc, mode == 1, bd)
    if mode == 2:  # P2SGrad's modulus: no eps
        r = 1.0 / nrm
        a = torch.ones_like(nrm)
    pr = torch.where(nrm >= _EPS, r * r * r, 0) if mode == 1 else r * r * r
    return r, a, nrm, pr


def _chain(g, t, r, pr, mode, out_dtype, bd):
    """dL/dt from dL/du (g, rows×D, the accumulator dtype), u = t·r."""
    if mode == 0:
        return g.to(out_dtype)
    R, D = g.shape
    out = g if g.dtype == out_dtype else torch.empty((R, D), dtype=out_dtype, device=g.device)
    K._l2norm_bwd_kernel[(triton.cdiv(R, 16),)](g, t, t.stride(0), t.stride(1), r, pr, out, R, D,
                                                ACC=CL._TL[g.dtype], BLOCK_R=16, BLOCK_D=bd)
    return out


class _ClassStats(torch.autograd.Function):
    """(t, r, b) per row, see the module docstring; W is D×(C·K), read through its transpose's strides."""

    @staticmethod
    def forward(ctx, x, W, labels, cfg, cm=None):
        B, D = x.shape
        C = W.shape[1] // cfg.kc
        acc = CL._acc(cfg.compute)
        bb, bg, kp, bk, bd, nw = _blocks(cfg.kc, D, cfg.compute, x.device)
        wt = W.t()
        rx, ax, nx, px = _norms(x, acc, cfg.norm_x, bd)
        rw, bw, nw_, pw = _norms(wt, acc, int(cfg.norm_w), bd)
        n_s, tps = _splits(triton.cdiv(C, bg), triton.cdiv(B, bb), 0, x.device)
        m = torch.empty((n_s, B), dtype=acc, device=x.device)
        l_, t, b = torch.empty_like(m), torch.empty_like(m), torch.empty_like(m)
        sc = CL._device_scalars([cfg.scale, cfg.inv_gamma], acc, x.device)
        cm = rx if cm is None else cm  # read only with SHARD
        _fwd_kernel[(triton.cdiv(B, bb), n_s)](
            x, x.stride(0), x.stride(1), W, wt.stride(0), wt.stride(1), labels, rx, ax, rw, bw, cm, m, l_, t, b, sc,
            B, C, D, cfg.kc, tps, LOSS=cfg.loss, KIND=cfg.kind, GROUP=cfg.group, WSQ=cfg.wsq, SHARD=cfg.shard,
            BB=bb, BG=bg, KP=kp,
            BK=bk, CD=CL._TL[cfg.compute], ACC=CL._TL[acc], EMU_BF16=CL._interpreting() and
            cfg.compute == torch.bfloat16, PREC=CL._prec(cfg.compute), num_warps=nw, num_stages=2)
        if cfg.loss == 1:
            r = l_.sum(0)
        elif n_s == 1:
            r = m[0] + torch.log(l_[0])
        else:
            mx = m.amax(0)
            mx_safe = torch.where(torch.isfinite(mx), mx, 0)
            r = mx_safe + torch.log((l_ * torch.exp(m - mx_safe)).sum(0))
        ctx.cfg = cfg
        ctx.norms = (rx, ax, px, rw, bw, pw, cm)
        ctx.save_for_backward(x, W, labels, r)
        return t.sum(0), r, b.sum(0)

    @staticmethod
    def backward(ctx, g_t, g_r, g_b):
        refuse_double_backward()
        x, W, labels, r = ctx.saved_tensors
        cfg = ctx.cfg
        rx, ax, px, rw, bw, pw, cm = ctx.norms
        B, D = x.shape
        C = W.shape[1] // cfg.kc
        acc = CL._acc(cfg.compute)
        wt = W.t()
        z = torch.zeros_like(r)
        g_t, g_r, g_b = (z if g is None else g.to(acc).contiguous() for g in (g_t, g_r, g_b))  # expanded grads: stride 0
        sc = CL._device_scalars([cfg.scale, cfg.inv_gamma], acc, x.device)
        bb, bg, kp, bk, bd, nw = _blocks(cfg.kc, D, cfg.compute, x.device)
        common = dict(LOSS=cfg.loss, KIND=cfg.kind, GROUP=cfg.group, WSQ=cfg.wsq, SHARD=cfg.shard, SCALE_G=cfg.compute == torch.float16,
                      BB=bb, BG=bg, KP=kp, BK=bk, BD=bd, CD=CL._TL[cfg.compute], ACC=CL._TL[acc],
                      EMU_BF16=CL._interpreting() and cfg.compute == torch.bfloat16, PREC=CL._prec(cfg.compute),
                      num_warps=nw, num_stages=2)
        grads = []
        for columns, (t, rr, pr, mode) in ((False, (x, rx, px, cfg.norm_x)), (True, (wt, rw, pw, int(cfg.norm_w)))):
            if not ctx.needs_input_grad[int(columns)]:
                grads.append(None)
                continue
            own, n_o, other = ((C * cfg.kc, triton.cdiv(C, bg), triton.cdiv(B, bb)) if columns
                               else (B, triton.cdiv(B, bb), triton.cdiv(C, bg)))
            n_d = triton.cdiv(D, bd)
            n_s, tps = _splits(other, n_o * n_d, own * D * acc.itemsize, x.device)
            partial = torch.empty((n_s, own, D), dtype=acc, device=x.device)
            _bwd_kernel[(n_o, n_d, n_s)](
                x, x.stride(0), x.stride(1), W, wt.stride(0), wt.stride(1), labels, rx, ax, rw, bw, cm, r, g_r, g_t,
                g_b, partial, sc, B, C, D, cfg.kc, tps, COLUMNS=columns,
                NORM_TERM=cfg.kind != 0 or (cfg.wsq and columns), **common)
            partial = partial[0] if n_s == 1 else partial.sum(0)
            grads.append(_chain(partial, t, rr, pr, mode, t.dtype, bd))
        gx, gw = grads
        return gx, (None if gw is None else gw.t()), None, None, None


def _stats(x, labels, W, cm=None, **cfg):
    if x.device.type not in ("cuda", "cpu") or W.device != x.device:
        raise Unsupported("the triton margin-softmax losses need embeddings and W on one CUDA device (or CPU under "
                          "TRITON_INTERPRET=1)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise Unsupported(f"the triton margin-softmax losses compute in a float dtype, not {x.dtype}")
    cfg.setdefault("inv_gamma", 1.0)
    cfg = _Cfg(compute=CL._compute_dtype(x), **cfg)
    return _ClassStats.apply(x, W, labels.contiguous(), cfg, cm)


def _ce(x, labels, C, target, rest, weights):
    """Mean over the rows of (logaddexp(target', rest) − target')·w; a label outside [0, C) (check_inputs=False)
    contributes 0."""
    valid = (labels >= 0) & (labels < C)
    losses = torch.where(rest > float("-inf"), torch.logaddexp(target, rest), target) - target
    losses = torch.where(valid, losses, 0)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    loss = losses.mean()
    return loss if x.dtype in (torch.float16, torch.bfloat16) else loss.to(x.dtype)


@register("normalized_softmax_loss", "triton")
def normalized_softmax_loss(x, labels, W, *, temperature, distance: Distance, weights=None):
    kind = CL._KIND.get(distance.name)
    if kind is None:
        raise Unsupported(f"normalized_softmax_loss: distance {distance.name!r} is not on the triton class engine")
    sg = 1.0 if distance.is_similarity else -1.0
    k = sg / float(temperature)
    t, rest, _ = _stats(x, labels, W, loss=0, kind=kind, group=0, kc=1, norm_x=int(distance.normalize), norm_w=True,
                        wsq=False, scale=k)
    return _ce(x, labels, W.shape[1], k * t, rest, weights)


def _cos_margin(x, labels, W, transform, margin, scale, weights):
    t, rest, _ = _stats(x, labels, W, loss=0, kind=0, group=0, kc=1, norm_x=1, norm_w=True, wsq=False,
                        scale=float(scale))
    return _ce(x, labels, W.shape[1], scale * transform(t, margin), rest, weights)


@register("cosface_loss", "triton")
def cosface_loss(x, labels, W, *, margin, scale, weights=None):
    return _cos_margin(x, labels, W, cosface_target, margin, scale, weights)


@register("arcface_loss", "triton")
def arcface_loss(x, labels, W, *, margin, scale, weights=None):
    return _cos_margin(x, labels, W, arcface_target, margin, scale, weights)


@register("large_margin_softmax_loss", "triton")
def large_margin_softmax_loss(x, labels, W, *, margin, scale, weights=None):
    """Non-target logits s·x·w_c (raw dots); target s·‖x‖‖w_y‖·ψ(t), t = x·w_y / (‖x‖‖w_y‖) (F.normalize's eps)."""
    dot, rest, wsq = _stats(x, labels, W, loss=0, kind=0, group=0, kc=1, norm_x=0, norm_w=False, wsq=True,
                            scale=float(scale))
    x_norm = torch.linalg.vector_norm(x.to(dot.dtype), dim=1)
    w_norm = wsq.sqrt()
    t = dot / (x_norm.clamp_min(_EPS) * w_norm.clamp_min(_EPS))
    return _ce(x, labels, W.shape[1], large_margin_target(t, margin) * w_norm * x_norm * scale, rest, weights)


@register("sphereface_loss", "triton")
def sphereface_loss(x, labels, W, *, margin, scale, weights=None):
    """Non-target logits s·x·ŵ_c (= s·‖x‖·cos); target s·‖x‖·ψ(t), t = x·ŵ_y / ‖x‖."""
    dot, rest, _ = _stats(x, labels, W, loss=0, kind=0, group=0, kc=1, norm_x=0, norm_w=True, wsq=False,
                          scale=float(scale))
    x_norm = torch.linalg.vector_norm(x.to(dot.dtype), dim=1)
    t = dot / x_norm.clamp_min(_EPS)
    return _ce(x, labels, W.shape[1], large_margin_target(t, margin) * x_norm * scale, rest, weights)


@register("subcenter_arcface_loss", "triton")
def subcenter_arcface_loss(x, labels, W, *, margin, scale, sub_centers, weights=None):
    kc = int(sub_centers)
    t, rest, _ = _stats(x, labels, W, loss=0, kind=0, group=1 if kc > 1 else 0, kc=kc, norm_x=1, norm_w=True,
                        wsq=False, scale=float(scale))
    return _ce(x, labels, W.shape[1] // kc, scale * arcface_target(t, margin), rest, weights)


@register("soft_triple_loss", "triton")
def soft_triple_loss(x, labels, fc, *, centers_per_class, la, gamma, margin, distance: Distance, weights=None):
    if distance.name not in ("cosine", "dot"):
        raise Unsupported(f"soft_triple_loss: distance {distance.name!r} is not on the triton class engine")
    kc = int(centers_per_class)
    t, rest, _ = _stats(x, labels, fc, loss=0, kind=0, group=2 if kc > 1 else 0, kc=kc,
                        norm_x=int(distance.normalize), norm_w=bool(distance.normalize), wsq=False, scale=float(la),
                        inv_gamma=1.0 / float(gamma))
    return _ce(x, labels, fc.shape[1] // kc, la * (t - margin), rest, weights)


@register("p2sgrad_loss", "triton")
def p2sgrad_loss(x, labels, weight):
    """Mean over N·C of (clamp(x·w_c/‖x‖, −1, 1) − δ_{c,y})², PML's clamp included (‖x‖ without eps, as PML)."""
    _, sq, _ = _stats(x, labels, weight, loss=1, kind=0, group=0, kc=1, norm_x=2, norm_w=False, wsq=False, scale=1.0)
    loss = sq.sum() / (x.shape[0] * weight.shape[1])
    return loss if x.dtype in (torch.float16, torch.bfloat16) else loss.to(x.dtype)


def aot_variants():
    """(kernel, pointer types, accumulator type, constexprs, num_warps) of every launch, for ``aot_check.py``
    (the proxy losses' signature convention): each dtype × the seven value / grouping forms × forward, row and
    class-block backward, with the GPU tile shapes (K = 3 centres: 4 slots per class)."""
    forms = [(0, 0, 0, False), (0, 1, 0, False), (0, 2, 0, False), (0, 0, 0, True), (0, 0, 1, False),
             (0, 0, 2, False), (1, 0, 0, False)]  # (LOSS, KIND, GROUP, WSQ)
    for dtype, compute in (("fp16", tl.float16), ("bf16", tl.bfloat16), ("fp32", tl.float32), ("fp64", tl.float64)):
        acc = "fp64" if dtype == "fp64" else "fp32"
        bb, w, bk, bd, nw = _GPU["fp64" if dtype == "fp64" else ("fp32" if dtype == "fp32" else "half")]
        ptr = dict(x_ptr=dtype, w_ptr="fp64" if dtype == "fp64" else "fp32", y_ptr="i64")
        dev = dict(CD=compute, ACC=tl.float64 if dtype == "fp64" else tl.float32, EMU_BF16=False,
                   PREC="tf32" if dtype == "fp32" else "ieee", BB=bb, BK=bk)
        for loss, kind, group, wsq in forms:
            kp = 4 if group else 1
            consts = dict(LOSS=loss, KIND=kind, GROUP=group, WSQ=wsq, SHARD=False, BG=w // kp, KP=kp, **dev)
            yield _fwd_kernel, ptr, acc, consts, nw
            for columns in (False, True):
                yield _bwd_kernel, ptr, acc, dict(consts, COLUMNS=columns, NORM_TERM=kind != 0 or (wsq and columns),
                                                  SCALE_G=dtype == "fp16", BD=bd), nw


__all__ = ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss", "sphereface_loss",
           "subcenter_arcface_loss", "soft_triple_loss", "p2sgrad_loss"]
