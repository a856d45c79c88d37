"""Language-guidance distillation (seed 002 §6.1 eq. 29) on the CPU in O(block × B) memory: the
``language_guidance_loss`` op of the ``cpu`` backend.

No C++ is needed: a block of rows meets all B columns at once, its image and language logit tiles come from two
BLAS calls (``torch.mm``), and the block's row statistics are taken while the tiles are hot — the LSEs of
a = S_I/T and b = (S_L + γ_L)/T, and E_a = Σ_j p_ij (a_ij − b_ij), E_b = Σ_j q_ij (b_ij − a_ij) (the same
statistics as the Triton kernels, ``dml_kernels/backends/triton/language_guidance.py``). The backward pass
recomputes each block's tiles and its gradient tile G (∂KL_i/∂a_ij, 0 on masked entries) and adds both
G x̂ (to the block's rows) and Gᵀ x̂_block (to every row: S_I is symmetric). Peak extra memory: a few
``ROWS × B`` tiles (``TILE`` elements each) plus O(B·D), never B×B.
"""
from __future__ import annotations

import math

import torch

from ..._registry import register
from .library import refuse_double_backward

TILE = 1 << 20  # elements of one block's logit tile (ROWS × B)


def _rows(n):
    return max(1, min(n, TILE // max(n, 1)))


def _block(xn, ln, labels, r0, r1, temperature, shift, mask):
    a = torch.mm(xn[r0:r1], xn.T).div_(temperature)
    b = torch.mm(ln[r0:r1], ln.T).add_(shift).div_(temperature)
    same = None
    if mask:
        same = labels[r0:r1, None] == labels[None, :]
        fill = (1.0 + shift) / temperature
        a.masked_fill_(same, fill)
        b.masked_fill_(same, fill)
    return a, b, same


class _LanguageGuidanceCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn, ln, labels, temperature, shift, forward_kl, mask):
        n = xn.shape[0]
        st = torch.empty(4, n, dtype=xn.dtype)
        step = _rows(n)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            a, b, _ = _block(xn, ln, labels, r0, r1, temperature, shift, mask)
            lse_a, lse_b = torch.logsumexp(a, 1), torch.logsumexp(b, 1)
            d = a - b
            st[0, r0:r1], st[1, r0:r1] = lse_a, lse_b
            st[2, r0:r1] = (torch.exp(a - lse_a[:, None]) * d).sum(1)
            st[3, r0:r1] = -(torch.exp(b - lse_b[:, None]) * d).sum(1)
        kl = (st[3] - st[1] + st[0]) if forward_kl else (st[2] - st[0] + st[1])
        ctx.save_for_backward(xn, ln, labels, st)
        ctx.args = (temperature, shift, forward_kl, mask)
        return kl.sum() * (temperature ** 2 / n)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("cpu language_guidance_loss")
        xn, ln, labels, st = ctx.saved_tensors
        temperature, shift, forward_kl, mask = ctx.args
        n = xn.shape[0]
        dx = torch.zeros_like(xn)
        step = _rows(n)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            a, b, same = _block(xn, ln, labels, r0, r1, temperature, shift, mask)
            p = torch.exp(a - st[0, r0:r1, None])
            if forward_kl:
                grad = p - torch.exp(b - st[1, r0:r1, None])
            else:
                grad = p * ((a - b) - st[2, r0:r1, None])
            if same is not None:
                grad.masked_fill_(same, 0.0)
            dx[r0:r1] += torch.mm(grad, xn)
            dx += torch.mm(grad.T, xn[r0:r1])
        return dx * (g.to(dx.dtype) * (temperature / n)), None, None, None, None, None, None


@register("language_guidance_loss", "cpu")
def language_guidance_loss(x, labels, lang, *, temperature, language_shift, direction, mask_same_class):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = x.to(ct)
    xn = xn / torch.linalg.vector_norm(xn, dim=1, keepdim=True).clamp_min(1e-12)
    e = lang.detach().to(ct)
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(1e-12)
    ln = e.reshape(e.shape[0], -1)
    if e.shape[1] > 1:
        ln = ln / math.sqrt(e.shape[1])
    lab = labels if mask_same_class else torch.zeros(1, dtype=torch.int64)
    out = _LanguageGuidanceCPU.apply(xn.contiguous(), ln.contiguous(), lab, float(temperature),
                                     float(language_shift), direction == "forward", bool(mask_same_class))
    return out
