"""PML's recorded statistics (``collect_stats=True``) for the losses that record any, as detached 0-dim device
tensors: PML stores Python numbers read with ``.item()`` (a host sync each); these never sync.

``collect_stats=None`` follows PML's global flag (``pytorch_metric_learning.utils.common_functions.COLLECT_STATS``)
when PML is loaded — PML's own classes read it the same way — and is off otherwise. The statistics are computed
after the loss, from its inputs, in plain PyTorch and only when asked for (row blocks: no N×M buffer).

loss class (and subclasses)                  statistics (PML's names; angles in degrees)
-------------------------------------------  ------------------------------------------------------------------
NPairsLoss                                   ``num_pairs``: the number of (anchor, positive) pairs used
LargeMarginSoftmaxLoss, SphereFaceLoss,      ``avg_angle``: mean angle between each embedding and its class's weight
ArcFaceLoss, CosFaceLoss, SubCenterArcFace   (SubCenterArcFace: its closest sub-centre)
TupletMarginLoss                             ``avg_pos_angle`` / ``avg_neg_angle``: mean angle of the positive /
                                             negative pairs used
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F



ROWS = 1024  # row block of the pair statistics

# The statistics each loss class records (found along the class's MRO).
KIND = {"NPairsLoss": "num_pairs", "LargeMarginSoftmaxLoss": "avg_angle", "ArcFaceLoss": "avg_angle",
        "CosFaceLoss": "avg_angle", "TupletMarginLoss": "pair_angles"}
STAT_NAMES = {"num_pairs": ("num_pairs",), "avg_angle": ("avg_angle",),
              "pair_angles": ("avg_pos_angle", "avg_neg_angle")}


def kind_of(cls):
    return next((KIND[c.__name__] for c in cls.__mro__ if c.__name__ in KIND), None)


def _degrees(x):
    return x * (180.0 / math.pi)


@torch.no_grad()
def _mean_pair_angles(x, ref, labels, ref_labels, indices_tuple):
    """(mean positive-pair angle, mean negative-pair angle) of cosine similarities, in degrees (NaN for none)."""
    from .._pairs import PackedPairMask, indices_to_pairs
    q = F.normalize(x, dim=1)
    r = q if ref is None else F.normalize(ref, dim=1)
    if indices_tuple is not None:
        if isinstance(indices_tuple, PackedPairMask):
            indices_tuple = indices_tuple.to_indices()
        a1, p, a2, n = (torch.as_tensor(t, device=q.device) for t in indices_to_pairs(indices_tuple))
        pos = torch.acos((q[a1] * r[p]).sum(1)).mean()
        neg = torch.acos((q[a2] * r[n]).sum(1)).mean()
        return _degrees(pos), _degrees(neg)
    rl = labels if ref is None else ref_labels
    sums = torch.zeros(2, dtype=q.dtype, device=q.device)
    counts = torch.zeros(2, dtype=q.dtype, device=q.device)
    for s in range(0, len(q), ROWS):
        cos = q[s:s + ROWS] @ r.T
        same = labels[s:s + ROWS, None] == rl[None, :]
        pos = same.clone()
        if ref is None:
            rows = torch.arange(s, s + len(cos), device=q.device)
            pos[torch.arange(len(cos), device=q.device), rows] = False
        angle = torch.acos(cos)
        sums[0] += angle.where(pos, 0).sum()
        sums[1] += angle.where(~same, 0).sum()
        counts[0] += pos.sum()
        counts[1] += (~same).sum()
    mean = sums / counts
    return _degrees(mean[0]), _degrees(mean[1])


@torch.no_grad()
def _avg_target_angle(x, labels, W, sub_centers=1):
    """Mean angle between each embedding and its class's (closest sub-centre) weight column, in degrees."""
    q = F.normalize(x, dim=1)
    cols = W.to(q.dtype).view(W.shape[0], -1, sub_centers)[:, labels]  # D × B × K: the batch's classes only
    cos = torch.einsum("bd,dbk->bk", q, F.normalize(cols, dim=0)).amax(1)
    return _degrees(torch.acos(cos.clamp(-1, 1)).mean())


@torch.no_grad()
def _num_pairs(labels, indices_tuple):
    """PML's NPairs pair count: the number of labels with a positive pair (without a tuple), or of distinct
    anchor labels among the tuple's positive pairs."""
    if indices_tuple is None:
        from .._pairs import n_pairs_flags
        return n_pairs_flags(labels)[0].sum()
    a1 = torch.as_tensor(indices_tuple[0], device=labels.device)
    s = labels[a1].sort().values
    return (s[1:] != s[:-1]).sum() + (len(s) > 0)


def record(loss, args, kwargs):
    """Set ``loss``'s statistics from its call's arguments (see the table above)."""
    names = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")
    call = dict(zip(names, args)) | kwargs
    x, labels = call["embeddings"], call.get("labels")
    indices_tuple, ref, ref_labels = call.get("indices_tuple"), call.get("ref_emb"), call.get("ref_labels")
    kind = kind_of(type(loss))
    if kind == "num_pairs":
        loss.num_pairs = _num_pairs(labels, indices_tuple)
    elif kind == "avg_angle":
        loss.avg_angle = _avg_target_angle(x.detach(), labels, loss.W.detach(), getattr(loss, "sub_centers", 1))
    elif kind == "pair_angles":
        loss.avg_pos_angle, loss.avg_neg_angle = _mean_pair_angles(
            x.detach(), None if ref is None else ref.detach(), labels, ref_labels, indices_tuple)


def hook(module, args, kwargs, output):
    """A forward hook (a plain function: deep copies of the module keep working)."""
    if module.collect_stats:
        record(module, args, kwargs)
