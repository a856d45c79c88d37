"""ProxyGML fused on the class engine (registered on import): no B×(C·N) buffer in forward or backward.

The equations, the tie rule and the two mask rules are ``backends/reference/proxy_gml.py``'s. Here ``P̂`` are
the proxies as rows (the official D×(C·N) parameter read through its transpose, never copied), ``N`` proxies
per class, ``K' = min(max(K − N, 0), (C−1)·N)`` other-class proxies selected per row.

Tiles: every kernel forms the same ``BB × W`` similarity tile, W = BG·NP columns holding BG whole classes, each
class's N proxies in NP = next_pow2(N) slots (slots j ≥ N are masked; N = 12 pays 16 slots). So the N
proxies of a class are adjacent in the tile and the grouped-column sum z_ic is a reshape-and-sum of the tile
(BB, BG, NP) → (BB, BG) in registers; no class straddles two tiles.

Passes (each recomputes its tiles from X and P; all save O(B) statistics only):

1. **Selection** (``_select_kernel``, row blocks, skipped when K' = 0): a running top-K' per row in registers
   over the other-class proxies (own-class slots hold −inf), ordered by (value desc, proxy index asc) — the
   k-NN kernel's merge, taken again: a tile enters only if a value beats the current K'-th, then K' rounds of
   "the best remaining, the smaller index among equal values". Writes the K'-th candidate (τ_i, κ_i). A
   proxy k of another class is then selected iff s_ik > τ_i or (s_ik == τ_i and k ≤ κ_i): exactly the
   reference's first K' in that order. K' ≤ :data:`MAX_OTHER` (registers); larger raises ``Unsupported``
   (``auto`` falls back to the reference).
2. **Forward** (``_fwd_kernel``, row blocks): per class tile the selection mask, z (grouped sums), the
   active classes (a selected proxy, or z ≠ 0 for ``class_mask="nonzero"``), an online LSE over the active
   z's, the target's z and whether it is active. The loss per row is formed on the device from those.
3. **Backward** by recomputation: dL/dz_ic = coef_i·([c∈A_i]·e^{z_ic − L_i} − [c = y_i]) (L_i = the LSE, or
   log(1e−8 + Σ e^z) with ``release_eps``; coef_i = grad/B, times p/(p + 1e−20) with ``release_eps``, 0
   where y_i ∉ A_i), broadcast back to the selected slots: dS. ``_bwd_rows_kernel`` (row block × D chunk)
   accumulates dS·P̂ over the class tiles, ``_bwd_cols_kernel`` (class block × D chunk) dSᵀ·X̂ over the
   row tiles; each program owns its output (no atomics); the normalisations' chain rule is the class
   engine's ``_l2norm_bwd_kernel``.

All four kernels form s with the same tile code and tile shapes, so τ_i is compared with bit-identical
recomputed values. The proxy-proxy regulariser is ProxyNCA's shape (rows p̂_k, "proxies" the class sums
Σ_{j∈c} p̂_j, dot, scale 1, target class(k)): it runs on the class engine's fused ProxyNCA, no (C·N)×C
buffer. Tested under the Triton interpreter, not yet run on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ...distances import Distance
from ..reference.proxy_gml import RELEASE_DEN_EPS, RELEASE_LOG_EPS, other_count
from . import class_losses as CL
from .class_engine import _accumulate
from .pair_engine import refuse_double_backward
from .tiles import dot_tile, load_rows, lse_init, lse_update, store_tile, tile_values

MAX_OTHER = 128  # K' held in registers by the selection pass
TUNING = {"block_b": None, "block_w": None, "block_k": None, "block_d": None}  # tests shrink / vary them
_BIG = tl.constexpr(2147483647)  # a kernel may read a global only as a constexpr (the GPU compiler refuses it)


@triton.jit
def _class_tile(x_ptr, sxb, sxd, p_ptr, spc, spd, rp_ptr, rows, rmask, rx, y, tau, kap, g0, C, D, NPC,
                MASK_RULE: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr,
                CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """The tile of classes [g0, g0 + BG) × rows: (s, selected, z, active, own slots, proxy index k, valid
    slot, the tile's classes). s = (x·p)·rx·rp; z = per-class sums of the selected s."""
    W: tl.constexpr = BG * NP
    t = tl.arange(0, W)
    cls = g0 + t // NP
    k = cls * NPC + t % NP
    cvalid = (t % NP < NPC) & (cls < C)
    rp = tl.load(rp_ptr + k, mask=cvalid, other=0.0)
    raw = dot_tile(x_ptr, p_ptr, rows, rmask, k, cvalid, D, sxb, sxd, spc, spd, BB, W, BK, CD, ACC, EMU_BF16, PREC)
    s, _ = tile_values(raw, rx, rp, rx, rp, 0, False)
    row_ok = rmask & (y >= 0) & (y < C)
    own = cls[None, :] == y[:, None]
    other = (s > tau[:, None]) | ((s == tau[:, None]) & (k[None, :] <= kap[:, None]))
    sel = (own | other) & cvalid[None, :] & row_ok[:, None]
    z = tl.sum(tl.reshape(tl.where(sel, s, 0.0), (BB, BG, NP)), axis=2)
    gcls = g0 + tl.arange(0, BG)
    if MASK_RULE == 0:
        active = tl.sum(tl.reshape(sel.to(tl.int32), (BB, BG, NP)), axis=2) > 0
    else:
        active = (z != 0) & (gcls < C)[None, :] & row_ok[:, None]
    return s, sel, z, active, own & cvalid[None, :] & row_ok[:, None], k, cvalid, gcls


@triton.jit
def _select_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, rp_ptr, tau_ptr, kap_ptr, B, C, D, NPC, KO,
                   KP: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr,
                   CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """(τ_i, κ_i): the K'-th of row i's other-class proxies in the order (value desc, index asc)."""
    W: tl.constexpr = BG * NP
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rmask = rows < B
    rx, _, y = load_rows(x_ptr, rx_ptr, rx_ptr, y_ptr, rows, B, True)
    slot = tl.arange(0, KP)[None, :]
    best_s = tl.full((BB, KP), float("-inf"), ACC)
    best_i = tl.full((BB, KP), _BIG, tl.int32)
    kth = tl.full((BB,), float("-inf"), ACC)
    none = tl.full((BB,), float("inf"), ACC)  # τ = +inf: nothing passes the "other" test of _class_tile
    no_idx = tl.full((BB,), -1, tl.int32)
    for g0 in range(0, C, BG):
        s, sel, z, active, own, k, cvalid, gcls = _class_tile(
            x_ptr, sxb, sxd, p_ptr, spc, spd, rp_ptr, rows, rmask, rx, y, none, no_idx, g0, C, D, NPC,
            0, BB, BG, NP, BK, CD, ACC, EMU_BF16, PREC)
        row_ok = rmask & (y >= 0) & (y < C)
        score = tl.where(cvalid[None, :] & row_ok[:, None] & (~own), s, float("-inf"))
        if tl.max(tl.max((score > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            tile_i = tl.zeros((BB, W), tl.int32) + k[None, :]
            new_s = tl.full((BB, KP), float("-inf"), ACC)
            new_i = tl.full((BB, KP), _BIG, tl.int32)
            for j in range(0, KO):
                top = tl.maximum(tl.max(best_s, axis=1), tl.max(score, axis=1))
                arg = tl.minimum(tl.min(tl.where(best_s == top[:, None], best_i, _BIG), axis=1),
                                 tl.min(tl.where(score == top[:, None], tile_i, _BIG), axis=1))
                arg = tl.where(top == float("-inf"), _BIG, arg)
                new_s = tl.where(slot == j, top[:, None], new_s)
                new_i = tl.where(slot == j, arg[:, None], new_i)
                best_s = tl.where(best_i == arg[:, None], float("-inf"), best_s)
                score = tl.where(tile_i == arg[:, None], float("-inf"), score)
            best_s = new_s
            best_i = new_i
            kth = tl.max(tl.where(slot == KO - 1, best_s, float("-inf")), axis=1)
    tl.store(tau_ptr + rows, kth, mask=rmask)
    tl.store(kap_ptr + rows, tl.min(tl.where(slot == KO - 1, best_i, _BIG), axis=1), mask=rmask)


@triton.jit
def _fwd_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, rp_ptr, tau_ptr, kap_ptr, lse_ptr, zy_ptr, ya_ptr,
                B, C, D, NPC, MASK_RULE: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr,
                BK: tl.constexpr, CD: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """Per row: LSE of the active classes' z (−inf if none), z of the target class, whether it is active."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rmask = rows < B
    rx, _, y = load_rows(x_ptr, rx_ptr, rx_ptr, y_ptr, rows, B, True)
    tau = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
    kap = tl.load(kap_ptr + rows, mask=rmask, other=0)
    m, l = lse_init(BB, ACC, False)
    zy = tl.zeros((BB,), ACC)
    ya = tl.zeros((BB,), tl.int32)
    for g0 in range(0, C, BG):
        s, sel, z, active, own, k, cvalid, gcls = _class_tile(
            x_ptr, sxb, sxd, p_ptr, spc, spd, rp_ptr, rows, rmask, rx, y, tau, kap, g0, C, D, NPC,
            MASK_RULE, BB, BG, NP, BK, CD, ACC, EMU_BF16, PREC)
        m, l = lse_update(m, l, tl.where(active, z, float("-inf")), 1)
        is_y = gcls[None, :] == y[:, None]
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        ya += tl.sum((is_y & active).to(tl.int32), axis=1)
    tl.store(lse_ptr + rows, tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf")), mask=rmask)
    tl.store(zy_ptr + rows, zy, mask=rmask)
    tl.store(ya_ptr + rows, ya, mask=rmask)


@triton.jit
def _tile_dslots(z, active, gcls, y, lref, coef, sel, BB: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr):
    """dL/ds of a tile: coef·([active]·e^{z − L} − [c = y]) per class, on the class's selected slots."""
    q = tl.where(active, tl.exp(z - lref[:, None]), 0.0)
    dz = coef[:, None] * (q - tl.where(gcls[None, :] == y[:, None], 1.0, 0.0))
    return tl.where(sel, tl.reshape(tl.broadcast_to(dz[:, :, None], (BB, BG, NP)), (BB, BG * NP)), 0.0)


@triton.jit
def _bwd_rows_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, rp_ptr, tau_ptr, kap_ptr, l_ptr, coef_ptr,
                     out_ptr, B, C, D, NPC, MASK_RULE: tl.constexpr, SCALE_G: tl.constexpr, BB: tl.constexpr,
                     BG: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CD: tl.constexpr,
                     ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """dL/du (u = x̂) of a row block, one D chunk: Σ over class tiles of dS·(p·rp)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rmask = rows < B
    ds_cols = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds_cols < D
    rx, _, y = load_rows(x_ptr, rx_ptr, rx_ptr, y_ptr, rows, B, True)
    tau = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
    kap = tl.load(kap_ptr + rows, mask=rmask, other=0)
    lref = tl.load(l_ptr + rows, mask=rmask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BB, BD), ACC)
    for g0 in range(0, C, BG):
        s, sel, z, active, own, k, cvalid, gcls = _class_tile(
            x_ptr, sxb, sxd, p_ptr, spc, spd, rp_ptr, rows, rmask, rx, y, tau, kap, g0, C, D, NPC,
            MASK_RULE, BB, BG, NP, BK, CD, ACC, EMU_BF16, PREC)
        g = _tile_dslots(z, active, gcls, y, lref, coef, sel, BB, BG, NP)
        rp = tl.load(rp_ptr + k, mask=cvalid, other=0.0)
        acc = _accumulate(acc, g * rp[None, :], p_ptr, spc, spd, k, cvalid, ds_cols, dmask, SCALE_G, CD, ACC,
                          EMU_BF16, PREC)
    store_tile(out_ptr, acc, rows, rmask, D, ds_cols, dmask, 1)


@triton.jit
def _bwd_cols_kernel(x_ptr, sxb, sxd, p_ptr, spc, spd, y_ptr, rx_ptr, rp_ptr, tau_ptr, kap_ptr, l_ptr, coef_ptr,
                     out_ptr, B, C, D, NPC, MASK_RULE: tl.constexpr, SCALE_G: tl.constexpr, BB: tl.constexpr,
                     BG: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CD: tl.constexpr,
                     ACC: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """dL/dv (v = p̂) of a block of BG classes, one D chunk: Σ over row tiles of dSᵀ·(x·rx)."""
    W: tl.constexpr = BG * NP
    g0 = tl.program_id(0) * BG
    ds_cols = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds_cols < D
    acc = tl.zeros((W, BD), ACC)
    t = tl.arange(0, W)
    k_own = (g0 + t // NP) * NPC + t % NP
    v_own = (t % NP < NPC) & (g0 + t // NP < C)
    for b0 in range(0, B, BB):
        rows = b0 + tl.arange(0, BB)
        rmask = rows < B
        rx, _, y = load_rows(x_ptr, rx_ptr, rx_ptr, y_ptr, rows, B, True)
        tau = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
        kap = tl.load(kap_ptr + rows, mask=rmask, other=0)
        lref = tl.load(l_ptr + rows, mask=rmask, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        s, sel, z, active, own, k, cvalid, gcls = _class_tile(
            x_ptr, sxb, sxd, p_ptr, spc, spd, rp_ptr, rows, rmask, rx, y, tau, kap, g0, C, D, NPC,
            MASK_RULE, BB, BG, NP, BK, CD, ACC, EMU_BF16, PREC)
        g = _tile_dslots(z, active, gcls, y, lref, coef, sel, BB, BG, NP)
        acc = _accumulate(acc, tl.trans(g * rx[:, None]), x_ptr, sxb, sxd, rows, rmask, ds_cols, dmask, SCALE_G,
                          CD, ACC, EMU_BF16, PREC)
    store_tile(out_ptr, acc, k_own, v_own, D, ds_cols, dmask, 1)


# --------------------------------------------------------------------------- launches and autograd


def _p2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


# GPU tile shapes (block_b, columns per tile W, block_k, block_d, num_warps) per dtype group: a first choice,
# not yet compiled for or timed on a GPU. W holds whole classes (BG = W // NP of them, at least one).
_GPU = {"half": (64, 128, 64, 64, 8), "fp32": (64, 64, 32, 64, 4), "fp64": (32, 32, 16, 32, 4)}


def _blocks(n_per_class, d, compute, device):
    """(BB, BG, NP, BK, BD, num_warps): the same tile shape for all four kernels (τ is compared with values
    the other kernels recompute: they must be bit-identical)."""
    if CL._interpreting() or device.type != "cuda":
        bb, w, bk, bd, nw = 16, 16, 32, 32, 4
    else:
        group = "fp64" if compute == torch.float64 else ("fp32" if compute == torch.float32 else "half")
        bb, w, bk, bd, nw = _GPU[group]
    npad = _p2(n_per_class)
    w = max(TUNING["block_w"] or w, npad, 16)  # tl.dot needs >= 16 columns
    dp = max(16, _p2(d))
    return (TUNING["block_b"] or bb, max(1, w // npad), npad, min(dp, TUNING["block_k"] or bk),
            min(dp, TUNING["block_d"] or bd), nw)


class _ProxyGML(torch.autograd.Function):
    """mean_i loss_i (the classification term); x (B×D), pt = proxiesᵀ (C·N × D, a view)."""

    @staticmethod
    def forward(ctx, x, pt, labels, cfg):
        b, d = x.shape
        c = pt.shape[0] // cfg["n"]
        acc = CL._acc(cfg["compute"])
        bb, bg, npad, bk, bd, nw = _blocks(cfg["n"], d, cfg["compute"], x.device)
        rx, _, nx = CL._norm_stats(x, acc, cfg["normalize"], bd)
        rp, _, npn = CL._norm_stats(pt, acc, True, bd)
        common = dict(BB=bb, BG=bg, NP=npad, BK=bk, CD=CL._TL[cfg["compute"]], ACC=CL._TL[acc],
                      EMU_BF16=CL._interpreting() and cfg["compute"] == torch.bfloat16,
                      PREC=CL._prec(cfg["compute"]), num_warps=nw)
        args = (x, x.stride(0), x.stride(1), pt, pt.stride(0), pt.stride(1), labels, rx, rp)
        tau = torch.full((b,), float("inf"), dtype=acc, device=x.device)  # K' = 0: no other proxy
        kap = torch.full((b,), -1, dtype=torch.int32, device=x.device)
        grid = (triton.cdiv(b, bb),)
        if cfg["k_other"] > 0:
            _select_kernel[grid](*args, tau, kap, b, c, d, cfg["n"], cfg["k_other"],
                                 KP=max(2, _p2(cfg["k_other"])), **common)
        lse = torch.empty(b, dtype=acc, device=x.device)
        zy = torch.empty_like(lse)
        ya = torch.empty(b, dtype=torch.int32, device=x.device)
        _fwd_kernel[grid](*args, tau, kap, lse, zy, ya, b, c, d, cfg["n"], MASK_RULE=cfg["mask_rule"], **common)
        valid = (labels >= 0) & (labels < c)
        y_act = (ya > 0) & valid
        if cfg["release_eps"]:
            den = RELEASE_DEN_EPS + torch.exp(lse)
            p = torch.where(y_act, torch.exp(zy), 0) / den
            losses = -torch.log(p + RELEASE_LOG_EPS)
            lref, w = torch.log(den), p / (p + RELEASE_LOG_EPS)
        else:
            losses = torch.where(y_act, lse - zy, float("inf"))
            lref, w = torch.where(torch.isfinite(lse), lse, 0), y_act.to(acc)
        loss = torch.where(valid, losses, 0).sum() / b
        ctx.cfg = cfg
        ctx.launch = (bb, bg, npad, bk, bd, nw, common)
        ctx.save_for_backward(x, pt, labels, rx, nx, rp, npn, tau, kap, lref, w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward()
        x, pt, labels, rx, nx, rp, npn, tau, kap, lref, w = ctx.saved_tensors
        cfg = ctx.cfg
        bb, bg, npad, bk, bd, nw, common = ctx.launch
        b, d = x.shape
        c = pt.shape[0] // cfg["n"]
        coef = w * (grad.to(w.dtype) / b)  # per-row dL/dloss_i on the device
        args = (x, x.stride(0), x.stride(1), pt, pt.stride(0), pt.stride(1), labels, rx, rp, tau, kap, lref, coef)
        kw = dict(MASK_RULE=cfg["mask_rule"], SCALE_G=cfg["compute"] == torch.float16, BD=bd, **common)
        gx = gp = None
        if ctx.needs_input_grad[0]:
            out = torch.empty((b, d), dtype=lref.dtype, device=x.device)
            _bwd_rows_kernel[(triton.cdiv(b, bb), triton.cdiv(d, bd))](*args, out, b, c, d, cfg["n"], **kw)
            gx = CL._l2norm_bwd(out, x, rx, nx, x.dtype, cfg["normalize"], bd)
        if ctx.needs_input_grad[1]:
            out = torch.empty((pt.shape[0], d), dtype=lref.dtype, device=x.device)  # every row is written
            _bwd_cols_kernel[(triton.cdiv(c, bg), triton.cdiv(d, bd))](*args, out, b, c, d, cfg["n"], **kw)
            gp = CL._l2norm_bwd(out, pt, rp, npn, pt.dtype, True, bd)
        return gx, gp, None, None


def proxy_regularizer(proxies, n_per_class, dtype):
    """mean_k reg_k on the fused ProxyNCA: rows p̂_k, "proxies" the class sums Σ_{j∈c} p̂_j (dot, scale 1)."""
    p_hat = TF.normalize(proxies.t().to(dtype), p=2, dim=1)  # C·N × D
    sums = p_hat.reshape(-1, n_per_class, p_hat.shape[1]).sum(1)  # C × D
    cls = torch.arange(p_hat.shape[0], device=p_hat.device) // n_per_class
    return CL.proxy_nca_loss(p_hat, cls, sums, softmax_scale=1.0, exclude_positive=False,
                             distance=Distance("dot", False))


@register("proxy_gml_loss", "triton")
def proxy_gml_loss(x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask="selected",
                   release_eps=False, distance: Distance):
    if x.device.type not in ("cuda", "cpu") or proxies.device != x.device:
        raise Unsupported("triton ProxyGML needs embeddings and proxies on one CUDA device (or CPU under "
                          "TRITON_INTERPRET=1)")
    if not distance.is_similarity:
        raise Unsupported("ProxyGML uses a similarity")
    n = int(proxies_per_class)
    k_other = other_count(top_k, n, proxies.shape[1] // n)
    if k_other > MAX_OTHER:
        raise Unsupported(f"the triton ProxyGML holds the K − N = {k_other} selected other-class proxies of a row in "
                          f"registers (at most {MAX_OTHER})")
    cfg = dict(n=n, k_other=k_other, mask_rule=0 if class_mask == "selected" else 1, release_eps=bool(release_eps),
               normalize=bool(distance.normalize), compute=CL._compute_dtype(x))
    loss = _ProxyGML.apply(x, proxies.t(), labels.contiguous(), cfg)
    if weight_lambda:
        reg = proxy_regularizer(proxies, n, torch.promote_types(x.dtype, proxies.dtype))
        loss = loss + weight_lambda * reg.to(loss.dtype)
    return loss
