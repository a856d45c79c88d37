"""Reference ProxyGML (Zhu, Yang, Deng, Liu, NeurIPS 2020; seed 002 §5.3, eq. 21–27): the float64 oracle.

Notation: ``proxies`` is the official layout, **D×(C·N)** (column k is proxy k of class ``k // N``: the N
proxies of a class are adjacent). Every op here takes the canonical arguments of ``dml_kernels/_ops.py``::

    (x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask, release_eps, distance)

The equations (``x̂`` = x/‖x‖ when ``distance.normalize``, else x; ``p̂_k`` = column k / ‖column k‖ always):

* s_ik = x̂_i · p̂_k                                                                    (eq. 21)
* S_i = {all N proxies of class y_i} ∪ T_i, T_i = the K' = min(max(K − N, 0), (C−1)·N) largest s_ik among the
  other classes' proxies. **Ties**: candidates are ordered by (value descending, proxy index ascending) and the
  first K' are taken, i.e. k ∈ T_i iff (s_ik, −k) ≥ (τ_i, −κ_i) lexicographically, (τ_i, κ_i) = the K'-th
  candidate in that order. Every backend applies exactly this rule.
* z_ic = Σ_{k∈S_i, class(k)=c} s_ik                                                     (sub-proxy aggregation)
* A_i = classes with a selected proxy (``class_mask="selected"``, the default) or with z_ic ≠ 0
  (``"nonzero"``: eq. 22's M_ij = [S_ij ≠ 0] read literally, as the official code does; the two differ only
  where a selected class's sum is exactly 0.0, which depends on the summation order).
* loss_i = log Σ_{c∈A_i} e^{z_ic} − z_{i,y_i} (eq. 22–23, +∞ when y_i ∉ A_i, possible only with "nonzero");
  ``release_eps=True``: the official code's −log(e^{z_iy}·[y_i∈A_i] / (1e−8 + Σ_{c∈A_i} e^{z_ic}) + 1e−20).
* reg_k = log Σ_c e^{Q_kc} − Q_{k,class(k)}, Q_kc = Σ_{j: class(j)=c} p̂_k·p̂_j (eq. 24–26: the proxy-proxy
  similarities summed per class, as the official code does; Q includes p̂_k·p̂_k = 1).
* loss = mean_i loss_i + weight_lambda · mean_k reg_k (eq. 27; the regulariser is not computed for λ = 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._registry import register
from ...distances import Distance

RELEASE_DEN_EPS = 1e-8  # the official code's epsilon in the masked softmax's denominator
RELEASE_LOG_EPS = 1e-20  # ... and inside its log


def other_count(top_k, n_per_class, num_classes):
    """K' of the module docstring: how many other-class proxies a row selects."""
    return min(max(int(top_k) - n_per_class, 0), (num_classes - 1) * n_per_class)


def similarities(x, proxies, distance: Distance):
    """s = x̂ · p̂ (B × C·N): proxies' columns always normalised, the embeddings when ``distance.normalize``."""
    p_hat = F.normalize(proxies.to(x.dtype), p=2, dim=0)
    xs = F.normalize(x, p=2, dim=1) if distance.normalize else x
    return xs @ p_hat


def selection(s, labels, n_per_class, top_k):
    """The selected-proxy mask S (B × C·N, bool) of the module docstring, from the values ``s``."""
    b, cn = s.shape
    own = (torch.arange(cn, device=s.device) // n_per_class).unsqueeze(0) == labels.unsqueeze(1)
    k_other = other_count(top_k, n_per_class, cn // n_per_class)
    if k_other == 0:
        return own
    key = s.detach().masked_fill(own, float("-inf"))
    # a stable descending sort keeps equal values in ascending index order: the tie rule
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k_other]
    return own | torch.zeros_like(own).scatter_(1, order, True)


def class_sums(s, sel, n_per_class):
    """(z, any_selected): per-class sums of the selected similarities and whether a class has one (B × C)."""
    b = s.shape[0]
    z = torch.where(sel, s, torch.zeros((), dtype=s.dtype, device=s.device)).view(b, -1, n_per_class).sum(2)
    return z, sel.view(b, -1, n_per_class).any(2)


def row_losses(z, active, labels, release_eps):
    """loss_i of the module docstring from the class sums z and the active classes A (B × C)."""
    zy = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    y_active = active.gather(1, labels.unsqueeze(1)).squeeze(1)
    if release_eps:
        den = RELEASE_DEN_EPS + torch.where(active, torch.exp(z), 0).sum(1)
        p = torch.where(y_active, torch.exp(zy), 0) / den
        return -torch.log(p + RELEASE_LOG_EPS)
    lse = torch.logsumexp(z.masked_fill(~active, float("-inf")), dim=1)
    return torch.where(y_active, lse - zy, float("inf"))


def proxy_reg_losses(proxies, n_per_class, dtype):
    """reg_k (C·N,) of the module docstring: CE over Q = p̂ᵀ p̂ summed per class, target class(k)."""
    p_hat = F.normalize(proxies.to(dtype), p=2, dim=0)
    cn = p_hat.shape[1]
    q = (p_hat.t() @ p_hat).view(cn, -1, n_per_class).sum(2)
    target = torch.arange(cn, device=proxies.device) // n_per_class
    return F.cross_entropy(q, target, reduction="none")


def _parts(x, labels, proxies, proxies_per_class, top_k, class_mask, release_eps, distance):
    s = similarities(x, proxies, distance)
    sel = selection(s, labels, proxies_per_class, top_k)
    z, has = class_sums(s, sel, proxies_per_class)
    active = has if class_mask == "selected" else (z != 0)
    return row_losses(z, active, labels, release_eps)


def proxy_gml_loss_elements(x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask="selected",
                            release_eps=False, distance: Distance):
    """The loss dict: "loss" = loss_i per row (``element``), "reg_loss" = weight_lambda·reg_k per proxy
    (``element``; zeros, attached to the proxies, when weight_lambda = 0). Their means sum to the loss."""
    losses = _parts(x, labels, proxies, proxies_per_class, top_k, class_mask, release_eps, distance)
    cn = proxies.shape[1]
    if weight_lambda:
        reg = weight_lambda * proxy_reg_losses(proxies, proxies_per_class, x.dtype)
    else:
        reg = (proxies.to(x.dtype) * 0).sum(0)
    return {"loss": {"losses": losses, "indices": torch.arange(x.shape[0], device=x.device),
                     "reduction_type": "element"},
            "reg_loss": {"losses": reg, "indices": torch.arange(cn, device=x.device), "reduction_type": "element"}}


def proxy_gml_loss(x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask="selected",
                   release_eps=False, distance: Distance):
    """mean_i loss_i + weight_lambda · mean_k reg_k (module docstring)."""
    loss = _parts(x, labels, proxies, proxies_per_class, top_k, class_mask, release_eps, distance).mean()
    if weight_lambda:
        loss = loss + weight_lambda * proxy_reg_losses(proxies, proxies_per_class, x.dtype).mean()
    return loss


register("proxy_gml_loss", "reference")(proxy_gml_loss)
register("proxy_gml_loss_elements", "reference")(proxy_gml_loss_elements)
