"""Reference ranking and histogram losses with PML 2.9 semantics (FastAP, Histogram, PNP, RankedList,
DynamicSoftMargin, Smooth-AP): plain PyTorch, float64-capable, written for clarity. Canonical arguments as in
``dml_kernels/_ops.py``.

Each loss is the reduction of its ``<loss>_elements`` (PML's loss dict) under PML's default reducer. The bin
arithmetic (bin centres, widths, the order of the soft-assignment operations) is PML's, op for op, and the
fused forms reuse the helpers defined here (``fastap_bin_centres``, ``fastap_ap``), so the two agree to
rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import Distance
from .similarity import pair_masks, pairwise_similarity


def _zero_losses(*names):
    return {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"} for name in names}


def _reduce_mean(entry, x):
    """PML's MeanReducer on an ``element`` entry (or its zero loss: a graph-attached 0)."""
    losses = entry["losses"]
    return (x * 0).sum() if isinstance(losses, int) else losses.mean()


def _already_reduced(entry, x):
    losses = entry["losses"]
    return (x * 0).sum() if isinstance(losses, int) else losses


def _all_triplets(labels, ref_labels):
    """PML's ``get_all_triplets_indices``: every (a, p, n), p ≠ a in self mode (``ref_labels=None``)."""
    pos, neg = pair_masks(labels, ref_labels)
    return torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))


# ---------------------------------------------------------------------------------------------- FastAP

def fastap_bin_centres(num_bins, power, dtype, device):
    """PML's histogram: centres z_l = linspace(0, 2^power, num_bins + 1) and width δ = 2^power / num_bins."""
    hmax = 2 ** power
    return torch.linspace(0.0, hmax, steps=num_bins + 1, device=device, dtype=dtype), hmax / num_bins


def fastap_histograms(dist, pos, neg, z, delta):
    """(h⁺, h⁻), N × (num_bins+1): Σ_j relu(1 − |D_ij − z_l| / δ) over the positives / negatives of row i."""
    pulse = F.relu(1 - torch.abs(dist - z.view(-1, 1, 1)) / delta)  # L × N × N
    return (pulse * pos.to(dist.dtype)).sum(2).t(), (pulse * neg.to(dist.dtype)).sum(2).t()


def fastap_ap(h_pos, h_neg, n_pos):
    """Per row: (1/N⁺_i) Σ_l h⁺_il H⁺_il / H_il over the bins where h⁺H⁺ > 0 and H > 0 (0 elsewhere)."""
    total_pos = torch.cumsum(h_pos, dim=1)
    total = torch.cumsum(h_pos + h_neg, dim=1)
    product = h_pos * total_pos
    safe = (product > 0) & (total > 0)
    ap = torch.where(safe, product / torch.where(safe, total, 1), 0).sum(1)
    return ap / n_pos.clamp_min(1).to(ap.dtype), safe.any()


def fastap_loss_elements(x, labels, *, num_bins, distance: Distance, weights=None):
    """Per row with a positive (``element``): (1 − AP_i)·w_i, AP from soft distance histograms (self mode)."""
    pos, neg = pair_masks(labels, None)
    n_pos = pos.sum(1)
    rows = torch.where(n_pos > 0)[0]
    if len(rows) == 0:
        return _zero_losses("loss")
    dist = pairwise_similarity(x, None, distance=distance)
    z, delta = fastap_bin_centres(num_bins, 2 if distance.squared else 1, dist.dtype, dist.device)
    h_pos, h_neg = fastap_histograms(dist, pos, neg, z, delta)
    ap, any_safe = fastap_ap(h_pos, h_neg, n_pos)
    if not bool(any_safe):
        return _zero_losses("loss")
    w = torch.ones_like(ap) if weights is None else weights.to(ap.dtype)
    return {"loss": {"losses": ((1 - ap) * w)[rows], "indices": rows, "reduction_type": "element"}}


def fastap_loss(x, labels, *, num_bins, distance: Distance, weights=None):
    return _reduce_mean(fastap_loss_elements(x, labels, num_bins=num_bins, distance=distance,
                                             weights=weights)["loss"], x)


# ------------------------------------------------------------------------------------------- Histogram

def _unordered_pairs(a, b, n):
    """N×N bool: True at (min, max) of every pair (a_t, b_t) — PML's sort + ``unique(dim=1)``."""
    out = torch.zeros(n, n, dtype=torch.bool, device=a.device)
    out[torch.minimum(a, b), torch.maximum(a, b)] = True
    return out


def histogram_density(s, delta):
    """PML's ``compute_density``: each value splits linearly between the two nodes around it; node index
    r = floor((s + 1)/Δ) taken in float32, r·Δ computed in float32 (PML's long × float), then / |set|."""
    r = torch.floor((s.float() + 1) / delta).to(device=s.device, dtype=torch.long)
    upper = ((s + 1 - r * delta) / delta).to(s.dtype)
    lower = (((r + 1) * delta - 1 - s) / delta).to(s.dtype)
    density = torch.zeros(round(1 + 2 / delta), dtype=s.dtype, device=s.device)
    density = density.scatter_add(0, r + 1, upper).scatter_add(0, r, lower)
    return density / s.shape[0]


def histogram_loss_elements(x, labels, *, delta, distance: Distance, triplets=None):
    """Σ_r p⁻_r Φ⁺_r (``already_reduced``): densities of the unique unordered (anchor, positive) and
    (anchor, negative) pairs of the triplets (all of them, or the given ones); Φ⁺ = cumsum p⁺."""
    n = x.shape[0]
    if triplets is None:
        pos, neg = pair_masks(labels, None)
        anchors = pos.any(1) & neg.any(1)  # only anchors with a triplet contribute pairs
        a, p = torch.where(pos & anchors.unsqueeze(1))
        a2, q = torch.where(neg & anchors.unsqueeze(1))
    else:
        a, p, q = triplets
        a2 = a
    if len(a) == 0 or len(a2) == 0:
        return _zero_losses("loss")
    mat = pairwise_similarity(x, None, distance=distance)
    p_pos = histogram_density(mat[_unordered_pairs(a, p, n)], delta)
    p_neg = histogram_density(mat[_unordered_pairs(a2, q, n)], delta)
    loss = torch.sum(p_neg * torch.cumsum(p_pos, dim=0))
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


def histogram_loss(x, labels, *, delta, distance: Distance, triplets=None):
    return _already_reduced(histogram_loss_elements(x, labels, delta=delta, distance=distance,
                                                    triplets=triplets)["loss"], x)


# ------------------------------------------------------------------------------------------------- PNP

def pnp_sigmoid(t, anneal):
    """PNP's temperature sigmoid 1 / (1 + e^{clamp(−t/anneal, −50, 50)})."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-t / anneal, min=-50, max=50)))


def pnp_rank_term(r, variant, b, alpha):
    if variant == "Ds":
        return torch.log(1 + r)
    if variant == "Dq":
        return 1 / (1 + r) ** alpha
    if variant == "Iu":
        return (1 + r) * torch.log(1 + r)
    if variant == "Ib":
        return 1 / b ** 2 * (b * r - torch.log(1 + b * r))
    return r


def pnp_loss_elements(x, labels, *, b, alpha, anneal, variant, distance: Distance):
    """Mean over rows with a positive of (1/N⁺_i) Σ_{j ∈ P_i ∪ {i}} f(R_ij), R_ij = Σ_{k: y_k ≠ y_j}
    σ((s_ik − s_ij)/anneal); variant Dq returns 1 − that (``already_reduced``)."""
    pos, neg = pair_masks(labels, None)
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return _zero_losses("loss")
    counted = pos | torch.diag(has_pos)  # the anchor itself counts for anchors with a positive
    sim = pairwise_similarity(x, None, distance=distance)
    diff = sim.unsqueeze(1) - sim.unsqueeze(2)  # [i, j, k] = s_ik − s_ij
    ranks = (pnp_sigmoid(diff, anneal) * neg.to(sim.dtype).unsqueeze(0)).sum(-1)
    per_row = (pnp_rank_term(ranks, variant, b, alpha) * counted.to(sim.dtype)).sum(-1)
    rows = torch.where(has_pos)[0]
    loss = torch.sum(per_row[rows] / counted.sum(1)[rows]) / len(rows)
    if variant == "Dq":
        loss = 1 - loss
    return {"loss": {"losses": loss, "indices": rows, "reduction_type": "already_reduced"}}


def pnp_loss(x, labels, *, b, alpha, anneal, variant, distance: Distance):
    return _already_reduced(pnp_loss_elements(x, labels, b=b, alpha=alpha, anneal=anneal, variant=variant,
                                              distance=distance)["loss"], x)


# ------------------------------------------------------------------------------------------ RankedList

def ranked_list_loss_elements(x, labels, *, margin, Tn, imbalance, alpha, Tp, distance: Distance):
    """Per row (``element``): (1−λ)·Σ_{P*} w⁺(D − (α − m)) / Σ_j(w⁺ + 1e-5) + λ·Σ_{N*} w⁻(α − D) / Σ_j(w⁻ + 1e-5),
    P* = same label, j ≠ i, D > α − m; N* = other label, D < α; both only where D > 0 (PML's selection);
    w⁺ = e^{Tp(D − (α − m))}, w⁻ = e^{Tn(α − D)}, 0 outside the sets."""
    mat = pairwise_similarity(x, None, distance=distance)
    eye = torch.eye(mat.shape[0], dtype=torch.bool, device=mat.device)
    mat = torch.where(eye, mat - mat, mat)  # PML: mat − mat·I
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    c = alpha - margin
    in_p = same & ~eye & (mat > c) & (mat > 0)
    in_n = ~same & (mat < alpha) & (mat > 0)
    w_p = torch.where(in_p, torch.exp(Tp * (mat - c)), 0)
    w_n = torch.where(in_n, torch.exp(Tn * (alpha - mat)), 0)
    loss_p = torch.sum(torch.where(in_p, w_p * (mat - c), 0), dim=1) / torch.sum(w_p + 1e-5, dim=1)
    loss_n = torch.sum(torch.where(in_n, w_n * (alpha - mat), 0), dim=1) / torch.sum(w_n + 1e-5, dim=1)
    losses = (1 - imbalance) * loss_p + imbalance * loss_n
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=x.device),
                     "reduction_type": "element"}}


def ranked_list_loss(x, labels, *, margin, Tn, imbalance, alpha, Tp, distance: Distance):
    return _reduce_mean(ranked_list_loss_elements(x, labels, margin=margin, Tn=Tn, imbalance=imbalance,
                                                  alpha=alpha, Tp=Tp, distance=distance)["loss"], x)


# ----------------------------------------------------------------------------------- DynamicSoftMargin

def _dsm_values(x, labels, ref, ref_labels, distance, triplets):
    """PML's per-sample d: D_ap − D_an over the triplets (labels), or, without labels, query i against
    reference i: D_ii − min(off-diagonal min of column i, of row i), zero-padded to max(N, M)."""
    mat = pairwise_similarity(x, ref, distance=distance)
    if labels is not None:
        a, p, n = _all_triplets(labels, ref_labels) if triplets is None else triplets
        return mat[a, p] - mat[a, n]
    r, c = mat.shape
    k = min(r, c)
    diag = torch.zeros(r, c, dtype=torch.bool, device=mat.device)
    diag[torch.arange(k), torch.arange(k)] = True
    d_pos = torch.zeros(max(r, c), dtype=mat.dtype, device=mat.device)
    d_pos = torch.cat([mat.diagonal(), d_pos[k:]])
    off = mat.masked_fill(diag, float("inf"))
    pad = torch.zeros(max(r, c), dtype=mat.dtype, device=mat.device)
    min_a = torch.cat([off.min(dim=0).values, pad[c:]])
    min_p = torch.cat([off.min(dim=1).values, pad[r:]])
    return d_pos - torch.minimum(min_a, min_p)


def dsm_update_histogram(hist, d, *, min_val, delta, momentum):
    """PML's update: linear split of each d between its bin and the next, momentum-blended into ``hist`` (μ = 1
    while ``hist`` is all zero), renormalised. Differentiable in d (PML builds it from d, not d.detach())."""
    u = (d - min_val) / delta
    idx, frac = torch.floor(u).to(dtype=torch.long), torch.frac(u)
    mu = momentum if bool(hist.sum() != 0) else 1.0
    hist = torch.scatter_add((1.0 - mu) * hist, 0, idx, mu * (1 - frac))
    hist = torch.scatter_add(hist, 0, idx + 1, mu * frac)
    return hist / hist.sum()


def dynamic_soft_margin_loss_elements(x, labels, ref, ref_labels, hist, *, min_val, num_bins, momentum,
                                      distance: Distance, triplets=None):
    """(loss dict, new histogram): mean_t CDF[bin(d_t)]·d_t (``already_reduced``) with the CDF of the histogram
    after this batch's update; the histogram is returned un-detached (the caller stores it detached)."""
    delta = 2 * abs(min_val) / num_bins
    hist = hist.to(device=x.device, dtype=x.dtype)
    d = _dsm_values(x, labels, ref, ref_labels, distance, triplets)
    if len(d) == 0:
        return _zero_losses("loss"), hist
    hist = dsm_update_histogram(hist, d, min_val=min_val, delta=delta, momentum=momentum)
    cdf = torch.cumsum(hist, 0)
    idx = torch.floor((d - min_val) / delta).to(dtype=torch.long)
    loss = (cdf[idx] * d).mean()
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}, hist


def dynamic_soft_margin_loss(x, labels, ref, ref_labels, hist, *, min_val, num_bins, momentum, distance: Distance,
                             triplets=None):
    """(loss, new histogram)."""
    out, hist = dynamic_soft_margin_loss_elements(x, labels, ref, ref_labels, hist, min_val=min_val,
                                                  num_bins=num_bins, momentum=momentum, distance=distance,
                                                  triplets=triplets)
    return _already_reduced(out["loss"], x), hist


# -------------------------------------------------------------------------------------------- SmoothAP

def smooth_ap_loss_elements(x, labels, *, temperature, distance: Distance, weights=None):
    """PML 2.9's SmoothAPLoss (``element``, entry "ap_loss", float32 as PML's): every class must have the same
    count k; rows are cut in consecutive blocks of G = N / k rows (PML's reshape: G is the number of classes,
    not k) and AP_i = (1/G) Σ_{q in i's block} R⁺_iq / R_iq, with R_ij = 1 + Σ_{l≠j} σ((s_il − s_ij)/τ) over the
    batch and R⁺ the same within the block; loss_i = (1 − AP_i)·w_i."""
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    if counts.unique().numel() != 1:
        raise ValueError("SmoothAPLoss: all classes must have the same number of elements in the labels; the "
                         f"given labels have these counts: {counts.cpu().tolist()} (PML's samplers.MPerClassSampler "
                         "makes such batches)")
    n = x.shape[0]
    per_class = n // counts.numel()  # PML's num_classes_batch
    g = n // per_class  # block size
    sim = pairwise_similarity(x, None, distance=distance)
    off = 1.0 - torch.eye(n, dtype=sim.dtype, device=sim.device)
    ranks = torch.sum(torch.sigmoid((sim.unsqueeze(1) - sim.unsqueeze(2)) / temperature) * off, dim=-1) + 1
    blocks = torch.arange(n, device=x.device).view(per_class, g)
    sb = sim[blocks.unsqueeze(2), blocks.unsqueeze(1)]  # per_class × g × g
    off_b = 1.0 - torch.eye(g, dtype=sim.dtype, device=sim.device)
    pos_ranks = torch.sum(torch.sigmoid((sb.unsqueeze(2) - sb.unsqueeze(3)) / temperature) * off_b, dim=-1) + 1
    all_ranks = ranks[blocks.unsqueeze(2), blocks.unsqueeze(1)]
    ap = (torch.sum(pos_ranks / all_ranks, dim=-1) / g).reshape(n).to(torch.float32)
    w = torch.ones_like(ap) if weights is None else weights.to(ap.dtype)
    loss = (1 - ap) * w
    return {"ap_loss": {"losses": loss, "indices": torch.arange(n, device=x.device), "reduction_type": "element"}}


def smooth_ap_loss(x, labels, *, temperature, distance: Distance, weights=None):
    return _reduce_mean(smooth_ap_loss_elements(x, labels, temperature=temperature, distance=distance,
                                                weights=weights)["ap_loss"], x)


__all__ = ["fastap_loss", "fastap_loss_elements", "histogram_loss", "histogram_loss_elements", "pnp_loss",
           "pnp_loss_elements", "ranked_list_loss", "ranked_list_loss_elements", "dynamic_soft_margin_loss",
           "dynamic_soft_margin_loss_elements", "smooth_ap_loss", "smooth_ap_loss_elements"]
