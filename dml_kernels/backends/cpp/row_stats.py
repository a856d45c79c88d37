"""Per-row reduction statistics on the C++ kernels (``<loss>_row_stats``, ``dml_kernels/_ops.py``): the sums and
counts a reducer needs of the contrastive pair hinges (``hinge_stats``) and of the triplet elements over every
valid triplet (``triplet_stats``: per-anchor sort + prefix sums, two binary searches per positive and band
edge), never forming a pair or triplet element. Batch-hard triplets are one per anchor: O(N) tensor ops."""
from __future__ import annotations

import math

import torch

from ..._registry import Unsupported
from .common import _cpu_only, _kernel_dtype, _need, _prep, _sg
from .pair_losses import batch_hard_violations


def _bounds(band):
    low, high = band
    return (-math.inf if low is None else float(low)), (math.inf if high is None else float(high))


def _out(sums, x):
    return sums if x.dtype in (torch.float16, torch.bfloat16) else sums.to(x.dtype)


@_cpu_only
def contrastive_loss_row_stats(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance, pairs=None,
                               bands=((None, None), (None, None))):
    if pairs is not None:
        raise Unsupported("the C++ contrastive_loss_row_stats takes no explicit pairs (PML counts duplicate pairs)")
    if labels is None:
        raise Unsupported("the C++ contrastive_loss_row_stats needs labels")
    _need(x, "hinge_stats")
    q, r, code = _prep(x, ref, distance)
    sg = _sg(distance)
    sums, counts = torch.ops.dml_kernels.hinge_stats(q, r, labels, ref_labels, code, -sg, float(pos_margin), sg,
                                                     float(neg_margin), *_bounds(bands[0]), *_bounds(bands[1]))
    return _out(sums, x), counts


def _in_band(losses, band):
    low, high = _bounds(band)
    return (losses > low) & (losses < high)


@_cpu_only
def triplet_margin_loss_row_stats(x, labels, ref, ref_labels, *, margin, swap=False, smooth_loss=False, mining=None,
                                  distance, triplets=None, bands=((None, None),)):
    if triplets is not None:
        raise Unsupported("the C++ triplet_margin_loss_row_stats takes no explicit triplets")
    band = bands[0]
    if mining is None:
        if swap or smooth_loss:
            raise Unsupported("the C++ all-triplets triplet_margin_loss_row_stats has no swap / smooth_loss")
        _need(x, "triplet_stats")
        q, r, code = _prep(x, ref, distance)
        sums, counts = torch.ops.dml_kernels.triplet_stats(q, r, labels, ref_labels, code, float(margin),
                                                           *_bounds(band))
        return _out(sums, x), counts
    # one triplet per anchor (hardest positive, hardest negative): the loss's own batch-hard hinges
    losses, valid = batch_hard_violations(x, labels, ref, ref_labels, margin=margin, swap=swap,
                                          smooth_loss=smooth_loss, distance=distance)
    losses = losses.where(valid, 0)
    banded = valid & _in_band(losses, band)
    sums = torch.stack([losses, losses.where(banded, 0)]).to(_kernel_dtype(x))
    counts = torch.stack([valid, banded]).long()
    return _out(sums, x), counts
