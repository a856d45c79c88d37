"""ProxyGML (seed 002 §5.3, eq. 21–27) on the CPU in O(block × C·N) memory: the ``proxy_gml_loss`` op of the
``cpu`` backend (equations, tie rule and mask rules: ``backends/reference/proxy_gml.py``).

No C++ is needed: a row's loss depends on its own row of similarities only, so row blocks meet all C·N
proxies through one BLAS tile s = X̂_blk·P̂ᵀ (P̂ = the normalised proxy columns as rows, O(C·N·D)) and take,
while the tile is hot:

* the selection: the K'-th largest other-class value τ_i (``topk``), then every other-class proxy with
  s > τ_i plus the first (lowest proxy index) of those equal to τ_i until K' are taken — exactly the
  reference's "stable descending sort, first K'";
* the class sums z (a reshape-and-sum of the (blk, C, N) tile), the active classes, the row losses.

The proxy-proxy regulariser is row-local in the proxies: Q_kc = p̂_k · Σ_{j∈c} p̂_j, so proxy blocks meet the
C class sums (C×D, O(C·N·D) to form) — a (blk × C) tile, never the (C·N)×C matrix. Both run on the
row-block engine of ``row_blocks.py`` (forward under no_grad, backward recomputes each block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._registry import Unsupported, register
from ..reference.proxy_gml import other_count, row_losses
from .row_blocks import _Blocks, row_blocks


def _select(s, own, k_other):
    """The selected-proxy mask of a block: own class ∪ the first K' other-class proxies in the order
    (value desc, proxy index asc)."""
    if k_other == 0:
        return own
    key = s.masked_fill(own, float("-inf"))
    tau = key.topk(k_other, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = key > tau
    tied = key == tau
    need = k_other - above.sum(1, keepdim=True)
    return own | above | (tied & (tied.cumsum(1) <= need))


@register("proxy_gml_loss", "cpu")
def proxy_gml_loss(x, labels, proxies, *, proxies_per_class, top_k, weight_lambda, class_mask="selected",
                   release_eps=False, distance):
    if not x.is_floating_point():
        raise Unsupported(f"the cpu proxy_gml_loss computes in float32 or float64, not {x.dtype}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    npc = int(proxies_per_class)
    pt = F.normalize(proxies.to(ct).t(), p=2, dim=1)  # (C·N) × D rows p̂_k
    cn = pt.shape[0]
    c = cn // npc
    k_other = other_count(top_k, npc, c)
    q = x.to(ct)
    if distance.normalize:
        q = F.normalize(q, p=2, dim=1)
    b = q.shape[0]
    proxy_class = torch.arange(cn) // npc

    def rows(qb, lb, pv):
        s = qb @ pv.T
        own = proxy_class[None, :] == lb[:, None]
        sel = _select(s.detach(), own, k_other)
        z = torch.where(sel, s, 0).view(len(lb), c, npc).sum(2)
        active = sel.view(len(lb), c, npc).any(2) if class_mask == "selected" else (z != 0)
        return row_losses(z, active, lb, release_eps), s.new_zeros(0, len(lb))

    losses, _ = _Blocks.apply(rows, row_blocks(b, cn, 3, (True, True, False)), b, 0, q, labels, pt)
    loss = losses.mean()
    if weight_lambda:
        sums = pt.view(c, npc, -1).sum(1)  # C × D: Σ_{j∈c} p̂_j

        def reg(pb, cb, sv):
            qm = pb @ sv.T  # (blk × C): Q_kc
            return torch.logsumexp(qm, 1) - qm.gather(1, cb[:, None]).squeeze(1), qm.new_zeros(0, len(cb))

        regs, _ = _Blocks.apply(reg, row_blocks(cn, c, 3, (True, True, False)), cn, 0, pt, proxy_class, sums)
        loss = loss + weight_lambda * regs.mean()
    return loss
