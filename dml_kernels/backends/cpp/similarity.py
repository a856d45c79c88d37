"""The similarity matrix and the miners (multi-similarity thresholds / mask, batch-hard) on the C++
kernels ``pair_values``, ``ms_thresholds``, ``ms_mask`` and ``batch_hard``."""
from __future__ import annotations

import torch

from ..._pairs import PackedPairMask
from .common import _both, _need, _prep


@_both
def pairwise_similarity(x, ref, *, distance):
    _need(x, "pair_values")
    q, r, code = _prep(x, ref, distance)
    out = torch.ops.dml_kernels.pair_values(q, r, code)
    return out if x.dtype in (torch.float32, torch.float64) else out.to(x.dtype)


@_both
def multi_similarity_thresholds(x, labels, ref, ref_labels, *, distance):
    _need(x, "ms_thresholds")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        hp, hn = torch.ops.dml_kernels.ms_thresholds(q, r, labels, ref_labels, None, None, code)
    return hp.to(x.dtype), hn.to(x.dtype)


@_both
def multi_similarity_mask(x, labels, ref, ref_labels, *, epsilon, distance):
    _need(x, "ms_mask")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        pb, nb = torch.ops.dml_kernels.ms_mask(q, r, labels, ref_labels, code, float(epsilon))
    return PackedPairMask(pb, nb, x.shape[0] if ref is None else ref.shape[0])


@_both
def batch_hard_mining(x, labels, ref, ref_labels, *, distance):
    _need(x, "batch_hard")
    with torch.no_grad():
        q, r, code = _prep(x, ref, distance)
        return torch.ops.dml_kernels.batch_hard(q, r, labels, ref_labels, code)
