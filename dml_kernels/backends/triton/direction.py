"""Direction regularisation (seed 002 eq. 33–35) fused on Triton: no N×M (B×C) and no N×M×M buffer, no host sync.

Every Cos of difference vectors is a function of dot products, so a tile of queries I × references K carries a
*second* dot tile beside G = Q_I·R_Kᵀ: H = F_I·R_Kᵀ, F the per-row "positive" vector (the anchor's hardest
positive for multi-similarity, its own proxy for ProxyNCA), gathered in O(N·D). With the row scalars
qq = ‖q‖², qf = q·f, ff = ‖f‖² and the column scalar rr = ‖r‖² (plain autograd, O(N + M)):
u = H − G − qf + qq, a² = rr − 2G + qq, b² = ff − 2qf + qq, Cos = u / sqrt(max(a², ε)·max(b², ε)).

:class:`_DirLSE` is one row log-sum-exp of logits A·v + B − cg_i·Cos over a masked row set (v the similarity or
distance of the tile), with or without the implicit zero term; the forward keeps O(N) statistics (LSE, count),
the backward recomputes tiles: a row kernel writes dQ_I, dF_I and the row-scalar gradients, a column kernel dR_K
and drr_K — deterministic, no atomics. Multi-similarity = two of them (positive term without Cos, negative term
with it); ProxyNCA = one over the proxies (target logit in O(N·D)). Triplet: batch-hard is an O(N·D) tail on
the fused batch-hard miner; all triplets stream (J, K) tile pairs per anchor block (``direction_triplet.py``).

Inputs are normalised (when the distance normalises) and cast to the compute dtype (fp64 stays fp64, everything
else fp32) in PyTorch: O((N + M)·D). Tested under the Triton interpreter, not yet run on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from . import tiles
from .multi_similarity import multi_similarity_thresholds
from .similarity import batch_hard_indices

EPS = 1e-12  # the ε floor of the squared norms in Cos (as the reference)


@triton.jit
def _row_logits(q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, offs_i, in_i, offs_k, M, D, sq,
                sr, A, B, E, eps,
                DIST: tl.constexpr, HAS_DIR: tl.constexpr, MASK: tl.constexpr, MINE: tl.constexpr,
                SELF: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CT: tl.constexpr,
                PREC: tl.constexpr):
    """(logits, kept mask, g, v, dd, h, u, a², b², Cos) of the I × K tile."""
    in_k = offs_k < M
    g = tiles.dot_tile(q_ptr, r_ptr, offs_i, in_i, offs_k, in_k, D, sq, 1, sr, 1, BI, BK, BD, CT, CT, False, PREC)
    rr = tl.load(rr_ptr + offs_k, mask=in_k, other=0.0)
    dd = qq[:, None] + rr[None, :] - 2.0 * g
    if DIST == 0:
        v = g
    elif DIST == 1:
        v = tl.maximum(dd, 0.0)
    else:
        v = tl.where(dd > 0, tl.sqrt(tl.where(dd > 0, dd, 1.0)), 0.0)
    x = A * v + B
    if HAS_DIR:
        h = tiles.dot_tile(f_ptr, r_ptr, offs_i, in_i, offs_k, in_k, D, sq, 1, sr, 1, BI, BK, BD, CT, CT, False,
                           PREC)
        u = h - g - qf[:, None] + qq[:, None]
        a2 = dd  # ‖r − q‖²
        b2 = ff - 2.0 * qf + qq
        c = u / tl.sqrt(tl.maximum(a2, eps) * tl.maximum(b2, eps)[:, None])
        x = x - cg[:, None] * c
    else:
        h = g
        u = g
        a2 = dd
        b2 = qq
        c = g
    inside = in_i[:, None] & in_k[None, :]
    if MASK == 0:  # negatives: another label
        lab_k = tl.load(lr_ptr + offs_k, mask=in_k, other=-1)
        keep = inside & (lab_k[None, :] != lab_i[:, None])
    elif MASK == 1:  # positives: the same label, not the (i, i) pair in self mode
        lab_k = tl.load(lr_ptr + offs_k, mask=in_k, other=-1)
        keep = inside & (lab_k[None, :] == lab_i[:, None])
        if SELF:
            keep = keep & (offs_k[None, :] != offs_i[:, None])
    elif MASK == 2:  # every column
        keep = inside
    else:  # every column but the row's own class
        keep = inside & (offs_k[None, :] != lab_i[:, None])
    if MINE == 1:  # PML's MultiSimilarityMiner: v + e < thr
        keep = keep & (v + E < thr[:, None])
    elif MINE == 2:  # v + e > thr
        keep = keep & (v + E > thr[:, None])
    return x, keep, g, v, dd, h, u, a2, b2, c


@triton.jit
def _lse_fwd_kernel(q_ptr, f_ptr, r_ptr, qq_ptr, qf_ptr, ff_ptr, rr_ptr, cg_ptr, lq_ptr, lr_ptr, thr_ptr, out_ptr,
                    N, M, D, sq, sr, par_ptr,
                    DIST: tl.constexpr, HAS_DIR: tl.constexpr, MASK: tl.constexpr, MINE: tl.constexpr,
                    SELF: tl.constexpr, WITH_ONE: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                    BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    A = tl.load(par_ptr)
    B = tl.load(par_ptr + 1)
    E = tl.load(par_ptr + 2)
    eps = tl.load(par_ptr + 3)
    offs_i = tl.program_id(0) * BI + tl.arange(0, BI)
    in_i = offs_i < N
    qq = tl.load(qq_ptr + offs_i, mask=in_i, other=0.0)
    qf = tl.load(qf_ptr + offs_i, mask=in_i, other=0.0)
    ff = tl.load(ff_ptr + offs_i, mask=in_i, other=0.0)
    cg = tl.load(cg_ptr + offs_i, mask=in_i, other=0.0)
    thr = tl.load(thr_ptr + offs_i, mask=in_i, other=0.0)
    lab_i = tl.load(lq_ptr + offs_i, mask=in_i, other=-2)
    m, l = tiles.lse_init(BI, CT, WITH_ONE)
    cnt = tl.zeros((BI,), CT)
    for k0 in range(0, M, BK):
        offs_k = k0 + tl.arange(0, BK)
        x, keep, g, v, dd, h, u, a2, b2, c = _row_logits(
            q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, offs_i, in_i, offs_k, M, D, sq, sr,
            A, B, E, eps, DIST, HAS_DIR, MASK, MINE, SELF, BI, BK, BD, CT, PREC)
        m, l = tiles.lse_update(m, l, tl.where(keep, x, float("-inf")), 1)
        cnt += tl.sum(keep.to(CT), axis=1)
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), 0.0)
    tl.store(out_ptr + offs_i, lse, mask=in_i)
    tl.store(out_ptr + N + offs_i, cnt, mask=in_i)


@triton.jit
def _tile_grads(q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, lse, w, offs_i, in_i, offs_k, M, D,
                sq, sr, A, B, E, eps,
                DIST: tl.constexpr, HAS_DIR: tl.constexpr, MASK: tl.constexpr, MINE: tl.constexpr,
                SELF: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CT: tl.constexpr,
                PREC: tl.constexpr):
    """dL/dG, dL/dH (tiles) and the tile's dL/dqq, dL/dqf, dL/dff (per entry) and dL/drr (per entry)."""
    x, keep, g, v, dd, h, u, a2, b2, c = _row_logits(
        q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, offs_i, in_i, offs_k, M, D, sq, sr,
        A, B, E, eps, DIST, HAS_DIR, MASK, MINE, SELF, BI, BK, BD, CT, PREC)
    p = tl.where(keep, tl.exp(tl.where(keep, x, 0.0) - lse[:, None]), 0.0) * w[:, None]
    gv = p * A
    if DIST == 0:
        wg = gv
        gdd = gv * 0.0
    elif DIST == 1:
        gdd = tl.where(dd >= 0, gv, 0.0)
        wg = -2.0 * gdd
    else:
        gdd = tl.where(dd > 0, gv / (2.0 * tl.where(dd > 0, v, 1.0)), 0.0)
        wg = -2.0 * gdd
    wqq = gdd
    wrr = gdd
    if HAS_DIR:
        gc = -p * cg[:, None]
        a2c = tl.maximum(a2, eps)
        b2c = tl.maximum(b2, eps)[:, None]
        inv = 1.0 / tl.sqrt(a2c * b2c)
        da = tl.where(a2 >= eps, -c / (2.0 * a2c), 0.0)
        db = tl.where((b2 >= eps)[:, None], -c / (2.0 * b2c), 0.0)
        wh = gc * inv
        wg = wg - gc * inv - 2.0 * gc * da
        wqq = wqq + gc * (inv + da + db)
        wrr = wrr + gc * da
        wqf = gc * (-inv - 2.0 * db)
        wff = gc * db
    else:
        wh = gv * 0.0
        wqf = wh
        wff = wh
    return wg, wh, wqq, wqf, wff, wrr


@triton.jit
def _lse_bwd_rows(q_ptr, f_ptr, r_ptr, qq_ptr, qf_ptr, ff_ptr, rr_ptr, cg_ptr, lq_ptr, lr_ptr, thr_ptr, lse_ptr,
                  w_ptr, dq_ptr, df_ptr, ds_ptr, N, M, D, sq, sr, par_ptr,
                  DIST: tl.constexpr, HAS_DIR: tl.constexpr, MASK: tl.constexpr, MINE: tl.constexpr,
                  SELF: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
                  PREC: tl.constexpr):
    """dQ_I, dF_I (output columns of program axis 1) and, from the first column program, the row scalars'."""
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    A = tl.load(par_ptr)
    B = tl.load(par_ptr + 1)
    E = tl.load(par_ptr + 2)
    eps = tl.load(par_ptr + 3)
    offs_i = tl.program_id(0) * BI + tl.arange(0, BI)
    in_i = offs_i < N
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    in_o = offs_o < D
    qq = tl.load(qq_ptr + offs_i, mask=in_i, other=0.0)
    qf = tl.load(qf_ptr + offs_i, mask=in_i, other=0.0)
    ff = tl.load(ff_ptr + offs_i, mask=in_i, other=0.0)
    cg = tl.load(cg_ptr + offs_i, mask=in_i, other=0.0)
    thr = tl.load(thr_ptr + offs_i, mask=in_i, other=0.0)
    lse = tl.load(lse_ptr + offs_i, mask=in_i, other=0.0)
    w = tl.load(w_ptr + offs_i, mask=in_i, other=0.0)
    lab_i = tl.load(lq_ptr + offs_i, mask=in_i, other=-2)
    dq = tl.zeros((BI, BDO), CT)
    df = tl.zeros((BI, BDO), CT)
    sqq = tl.zeros((BI,), CT)
    sqf = tl.zeros((BI,), CT)
    sff = tl.zeros((BI,), CT)
    for k0 in range(0, M, BK):
        offs_k = k0 + tl.arange(0, BK)
        wg, wh, wqq, wqf, wff, wrr = _tile_grads(
            q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, lse, w, offs_i, in_i, offs_k, M, D, sq,
            sr, A, B, E, eps, DIST, HAS_DIR, MASK, MINE, SELF, BI, BK, BD, CT, PREC)
        rk = tiles.load_tile(r_ptr, offs_k, offs_k < M, sr, offs_o, in_o, 1)
        dq = tl.dot(wg, rk, dq, input_precision=PREC, out_dtype=CT)
        if HAS_DIR:
            df = tl.dot(wh, rk, df, input_precision=PREC, out_dtype=CT)
        sqq += tl.sum(wqq, axis=1)
        sqf += tl.sum(wqf, axis=1)
        sff += tl.sum(wff, axis=1)
    tiles.store_tile(dq_ptr, dq, offs_i, in_i, D, offs_o, in_o, 1)
    if HAS_DIR:
        tiles.store_tile(df_ptr, df, offs_i, in_i, D, offs_o, in_o, 1)
    first = in_i & (offs_i * 0 + tl.program_id(1) == 0)
    tl.store(ds_ptr + offs_i, sqq, mask=first)
    tl.store(ds_ptr + N + offs_i, sqf, mask=first)
    tl.store(ds_ptr + 2 * N + offs_i, sff, mask=first)


@triton.jit
def _lse_bwd_cols(q_ptr, f_ptr, r_ptr, qq_ptr, qf_ptr, ff_ptr, rr_ptr, cg_ptr, lq_ptr, lr_ptr, thr_ptr, lse_ptr,
                  w_ptr, dr_ptr, drr_ptr, N, M, D, sq, sr, par_ptr,
                  DIST: tl.constexpr, HAS_DIR: tl.constexpr, MASK: tl.constexpr, MINE: tl.constexpr,
                  SELF: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
                  PREC: tl.constexpr):
    """dR_K = Σ_I W_Gᵀ Q_I + W_Hᵀ F_I and drr_K, streaming the query blocks."""
    CT: tl.constexpr = qq_ptr.dtype.element_ty
    A = tl.load(par_ptr)
    B = tl.load(par_ptr + 1)
    E = tl.load(par_ptr + 2)
    eps = tl.load(par_ptr + 3)
    offs_k = tl.program_id(0) * BK + tl.arange(0, BK)
    in_k = offs_k < M
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    in_o = offs_o < D
    dr = tl.zeros((BK, BDO), CT)
    srr = tl.zeros((BK,), CT)
    for i0 in range(0, N, BI):
        offs_i = i0 + tl.arange(0, BI)
        in_i = offs_i < N
        qq = tl.load(qq_ptr + offs_i, mask=in_i, other=0.0)
        qf = tl.load(qf_ptr + offs_i, mask=in_i, other=0.0)
        ff = tl.load(ff_ptr + offs_i, mask=in_i, other=0.0)
        cg = tl.load(cg_ptr + offs_i, mask=in_i, other=0.0)
        thr = tl.load(thr_ptr + offs_i, mask=in_i, other=0.0)
        lse = tl.load(lse_ptr + offs_i, mask=in_i, other=0.0)
        w = tl.load(w_ptr + offs_i, mask=in_i, other=0.0)
        lab_i = tl.load(lq_ptr + offs_i, mask=in_i, other=-2)
        wg, wh, wqq, wqf, wff, wrr = _tile_grads(
            q_ptr, f_ptr, r_ptr, rr_ptr, lr_ptr, qq, qf, ff, cg, lab_i, thr, lse, w, offs_i, in_i, offs_k, M, D, sq,
            sr, A, B, E, eps, DIST, HAS_DIR, MASK, MINE, SELF, BI, BK, BD, CT, PREC)
        qi = tiles.load_tile(q_ptr, offs_i, in_i, sq, offs_o, in_o, 1)
        dr = tl.dot(tl.trans(wg), qi, dr, input_precision=PREC, out_dtype=CT)
        if HAS_DIR:
            fi = tiles.load_tile(f_ptr, offs_i, in_i, sq, offs_o, in_o, 1)
            dr = tl.dot(tl.trans(wh), fi, dr, input_precision=PREC, out_dtype=CT)
        srr += tl.sum(wrr, axis=0)
    tiles.store_tile(dr_ptr, dr, offs_k, in_k, D, offs_o, in_o, 1)
    tl.store(drr_ptr + offs_k, srr, mask=in_k & (offs_k * 0 + tl.program_id(1) == 0))


def _p2(n, lo=16, hi=64):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _params(cfg, q):
    """The kernels' float parameters as a device tensor of the compute dtype (a Python float would be fp32)."""
    return torch.tensor([cfg["A"], cfg["B"], cfg["E"], EPS], dtype=q.dtype, device=q.device)


class _DirLSE(torch.autograd.Function):
    """Row LSE of A·v + B − cg_i·Cos over a masked row set → (LSE (N,), kept count (N,)); see the module doc."""

    @staticmethod
    def forward(ctx, q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, cfg):
        n, d = q.shape
        m = r.shape[0]
        out = torch.empty(2, n, dtype=q.dtype, device=q.device)
        blk = cfg["blocks"]
        _lse_fwd_kernel[(triton.cdiv(n, blk[0]),)](
            q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, out, n, m, d, q.stride(0), r.stride(0),
            _params(cfg, q), **cfg["flags"], BI=blk[0], BK=blk[1], BD=_p2(d), PREC=cfg["prec"])
        ctx.save_for_backward(q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, out[0])
        ctx.cfg = cfg
        ctx.mark_non_differentiable(out[1])
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_lse, _g_cnt):
        q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, lse = ctx.saved_tensors
        cfg = ctx.cfg
        n, d = q.shape
        m = r.shape[0]
        blk = cfg["blocks"]
        bdo = _p2(d)
        w = g_lse.to(q.dtype).contiguous()
        args = (q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, lse, w)
        consts = (_params(cfg, q),)
        # WITH_ONE is the forward kernel's only (the LSE holds it): a GPU launch refuses an unknown keyword
        flags = {k: v for k, v in cfg["flags"].items() if k != "WITH_ONE"}
        kw = dict(**flags, BI=blk[0], BK=blk[1], BD=_p2(d), BDO=bdo, PREC=cfg["prec"])
        dq, df = torch.empty_like(q), torch.empty_like(q)
        ds = torch.empty(3, n, dtype=q.dtype, device=q.device)
        _lse_bwd_rows[(triton.cdiv(n, blk[0]), triton.cdiv(d, bdo))](
            *args, dq, df, ds, n, m, d, q.stride(0), r.stride(0), *consts, **kw)
        dr, drr = torch.empty_like(r), torch.empty(m, dtype=q.dtype, device=q.device)
        _lse_bwd_cols[(triton.cdiv(m, blk[1]), triton.cdiv(d, bdo))](
            *args, dr, drr, n, m, d, q.stride(0), r.stride(0), *consts, **kw)
        has_dir = cfg["flags"]["HAS_DIR"]
        return (dq, df if has_dir else None, dr, ds[0], ds[1] if has_dir else None, ds[2] if has_dir else None, drr,
                None, None, None, None, None)


def _setup(x, ref, distance):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    prec = "tf32" if (x.is_cuda and ct == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    blocks = (16, 16) if not x.is_cuda else (32, 32)

    def vec(t):
        t = t.to(ct)
        return (F.normalize(t, dim=1) if distance.normalize else t).contiguous()

    q = vec(x)
    r = q if ref is None else vec(ref)
    return q, r, (q * q).sum(1), (r * r).sum(1), dict(prec=prec, blocks=blocks)


def _dist_code(distance):
    return {"cosine": 0, "dot": 0, "squared_euclidean": 1, "euclidean": 2}[distance.name]


def _lse(q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr, base_cfg, *, A, B, E=0.0, dist, has_dir, mask, mine=0,
         self_mode=False, with_one=True):
    cfg = dict(base_cfg, A=float(A), B=float(B), E=float(E),
               flags=dict(DIST=dist, HAS_DIR=has_dir, MASK=mask, MINE=mine, SELF=self_mode, WITH_ONE=with_one))
    z = qq.new_zeros(qq.shape)
    return _DirLSE.apply(q, q if f is None else f, r, qq, z if qf is None else qf, z if ff is None else ff, rr,
                         z if cg is None else cg, lab_q, lab_r, z if thr is None else thr, cfg)


@register("direction_multi_similarity_loss", "triton")
def direction_multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon=None, distance,
                                    pairs=None, pair_rule=True):
    if pairs is not None:
        raise Unsupported("the triton direction_multi_similarity_loss has no explicit-pair form")
    q, r, qq, rr, base_cfg = _setup(x, ref, distance)
    lab_q = labels.contiguous()
    lab_r = lab_q if ref is None else ref_labels.contiguous()
    sg = 1.0 if distance.is_similarity else -1.0
    dist = _dist_code(distance)
    pos_mine = neg_mine = 0
    thr_p = thr_n = None
    e_pos = e_neg = 0.0
    if epsilon is not None:
        hard_pos, hard_neg = multi_similarity_thresholds(x.detach(), labels, None if ref is None else ref.detach(),
                                                         ref_labels, distance=distance)
        thr_p, thr_n = hard_neg.to(q.dtype).contiguous(), hard_pos.to(q.dtype).contiguous()
        # similarity: keep S − ε < hardest neg, S + ε > hardest pos; distance: D + ε > hardest neg, D − ε < hardest pos
        pos_mine, e_pos = (1, -epsilon) if sg > 0 else (2, epsilon)
        neg_mine, e_neg = (2, epsilon) if sg > 0 else (1, -epsilon)
    common = dict(dist=dist, self_mode=ref is None)
    lse_p, cnt_p = _lse(q, None, r, qq, None, None, rr, None, lab_q, lab_r, thr_p, base_cfg, A=-alpha * sg,
                        B=alpha * sg * base, E=e_pos, has_dir=False, mask=1, mine=pos_mine, **common)
    hp, _ = batch_hard_indices(x.detach(), labels, None if ref is None else ref.detach(), ref_labels, distance)
    has = (hp >= 0) & (cnt_p > 0)  # the hardest positive is among the positives used
    f = r[hp.clamp_min(0)]
    qf, ff = (q * f).sum(1), (f * f).sum(1)
    cg = (beta * gamma) * has.to(q.dtype)
    lse_n, cnt_n = _lse(q, f, r, qq, qf, ff, rr, cg, lab_q, lab_r, thr_n, base_cfg, A=beta * sg, B=-beta * sg * base,
                        E=e_neg, has_dir=True, mask=0, mine=neg_mine, **common)
    loss = (lse_p / alpha + lse_n / beta).mean()
    zero = (x * 0).sum().to(loss.dtype) + (0 if ref is None else (ref * 0).sum().to(loss.dtype))
    if pair_rule:
        return torch.where((cnt_p.sum() <= 1) & (cnt_n.sum() <= 1), zero, loss)
    return loss + zero


def _pair_value(q, f, qq, ff, dist):
    c = (q * f).sum(1)
    if dist == 0:
        return c
    sqd = (qq + ff - 2 * c).clamp_min(0)
    if dist == 1:
        return sqd
    positive = sqd > 0
    return torch.where(positive, sqd.where(positive, 1).sqrt(), 0)


@register("direction_proxy_nca_loss", "triton")
def direction_proxy_nca_loss(x, labels, proxies, *, softmax_scale, gamma, exclude_positive=False, distance,
                             weights=None):
    q, p, qq, pp, base_cfg = _setup(x, proxies, distance)
    lab = labels.contiguous()
    f = p[lab]
    qf, ff = (q * f).sum(1), (f * f).sum(1)
    sg = 1.0 if distance.is_similarity else -1.0
    dist = _dist_code(distance)
    cg = torch.full_like(qq, float(gamma))
    lse, _ = _lse(q, f, p, qq, qf, ff, pp, cg, lab, lab, None, base_cfg, A=softmax_scale * sg, B=0.0, dist=dist,
                  has_dir=True, mask=3 if exclude_positive else 2, with_one=False)
    losses = lse - softmax_scale * sg * _pair_value(q, f, qq, ff, dist)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.mean().to(torch.promote_types(x.dtype, torch.float32))


def _batch_hard_triplet(x, labels, ref, ref_labels, margin, gamma, smooth_loss, distance):
    hp, hn = batch_hard_indices(x.detach(), labels, None if ref is None else ref.detach(), ref_labels, distance)
    q, r, qq, rr, _ = _setup(x, ref, distance)
    valid = hp >= 0
    fp, fn = r[hp.clamp_min(0)], r[hn.clamp_min(0)]
    dist = _dist_code(distance)
    pq, nq = rr[hp.clamp_min(0)], rr[hn.clamp_min(0)]
    ap, an = _pair_value(q, fp, qq, pq, dist), _pair_value(q, fn, qq, nq, dist)
    dot_np, dot_an, dot_ap = (fn * fp).sum(1), (q * fn).sum(1), (q * fp).sum(1)
    u = dot_np - dot_an - dot_ap + qq
    cos = u / ((nq - 2 * dot_an + qq).clamp_min(EPS) * (pq - 2 * dot_ap + qq).clamp_min(EPS)).sqrt()
    sg = 1.0 if distance.is_similarity else -1.0
    t = sg * (an - ap) + margin - gamma * cos
    losses = (F.softplus(t) if smooth_loss else F.relu(t)) * valid
    active = losses > 0
    count = active.sum()
    total = losses.where(active, 0).sum()
    zero = (x * 0).sum().to(total.dtype) + (0 if ref is None else (ref * 0).sum().to(total.dtype))
    return torch.where(count > 0, total / count.clamp_min(1), zero)


@register("direction_triplet_margin_loss", "triton")
def direction_triplet_margin_loss(x, labels, ref, ref_labels, *, margin, gamma, swap=False, smooth_loss=False,
                                  mining=None, distance, triplets=None):
    if triplets is not None:
        raise Unsupported("the triton direction_triplet_margin_loss has no explicit-triplet form")
    if swap:
        raise Unsupported("the triton direction_triplet_margin_loss does not support swap=True")
    if mining == "batch_hard":
        return _batch_hard_triplet(x, labels, ref, ref_labels, margin, gamma, smooth_loss, distance)
    from .direction_triplet import all_triplets_loss

    return all_triplets_loss(x, labels, ref, ref_labels, margin=margin, gamma=gamma, smooth_loss=smooth_loss,
                             distance=distance, setup=_setup, dist_code=_dist_code(distance), eps=EPS)
