"""Triton kernels of the proxy losses (ProxyNCA / ProxyNCA++ and Proxy Anchor) at million-class scale.

Shapes: embeddings X (B×D), proxies P (C×D), C up to millions. No kernel ever holds or writes a B×C
buffer: every similarity tile is recomputed from X and P where it is needed.

Conventions shared by every kernel
----------------------------------
* The tiles are the pair engine's: :mod:`.tiles` forms them (``dot_tile``; ``tile_values`` with
  ``SYM=False``, this engine's ``(c·rx)·rp`` rounding), loads them (``load_tile``, ``load_rows``, all offsets
  in int64: C·D can pass 2³¹) and reduces them (``lse_update``, per row or per column); this module adds the
  proxy masks, the epilogues and the tile skipping.
* ``u_i = x_i·rx_i`` and ``v_c = p_c·rp_c`` are the (optionally L2-normalised) vectors; ``rx`` / ``rp``
  are precomputed reciprocal norms (1 without normalisation), so the raw dot ``x_i·p_c`` is formed in the
  compute dtype ``CD`` (tensor cores for fp16/bf16; proxies are read in their own dtype and converted tile
  by tile) with fp32 accumulation and scaled afterwards: normalisation is fused, nothing is copied.
* ``KIND`` picks the value a loss sees (``tile_values``' DIST): 0 = similarity ``s = u·v`` (cosine / dot),
  1 = squared euclidean ``d = max(a_i + b_c − 2s, 0)`` (``a = ‖u‖²``, ``b = ‖v‖²``), 2 = euclidean ``sqrt(d)``
  (zero gradient at 0), matching the reference's clamp / where exactly, gradients included.
* Gradients are first taken w.r.t. ``u`` and ``v`` (``dU``, ``dV``); :func:`_l2norm_bwd_kernel` applies the
  chain rule through the normalisation afterwards (a row-local epilogue over O(B·D) / O(C·D)).
* ``EMU_BF16`` (set under ``TRITON_INTERPRET=1`` for a bf16 compute dtype): bf16 dots are emulated exactly
  (see :mod:`.tiles`).

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

from .tiles import dot_operand, dot_tile, load_rows, load_tile, lse_init, lse_update, store_tile, tile_values


@triton.jit
def _loss_scalars(sc_ptr):
    """The loss scalars k0..k3 of :func:`_tile_grad` (device values)."""
    return tl.load(sc_ptr), tl.load(sc_ptr + 1), tl.load(sc_ptr + 2), tl.load(sc_ptr + 3)


@triton.jit
def _split_range(pid_s, tiles_per_split, BLOCK: tl.constexpr, N):
    """[begin, end) of the streamed side (N entries) that split pid_s covers: tiles_per_split tiles of BLOCK."""
    begin = pid_s * tiles_per_split * BLOCK
    return begin, tl.minimum(begin + tiles_per_split * BLOCK, N)


@triton.jit
def _valid_rows(y, rmask, C):
    """The rows that take part: a label in [0, C) (with validation off, another label is ignored)."""
    return rmask & (y >= 0) & (y < C)


@triton.jit
def _targets(y, valid, cols, cmask):
    """The (row, proxy) entries of a tile where a valid row meets its target proxy."""
    return (y[:, None] == cols[None, :]) & valid[:, None] & cmask[None, :]


@triton.jit
def _chain_value(gv, val, dd, KIND: tl.constexpr):
    """dL/dvalue → (Gs = dL/ds, Gd = dL/d(a+b−2s) through the clamp / sqrt), from ``tile_values``' (value,
    unclamped squared distance ``dd``). Unlike the pair engine's ``chain`` the clamp passes the gradient at
    dd = 0 exactly, as the reference's ``clamp_min`` does."""
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
    valid = _valid_rows(y, rmask, C)
    is_tgt = _targets(y, valid, cols, cmask)
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
    acc = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        t = load_tile(x_ptr, rows, rmask, sxr, ks, ks < D, sxd).to(ACC)
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
    rx, ax, y = load_rows(x_ptr, rx_ptr, ax_ptr, y_ptr, rows, B, True)
    valid = _valid_rows(y, rmask, C)
    m, l = lse_init(BLOCK_B, ACC, False)
    t = tl.zeros((BLOCK_B,), dtype=ACC)
    c_begin, c_end = _split_range(pid_s, tiles_per_split, BLOCK_C, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        rp, bp, lab_c = load_rows(p_ptr, rp_ptr, bp_ptr, y_ptr, cols, c_end, False)
        raw = dot_tile(x_ptr, p_ptr, rows, rmask, cols, cmask, D, sxb, sxd, spc, spd,
                       BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = tile_values(raw, rx, rp, ax, bp, KIND, False)
        logit = logit_scale * val
        is_tgt = _targets(y, valid, cols, cmask)
        t += tl.sum(tl.where(is_tgt, logit, 0.0), axis=1)
        allowed = cmask[None, :] & rmask[:, None]
        if EXCL:
            allowed = allowed & (~is_tgt)
        m, l = lse_update(m, l, tl.where(allowed, logit, float("-inf")), 1)
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
    k0, k1, k2, k3 = _loss_scalars(sc_ptr)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rp, bp, lab_c = load_rows(p_ptr, rp_ptr, bp_ptr, y_ptr, cols, C, False)
    if pid_s == 0:  # the split that holds the implicit zero term
        mp, lp = lse_init(BLOCK_C, ACC, True)
    else:
        mp, lp = lse_init(BLOCK_C, ACC, False)
    mn = mp
    ln = lp
    npos = tl.zeros((BLOCK_C,), dtype=tl.int32)
    b_begin, b_end = _split_range(pid_s, tiles_per_split, BLOCK_B, B)
    for b0 in range(b_begin, b_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < b_end
        rx, ax, y = load_rows(x_ptr, rx_ptr, ax_ptr, y_ptr, rows, b_end, True)
        valid = _valid_rows(y, rmask, C)
        if HAS_OFF:
            off = tl.load(off_ptr + rows, mask=rmask, other=0.0)
        else:
            off = tl.zeros((BLOCK_B,), dtype=ACC)
        raw = dot_tile(x_ptr, p_ptr, rows, rmask, cols, cmask, D, sxb, sxd, spc, spd,
                       BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = tile_values(raw, rx, rp, ax, bp, KIND, False)
        is_tgt = _targets(y, valid, cols, cmask)
        neg = valid[:, None] & cmask[None, :] & (~is_tgt)
        npos += tl.sum(is_tgt.to(tl.int32), axis=0)
        mp, lp = lse_update(mp, lp, tl.where(is_tgt, k0 * val + k1 + off[:, None], float("-inf")), 0)
        mn, ln = lse_update(mn, ln, tl.where(neg, k2 * val + k3 + off[:, None], float("-inf")), 0)
    out = pid_s.to(tl.int64) * C + cols
    # log(0) = −inf for an empty partial of a split > 0
    tl.store(lsep_ptr + out, tl.where(lp > 0, mp + tl.log(tl.where(lp > 0, lp, 1.0)), float("-inf")), mask=cmask)
    tl.store(lsen_ptr + out, tl.where(ln > 0, mn + tl.log(tl.where(ln > 0, ln, 1.0)), float("-inf")), mask=cmask)
    tl.store(npos_ptr + out, npos, mask=cmask)


# --------------------------------------------------------------------------- backward kernels


@triton.jit
def _accumulate(acc, g, e_ptr, s_e, s_d, offs, emask, ds, dmask, SCALE_G: tl.constexpr, CD: tl.constexpr,
                ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc += g · E[offs, ds] with the product in the compute dtype (unlike the pair engine's fp32 gradient
    dot); SCALE_G (fp16) divides g by its per-output-row maximum before the cast and multiplies it back
    after the dot."""
    e = dot_operand(load_tile(e_ptr, offs, emask, s_e, ds, dmask, s_d), CD, EMU_BF16)
    if SCALE_G:
        sc = tl.max(tl.abs(g), axis=1)
        sc = tl.where(sc > 0, sc, 1.0)
        part = tl.dot(dot_operand(g / sc[:, None], CD, EMU_BF16), e, input_precision=PREC)
        acc += part.to(ACC) * sc[:, None]
    else:
        acc = tl.dot(dot_operand(g, CD, EMU_BF16), e, acc, input_precision=PREC)
    return acc


@triton.jit
def _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, n_rows,
                LOSS: tl.constexpr, HAS_R0: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per-row inputs of a gradient tile (rows below n_rows): label, 1/‖x‖, ‖u‖², and r0 / r1 of
    :func:`_tile_grad`."""
    rx, ax, y = load_rows(y_ptr, rx_ptr, ax_ptr, y_ptr, rows, n_rows, True)
    rmask = rows < n_rows
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
def _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, n_cols, LOSS: tl.constexpr):
    """Per-proxy inputs of a gradient tile (proxies below n_cols): 1/‖p‖, ‖v‖², and c0 / c1 of
    :func:`_tile_grad`."""
    rp, bp, lab_c = load_rows(rp_ptr, rp_ptr, bp_ptr, rp_ptr, cols, n_cols, False)
    cmask = cols < n_cols
    if LOSS == 1:
        c0 = tl.load(c0_ptr + cols, mask=cmask, other=0.0)
        c1 = tl.load(c1_ptr + cols, mask=cmask, other=0.0)
    else:
        c0 = rp
        c1 = rp
    return rp, bp, c0, c1


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
    k0, k1, k2, k3 = _loss_scalars(sc_ptr)
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
    if COLUMNS:  # owns a proxy block, streams the split's batch tiles
        cols = pid_o * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        rp, bp, c0, c1 = _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, C, LOSS)
        own_block: tl.constexpr = BLOCK_C
        step: tl.constexpr = BLOCK_B
        n_streamed = B
    else:  # owns a row block, streams the split's proxy tiles
        rows = pid_o * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        y, rx, ax, r0, r1 = _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, B, LOSS, HAS_R0, ACC, BLOCK_B)
        own_block: tl.constexpr = BLOCK_B
        step: tl.constexpr = BLOCK_C
        n_streamed = C
    acc = tl.zeros((own_block, BLOCK_D), dtype=ACC)
    norm_sum = tl.zeros((own_block,), dtype=ACC)
    begin, end = _split_range(pid_s, tiles_per_split, step, n_streamed)
    for t0 in range(begin, end, step):
        if COLUMNS:
            rows = t0 + tl.arange(0, BLOCK_B)
            rmask = rows < end
            y, rx, ax, r0, r1 = _row_inputs(y_ptr, rx_ptr, ax_ptr, r0_ptr, r1_ptr, rows, end, LOSS, HAS_R0, ACC,
                                            BLOCK_B)
        else:
            cols = t0 + tl.arange(0, BLOCK_C)
            cmask = cols < end
            rp, bp, c0, c1 = _col_inputs(rp_ptr, bp_ptr, c0_ptr, c1_ptr, cols, end, LOSS)
        raw = dot_tile(x_ptr, p_ptr, rows, rmask, cols, cmask, D, sxb, sxd, spc, spd,
                       BLOCK_B, BLOCK_C, BLOCK_K, CD, ACC, EMU_BF16, PREC)
        val, dd = tile_values(raw, rx, rp, ax, bp, KIND, False)
        gv, stat = _tile_grad(val, rows, rmask, cols, cmask, y, C, r0, r1, c0, c1, g0, g1, k0, k1, k2, k3,
                              LOSS, EXCL)
        if stat >= tau:
            gs, gd = _chain_value(gv, val, dd, KIND)
            if COLUMNS:  # dL/dv_c = Σ_i gs_ic · u_i with u = x·rx
                acc = _accumulate(acc, tl.trans(gs * rx[:, None]), x_ptr, sxb, sxd, rows, rmask, ds, dmask,
                                  SCALE_G, CD, ACC, EMU_BF16, PREC)
                if KIND != 0:
                    norm_sum += tl.sum(gd, axis=0)
            else:  # dL/du_i = Σ_c gs_ic · v_c with v = p·rp
                acc = _accumulate(acc, gs * rp[None, :], p_ptr, spc, spd, cols, cmask, ds, dmask,
                                  SCALE_G, CD, ACC, EMU_BF16, PREC)
                if KIND != 0:
                    norm_sum += tl.sum(gd, axis=1)
        else:
            skipped += 1
    # the squared-norm term of the distances, 2·(Σ gd)·u (the owned side's own vectors), then the partial
    if COLUMNS:
        own, own_mask, n_own, e_ptr, s_e, s_d, r_own = cols, cmask, C, p_ptr, spc, spd, rp
    else:
        own, own_mask, n_own, e_ptr, s_e, s_d, r_own = rows, rmask, B, x_ptr, sxb, sxd, rx
    if KIND != 0:
        et = load_tile(e_ptr, own, own_mask, s_e, ds, dmask, s_d).to(ACC)
        acc += 2.0 * et * (r_own * norm_sum)[:, None]
    if COUNT:
        tl.store(cnt_ptr + (pid_s * tl.num_programs(1) + pid_d) * tl.num_programs(0) + pid_o, skipped)
    store_tile(out_ptr + pid_s.to(tl.int64) * n_own * D, acc, own, own_mask, D, ds, dmask, 1)


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
    r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
    pr = tl.load(pr_ptr + rows, mask=rmask, other=0.0)  # r³ where ‖x‖ ≥ eps, else 0
    xg = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        g = load_tile(g_ptr, rows, rmask, D, ks, ks < D, 1)
        xg += tl.sum(g * load_tile(x_ptr, rows, rmask, sxr, ks, ks < D, sxd).to(ACC), axis=1)
    q = pr * xg
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        g = load_tile(g_ptr, rows, rmask, D, ks, ks < D, 1)
        dx = r[:, None] * g - q[:, None] * load_tile(x_ptr, rows, rmask, sxr, ks, ks < D, sxd).to(ACC)
        store_tile(out_ptr, dx.to(out_ptr.dtype.element_ty), rows, rmask, D, ks, ks < D, 1)
