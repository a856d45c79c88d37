"""The contrastive family on the C++ kernels: NCA is one ``pair_reduce`` call (per-row LSE over the positive
pairs and over the negative pairs; the all-pairs LSE is their logaddexp) plus O(N) tensor ops — no N×M
buffer, forward or backward."""
from __future__ import annotations

import torch

from .common import _LSE, _both, _need, _out, _prep, _sg, _zero


@_both
def nca_loss(x, labels, ref, ref_labels, *, softmax_scale, distance, weights=None):
    if x.shape[0] <= 1:  # PML's "len(embeddings) <= 1" zero loss (a shape: no sync)
        return _out(_zero(x), x)
    _need(x, "pair_reduce")
    q, r, code = _prep(x, ref, distance)
    s = _sg(distance) * float(softmax_scale)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, ref_labels, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    has_pos = cnt[0] > 0
    per_row = torch.where(cnt[1] > 0, torch.logaddexp(lp, ln), lp) - lp
    if weights is not None:
        per_row = per_row * weights.to(per_row.dtype)
    k = has_pos.sum()
    total = torch.where(has_pos, per_row, 0).sum()
    loss = torch.where(k > 0, total / k.clamp_min(1), _zero(x).to(total.dtype))
    return _out(loss, x)
