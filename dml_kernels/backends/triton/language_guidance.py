"""Language-guidance distillation (seed 002 §6.1 eq. 29) fused: neither B×B similarity matrix is ever formed.

Per row i, with a_ij = S_I[i, j] / T (S_I = x̂ x̂ᵀ) and b_ij = (S_L[i, j] + γ_L) / T (S_L = l̂ l̂ᵀ, l̂ the
normalised language rows, K of them per sample concatenated and scaled by 1/√K so that l̂_i · l̂_j is the mean
of the K cosines), and with ``MASK`` a_ij = b_ij = (1 + γ_L) / T where y_i = y_j:

* forward: a program owns BA rows and streams column tiles; each tile is two dot tiles (image, language) and
  updates five online row statistics — the LSEs of a and of b (running max and sum) and the cross terms
  X_a = Σ_j e^{a_ij − m_a} (a_ij − b_ij), X_b = Σ_j e^{b_ij − m_b} (b_ij − a_ij), rescaled with their LSE's
  max. Stored per row: lse_a, lse_b, E_a = X_a / l_a (= Σ_j p_ij (a_ij − b_ij)), E_b = X_b / l_b. Then
  KL(p ‖ q)_i = E_a − lse_a + lse_b ("backward", eq. 29) and KL(q ‖ p)_i = E_b − lse_b + lse_a ("forward"),
  and the loss is T²/B · Σ_i KL_i (an O(B) sum on the device).
* backward by recomputation: ∂KL_i/∂a_ij = p_ij (a_ij − b_ij − E_a,i) ("backward") or p_ij − q_ij
  ("forward"), 0 on masked entries; S_I is symmetric, so dx̂_I = (T/B) Σ_J (G_IJ + G_JIᵀ) x̂_J where the
  G_JIᵀ tile comes from the same a, b tile with the column rows' statistics — a row-block program writes
  only its own rows (deterministic, no atomics). The normalisations are plain autograd outside (O(B·D)).

The language side is a constant (no gradient). fp64 stays fp64 (gradcheck); fp32 computes in fp32 (tf32 only
when PyTorch allows it); fp16/bf16 operands go to the dot in their dtype with fp32 accumulation. Tested under
the Triton interpreter, not yet run on a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._registry import register
from .pair_engine import INTERPRET, autocast_inputs, refuse_double_backward
from .tiles import dot_tile, load_tile, store_tile

# (BA, BB, BD, BDO, num_warps) on a GPU per dtype group: not yet timed (no GPU in this project's CI).
GPU_BLOCKS = {"half": (64, 64, 32, 64, 8), "fp32": (32, 64, 32, 64, 8), "fp64": (32, 32, 16, 32, 4)}
INTERPRETER_BLOCKS = [16, 16]  # (BA, BB) under the interpreter: small, so odd test shapes span several tiles


@triton.jit
def _row_labels(lab_ptr, offs_a, in_a, MASK: tl.constexpr, BA: tl.constexpr):
    if MASK:
        return tl.load(lab_ptr + offs_a, mask=in_a, other=-1).to(tl.int64)
    else:
        return tl.full((BA,), -1, tl.int64)


@triton.jit
def _logits(x_ptr, l_ptr, lab_ptr, offs_a, in_a, offs_b, in_b, lab_a, D, DL, stride_x, stride_l, temp, shift,
            MASK: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BDL: tl.constexpr,
            CD: tl.constexpr, ACC_T: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """(a, b, same) of one BA×BB tile: image and language logits, and the same-class mask (False without MASK)."""
    s_img = dot_tile(x_ptr, x_ptr, offs_a, in_a, offs_b, in_b, D, stride_x, 1, stride_x, 1, BA, BB, BD, CD, ACC_T,
                     EMU_BF16, PREC)
    s_lang = dot_tile(l_ptr, l_ptr, offs_a, in_a, offs_b, in_b, DL, stride_l, 1, stride_l, 1, BA, BB, BDL, CD,
                      ACC_T, EMU_BF16, PREC)
    a = s_img / temp
    b = (s_lang + shift) / temp
    if MASK:
        lab_b = tl.load(lab_ptr + offs_b, mask=in_b, other=-2)
        same = lab_a[:, None] == lab_b[None, :]
        fill = (1.0 + shift) / temp
        a = tl.where(same, fill, a)
        b = tl.where(same, fill, b)
    else:
        same = (offs_a[:, None] < 0) & (offs_b[None, :] < 0)  # all False
    return a, b, same


@triton.jit
def _fwd_kernel(x_ptr, l_ptr, lab_ptr, st_ptr, N, D, DL, stride_x, stride_l, temp, shift, MASK: tl.constexpr,
                BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BDL: tl.constexpr, CD: tl.constexpr,
                ACC_T: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    in_a = offs_a < N
    lab_a = _row_labels(lab_ptr, offs_a, in_a, MASK, BA)
    m_a = tl.full((BA,), float("-inf"), ACC_T)
    m_b = tl.full((BA,), float("-inf"), ACC_T)
    l_a = tl.zeros((BA,), ACC_T)
    l_b = tl.zeros((BA,), ACC_T)
    x_a = tl.zeros((BA,), ACC_T)
    x_b = tl.zeros((BA,), ACC_T)
    for j0 in range(0, N, BB):
        offs_b = j0 + tl.arange(0, BB)
        in_b = offs_b < N
        a, b, same = _logits(x_ptr, l_ptr, lab_ptr, offs_a, in_a, offs_b, in_b, lab_a, D, DL, stride_x, stride_l,
                             temp, shift, MASK, BA, BB, BD, BDL, CD, ACC_T, EMU_BF16, PREC)
        col = in_b[None, :]
        diff = tl.where(col, a - b, 0.0)
        # every tile holds at least one real column, so the new maxima are finite
        mn_a = tl.maximum(m_a, tl.max(tl.where(col, a, float("-inf")), axis=1))
        mn_b = tl.maximum(m_b, tl.max(tl.where(col, b, float("-inf")), axis=1))
        e_a = tl.where(col, tl.exp(a - mn_a[:, None]), 0.0)
        e_b = tl.where(col, tl.exp(b - mn_b[:, None]), 0.0)
        r_a = tl.exp(m_a - mn_a)
        r_b = tl.exp(m_b - mn_b)
        l_a = l_a * r_a + tl.sum(e_a, axis=1)
        l_b = l_b * r_b + tl.sum(e_b, axis=1)
        x_a = x_a * r_a + tl.sum(e_a * diff, axis=1)
        x_b = x_b * r_b - tl.sum(e_b * diff, axis=1)
        m_a, m_b = mn_a, mn_b
    tl.store(st_ptr + offs_a, m_a + tl.log(l_a), mask=in_a)
    tl.store(st_ptr + N + offs_a, m_b + tl.log(l_b), mask=in_a)
    tl.store(st_ptr + 2 * N + offs_a, x_a / l_a, mask=in_a)
    tl.store(st_ptr + 3 * N + offs_a, x_b / l_b, mask=in_a)


@triton.jit
def _tile_grad(a, b, lse_a, lse_b, e_a, FORWARD: tl.constexpr, AXIS: tl.constexpr):
    """∂KL_r/∂a of the rows r along AXIS (1: the tile's rows, 0: its columns) from their statistics."""
    la = tl.expand_dims(lse_a, AXIS)
    p = tl.exp(a - la)
    if FORWARD:
        return p - tl.exp(b - tl.expand_dims(lse_b, AXIS))
    else:
        return p * ((a - b) - tl.expand_dims(e_a, AXIS))


@triton.jit
def _bwd_kernel(x_ptr, l_ptr, lab_ptr, st_ptr, scale_ptr, dx_ptr, N, D, DL, stride_x, stride_l, stride_dx, temp,
                shift, MASK: tl.constexpr, FORWARD: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                BD: tl.constexpr, BDL: tl.constexpr, BDO: tl.constexpr, CD: tl.constexpr, ACC_T: tl.constexpr,
                EMU_BF16: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr):
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    in_a = offs_a < N
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    in_o = offs_o < D
    lab_a = _row_labels(lab_ptr, offs_a, in_a, MASK, BA)
    lse_a_r = tl.load(st_ptr + offs_a, mask=in_a, other=0.0)
    lse_b_r = tl.load(st_ptr + N + offs_a, mask=in_a, other=0.0)
    e_a_r = tl.load(st_ptr + 2 * N + offs_a, mask=in_a, other=0.0)
    acc = tl.zeros((BA, BDO), ACC_T)
    for j0 in range(0, N, BB):
        offs_b = j0 + tl.arange(0, BB)
        in_b = offs_b < N
        a, b, same = _logits(x_ptr, l_ptr, lab_ptr, offs_a, in_a, offs_b, in_b, lab_a, D, DL, stride_x, stride_l,
                             temp, shift, MASK, BA, BB, BD, BDL, CD, ACC_T, EMU_BF16, PREC)
        lse_a_c = tl.load(st_ptr + offs_b, mask=in_b, other=0.0)
        lse_b_c = tl.load(st_ptr + N + offs_b, mask=in_b, other=0.0)
        e_a_c = tl.load(st_ptr + 2 * N + offs_b, mask=in_b, other=0.0)
        g = _tile_grad(a, b, lse_a_r, lse_b_r, e_a_r, FORWARD, 1) + _tile_grad(a, b, lse_a_c, lse_b_c, e_a_c,
                                                                               FORWARD, 0)
        g = tl.where(in_a[:, None] & in_b[None, :], g, 0.0)
        if MASK:
            g = tl.where(same, 0.0, g)
        xb = load_tile(x_ptr, offs_b, in_b, stride_x, offs_o, in_o, 1).to(ACC_T)
        acc = tl.dot(g, xb, acc, input_precision=GPREC, out_dtype=ACC_T)
    acc = acc * tl.load(scale_ptr)
    store_tile(dx_ptr, acc, offs_a, in_a, stride_dx, offs_o, in_o, 1)


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


class _Launch:
    """Dtypes, precisions and tile shapes of one call."""

    def __init__(self, xn, ln, labels, temperature, shift, mask):
        self.n, self.d = xn.shape
        self.dl = ln.shape[1]
        self.ct = torch.float64 if xn.dtype == torch.float64 else torch.float32
        gpu = xn.is_cuda and not INTERPRET
        allow_tf32 = gpu and torch.backends.cuda.matmul.allow_tf32
        half = xn.dtype in (torch.float16, torch.bfloat16)
        self.prec = "tf32" if (allow_tf32 and xn.dtype == torch.float32) else "ieee"
        self.gprec = "tf32" if (gpu and half) or (allow_tf32 and xn.dtype == torch.float32) else "ieee"
        if gpu:
            group = "fp64" if xn.dtype == torch.float64 else ("fp32" if xn.dtype == torch.float32 else "half")
            self.ba, self.bb, bd, bdo, self.warps = GPU_BLOCKS[group]
        else:
            (self.ba, self.bb), bd, bdo, self.warps = INTERPRETER_BLOCKS, 32, 64, 1
        self.bd, self.bdl, self.bdo = min(bd, _pow2(self.d)), min(bd, _pow2(self.dl)), min(bdo, _pow2(self.d))
        self.labels = labels.contiguous() if mask else torch.zeros(1, dtype=torch.int64, device=xn.device)
        self.temperature, self.shift, self.mask = float(temperature), float(shift), bool(mask)

    def common(self):
        return dict(MASK=self.mask, BA=self.ba, BB=self.bb, BD=self.bd, BDL=self.bdl, ACC_T=_TL[self.ct],
                    EMU_BF16=INTERPRET, PREC=self.prec, num_warps=self.warps)


_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}


class _LanguageGuidance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn, ln, launch, forward_kl):
        st = torch.empty(4, launch.n, dtype=launch.ct, device=xn.device)
        _fwd_kernel[(triton.cdiv(launch.n, launch.ba),)](
            xn, ln, launch.labels, st, launch.n, launch.d, launch.dl, xn.stride(0), ln.stride(0), launch.temperature,
            launch.shift, CD=_TL[xn.dtype], **launch.common())
        kl = (st[3] - st[1] + st[0]) if forward_kl else (st[2] - st[0] + st[1])
        ctx.save_for_backward(xn, ln, st)
        ctx.launch, ctx.forward_kl = launch, forward_kl
        return kl.sum() * (launch.temperature ** 2 / launch.n)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward()
        xn, ln, st = ctx.saved_tensors
        launch = ctx.launch
        scale = (g.to(launch.ct) * (launch.temperature / launch.n)).reshape(1)
        dx = torch.empty(launch.n, launch.d, dtype=launch.ct, device=xn.device)
        grid = (triton.cdiv(launch.n, launch.ba), triton.cdiv(launch.d, launch.bdo))
        _bwd_kernel[grid](xn, ln, launch.labels, st, scale, dx, launch.n, launch.d, launch.dl, xn.stride(0),
                          ln.stride(0), dx.stride(0), launch.temperature, launch.shift, FORWARD=ctx.forward_kl,
                          BDO=launch.bdo, CD=_TL[xn.dtype], GPREC=launch.gprec, **launch.common())
        return dx.to(xn.dtype), None, None, None


@register("language_guidance_loss", "triton")
def language_guidance_loss(x, labels, lang, *, temperature, language_shift, direction, mask_same_class):
    x, _ = autocast_inputs(x, None)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    operand = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else ct
    xn = x.to(ct)
    xn = (xn / torch.linalg.vector_norm(xn, dim=1, keepdim=True).clamp_min(1e-12)).to(operand).contiguous()
    e = lang.detach().to(ct)
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(1e-12)
    k = e.shape[1]
    ln = e.reshape(e.shape[0], -1)
    if k > 1:
        ln = ln / math.sqrt(k)
    ln = ln.to(operand).contiguous()
    launch = _Launch(xn, ln, labels, temperature, language_shift, mask_same_class)
    return _LanguageGuidance.apply(xn, ln, launch, direction == "forward")
