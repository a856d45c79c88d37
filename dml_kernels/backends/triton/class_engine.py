"""Triton kernels of the proxy losses (ProxyNCA / ProxyNCA++ and Proxy Anchor) at million-class scale.

Shapes: embeddings X (B×D), proxies P (C×D), C up to millions. No kernel ever holds or writes a B×C
buffer: every similarity tile is recomputed from X and P where it is needed.

Conventions shared by every kernel
----------------------------------
* ``u_i = x_i·rx_i`` and ``v_c = p_c·rp_c`` are the (optionally L2-normalised) vectors; ``rx`` / ``rp``
  are precomputed reciprocal norms (1 without normalisation), so the raw dot ``x_i·p_c`` is formed in the
  compute dtype (tensor cores for fp16/bf16) with fp32 accumulation and scaled afterwards: normalisation
  is fused, nothing is copied.
* ``KIND`` picks the value a loss sees: 0 = similarity ``s = u·v`` (cosine / dot), 1 = squared euclidean
  ``d = max(a_i + b_c − 2s, 0)`` (``a = ‖u‖²``, ``b = ‖v‖²``), 2 = euclidean ``sqrt(d)`` (zero gradient at 0),
  matching the reference's clamp / where exactly, gradients included.
* Gradients are first taken w.r.t. ``u`` and ``v`` (``dU``, ``dV``); :func:`_l2norm_bwd_kernel` applies the
  chain rule through the normalisation afterwards (a row-local epilogue over O(B·D) / O(C·D)).
* All offsets are computed in int64 (C·D can pass 2³¹).
* Under ``TRITON_INTERPRET=1`` the interpreter's bf16 ``tl.dot`` is wrong and its fp32→bf16 cast truncates;
  ``EMU_BF16`` then rounds tiles to bf16 exactly (round-to-nearest-even on the bit pattern) and multiplies
  them in fp32, which is what bf16 tensor cores compute (exact products, fp32 accumulation).

Tile skipping (Cut Cross-Entropy's gradient filtering, made sound)
--------------------------------------------------------------------
In backward every gradient entry of a tile is ``coef · e_ic · (bounded factor)`` with ``e_ic = exp(z_ic −
lse) ∈ [0, 1]`` (a softmax / column-softmax probability) plus, for ProxyNCA, a ``−1`` at the target. With
normalised vectors, ``‖∂value/∂u‖ ≤ 4`` for every supported value, so a skipped entry moves any gradient
row by at most ``4·|coef|·e_ic``. A tile is skipped (both ``tl.dot``s and the exps of the second product are
not done) only when it holds no ProxyNCA target and ``max e_ic < τ`` with ``τ = u / max(B, C)`` (u = unit
roundoff of the accumulator: 2⁻²⁴ for fp32, 2⁻⁵³ for fp64). Every gradient row then loses at most
``4·u·Σ|coef|`` over *all* skipped tiles together — the size of the rounding error of the unskipped sum
itself. Tiles with e_ic exactly 0 (underflow, masked) are skipped exactly. Skipping is only enabled with
normalised vectors (the bound needs ‖u‖, ‖v‖ ≤ 1).

fp16: tile gradients are divided by their per-output-row maximum before the cast to fp16 and multiplied back
after the dot (fp16's range would otherwise flush the small entries of a large sum to zero).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rne_bf16(v):
    """Round fp32 ``v`` to the nearest bf16 (ties to even), returned as fp32."""
    b = v.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    b = (b >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cvt(t, CD: tl.constexpr, EMU_BF16: tl.constexpr):
    """A tile in the compute dtype (an exactly bf16-rounded fp32 tile under the interpreter)."""
    if EMU_BF16:
        return _rne_bf16(t.to(tl.float32))
    else:
        return t.to(CD)


@triton.jit
def _raw_dot_tile(x_ptr, sxb, sxd, rows, rmask, p_ptr, spc, spd, cols, cmask, D,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                  CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """The BLOCK_B×BLOCK_C tile of raw dots x_i·p_c (compute dtype in, ACC accumulate)."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        ks64 = ks.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * sxb + ks64[None, :] * sxd, mask=rmask[:, None] & km[None, :],
                     other=0.0)
        pt = tl.load(p_ptr + cols64[:, None] * spc + ks64[None, :] * spd, mask=cmask[:, None] & km[None, :],
                     other=0.0)
        acc = tl.dot(_cvt(xt, CD, EMU_BF16), tl.trans(_cvt(pt, CD, EMU_BF16)), acc, input_precision=PREC)
    return acc


@triton.jit
def _value(raw, rx, ax, rp, bp, KIND: tl.constexpr):
    """(value, squared distance before the clamp) of a tile; see KIND in the module docstring."""
    s = raw * rx[:, None] * rp[None, :]
    if KIND == 0:
        return s, s
    else:
        dd = ax[:, None] + bp[None, :] - 2.0 * s
        if KIND == 1:
            return tl.maximum(dd, 0.0), dd
        else:
            return tl.where(dd > 0, tl.sqrt(tl.where(dd > 0, dd, 1.0)), 0.0), dd


@triton.jit
def _chain_value(gv, val, dd, KIND: tl.constexpr):
    """dL/dvalue → (Gs = dL/ds, Gd = dL/d(a+b−2s) through the clamp / sqrt)."""
    if KIND == 0:
        return gv, gv * 0.0
    else:
        if KIND == 1:
            gd = tl.where(dd >= 0, gv, 0.0)
        else:
            gd = tl.where(dd > 0, gv * 0.5 / tl.where(dd > 0, val, 1.0), 0.0)
        return -2.0 * gd, gd


@triton.jit
def _tile_grad(val, rows, rmask, cols, cmask, y, C, r0, r1, c0, c1, g0, g1, k0, k1, k2, k3,
               LOSS: tl.constexpr, EXCL: tl.constexpr):
    """dL/dvalue of a tile, and the tile's skip statistic (max e, or 1 where a ProxyNCA target sits).

    LOSS 0 (ProxyNCA): r0 = lse_i, r1 = coef_i (grad_out·w_i/B, 0 for invalid rows), k0 = logit scale.
    LOSS 1 (Proxy Anchor): r0 = exponent offset w_i − 1, c0 = lse⁺_c, c1 = lse⁻_c, g0 / g1 = grad_out
    over |C⁺| / over C; positive exponent k0·value + k1 + r0, negative k2·value + k3 + r0.
    """
    valid = rmask & (y >= 0) & (y < C)  # a row with an out-of-range label takes no part (validation off)
    is_tgt = (y[:, None] == cols[None, :]) & valid[:, None] & cmask[None, :]
    if LOSS == 0:
        allowed = valid[:, None] & cmask[None, :]
        if EXCL:
            allowed = allowed & (~is_tgt)
        e = tl.exp(tl.where(allowed, k0 * val - r0[:, None], float("-inf")))
        gv = (e - tl.where(is_tgt, 1.0, 0.0)) * (r1 * k0)[:, None]
        stat = tl.max(tl.max(tl.where(is_tgt, 1.0, e), axis=1), axis=0)
    else:
        neg = valid[:, None] & cmask[None, :] & (~is_tgt)
        ep = tl.exp(tl.where(is_tgt, k0 * val + k1 + r0[:, None] - c0[None, :], float("-inf")))
        en = tl.exp(tl.where(neg, k2 * val + k3 + r0[:, None] - c1[None, :], float("-inf")))
        gv = (k0 * g0) * ep + (k2 * g1) * en
        stat = tl.max(tl.max(tl.maximum(ep, en), axis=1), axis=0)
    return gv, stat


# --------------------------------------------------------------------------- forward kernels


@triton.jit
def _sqnorm_kernel(x_ptr, sxr, sxd, out_ptr, R, D,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_r = ‖x_r‖² accumulated in ACC (fp32 for half inputs, without any copy of x)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        km = ks < D
        t = tl.load(x_ptr + rows64[:, None] * sxr + ks.to(tl.int64)[None, :] * sxd,
                    mask=rmask[:, None] & km[None, :], other=0.0).to(ACC)
        acc += tl.sum(t * t, axis=1)
    tl.store(out_ptr + rows, acc, mask=rmask)


@triton.jit
def _nca_fwd_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, ax_ptr, rp_ptr, bp_ptr,
                    m_ptr, l_ptr, t_ptr, sc_ptr, B, C, D, tiles_per_split,
                    KIND: tl.constexpr, EXCL: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """ProxyNCA forward, program (row block, C split): online row LSE over the split's proxy tiles and the
    target logit (taken from the tile that holds it: no separate gather, and the same rounding as the LSE).
    Writes per-split partials m, l (LSE = m + log l) and t (target logit, 0 if not in this split)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    logit_scale = tl.load(sc_ptr)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    valid = rmask & (y >= 0) & (y < C)
    rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
    ax = tl.load(ax_ptr + rows, mask=rmask, other=0.0)
    m = tl.full((BLOCK_B,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_B,), dtype=ACC)
    t = tl.zeros((BLOCK_B,), dtype=ACC)
    c_begin = pid_s * tiles_per_split * BLOCK_C
    c_end = tl.minimum(c_begin + tiles_per_split * BLOCK_C, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        rp = tl.load(rp_ptr + cols, mask=cmask, other=0.0)
        bp = tl.load(bp_ptr + cols, mask=cmask, other=0.0)
        raw = _raw_dot_tile(x_ptr, sxb, sxd, rows, rmask, p_ptr, spc, spd, cols, cmask, D,
                            BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = _value(raw, rx, ax, rp, bp, KIND)
        logit = logit_scale * val
        is_tgt = (y[:, None] == cols[None, :]) & valid[:, None] & cmask[None, :]
        t += tl.sum(tl.where(is_tgt, logit, 0.0), axis=1)
        allowed = cmask[None, :] & rmask[:, None]
        if EXCL:
            allowed = allowed & (~is_tgt)
        z = tl.where(allowed, logit, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(l_ptr + out, l, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)


@triton.jit
def _pa_fwd_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, off_ptr, rx_ptr, ax_ptr, rp_ptr, bp_ptr,
                   lsep_ptr, lsen_ptr, npos_ptr, sc_ptr, B, C, D, tiles_per_split,
                   KIND: tl.constexpr, HAS_OFF: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """Proxy Anchor forward, program (proxy block, batch split): two column LSEs over the split's batch
    tiles. Split 0 starts with the implicit zero term (m = 0, l = 1), i.e. log(1 + Σ e^z), so an empty set
    gives exactly 0; other splits start empty (their partial LSE may be −inf). Writes partial column LSEs
    and positive counts at [split, column]; the host merges splits with a logsumexp (O(splits·C))."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    k0 = tl.load(sc_ptr)
    k1 = tl.load(sc_ptr + 1)
    k2 = tl.load(sc_ptr + 2)
    k3 = tl.load(sc_ptr + 3)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rp = tl.load(rp_ptr + cols, mask=cmask, other=0.0)
    bp = tl.load(bp_ptr + cols, mask=cmask, other=0.0)
    first = tl.full((BLOCK_C,), 0, dtype=tl.int32) + pid_s == 0
    mp = tl.where(first, 0.0, float("-inf")).to(ACC)
    lp = tl.where(first, 1.0, 0.0).to(ACC)
    mn = mp
    ln = lp
    npos = tl.zeros((BLOCK_C,), dtype=tl.int32)
    b_begin = pid_s * tiles_per_split * BLOCK_B
    b_end = tl.minimum(b_begin + tiles_per_split * BLOCK_B, B)
    for b0 in range(b_begin, b_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < b_end
        y = tl.load(y_ptr + rows, mask=rmask, other=-1)
        valid = rmask & (y >= 0) & (y < C)
        rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
        ax = tl.load(ax_ptr + rows, mask=rmask, other=0.0)
        if HAS_OFF:
            off = tl.load(off_ptr + rows, mask=rmask, other=0.0)
        else:
            off = tl.zeros((BLOCK_B,), dtype=ACC)
        raw = _raw_dot_tile(x_ptr, sxb, sxd, rows, rmask, p_ptr, spc, spd, cols, cmask, D,
                            BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = _value(raw, rx, ax, rp, bp, KIND)
        is_tgt = (y[:, None] == cols[None, :]) & valid[:, None] & cmask[None, :]
        neg = valid[:, None] & cmask[None, :] & (~is_tgt)
        npos += tl.sum(is_tgt.to(tl.int32), axis=0)
        zp = tl.where(is_tgt, k0 * val + k1 + off[:, None], float("-inf"))
        m_new = tl.maximum(mp, tl.max(zp, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        lp = lp * tl.exp(mp - m_safe) + tl.sum(tl.exp(zp - m_safe[None, :]), axis=0)
        mp = m_new
        zn = tl.where(neg, k2 * val + k3 + off[:, None], float("-inf"))
        m_new = tl.maximum(mn, tl.max(zn, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        ln = ln * tl.exp(mn - m_safe) + tl.sum(tl.exp(zn - m_safe[None, :]), axis=0)
        mn = m_new
    out = pid_s.to(tl.int64) * C + cols
    # log(0) = −inf for an empty partial of a split > 0
    tl.store(lsep_ptr + out, tl.where(lp > 0, mp + tl.log(tl.where(lp > 0, lp, 1.0)), float("-inf")), mask=cmask)
    tl.store(lsen_ptr + out, tl.where(ln > 0, mn + tl.log(tl.where(ln > 0, ln, 1.0)), float("-inf")), mask=cmask)
    tl.store(npos_ptr + out, npos, mask=cmask)


# --------------------------------------------------------------------------- backward kernels


@triton.jit
def _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, rmask,
                LOSS: tl.constexpr, HAS_R0: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per-row inputs of a gradient tile: label, 1/‖x‖, ‖u‖², and r0 / r1 of :func:`_tile_grad`."""
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
    ax = tl.load(ax_ptr + rows, mask=rmask, other=0.0)
    if HAS_R0:
        r0 = tl.load(r0_ptr + rows, mask=rmask, other=0.0)
    else:
        r0 = tl.zeros((BLOCK_B,), dtype=ACC)
    if LOSS == 0:
        r1 = tl.load(r1_ptr + rows, mask=rmask, other=0.0)
    else:
        r1 = r0
    return y, rx, ax, r0, r1


@triton.jit
def _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, cmask, LOSS: tl.constexpr):
    """Per-proxy inputs of a gradient tile: 1/‖p‖, ‖v‖², and c0 / c1 of :func:`_tile_grad`."""
    rp = tl.load(rp_ptr + cols, mask=cmask, other=0.0)
    bp = tl.load(bp_ptr + cols, mask=cmask, other=0.0)
    if LOSS == 1:
        c0 = tl.load(c0_ptr + cols, mask=cmask, other=0.0)
        c1 = tl.load(c1_ptr + cols, mask=cmask, other=0.0)
    else:
        c0 = rp
        c1 = rp
    return rp, bp, c0, c1


@triton.jit
def _accumulate(acc, g, e_ptr, s_e, s_d, offs, emask, ds64, dmask, SCALE_G: tl.constexpr, CD: tl.constexpr,
                ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc += g · E[offs, ds] with the product in the compute dtype; SCALE_G (fp16) divides g by its
    per-output-row maximum before the cast and multiplies it back after the dot."""
    e = tl.load(e_ptr + offs.to(tl.int64)[:, None] * s_e + ds64[None, :] * s_d, mask=emask[:, None] & dmask[None, :],
                other=0.0)
    if SCALE_G:
        sc = tl.max(tl.abs(g), axis=1)
        sc = tl.where(sc > 0, sc, 1.0)
        part = tl.dot(_cvt(g / sc[:, None], CD, EMU_BF16), _cvt(e, CD, EMU_BF16), input_precision=PREC)
        acc += part.to(ACC) * sc[:, None]
    else:
        acc = tl.dot(_cvt(g, CD, EMU_BF16), _cvt(e, CD, EMU_BF16), acc, input_precision=PREC)
    return acc


@triton.jit
def _bwd_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, ax_ptr, rp_ptr, bp_ptr,
                r0_ptr, r1_ptr, c0_ptr, c1_ptr, g_ptr, out_ptr, sc_ptr, cnt_ptr, B, C, D, tiles_per_split,
                COLUMNS: tl.constexpr, LOSS: tl.constexpr, KIND: tl.constexpr, EXCL: tl.constexpr,
                HAS_R0: tl.constexpr, COUNT: tl.constexpr, SCALE_G: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """One program per (owned block, D chunk, split). Rows (COLUMNS=False): dL/du of a row block over the
    split's proxy tiles, G·V plus the ‖u‖² term of the distances. Columns: dL/dv of a proxy block over the
    split's batch tiles, Gᵀ·U plus the ‖v‖² term. Every S tile is recomputed; the split's partial is
    written at out[split, owned rows, chunk], so each program owns its output: deterministic, no atomics.
    ``cnt`` (COUNT) receives the number of skipped tiles per program."""
    pid_o = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    k0 = tl.load(sc_ptr)
    k1 = tl.load(sc_ptr + 1)
    k2 = tl.load(sc_ptr + 2)
    k3 = tl.load(sc_ptr + 3)
    tau = tl.load(sc_ptr + 4)  # < 0: never skip
    if LOSS == 1:
        g0 = tl.load(g_ptr)
        g1 = tl.load(g_ptr + 1)
    else:
        g0 = 0.0
        g1 = 0.0
    skipped = 0
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    ds64 = ds.to(tl.int64)
    if COLUMNS:
        cols = pid_o * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        rp, bp, c0, c1 = _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, cmask, LOSS)
        acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
        norm_sum = tl.zeros((BLOCK_C,), dtype=ACC)
        begin = pid_s * tiles_per_split * BLOCK_B
        end = tl.minimum(begin + tiles_per_split * BLOCK_B, B)
        step: tl.constexpr = BLOCK_B
    else:
        rows = pid_o * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        y, rx, ax, r0, r1 = _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, rmask, LOSS, HAS_R0, ACC,
                                        BLOCK_B)
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
        norm_sum = tl.zeros((BLOCK_B,), dtype=ACC)
        begin = pid_s * tiles_per_split * BLOCK_C
        end = tl.minimum(begin + tiles_per_split * BLOCK_C, C)
        step: tl.constexpr = BLOCK_C
    for t0 in range(begin, end, step):
        if COLUMNS:
            rows = t0 + tl.arange(0, BLOCK_B)
            rmask = rows < end
            y, rx, ax, r0, r1 = _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, rmask, LOSS, HAS_R0, ACC,
                                            BLOCK_B)
        else:
            cols = t0 + tl.arange(0, BLOCK_C)
            cmask = cols < end
            rp, bp, c0, c1 = _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, cmask, LOSS)
        raw = _raw_dot_tile(x_ptr, sxb, sxd, rows, rmask, p_ptr, spc, spd, cols, cmask, D,
                            BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = _value(raw, rx, ax, rp, bp, KIND)
        gv, stat = _tile_grad(val, rows, rmask, cols, cmask, y, C, r0, r1, c0, c1, g0, g1, k0, k1, k2, k3,
                              LOSS, EXCL)
        if stat >= tau:
            gs, gd = _chain_value(gv, val, dd, KIND)
            if COLUMNS:  # dL/dv_c = Σ_i gs_ic · u_i with u = x·rx
                acc = _accumulate(acc, tl.trans(gs * rx[:, None]), x_ptr, sxb, sxd, rows, rmask, ds64, dmask,
                                  SCALE_G, CD, ACC, EMU_BF16, PREC)
                if KIND != 0:
                    norm_sum += tl.sum(gd, axis=0)
            else:  # dL/du_i = Σ_c gs_ic · v_c with v = p·rp
                acc = _accumulate(acc, gs * rp[None, :], p_ptr, spc, spd, cols, cmask, ds64, dmask,
                                  SCALE_G, CD, ACC, EMU_BF16, PREC)
                if KIND != 0:
                    norm_sum += tl.sum(gd, axis=1)
        else:
            skipped += 1
    # the squared-norm term of the distances, 2·(Σ gd)·u (the owned side's own vectors), then the partial
    if COLUMNS:
        own, own_mask, own64, n_own, e_ptr, s_e, s_d, r_own = cols, cmask, cols.to(tl.int64), C, p_ptr, spc, spd, rp
    else:
        own, own_mask, own64, n_own, e_ptr, s_e, s_d, r_own = rows, rmask, rows.to(tl.int64), B, x_ptr, sxb, sxd, rx
    if KIND != 0:
        et = tl.load(e_ptr + own64[:, None] * s_e + ds64[None, :] * s_d, mask=own_mask[:, None] & dmask[None, :],
                     other=0.0).to(ACC)
        acc += 2.0 * et * (r_own * norm_sum)[:, None]
    if COUNT:
        tl.store(cnt_ptr + (pid_s * tl.num_programs(1) + pid_d) * tl.num_programs(0) + pid_o, skipped)
    out = out_ptr + (pid_s.to(tl.int64) * n_own + own64)[:, None] * D + ds64[None, :]
    tl.store(out, acc, mask=own_mask[:, None] & dmask[None, :])


@triton.jit
def _l2norm_bwd_kernel(g_ptr, x_ptr, sxr, sxd, r_ptr, pr_ptr, out_ptr, R, D,
                       ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Chain rule through F.normalize(x, eps): g = dL/du (R×D, ACC) → dL/dx = r·g − r³(x·g)·x when
    ‖x‖ ≥ eps (r = 1/‖x‖), else g/eps (the clamped norm passes no gradient, as torch's clamp_min);
    ``r`` and ``pr`` (= r³ or 0) come from the host's O(R) vectors.
    Row-local, so ``out`` may alias ``g``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
    pr = tl.load(pr_ptr + rows, mask=rmask, other=0.0)  # r³ where ‖x‖ ≥ eps, else 0
    xg = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = (k0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m2 = rmask[:, None] & (ks < D)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * D + ks[None, :], mask=m2, other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * sxr + ks[None, :] * sxd, mask=m2, other=0.0).to(ACC)
        xg += tl.sum(g * xt, axis=1)
    q = pr * xg
    for k0 in range(0, D, BLOCK_D):
        ks = (k0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m2 = rmask[:, None] & (ks < D)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * D + ks[None, :], mask=m2, other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * sxr + ks[None, :] * sxd, mask=m2, other=0.0).to(ACC)
        dx = r[:, None] * g - q[:, None] * xt
        tl.store(out_ptr + rows64[:, None] * D + ks[None, :], dx.to(out_ptr.dtype.element_ty), mask=m2)
