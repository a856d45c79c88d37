"""Device-side pair sets: a bit-packed N×M mask (1 bit per pair) for positives and for negatives, PML's
index tuples, and the N-pairs selection (which samples are anchors and positives, and the block of the
tile space that holds them).

A :class:`PackedPairMask` is what ``dk.functional.multi_similarity_mask`` returns, and what losses
accept as ``indices_tuple`` besides PML's index tuples. Row ``i`` holds ``ceil(M / 8)`` bytes; pair
``(i, k)`` is bit ``k % 8`` of byte ``k // 8``. Building or reading it never syncs with the host;
only ``to_indices()`` (PML's tuple, whose length depends on the data) does.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = 2 ** torch.arange(8)


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """N×M bool → N×ceil(M/8) uint8, little-endian bit order within each byte."""
    n, m = dense.shape
    nbytes = (m + 7) // 8
    padded = torch.zeros(n, nbytes * 8, dtype=torch.uint8, device=dense.device)
    padded[:, :m] = dense
    weights = _BIT_WEIGHTS.to(device=dense.device, dtype=torch.int32)
    return (padded.view(n, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, m: int) -> torch.Tensor:
    """N×ceil(M/8) uint8 → N×M bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :m].bool()


class PackedPairMask:
    """Positive and negative pair sets of N queries against M references, 1 bit per pair."""

    def __init__(self, pos_bits: torch.Tensor, neg_bits: torch.Tensor, num_refs: int):
        expected = (pos_bits.shape[0], (num_refs + 7) // 8)
        for name, t in (("pos_bits", pos_bits), ("neg_bits", neg_bits)):
            if t.dtype != torch.uint8 or t.dim() != 2 or tuple(t.shape) != expected:
                raise ValueError(f"{name} must be a uint8 tensor of shape {expected}, got {t.dtype} {tuple(t.shape)}")
        self.pos_bits = pos_bits
        self.neg_bits = neg_bits
        self.num_refs = num_refs

    @property
    def shape(self):
        return (self.pos_bits.shape[0], self.num_refs)

    @property
    def device(self):
        return self.pos_bits.device

    @classmethod
    def from_dense(cls, pos: torch.Tensor, neg: torch.Tensor) -> "PackedPairMask":
        if pos.shape != neg.shape or pos.dim() != 2:
            raise ValueError("pos and neg masks must both be N×M")
        return cls(pack_bits(pos.bool()), pack_bits(neg.bool()), pos.shape[1])

    @classmethod
    def from_indices(cls, indices_tuple, num_queries: int, num_refs: int, device=None) -> "PackedPairMask":
        """PML 3-tuple (a, p, n) or 4-tuple (a1, p, a2, n) → mask (duplicates collapse to one bit)."""
        return cls.from_dense(*dense_from_indices(indices_tuple, num_queries, num_refs, device))

    def to_dense(self):
        """(pos, neg) as N×M bool tensors."""
        return unpack_bits(self.pos_bits, self.num_refs), unpack_bits(self.neg_bits, self.num_refs)

    def to_indices(self):
        """PML's 4-tuple (a1, p, a2, n), row-major (host sync: its length depends on the data)."""
        pos, neg = self.to_dense()
        a1, p = torch.where(pos)
        a2, n = torch.where(neg)
        return a1, p, a2, n

    def count(self):
        """(number of positive pairs, number of negative pairs) as 0-dim device tensors."""
        pos, neg = self.to_dense()
        return pos.sum(), neg.sum()

    def to(self, device):
        return PackedPairMask(self.pos_bits.to(device), self.neg_bits.to(device), self.num_refs)

    def __repr__(self):
        return f"PackedPairMask(shape={self.shape}, device={self.device})"


def dense_from_indices(indices_tuple, num_queries: int, num_refs: int, device=None):
    """PML 3- or 4-tuple → (pos, neg) N×M bool masks (duplicate pairs collapse)."""
    a1, p, a2, n = indices_to_pairs(indices_tuple)
    device = device if device is not None else a1.device
    pos = torch.zeros(num_queries, num_refs, dtype=torch.bool, device=device)
    neg = torch.zeros_like(pos)
    pos[a1.to(device), p.to(device)] = True
    neg[a2.to(device), n.to(device)] = True
    return pos, neg


def indices_to_pairs(indices_tuple):
    """PML's ``convert_to_pairs`` for a given tuple: a triplet (a, p, n) becomes (a, p, a, n)."""
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    a, p, n = indices_tuple
    return a, p, a, n


def indices_to_triplets(indices_tuple):
    """PML's ``convert_to_triplets`` for a given tuple: pairs sharing an anchor are joined."""
    if len(indices_tuple) == 3:
        return tuple(indices_tuple)
    a1, p, a2, n = indices_tuple
    p_idx, n_idx = torch.where(a1.unsqueeze(1) == a2)
    return a1[p_idx], p[p_idx], n[n_idx]


# ----------------------------------------------------------------------------------------- N-pairs selection

# Cut the N-pairs block to exactly K rows × K columns when the labels are on the CPU (reading K costs
# nothing there); else, and under torch.compile, to the sync-free bound ceil(N/2) ≥ K. Tests set it False to
# run the bound on the CPU.
N_PAIRS_EXACT_ON_CPU = True


def n_pairs_flags(labels):
    """(is_anchor, is_positive): PML's NPairsLoss pairs per sample — the anchor of a label with ≥ 2 samples is
    its lowest index, the positive its second lowest. O(N log N) (a stable sort), no N×N, no host sync."""
    n = labels.shape[0]
    order = torch.argsort(labels, stable=True)
    srt = labels[order]
    idx = torch.arange(n, device=labels.device)
    first = torch.ones(n, dtype=torch.bool, device=labels.device)
    first[1:] = srt[1:] != srt[:-1]
    rank = idx - torch.cummax(torch.where(first, idx, 0), 0).values  # rank within the label, by index
    has_next = torch.zeros(n, dtype=torch.bool, device=labels.device)
    has_next[:-1] = ~first[1:]
    is_anchor, is_positive = torch.empty_like(first), torch.empty_like(first)
    is_anchor[order] = (rank == 0) & has_next
    is_positive[order] = rank == 1
    return is_anchor, is_positive


def n_pairs_block(labels):
    """The one block of the N×N tile space that N-pairs needs: ``(rows, cols, row_is_anchor, col_is_positive)``.

    ``rows`` lists the samples with the anchors first (in index order), ``cols`` with the positives first;
    both are cut to the same length h, K (the number of pairs) when that is free to read (labels on the CPU,
    eager) and the bound ceil(N/2) ≥ K otherwise. The loss over rows × cols is the loss over N × N: every
    row cut off is not an anchor and every column cut off is not a positive. For a PK batch (4 per class)
    that is N²/16 (CPU) or N²/4 (GPU) similarity entries instead of N².
    """
    is_anchor, is_positive = n_pairs_flags(labels)
    n = labels.shape[0]
    exact = N_PAIRS_EXACT_ON_CPU and labels.device.type == "cpu" and not torch.compiler.is_compiling()
    h = int(is_anchor.sum()) if exact else (n + 1) // 2
    rows = torch.argsort((~is_anchor).to(torch.int32), stable=True)[:h]
    cols = torch.argsort((~is_positive).to(torch.int32), stable=True)[:h]
    return rows, cols, is_anchor[rows], is_positive[cols]


def random_triplets(labels, ref_labels, per_anchor):
    """PML's ``triplets_per_anchor=<int>``: for each anchor, ``per_anchor`` random (positive, negative) pairs,
    drawn from torch's global CPU generator with PML's calls, sizes and order (one seed gives PML's triplets).

    Label by label (sorted), every anchor of the label gets ``per_anchor`` positives drawn uniformly from its
    label's references (itself excluded in self mode, ``ref_labels=None``) and as many negatives drawn
    uniformly from the other labels' references; a label with too few positives (< 2 in self mode, < 1 with
    references) or no negative is skipped. A host sync (the counts depend on the labels), as in PML.
    """
    if isinstance(per_anchor, bool) or not isinstance(per_anchor, int) or per_anchor < 0:
        raise ValueError(f"triplets_per_anchor must be 'all' or a non-negative int, got {per_anchor!r}")
    self_mode = ref_labels is None
    refs = labels if self_mode else ref_labels
    a_all, p_all, n_all = [], [], []
    for label in torch.unique(labels):
        pos = torch.nonzero(refs == label).flatten()
        anchors = pos if self_mode else torch.nonzero(labels == label).flatten()
        neg = torch.nonzero(refs != label).flatten()
        if len(pos) < (2 if self_mode else 1) or len(neg) == 0:
            continue
        count = len(anchors) * per_anchor
        choices = pos.expand(len(anchors), len(pos))
        if self_mode:  # each anchor's positives are its label's other samples, in index order
            keep = ~torch.eye(len(anchors), dtype=torch.bool, device=pos.device)
            choices = choices[keep].view(len(anchors), len(anchors) - 1)
        p_pick = torch.randint(0, choices.shape[1], (count,))
        a_row = torch.arange(len(anchors)).repeat_interleave(per_anchor)
        n_pick = torch.randint(0, len(neg), (count,))
        a_all.append(anchors[a_row.to(anchors.device)])
        p_all.append(choices[a_row.to(pos.device), p_pick.to(pos.device)])
        n_all.append(neg[n_pick.to(neg.device)])
    if not a_all:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(t).to(device=labels.device, dtype=torch.long) for t in (a_all, p_all, n_all))
