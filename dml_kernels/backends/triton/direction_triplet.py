"""All-triplets direction-regularised triplet loss (seed 002 eq. 33) on Triton, without the N×M×M set or N×M.

Per triplet (a, j positive, k negative): t = sg(v_ak − v_aj) + m − γ·Cos, Cos = u / sqrt(max(a², ε)·max(b², ε)),
u = H_jk − G_ak − G_aj + qq_a, a² = rr_k − 2G_ak + qq_a, b² = rr_j − 2G_aj + qq_a with G = Q·Rᵀ and the second dot
tile H = R_J·R_Kᵀ (references × references) formed beside G_IJ, G_IK; loss = AvgNonZero of h(t).

Forward: per anchor block, stream J and K tiles, reduce the (BA, BB, BB) block to per-row sums and counts.
Backward (``w`` = h'(t)/count on the active triplets): every partial of t is one of G_aj, G_ak, H_jk, qq_a,
rr_j, rr_k, so
* the row kernel forms W_IJ = ∂L/∂G_IJ (streaming K, J in both roles) and writes dQ_I = Σ_J W_IJ R_J, dqq_I;
* the column kernel writes dR_J = Σ_I W_IJᵀ Q_I + Σ_K (∂L/∂H_JK + ∂L/∂H_KJᵀ) R_K and drr_J (streaming anchors).
Deterministic, no atomics; O(N·M²) work per kernel as the forward. Tested under the interpreter only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles


@triton.jit
def _trip(q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, offs_k, N, M, D, sq, sr, margin, gamma,
          eps, DIST: tl.constexpr, SMOOTH: tl.constexpr, SELF: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
          BD: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr):
    """The (BA, BB, BB) block: anchors I, positives J (axis 1), negatives K (axis 2) → (h, active, dh and the
    partials of t w.r.t. G_aj, G_ak, H_jk, qq_a, rr_j, rr_k)."""
    in_j = offs_j < M
    in_k = offs_k < M
    gj = tiles.dot_tile(q_ptr, r_ptr, offs_a, in_a, offs_j, in_j, D, sq, 1, sr, 1, BA, BB, BD, CT, CT, False, PREC)
    gk = tiles.dot_tile(q_ptr, r_ptr, offs_a, in_a, offs_k, in_k, D, sq, 1, sr, 1, BA, BB, BD, CT, CT, False, PREC)
    hjk = tiles.dot_tile(r_ptr, r_ptr, offs_j, in_j, offs_k, in_k, D, sr, 1, sr, 1, BB, BB, BD, CT, CT, False, PREC)
    rj = tl.load(rr_ptr + offs_j, mask=in_j, other=0.0)
    rk = tl.load(rr_ptr + offs_k, mask=in_k, other=0.0)
    lj = tl.load(lr_ptr + offs_j, mask=in_j, other=-1)
    lk = tl.load(lr_ptr + offs_k, mask=in_k, other=-1)
    ddj = qq[:, None] + rj[None, :] - 2.0 * gj  # b² (BA, BB)
    ddk = qq[:, None] + rk[None, :] - 2.0 * gk  # a² (BA, BB)
    if DIST == 0:
        vj = gj
        vk = gk
        sg = 1.0
    elif DIST == 1:
        vj = tl.maximum(ddj, 0.0)
        vk = tl.maximum(ddk, 0.0)
        sg = -1.0
    else:
        vj = tl.where(ddj > 0, tl.sqrt(tl.where(ddj > 0, ddj, 1.0)), 0.0)
        vk = tl.where(ddk > 0, tl.sqrt(tl.where(ddk > 0, ddk, 1.0)), 0.0)
        sg = -1.0
    u = hjk[None, :, :] - gk[:, None, :] - gj[:, :, None] + qq[:, None, None]
    a2c = tl.maximum(ddk, eps)[:, None, :]
    b2c = tl.maximum(ddj, eps)[:, :, None]
    inv = 1.0 / tl.sqrt(a2c * b2c)
    c = u * inv
    t = sg * (vk[:, None, :] - vj[:, :, None]) + margin - gamma * c
    if SMOOTH:
        e = tl.exp(tl.minimum(t, 20.0))
        one = 1.0 + e
        log1p = tl.where(one == 1.0, e, tl.log(one) * e / tl.where(one == 1.0, 1.0, one - 1.0))
        h = tl.where(t > 20.0, t, log1p)
        dh = tl.where(t > 20.0, 1.0, e / one)
    else:
        h = tl.maximum(t, 0.0)
        dh = tl.where(t > 0, 1.0, 0.0)
    pos = in_a[:, None] & in_j[None, :] & (lj[None, :] == lab_a[:, None])
    if SELF:
        pos = pos & (offs_j[None, :] != offs_a[:, None])
    neg = in_a[:, None] & in_k[None, :] & (lk[None, :] != lab_a[:, None])
    active = pos[:, :, None] & neg[:, None, :] & (h > 0)
    # ∂t/∂ of the six inputs (before the weight h'·scale)
    da = tl.where((ddk >= eps)[:, None, :], -c / (2.0 * a2c), 0.0)
    db = tl.where((ddj >= eps)[:, :, None], -c / (2.0 * b2c), 0.0)
    if DIST == 0:
        cj = -sg + 0.0 * ddj  # ∂t/∂G_aj through v
        ck = sg + 0.0 * ddk
        dvj = 0.0 * ddj  # ∂t/∂dd_aj through v
        dvk = 0.0 * ddk
    elif DIST == 1:
        dvj = tl.where(ddj >= 0, -sg + 0.0 * ddj, 0.0)
        dvk = tl.where(ddk >= 0, sg + 0.0 * ddk, 0.0)
        cj = -2.0 * dvj
        ck = -2.0 * dvk
    else:
        dvj = tl.where(ddj > 0, -sg / (2.0 * tl.where(ddj > 0, vj, 1.0)), 0.0)
        dvk = tl.where(ddk > 0, sg / (2.0 * tl.where(ddk > 0, vk, 1.0)), 0.0)
        cj = -2.0 * dvj
        ck = -2.0 * dvk
    ng = -gamma
    t_gj = cj[:, :, None] + ng * (-inv - 2.0 * db)
    t_gk = ck[:, None, :] + ng * (-inv - 2.0 * da)
    t_h = ng * inv
    t_qq = dvj[:, :, None] + dvk[:, None, :] + ng * (inv + da + db)
    t_rj = dvj[:, :, None] + ng * db
    t_rk = dvk[:, None, :] + ng * da
    return h, active, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk


@triton.jit
def _fwd_kernel(q_ptr, r_ptr, qq_ptr, rr_ptr, lq_ptr, lr_ptr, out_ptr, N, M, D, sq, sr, par_ptr,
                DIST: tl.constexpr, SMOOTH: tl.constexpr, SELF: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    margin = tl.load(par_ptr)
    gamma = tl.load(par_ptr + 1)
    eps = tl.load(par_ptr + 2)
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    in_a = offs_a < N
    qq = tl.load(qq_ptr + offs_a, mask=in_a, other=0.0)
    lab_a = tl.load(lq_ptr + offs_a, mask=in_a, other=-2)
    total = tl.zeros((BA,), CT)
    count = tl.zeros((BA,), CT)
    for j0 in range(0, M, BB):
        for k0 in range(0, M, BB):
            h, active, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk = _trip(
                q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, j0 + tl.arange(0, BB), k0 + tl.arange(0, BB),
                N, M, D, sq, sr, margin, gamma, eps, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
            total += tl.sum(tl.sum(tl.where(active, h, 0.0), axis=2), axis=1)
            count += tl.sum(tl.sum(active.to(CT), axis=2), axis=1)
    tl.store(out_ptr + offs_a, total, mask=in_a)
    tl.store(out_ptr + N + offs_a, count, mask=in_a)


@triton.jit
def _w_gram(q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, N, M, D, sq, sr, margin, gamma, eps, sc,
            DIST: tl.constexpr, SMOOTH: tl.constexpr, SELF: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
            BD: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr):
    """W_IJ = ∂L/∂G_IJ, per-anchor ∂L/∂qq and per-reference ∂L/∂rr_J (J as positive and as negative)."""
    wg = tl.zeros((BA, BB), CT)
    wq = tl.zeros((BA,), CT)
    wr = tl.zeros((BB,), CT)
    for k0 in range(0, M, BB):
        offs_k = k0 + tl.arange(0, BB)
        h, act, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk = _trip(  # J positive, K negative
            q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, offs_k, N, M, D, sq, sr, margin, gamma,
            eps, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
        w = tl.where(act, dh, 0.0) * sc
        wg += tl.sum(w * t_gj, axis=2)
        wq += tl.sum(tl.sum(w * t_qq, axis=2), axis=1)
        wr += tl.sum(tl.sum(w * t_rj, axis=2), axis=0)
        h, act, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk = _trip(  # K positive, J negative
            q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_k, offs_j, N, M, D, sq, sr, margin, gamma,
            eps, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
        w = tl.where(act, dh, 0.0) * sc
        wg += tl.sum(w * t_gk, axis=1)
        wr += tl.sum(tl.sum(w * t_rk, axis=1), axis=0)
    return wg, wq, wr


@triton.jit
def _bwd_rows(q_ptr, r_ptr, qq_ptr, rr_ptr, lq_ptr, lr_ptr, sc_ptr, dq_ptr, dqq_ptr, N, M, D, sq, sr, par_ptr,
              DIST: tl.constexpr, SMOOTH: tl.constexpr, SELF: tl.constexpr, BA: tl.constexpr,
              BB: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    margin = tl.load(par_ptr)
    gamma = tl.load(par_ptr + 1)
    eps = tl.load(par_ptr + 2)
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    in_a = offs_a < N
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    in_o = offs_o < D
    qq = tl.load(qq_ptr + offs_a, mask=in_a, other=0.0)
    lab_a = tl.load(lq_ptr + offs_a, mask=in_a, other=-2)
    sc = tl.load(sc_ptr)
    dq = tl.zeros((BA, BDO), CT)
    dqq = tl.zeros((BA,), CT)
    for j0 in range(0, M, BB):
        offs_j = j0 + tl.arange(0, BB)
        wg, wq, wr = _w_gram(q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, N, M, D, sq, sr, margin,
                             gamma, eps, sc, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
        rj = tiles.load_tile(r_ptr, offs_j, offs_j < M, sr, offs_o, in_o, 1)
        dq = tl.dot(wg, rj, dq, input_precision=PREC, out_dtype=CT)
        dqq += wq
    tiles.store_tile(dq_ptr, dq, offs_a, in_a, D, offs_o, in_o, 1)
    tl.store(dqq_ptr + offs_a, dqq, mask=in_a & (offs_a * 0 + tl.program_id(1) == 0))


@triton.jit
def _bwd_cols(q_ptr, r_ptr, qq_ptr, rr_ptr, lq_ptr, lr_ptr, sc_ptr, dr_ptr, drr_ptr, N, M, D, sq, sr, par_ptr,
              DIST: tl.constexpr, SMOOTH: tl.constexpr, SELF: tl.constexpr, BA: tl.constexpr,
              BB: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    margin = tl.load(par_ptr)
    gamma = tl.load(par_ptr + 1)
    eps = tl.load(par_ptr + 2)
    offs_j = tl.program_id(0) * BB + tl.arange(0, BB)
    in_j = offs_j < M
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    in_o = offs_o < D
    sc = tl.load(sc_ptr)
    dr = tl.zeros((BB, BDO), CT)
    drr = tl.zeros((BB,), CT)
    for a0 in range(0, N, BA):
        offs_a = a0 + tl.arange(0, BA)
        in_a = offs_a < N
        qq = tl.load(qq_ptr + offs_a, mask=in_a, other=0.0)
        lab_a = tl.load(lq_ptr + offs_a, mask=in_a, other=-2)
        wg, wq, wr = _w_gram(q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, N, M, D, sq, sr, margin,
                             gamma, eps, sc, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
        qa = tiles.load_tile(q_ptr, offs_a, in_a, sq, offs_o, in_o, 1)
        dr = tl.dot(tl.trans(wg), qa, dr, input_precision=PREC, out_dtype=CT)
        drr += wr
    for k0 in range(0, M, BB):  # ∂L/∂H_JK (J positive) and ∂L/∂H_KJ (J negative), streaming the anchors
        offs_k = k0 + tl.arange(0, BB)
        wh = tl.zeros((BB, BB), CT)
        for a0 in range(0, N, BA):
            offs_a = a0 + tl.arange(0, BA)
            in_a = offs_a < N
            qq = tl.load(qq_ptr + offs_a, mask=in_a, other=0.0)
            lab_a = tl.load(lq_ptr + offs_a, mask=in_a, other=-2)
            h, act, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk = _trip(
                q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_j, offs_k, N, M, D, sq, sr, margin,
                gamma, eps, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
            wh += tl.sum(tl.where(act, dh, 0.0) * sc * t_h, axis=0)
            h, act, dh, t_gj, t_gk, t_h, t_qq, t_rj, t_rk = _trip(
                q_ptr, r_ptr, rr_ptr, lr_ptr, qq, lab_a, offs_a, in_a, offs_k, offs_j, N, M, D, sq, sr, margin,
                gamma, eps, DIST, SMOOTH, SELF, BA, BB, BD, CT, PREC)
            wh += tl.trans(tl.sum(tl.where(act, dh, 0.0) * sc * t_h, axis=0))
        rk = tiles.load_tile(r_ptr, offs_k, offs_k < M, sr, offs_o, in_o, 1)
        dr = tl.dot(wh, rk, dr, input_precision=PREC, out_dtype=CT)
    tiles.store_tile(dr_ptr, dr, offs_j, in_j, D, offs_o, in_o, 1)
    tl.store(drr_ptr + offs_j, drr, mask=in_j & (offs_j * 0 + tl.program_id(1) == 0))


# On a GPU the (BA, BB, BB) block is 16 × 16 × 16 with a D-chunk of 32 (fp64: 16) and 8 warps: ptxas (sm_90,
# aot_check) reports no spill in the fp32 forward and row backward, 56 bytes in the column backward (fp64 spills
# ~1.3 KB, as the pair engine's fp64 triplets); direction.py's 32 × 32 tiles spilled 6.6-19 KB per thread and took
# minutes to compile. Not yet timed on a GPU.
GPU_WARPS = 8


def _p2(n, lo=16, hi=64):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _params(cfg, q):
    """margin, γ, ε as a device tensor of the compute dtype (a Python float argument would be fp32)."""
    return torch.tensor([cfg["margin"], cfg["gamma"], cfg["eps"]], dtype=q.dtype, device=q.device)


class _AllTriplets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, qq, rr, lab_q, lab_r, cfg):
        n, d = q.shape
        m = r.shape[0]
        out = torch.empty(2, n, dtype=q.dtype, device=q.device)
        ba, bb = cfg["blocks"]
        _fwd_kernel[(triton.cdiv(n, ba),)](q, r, qq, rr, lab_q, lab_r, out, n, m, d, q.stride(0), r.stride(0),
                                           _params(cfg, q), **cfg["flags"], BA=ba, BB=bb,
                                           BD=_p2(d, hi=cfg["bd_max"]), PREC=cfg["prec"], num_warps=GPU_WARPS)
        total, count = out.sum(1)
        scale = (count > 0).to(q.dtype) / count.clamp_min(1)
        ctx.save_for_backward(q, r, qq, rr, lab_q, lab_r, scale)
        ctx.cfg = cfg
        return total * scale, count

    @staticmethod
    def backward(ctx, g, _g_count):
        q, r, qq, rr, lab_q, lab_r, scale = ctx.saved_tensors
        cfg = ctx.cfg
        n, d = q.shape
        m = r.shape[0]
        ba, bb = cfg["blocks"]
        bdo = _p2(d)
        sc = (g.to(q.dtype) * scale).reshape(1).contiguous()
        consts = (n, m, d, q.stride(0), r.stride(0), _params(cfg, q))
        kw = dict(**cfg["flags"], BA=ba, BB=bb, BD=_p2(d, hi=cfg["bd_max"]), BDO=bdo, PREC=cfg["prec"],
                  num_warps=GPU_WARPS)
        dq, dqq = torch.empty_like(q), torch.empty_like(qq)
        _bwd_rows[(triton.cdiv(n, ba), triton.cdiv(d, bdo))](q, r, qq, rr, lab_q, lab_r, sc, dq, dqq, *consts, **kw)
        dr, drr = torch.empty_like(r), torch.empty_like(rr)
        _bwd_cols[(triton.cdiv(m, bb), triton.cdiv(d, bdo))](q, r, qq, rr, lab_q, lab_r, sc, dr, drr, *consts, **kw)
        return dq, dr, dqq, drr, None, None, None


def all_triplets_loss(x, labels, ref, ref_labels, *, margin, gamma, smooth_loss, distance, setup, dist_code, eps):
    q, r, qq, rr, base_cfg = setup(x, ref, distance)
    lab_q = labels.contiguous()
    lab_r = lab_q if ref is None else ref_labels.contiguous()
    cfg = dict(base_cfg, margin=float(margin), gamma=float(gamma), eps=float(eps), bd_max=64,
               flags=dict(DIST=dist_code, SMOOTH=bool(smooth_loss), SELF=ref is None))
    if q.is_cuda:  # triplet.py's GPU triplet block (see GPU_WARPS)
        cfg.update(blocks=(16, 16), bd_max=16 if q.dtype == torch.float64 else 32)
    loss, count = _AllTriplets.apply(q, r, qq, rr, lab_q, lab_r, cfg)
    zero = (x * 0).sum().to(loss.dtype) + (0 if ref is None else (ref * 0).sum().to(loss.dtype))
    return torch.where(count > 0, loss, zero)
