"""cpu forms of the per-row miners in O(block × M) memory, in torch (no C++): ``batch_easy_hard_mining`` (every
strategy pair PML accepts) and ``pair_margin_mining`` (a :class:`PackedPairMask`).

A block of query rows (``row_blocks.block_rows``: ≤ 2^20 elements and ≤ 1/16 of N×M) meets all M references; its
values are computed as PML's distance classes compute them (the reference's :func:`pml_matrix` on the block: both
sides ``F.normalize``d once, ``q·rᵀ`` for a similarity, ``torch.cdist`` for a distance, squared for
squared_euclidean; fp16: ``F.pairwise_distance``, so the block is cut to ≤ 2^20 × D-elements there), and the
selection is row-local, so each block's picks are the whole matrix's. Nothing is read back to the host (the
loop runs over shapes only); outputs are O(N) (indices) or N×ceil(M/8) bytes (the packed mask: 1 bit per pair).

Selection rules (PML 2.9's BatchEasyHardMiner, the reference's docstring): per row a "hard" / "semihard"
positive is the farthest (smallest similarity), an "easy" one the closest; a "hard" / "semihard" negative the
closest, an "easy" one the farthest; only values within ``allowed_*_range`` [lo, hi]; equal values go to the
lowest reference index (torch's ``min`` / ``max`` along a row). A semihard side is chosen after the other side
and only among values strictly on the near side of the other side's pick. An empty other side leaves the start
of its search as the bound, as in PML: -inf for a largest-value search, +inf for a smallest — no bound when the
two searches run in opposite directions (semihard with hard), nothing admissible when in the same (semihard with
easy); such a row lacks one side, so the miner drops its anchor either way.
A row without an admissible pair gets -1 on that side; an "all" side is ``None`` (every pair of that kind: the
miner builds PML's tuple from the labels, whose length depends on the data).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._miner_rules import check_strategies, largest_sides
from ..._pairs import PackedPairMask, pack_bits
from ..._registry import Unsupported, register
from ...distances import Distance
from ..reference.mining import pml_matrix
from .row_blocks import block_rows, spans

def _check_distance(distance):
    if not isinstance(distance, Distance):
        raise Unsupported(f"the fused miners take a dk Distance, not {type(distance).__name__} (reference only)")


def _blocks(x, ref, distance):
    """(normalised queries, normalised references, the distance without normalisation, row spans)."""
    r = x if ref is None else ref
    if distance.normalize:
        x, r = F.normalize(x, p=2, dim=1), F.normalize(r, p=2, dim=1)
    m = r.shape[0]
    per_row = m * (x.shape[1] if x.dtype == torch.float16 and not distance.is_similarity else 1)
    return x, r, Distance(distance.name, False), spans(x.shape[0], block_rows(x.shape[0], per_row))


def _block_masks(labels, ref_labels, r0, r1):
    """(pos, neg) of query rows r0:r1; ``ref_labels=None``: self mode, (i, i) is no pair."""
    same = labels[r0:r1].unsqueeze(1) == (labels if ref_labels is None else ref_labels).unsqueeze(0)
    pos = same.clone()
    if ref_labels is None:
        pos.diagonal(r0).fill_(False)
    return pos, ~same


def _pick(mat, allowed, largest):
    """Per row: (the largest / smallest allowed value, its lowest index), (±inf, -1) where nothing is allowed."""
    fill = float("-inf") if largest else float("inf")
    score = mat.masked_fill(~allowed, fill)
    best = score.amax(1) if largest else score.amin(1)
    m = mat.shape[1]
    cols = torch.arange(m, device=mat.device)
    idx = torch.where(score == best.unsqueeze(1), cols, m).amin(1)
    return best, torch.where(allowed.any(1), idx, -1)


def _in_range(mat, allowed, value_range):
    if value_range is None:
        return allowed
    lo, hi = value_range
    return allowed & (mat >= lo) & (mat <= hi)


def _strictly_near(mat, threshold, largest):
    """Values strictly on the near side of the other side's pick (the semihard bound)."""
    return mat < threshold.unsqueeze(1) if largest else mat > threshold.unsqueeze(1)


def easy_hard_block(mat, pos, neg, pos_strategy, neg_strategy, allowed_pos_range, allowed_neg_range, is_similarity):
    """(pos_idx, neg_idx) of one block of rows (see the module docstring)."""
    pos_largest, neg_largest = largest_sides(pos_strategy, neg_strategy, is_similarity)
    pos_ok, neg_ok = _in_range(mat, pos, allowed_pos_range), _in_range(mat, neg, allowed_neg_range)
    if pos_strategy == "semihard":
        neg_val, neg_idx = _pick(mat, neg_ok, neg_largest)
        pos_idx = _pick(mat, pos_ok & _strictly_near(mat, neg_val, pos_largest), pos_largest)[1]
    elif neg_strategy == "semihard":
        pos_val, pos_idx = _pick(mat, pos_ok, pos_largest)
        neg_idx = _pick(mat, neg_ok & _strictly_near(mat, pos_val, neg_largest), neg_largest)[1]
    else:
        pos_idx = _pick(mat, pos_ok, pos_largest)[1]
        neg_idx = _pick(mat, neg_ok, neg_largest)[1]
    return pos_idx, neg_idx


@torch.no_grad()
def batch_easy_hard_mining(x, labels, ref, ref_labels, *, pos_strategy, neg_strategy, allowed_pos_range,
                           allowed_neg_range, distance):
    check_strategies(pos_strategy, neg_strategy)
    _check_distance(distance)
    q, r, dist, blocks = _blocks(x, ref, distance)
    out = torch.empty(2, x.shape[0], dtype=torch.long, device=x.device)
    for r0, r1 in blocks:
        mat = pml_matrix(q[r0:r1], r, dist)
        pos, neg = _block_masks(labels, ref_labels, r0, r1)
        out[0, r0:r1], out[1, r0:r1] = easy_hard_block(mat, pos, neg, pos_strategy, neg_strategy, allowed_pos_range,
                                                       allowed_neg_range, distance.is_similarity)
    return (None if pos_strategy == "all" else out[0]), (None if neg_strategy == "all" else out[1])


@torch.no_grad()
def pair_margin_mining(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance) -> PackedPairMask:
    """PML's PairMarginMiner straight into packed bits (N×ceil(M/8) bytes per side, no N×M mask)."""
    _check_distance(distance)
    q, r, dist, blocks = _blocks(x, ref, distance)
    m = r.shape[0]
    pos_bits = torch.empty(x.shape[0], (m + 7) // 8, dtype=torch.uint8, device=x.device)
    neg_bits = torch.empty_like(pos_bits)
    for r0, r1 in blocks:
        mat = pml_matrix(q[r0:r1], r, dist)
        pos, neg = _block_masks(labels, ref_labels, r0, r1)
        if distance.is_similarity:
            far, near = mat < pos_margin, mat > neg_margin
        else:
            far, near = mat > pos_margin, mat < neg_margin
        pos_bits[r0:r1] = pack_bits(pos & far)
        neg_bits[r0:r1] = pack_bits(neg & near)
    return PackedPairMask(pos_bits, neg_bits, m)


for _fn in (batch_easy_hard_mining, pair_margin_mining):
    register(_fn.__name__, "cpu")(_fn)
