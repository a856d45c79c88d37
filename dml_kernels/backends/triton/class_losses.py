"""Triton proxy losses (registered on import): ProxyNCA / ProxyNCA++ and Proxy Anchor without B×C buffers.

Forward saves O(B + C) statistics (norms, row LSEs or column LSEs) and never a B×C matrix; backward
recomputes similarity tiles (``class_engine.py`` has the kernels and the tile-skipping criterion).

* ProxyNCA: a row LSE over proxy tiles (grid: row blocks × C splits, partials merged by a logaddexp over
  the splits) with the target logit taken from the tile that holds it (the "indexed dot" of Cut
  Cross-Entropy, fused into the scan: no extra gather of P rows, and the target logit has exactly the
  rounding of the LSE term it cancels against). Backward: dX from a row-block kernel, dP from a
  proxy-block kernel.
* Proxy Anchor: per proxy block, two column LSEs over the batch with the implicit zero term; |C⁺| is a
  device-side sum. Backward: the same two kernels with the Proxy Anchor tile gradient.
* Parallelism: the serial loops are split (over C for row kernels, over the batch for proxy-block kernels)
  when the grid would not fill the GPU; every split writes its own partial (O(splits·B), O(splits·C), or
  for gradients O(splits·B·D) / O(splits·C·D), capped at 256 MB) and torch merges them deterministically —
  no atomics anywhere.

Mixed precision: the compute dtype is the embeddings' dtype (or the autocast dtype for fp32 embeddings
under autocast); proxies are read in that dtype tile by tile (never cast as a whole), accumulation and
statistics are fp32 (fp64 for fp64 inputs), the loss is fp32 (fp64 for fp64). Gradients come back in each
input's own dtype. No ``.item()`` / host sync anywhere: every data-dependent scalar (grad_out, |C⁺|) stays
on the device and is read by the kernels.

Labels outside [0, C) (only possible with ``check_inputs=False``) are never used as an index: the kernels
only compare labels with column indices. Such a sample is ignored: it contributes 0 to the ProxyNCA sum
(the mean still divides by B) and is neither a positive nor a negative of any proxy in Proxy Anchor; its
gradient is 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._registry import Unsupported, register
from ...distances import Distance
from . import class_engine as K
from .pair_engine import refuse_double_backward

_EPS = 1e-12  # F.normalize's eps
_KIND = {"cosine": 0, "dot": 0, "squared_euclidean": 1, "euclidean": 2}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

# Tuning knobs (tests shrink the tiles and force C splits to exercise every path under the interpreter).
TUNING = {
    "block_b": None,  # rows per tile (None: 64 on GPU, 16 under the interpreter)
    "block_c": None,  # proxies per tile (None: 128 on GPU / 32 interpreted)
    "block_k": None,  # reduction chunk over D (None: up to 64 on GPU / 32 interpreted)
    "block_d": None,  # output chunk over D in backward (None: up to 128 on GPU / 32 interpreted)
    "splits": None,  # C splits of the row kernels (None: enough programs to fill the GPU; 1 interpreted)
    "splits_b": None,  # batch splits of the proxy-block kernels (None: as "splits")
    "skip": True,  # sound tile skipping in backward (see class_engine.py)
    "count_skips": False,  # record skipped tiles in LAST_SKIPS (tests)
}
LAST_SKIPS: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class _Cfg:
    loss: int  # 0 ProxyNCA, 1 Proxy Anchor
    kind: int
    normalize: bool
    excl: bool
    scalars: tuple  # (k0, k1, k2, k3)
    compute: torch.dtype


# GPU tile configurations (block_b, block_c, block_k, block_d, num_warps), chosen so that ptxas reports no
# (or a few bytes of) register spills on sm_90 (checked with the AOT compile, see aot_check.py); not
# yet timed on hardware. "cols" is the proxy-block gradient kernel (block_b = its batch tile).
_GPU_CFG = {
    "half": {"nca_fwd": (64, 128, 64, 0, 8), "pa_fwd": (64, 64, 64, 0, 8), "rows": (64, 64, 64, 128, 8),
             "cols": (64, 64, 32, 128, 8)},
    "fp32": {"nca_fwd": (64, 64, 32, 0, 8), "pa_fwd": (32, 64, 32, 0, 8), "rows": (64, 64, 32, 64, 8),
             "cols": (32, 64, 32, 64, 8)},
    "fp64": {k: (32, 32, 16, 32, 4) for k in ("nca_fwd", "pa_fwd", "rows", "cols")},
}


def _blocks(kernel, compute, D, device):
    """(block_b, block_c, block_k, block_d, num_warps) for one kernel launch; TUNING entries override."""
    interp = _interpreting() or device.type != "cuda"
    if interp:
        bb, bc, bk, bd, nw = 16, 32, 32, 32, 4
    else:
        group = "fp64" if compute == torch.float64 else ("fp32" if compute == torch.float32 else "half")
        bb, bc, bk, bd, nw = _GPU_CFG[group][kernel]
    dp = max(16, _p2(D))
    bb = TUNING["block_b"] or bb
    bc = TUNING["block_c"] or bc
    bk = min(dp, TUNING["block_k"] or bk)
    bd = min(dp, TUNING["block_d"] or bd or 32)
    return bb, bc, bk, bd, nw


def _splits(n_tiles, n_programs, partial_bytes, device, over="c"):
    """Split a serial loop over ``n_tiles`` tiles (over proxies, "c", or the batch, "b") so that
    ``n_programs`` × splits programs fill the GPU, with the per-split partial buffers (``partial_bytes``
    each) capped at 256 MB. Returns (splits, tiles per split)."""
    forced = TUNING["splits_b"] if over == "b" and TUNING["splits_b"] is not None else TUNING["splits"]
    if forced is not None:
        s = int(forced)
    elif device.type == "cuda" and not _interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        s = triton.cdiv(4 * sms, max(1, n_programs))
        s = min(s, max(1, (256 << 20) // max(1, partial_bytes)))
    else:
        s = 1
    s = max(1, min(s, n_tiles))
    tps = triton.cdiv(n_tiles, s)
    return triton.cdiv(n_tiles, tps), tps


def _prec(compute):
    if compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _acc(compute):
    return torch.float64 if compute == torch.float64 else torch.float32


_SCALARS: dict = {}


def _device_scalars(values, dtype, device):
    """A small device tensor of Python floats, filled without a host→device copy (no sync, graph-safe) and
    cached (kernels only read it)."""
    key = (tuple(float(v) for v in values), dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 256:
            _SCALARS.clear()
        t = torch.empty(len(values), dtype=dtype, device=device)
        for i, v in enumerate(key[0]):
            t[i].fill_(v)
        _SCALARS[key] = t
    return t


def _norm_stats(t, acc, normalize, bd):
    """(r, a, nrm): reciprocal norm used to scale dots (1 without normalisation), ‖u‖², and ‖t‖ — O(rows)."""
    R, D = t.shape
    sq = torch.empty(R, dtype=acc, device=t.device)
    br = 16
    K._sqnorm_kernel[(triton.cdiv(R, br),)](t, t.stride(0), t.stride(1), sq, R, D, ACC=_TL[acc], BLOCK_R=br,
                                            BLOCK_D=bd)
    nrm = sq.sqrt()
    if normalize:
        r = 1.0 / nrm.clamp_min(_EPS)
        a = (nrm * r) ** 2
    else:
        r = torch.ones_like(sq)
        a = sq
    return r, a, nrm


def _l2norm_bwd(g, t, r, nrm, out_dtype, normalize, bd):
    """dL/dt from dL/du (g, R×D in the accumulator dtype), through u = t·r."""
    if not normalize:
        return g.to(out_dtype)
    R, D = g.shape
    pr = torch.where(nrm >= _EPS, r * r * r, 0)
    out = g if g.dtype == out_dtype else torch.empty((R, D), dtype=out_dtype, device=g.device)
    br = 16
    K._l2norm_bwd_kernel[(triton.cdiv(R, br),)](g, t, t.stride(0), t.stride(1), r, pr, out, R, D,
                                                ACC=_TL[g.dtype], BLOCK_R=br, BLOCK_D=bd)
    return out


def _compute_dtype(x):
    dt = x.dtype
    dev = x.device.type
    if dt == torch.float32 and torch.is_autocast_enabled(dev):
        ad = torch.get_autocast_dtype(dev)
        if ad in (torch.float16, torch.bfloat16):
            return ad
    return dt


def _common(x, proxies, labels):
    if x.device.type not in ("cuda", "cpu") or proxies.device != x.device:
        raise Unsupported("triton proxy losses need embeddings and proxies on one CUDA device (or CPU under "
                          "TRITON_INTERPRET=1)")
    return labels.contiguous()


def _bwd(ctx, x, proxies, labels, r0, r1, c0, c1, gsc, has_r0):
    """Shared backward: dX by the kernel's row form (row blocks over proxy tiles), dP by its column form."""
    cfg = ctx.cfg
    B, D = x.shape
    C = proxies.shape[0]
    acc = _acc(cfg.compute)
    rx, ax, rp, bp, nx, np_ = ctx.norms
    tau = -1.0
    if TUNING["skip"] and cfg.normalize:
        tau = (2.0 ** -53 if acc == torch.float64 else 2.0 ** -24) / max(B, C)
    sc = _device_scalars(list(cfg.scalars) + [tau], acc, x.device)
    cd = _TL[cfg.compute]
    emu = _interpreting() and cfg.compute == torch.bfloat16
    common = dict(LOSS=cfg.loss, KIND=cfg.kind, EXCL=cfg.excl, HAS_R0=has_r0, COUNT=bool(TUNING["count_skips"]),
                  SCALE_G=cfg.compute == torch.float16, CD=cd, ACC=_TL[acc], EMU_BF16=emu, PREC=_prec(cfg.compute),
                  num_stages=2)
    dummy = rx
    r0 = dummy if r0 is None else r0
    r1 = dummy if r1 is None else r1
    c0 = dummy if c0 is None else c0
    c1 = dummy if c1 is None else c1
    gsc = dummy if gsc is None else gsc
    grads = []
    for side, (t, r, nrm) in enumerate(((x, rx, nx), (proxies, rp, np_))):  # 0: dX by row blocks, 1: dP by proxies
        if not ctx.needs_input_grad[side]:
            grads.append(None)
            continue
        columns = side == 1
        bb, bc, bk, bd, nw = _blocks("cols" if columns else "rows", cfg.compute, D, x.device)
        own, own_block, other_tiles = (C, bc, triton.cdiv(B, bb)) if columns else (B, bb, triton.cdiv(C, bc))
        n_o, n_d = triton.cdiv(own, own_block), triton.cdiv(D, bd)
        n_s, tps = _splits(other_tiles, n_o * n_d, own * D * acc.itemsize, x.device, "b" if columns else "c")
        partial = torch.empty((n_s, own, D), dtype=acc, device=x.device)
        cnt = torch.zeros(n_s * n_d * n_o, dtype=torch.int32, device=x.device) if TUNING["count_skips"] else dummy
        K._bwd_kernel[(n_o, n_d, n_s)](x, x.stride(0), x.stride(1), proxies, proxies.stride(0), proxies.stride(1),
                                       labels, rx, ax, rp, bp, r0, r1, c0, c1, gsc, partial, sc, cnt, B, C, D, tps,
                                       COLUMNS=columns, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk, BLOCK_D=bd, num_warps=nw,
                                       **common)
        if TUNING["count_skips"]:
            LAST_SKIPS["cols" if columns else "rows"] = (cnt, n_o * n_d * tps * n_s)
        partial = partial[0] if n_s == 1 else partial.sum(0)
        grads.append(_l2norm_bwd(partial, t, r, nrm, t.dtype, cfg.normalize, bd))
    return tuple(grads)


def _forward_norms(x, proxies, cfg, bd):
    acc = _acc(cfg.compute)
    rx, ax, nx = _norm_stats(x, acc, cfg.normalize, bd)
    rp, bp, np_ = _norm_stats(proxies, acc, cfg.normalize, bd)
    return rx, ax, rp, bp, nx, np_


# --------------------------------------------------------------------------- ProxyNCA


class _ProxyNCA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, proxies, labels, weights, cfg):
        B, D = x.shape
        C = proxies.shape[0]
        acc = _acc(cfg.compute)
        bb, bc, bk, bd, nw = _blocks("nca_fwd", cfg.compute, D, x.device)
        norms = _forward_norms(x, proxies, cfg, bd)
        rx, ax, rp, bp, _, _ = norms
        n_s, tps = _splits(triton.cdiv(C, bc), triton.cdiv(B, bb), 0, x.device)
        m = torch.empty((n_s, B), dtype=acc, device=x.device)
        l_ = torch.empty_like(m)
        t = torch.empty_like(m)
        sc = _device_scalars([cfg.scalars[0]], acc, x.device)
        K._nca_fwd_kernel[(triton.cdiv(B, bb), n_s)](
            x, x.stride(0), x.stride(1), proxies, proxies.stride(0), proxies.stride(1), labels, rx, ax, rp, bp,
            m, l_, t, sc, B, C, D, tps, KIND=cfg.kind, EXCL=cfg.excl, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
            CD=_TL[cfg.compute], ACC=_TL[acc], EMU_BF16=_interpreting() and cfg.compute == torch.bfloat16,
            PREC=_prec(cfg.compute), num_warps=nw, num_stages=2)
        if n_s == 1:
            lse = m[0] + torch.log(l_[0])
        else:
            mx = m.amax(0)
            mx_safe = torch.where(torch.isfinite(mx), mx, 0)
            lse = mx_safe + torch.log((l_ * torch.exp(m - mx_safe)).sum(0))
        target = t.sum(0)
        valid = (labels >= 0) & (labels < C)
        w = valid.to(acc) if weights is None else torch.where(valid, weights.to(acc), 0)
        losses = torch.where(valid, lse - target, 0) * w
        loss = losses.sum() / B
        ctx.cfg = cfg
        ctx.norms = norms
        ctx.save_for_backward(x, proxies, labels, lse, w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward()
        x, proxies, labels, lse, w = ctx.saved_tensors
        coef = w * (grad.to(w.dtype) / x.shape[0])  # per-row dL/d(loss_i), on the device
        gx, gp = _bwd(ctx, x, proxies, labels, lse, coef, None, None, None, has_r0=True)
        return gx, gp, None, None, None


@register("proxy_nca_loss", "triton")
def proxy_nca_loss(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance: Distance, weights=None):
    labels = _common(x, proxies, labels)
    kind = _KIND[distance.name]
    normalize = distance.normalize
    # logits = σ·s for a similarity, −σ·d for a distance
    scale = float(softmax_scale) if kind == 0 else -float(softmax_scale)
    cfg = _Cfg(0, kind, normalize, bool(exclude_positive), (scale, 0.0, 0.0, 0.0), _compute_dtype(x))
    return _ProxyNCA.apply(x, proxies, labels, weights, cfg)


# --------------------------------------------------------------------------- Proxy Anchor


class _ProxyAnchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, proxies, labels, weights, cfg):
        B, D = x.shape
        C = proxies.shape[0]
        acc = _acc(cfg.compute)
        bb, bc, bk, bd, nw = _blocks("pa_fwd", cfg.compute, D, x.device)
        norms = _forward_norms(x, proxies, cfg, bd)
        rx, ax, rp, bp, _, _ = norms
        off = None if weights is None else (weights.to(acc) - 1)
        n_c = triton.cdiv(C, bc)
        n_s, tps = _splits(triton.cdiv(B, bb), n_c, 0, x.device, "b")
        lsep = torch.empty((n_s, C), dtype=acc, device=x.device)
        lsen = torch.empty_like(lsep)
        npos_c = torch.empty((n_s, C), dtype=torch.int32, device=x.device)
        sc = _device_scalars(cfg.scalars, acc, x.device)
        K._pa_fwd_kernel[(n_c, n_s)](
            x, x.stride(0), x.stride(1), proxies, proxies.stride(0), proxies.stride(1), labels,
            rx if off is None else off, rx, ax, rp, bp, lsep, lsen, npos_c, sc, B, C, D, tps, KIND=cfg.kind,
            HAS_OFF=off is not None, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk, CD=_TL[cfg.compute], ACC=_TL[acc],
            EMU_BF16=_interpreting() and cfg.compute == torch.bfloat16, PREC=_prec(cfg.compute), num_warps=nw,
            num_stages=2)
        if n_s == 1:
            lsep, lsen, npos_c = lsep[0], lsen[0], npos_c[0]
        else:  # split 0 holds the implicit zero term, so every merged LSE is finite
            lsep, lsen, npos_c = torch.logsumexp(lsep, 0), torch.logsumexp(lsen, 0), npos_c.sum(0)
        npos = (npos_c > 0).sum()  # |C⁺| on the device
        pos_loss = torch.where(npos > 0, lsep.sum() / npos.clamp_min(1).to(acc), 0)
        loss = pos_loss + lsen.sum() / C
        ctx.cfg = cfg
        ctx.norms = norms
        ctx.save_for_backward(x, proxies, labels, off, lsep, lsen, npos)
        return loss

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward()
        x, proxies, labels, off, lsep, lsen, npos = ctx.saved_tensors
        g = grad.to(lsep.dtype)
        gp = torch.where(npos > 0, g / npos.clamp_min(1).to(g.dtype), 0)
        gsc = torch.stack([gp, g / proxies.shape[0]])
        gx, gpx = _bwd(ctx, x, proxies, labels, off, None, lsep, lsen, gsc, has_r0=off is not None)
        return gx, gpx, None, None, None


@register("proxy_anchor_loss", "triton")
def proxy_anchor_loss(x, labels, proxies, *, margin, alpha, distance: Distance, weights=None):
    labels = _common(x, proxies, labels)
    kind = _KIND[distance.name]
    a, d = float(alpha), float(margin)
    # PML: positive exponent α·margin(value, δ), negative α·margin(−δ, value); margin(x, y) = y − x for a
    # similarity and x − y for a distance. Written as k0·value + k1 (positive), k2·value + k3 (negative).
    sgn = 1.0 if kind == 0 else -1.0
    scal = (-sgn * a, sgn * a * d, sgn * a, sgn * a * d)
    cfg = _Cfg(1, kind, distance.normalize, False, scal, _compute_dtype(x))
    return _ProxyAnchor.apply(x, proxies, labels, weights, cfg)
