"""The seeds' regularisers on the reference backend: language-guidance distillation (Mohan et al. overview
§6.1 eq. 28–30, after Roth et al. CVPR 2022) and the DML-DA density regulariser (Li et al., eq. 5–9).

Plain PyTorch, float64-capable, written to read like the equations; the oracle of every other backend.

``language_guidance_loss(x, labels, lang, *, temperature, language_shift, direction, mask_same_class)``
    S_I = x̂ x̂ᵀ (eq. 10, cosine, diagonal included), S_L[i, j] = (1/K) Σ_k ê_ik · ê_jk with ``lang`` of shape
    (B, K, D_L) (K = 1: one text embedding per sample, eq. 28; K > 1: the release's pseudo-label guidance,
    the mean of K cosines). Eq. 29 with the release's temperature T (T = 1 in the seed):
    a = S_I / T, b = (S_L + γ_L) / T; ``mask_same_class`` (the release's variant) sets a_ij = b_ij =
    (1 + γ_L) / T wherever y_i = y_j (diagonal included). Per row p = softmax(a_i), q = softmax(b_i);
    ``direction="backward"``: KL(p ‖ q) (eq. 29, the release's default), ``"forward"``: KL(q ‖ p).
    Loss = T² · (1/B) Σ_i KL_i. ``lang`` is a constant (the teacher: no gradient flows into it).
``class_densities(x, labels, *, num_classes, normalize)``
    Eq. 5: D_avg(S_c) = (1/|S_c|) Σ_{i∈S_c} ‖f_i − μ_c‖², μ_c the class mean; 0 for a class absent from x.
``density_adaptivity_loss(x, labels, alpha, *, num_classes, original_densities, eta, normalize)``
    Eq. 6 / 8 over the classes present in the batch (C = their number, counted on the device):
    (1/C) Σ_c (D_avg(S_c) − α_c)² − (1/C) Σ_c α_c
    + (1/C²) Σ_{ci, cj} (d_cj α_ci − d_ci α_cj)², d_c = (D⁽⁰⁾_c)^η (the last term only with D⁽⁰⁾ given).
    The double sum has the O(C) closed form 2 (Σ d²) Σ_c (α_c − β d_c)², β = Σ dα / Σ d² (Lagrange's
    identity, written as a sum of squares: no cancellation when α is nearly proportional to d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as tnf

__all__ = ["language_guidance_loss", "class_densities", "density_adaptivity_loss"]


def _cosine_rows(v):
    return tnf.normalize(v, p=2, dim=-1, eps=1e-12)


def language_similarity(lang):
    """S_L (B×B) from (B, K, D_L) language embeddings: the mean over k of the cosines ê_ik · ê_jk."""
    e = _cosine_rows(lang)
    return torch.einsum("ikd,jkd->ijk", e, e).mean(-1)


def language_guidance_logits(x, labels, lang, *, temperature, language_shift, mask_same_class):
    """(a, b): the row logits of the image and language softmaxes of eq. 29 (B×B each)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    xn = _cosine_rows(x)
    s_img = xn @ xn.T
    s_lang = language_similarity(lang.detach()).to(s_img.dtype) + language_shift
    if mask_same_class:
        same = labels[:, None] == labels[None, :]
        fill = torch.full((), 1.0 + language_shift, dtype=s_img.dtype, device=x.device)
        s_img = torch.where(same, fill, s_img)
        s_lang = torch.where(same, fill, s_lang)
    return s_img / temperature, s_lang / temperature


def language_guidance_loss(x, labels, lang, *, temperature, language_shift, direction, mask_same_class):
    a, b = language_guidance_logits(x, labels, lang, temperature=temperature, language_shift=language_shift,
                                    mask_same_class=mask_same_class)
    log_p, log_q = torch.log_softmax(a, dim=1), torch.log_softmax(b, dim=1)
    if direction == "backward":  # KL(p_img ‖ p_lang)
        kl = (log_p.exp() * (log_p - log_q)).sum(1)
    else:  # KL(p_lang ‖ p_img)
        kl = (log_q.exp() * (log_q - log_p)).sum(1)
    return kl.sum() * (temperature ** 2 / x.shape[0])


def _class_stats(x, labels, num_classes, normalize):
    """(counts (C,), D_avg (C,)) of eq. 5, computed with index_add (no host sync, no B×C buffer)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # statistics in fp32 for half inputs
    f = _cosine_rows(x) if normalize else x
    counts = torch.zeros(num_classes, dtype=f.dtype, device=f.device).index_add(0, labels,
                                                                                  torch.ones_like(f[:, 0]))
    size = counts.clamp_min(1)
    mu = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add(0, labels, f) / size[:, None]
    sq = ((f - mu[labels]) ** 2).sum(1)
    return counts, torch.zeros_like(counts).index_add(0, labels, sq) / size


def class_densities(x, labels, *, num_classes, normalize):
    return _class_stats(x, labels, num_classes, normalize)[1]


def correlation_penalty(alpha, d):
    """Σ_{i,j} (d_j α_i − d_i α_j)² in O(C): 2 (Σ d²) Σ_c (α_c − β d_c)², β = Σ dα / Σ d² (0 when d = 0)."""
    dd = (d * d).sum()
    beta = (d * alpha).sum() / torch.where(dd > 0, dd, torch.ones_like(dd))
    return 2 * dd * ((alpha - beta * d) ** 2).sum()


def density_adaptivity_loss(x, labels, alpha, *, num_classes, original_densities, eta, normalize):
    counts, dens = _class_stats(x, labels, num_classes, normalize)
    ct = torch.promote_types(dens.dtype, alpha.dtype)
    present = (counts > 0).to(ct)
    n_cls = present.sum()  # ≥ 1: a batch has at least one sample
    a = alpha.to(ct) * present
    loss = (((dens.to(ct) - a) ** 2) * present).sum() / n_cls - a.sum() / n_cls
    if original_densities is not None:
        d = original_densities.to(ct).pow(eta) * present
        loss = loss + correlation_penalty(a, d) / (n_cls * n_cls)
    return loss
