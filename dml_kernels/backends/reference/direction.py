"""Reference direction regularisation (Mohan et al., "Moving in the Right Direction", CVPR 2020; the seed
overview's §6.2, eq. 31–35): plain PyTorch, float64-capable, materialised N×M (and N×M×M in anchor chunks).

Every term uses Cos(u, v) = u·v / sqrt(max(‖u‖², ε)·max(‖v‖², ε)), ε = 1e-12 (:data:`EPS`), of difference
vectors of the vectors the distance sees (L2-normalised when ``distance.normalize``), written through dot
products only (``diff_cos``): with f_a the anchor, f_n the "negative" and f_f the "positive" vector,
u = f_n − f_a, v = f_f − f_a, u·v = f_n·f_f − f_n·f_a − f_a·f_f + f_a·f_a, ‖u‖² = f_n·f_n − 2 f_n·f_a + f_a·f_a.

* triplet (eq. 33): per triplet h(margin(D_ap, D_an) + m − γ Cos(f_n − f_a, f_p − f_a)), h = relu (softplus with
  ``smooth_loss``), AvgNonZero over the triplets (all valid ones, the batch-hard ones, or the given ones);
* multi-similarity (eq. 34): the negative exponent β(margin(λ, S_an) − γ Cos(f_n − f_a, f_p* − f_a)), p* the
  hardest positive of anchor a among the positive pairs used (lowest similarity / largest distance, ties to the
  lowest index); a row with no such positive has no regulariser (its negative term is PML's);
* ProxyNCA (eq. 35): −log(e^{σ s(a, p_y)} / Σ_c e^{σ s(a, p_c) − γ Cos(p_c − f_a, p_y − f_a)}) — the target's
  own denominator term carries Cos = 1 (PML keeps the positive proxy in the denominator; ``exclude_positive``
  drops it as in the "No Fuss" form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance
from .class_losses import proxy_logits
from .mining import batch_hard_indices, multi_similarity_select
from .pair_losses import _avg_nonzero, _few_pairs, _masks, _zero_if
from .similarity import masked_log1p_sum_exp, normalize_rows, pair_masks, pairwise_similarity

EPS = 1e-12  # floor of the squared norms of the difference vectors in Cos


def diff_cos(dot_nf, dot_an, dot_af, sq_a, sq_n, sq_f):
    """Cos(f_n − f_a, f_f − f_a) from the dot products f_n·f_f, f_a·f_n, f_a·f_f and squared norms (broadcast)."""
    u = dot_nf - dot_an - dot_af + sq_a
    nu = (sq_n - 2 * dot_an + sq_a).clamp_min(EPS)
    nv = (sq_f - 2 * dot_af + sq_a).clamp_min(EPS)
    return u / (nu * nv).sqrt()


def _sq(v):
    return (v * v).sum(1)


def _hinge(smooth_loss):
    return F.softplus if smooth_loss else F.relu


def _swap_an(an, pn, distance):
    return torch.maximum(an, pn) if distance.is_similarity else torch.minimum(an, pn)


def _triplet_violations(x, ref, a, p, n, *, margin, gamma, swap, distance):
    """margin(D_ap, D_an) + m − γ Cos(f_n − f_a, f_p − f_a) for index vectors a (queries), p, n (references)."""
    r = x if ref is None else ref
    q, v = normalize_rows(x, distance), normalize_rows(r, distance)
    mat = pairwise_similarity(x, ref, distance=distance)
    an = mat[a, n]
    if swap:
        an = _swap_an(an, pairwise_similarity(r, r, distance=distance)[p, n], distance)
    qa, vp, vn = q[a], v[p], v[n]
    cos = diff_cos((vn * vp).sum(1), (qa * vn).sum(1), (qa * vp).sum(1), _sq(qa), _sq(vn), _sq(vp))
    return distance.margin(mat[a, p], an) + margin - gamma * cos


def _triplet_indices(x, labels, ref, ref_labels, mining, distance, triplets):
    if triplets is not None:
        return tuple(t.to(x.device) for t in triplets)
    pos, neg = pair_masks(labels, ref_labels)
    if mining == "batch_hard":
        hard_pos, hard_neg = batch_hard_indices(pairwise_similarity(x, ref, distance=distance).detach(), pos, neg,
                                                distance)
        a = torch.where(hard_pos >= 0)[0]
        return a, hard_pos[a], hard_neg[a]
    return torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))  # (a, p, n) in PML's order


def direction_triplet_margin_loss(x, labels, ref, ref_labels, *, margin, gamma, swap=False, smooth_loss=False,
                                  mining=None, distance: Distance, triplets=None, anchor_chunk=None):
    """AvgNonZero over triplets of h(margin(D_ap, D_an) + m − γ Cos(f_n − f_a, f_p − f_a)) (eq. 33).

    All valid triplets are formed in anchor chunks ((c, M, M) tensors, never the whole N×M×M set); batch-hard
    and given triplets through index vectors."""
    hinge = _hinge(smooth_loss)
    if triplets is not None or mining == "batch_hard":
        a, p, n = _triplet_indices(x, labels, ref, ref_labels, mining, distance, triplets)
        if len(a) == 0:
            return _avg_nonzero(x.new_zeros(0), x)
        kw = dict(margin=margin, gamma=gamma, swap=swap, distance=distance)
        return _avg_nonzero(hinge(_triplet_violations(x, ref, a, p, n, **kw)), x)
    r = x if ref is None else ref
    q, v = normalize_rows(x, distance), normalize_rows(r, distance)
    mat = pairwise_similarity(x, ref, distance=distance)
    qv, vv, sq_q, sq_v = q @ v.T, v @ v.T, _sq(q), _sq(v)
    ref_mat = pairwise_similarity(r, r, distance=distance) if swap else None
    pos, neg = pair_masks(labels, ref_labels)
    n_rows, m = mat.shape
    chunk = anchor_chunk or max(1, (1 << 22) // max(1, m * m))
    total = mat.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        ap, an = mat[rows].unsqueeze(2), mat[rows].unsqueeze(1)  # (c, M positive, 1), (c, 1, M negative)
        if swap:
            an = _swap_an(an, ref_mat.unsqueeze(0), distance)
        qa = sq_q[rows].view(-1, 1, 1)
        cos = diff_cos(vv.unsqueeze(0), qv[rows].unsqueeze(1), qv[rows].unsqueeze(2), qa, sq_v.view(1, 1, -1),
                       sq_v.view(1, -1, 1))
        losses = hinge(distance.margin(ap, an) + margin - gamma * cos)
        counted = pos[rows].unsqueeze(2) & neg[rows].unsqueeze(1) & (losses > 0)
        total = total + losses.where(counted, 0).sum()
        count = count + counted.sum()
    return torch.where(count > 0, total / count.clamp_min(1), (x * 0).sum().to(total.dtype))


def direction_triplet_margin_loss_elements(x, labels, ref, ref_labels, *, margin, gamma, swap=False,
                                           smooth_loss=False, mining=None, distance: Distance, triplets=None):
    """PML's loss dict: per triplet (a, p, n) h(margin(D_ap, D_an) + m − γ Cos) (``triplet`` elements)."""
    a, p, n = _triplet_indices(x, labels, ref, ref_labels, mining, distance, triplets)
    if len(a) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    losses = _hinge(smooth_loss)(_triplet_violations(x, ref, a, p, n, margin=margin, gamma=gamma, swap=swap,
                                                     distance=distance))
    return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}


def hardest_positive(mat, pos, distance: Distance):
    """Per row: the index of the hardest positive (smallest similarity / largest distance, ties to the lowest
    index) and whether the row has one."""
    score = (-mat if distance.is_similarity else mat).masked_fill(~pos, float("-inf"))
    best = score.amax(1, keepdim=True)
    idx = torch.arange(mat.shape[1], device=mat.device).expand_as(mat)
    return torch.where((score == best) & pos, idx, mat.shape[1]).amin(1).clamp_max(mat.shape[1] - 1), pos.any(1)


def _ms_terms(x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon, distance, pairs):
    mat = pairwise_similarity(x, ref, distance=distance)
    pos, neg = _masks(labels, ref_labels, pairs, *mat.shape, mat.device)
    if epsilon is not None:
        pos, neg = multi_similarity_select(mat.detach(), pos, neg, epsilon, distance)
    hp, has_p = hardest_positive(mat.detach(), pos, distance)
    r = x if ref is None else ref
    q, v = normalize_rows(x, distance), normalize_rows(r, distance)
    f = v[hp]  # the hardest positive of each row (N×D)
    cos = diff_cos(f @ v.T, q @ v.T, (q * f).sum(1, keepdim=True), _sq(q).unsqueeze(1), _sq(v).unsqueeze(0),
                   _sq(f).unsqueeze(1))
    reg = gamma * cos * has_p.unsqueeze(1)
    losses = (masked_log1p_sum_exp(alpha * distance.margin(mat, base), pos) / alpha
              + masked_log1p_sum_exp(beta * (distance.margin(base, mat) - reg), neg) / beta)
    return losses, pos, neg


def direction_multi_similarity_loss(x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon=None,
                                    distance: Distance, pairs=None, pair_rule=True):
    """(1/N) Σ_a [(1/α) log(1+Σ_P e^{α·margin(S,λ)}) + (1/β) log(1+Σ_N e^{β(margin(λ,S) − γ Cos(f_n − f_a,
    f_p* − f_a))})] (eq. 34), p* the hardest positive used by row a."""
    losses, pos, neg = _ms_terms(x, labels, ref, ref_labels, alpha=alpha, beta=beta, base=base, gamma=gamma,
                                 epsilon=epsilon, distance=distance, pairs=pairs)
    loss = losses.mean()
    return _zero_if(_few_pairs(pos, neg), loss, x) if pair_rule else loss


def direction_multi_similarity_loss_elements(x, labels, ref, ref_labels, *, alpha, beta, base, gamma, epsilon=None,
                                             distance: Distance, pairs=None, pair_rule=True):
    """PML's loss dict: the per-row losses of :func:`direction_multi_similarity_loss` (``element``)."""
    losses, pos, neg = _ms_terms(x, labels, ref, ref_labels, alpha=alpha, beta=beta, base=base, gamma=gamma,
                                 epsilon=epsilon, distance=distance, pairs=pairs)
    if pair_rule and int(pos.sum()) <= 1 and int(neg.sum()) <= 1:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    return {"loss": {"losses": losses, "indices": torch.arange(x.shape[0], device=x.device),
                     "reduction_type": "element"}}


def _proxy_nca_losses(x, labels, proxies, *, softmax_scale, gamma, exclude_positive, distance, weights):
    logits = proxy_logits(x, proxies, scale=softmax_scale, distance=distance)
    target = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    q, p = normalize_rows(x, distance), normalize_rows(proxies.to(x.dtype), distance)
    f = p[labels]  # each row's own proxy
    cos = diff_cos(f @ p.T, q @ p.T, (q * f).sum(1, keepdim=True), _sq(q).unsqueeze(1), _sq(p).unsqueeze(0),
                   _sq(f).unsqueeze(1))
    den = logits - gamma * cos
    if exclude_positive:
        is_target = torch.zeros_like(den, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
        den = den.masked_fill(is_target, float("-inf"))
    losses = torch.logsumexp(den, dim=1) - target
    return losses if weights is None else losses * weights.to(losses.dtype)


def direction_proxy_nca_loss(x, labels, proxies, *, softmax_scale, gamma, exclude_positive=False,
                             distance: Distance, weights=None):
    """mean_a w_a·(LSE_c(σ s(a, p_c) − γ Cos(p_c − f_a, p_y − f_a)) − σ s(a, p_y)) (eq. 35)."""
    return _proxy_nca_losses(x, labels, proxies, softmax_scale=softmax_scale, gamma=gamma,
                             exclude_positive=exclude_positive, distance=distance, weights=weights).mean()


def direction_proxy_nca_loss_elements(x, labels, proxies, *, softmax_scale, gamma, exclude_positive=False,
                                      distance: Distance, weights=None):
    """PML's loss dict: the per-row losses of :func:`direction_proxy_nca_loss` (``element``)."""
    losses = _proxy_nca_losses(x, labels, proxies, softmax_scale=softmax_scale, gamma=gamma,
                               exclude_positive=exclude_positive, distance=distance, weights=weights)
    return {"loss": {"losses": losses, "indices": torch.arange(x.shape[0], device=x.device),
                     "reduction_type": "element"}}


__all__ = ["direction_triplet_margin_loss", "direction_triplet_margin_loss_elements",
           "direction_multi_similarity_loss", "direction_multi_similarity_loss_elements",
           "direction_proxy_nca_loss", "direction_proxy_nca_loss_elements"]
