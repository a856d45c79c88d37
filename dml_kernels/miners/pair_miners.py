"""Miners that return pairs (a1, p, a2, n): multi-similarity, pair-margin, batch easy/hard, HDC, uniform histogram."""
from __future__ import annotations

import torch

from .. import functional as F
from ._base import _Miner, _PMLMiner, all_pairs, count, real, value_range


class MultiSimilarityMiner(_Miner):
    """Returns (a1, p, a2, n) of the pairs kept by the MS rule (row-major order; PML orders within a row
    by similarity — compare as sets)."""

    def __init__(self, epsilon=0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        mask = F.multi_similarity_mask(embeddings, labels, ref_emb, ref_labels, epsilon=self.epsilon,
                                       **self._common())
        pos, neg = mask.to_dense()
        if not bool(pos.any()) or not bool(neg.any()):  # PML returns nothing unless both kinds exist
            empty = torch.zeros(0, dtype=torch.long, device=embeddings.device)
            return empty, empty.clone(), empty.clone(), empty.clone()
        return mask.to_indices()


class PairMarginMiner(_PMLMiner):
    """PML's PairMarginMiner: positive pairs farther than ``pos_margin`` and negative pairs closer than
    ``neg_margin`` (a similarity: less / more similar), strict, row-major as in PML. ``mask(...)`` returns
    the same selection as a device-side :class:`~dml_kernels.PackedPairMask` (no host sync), which MS /
    contrastive losses take as ``indices_tuple``."""

    def __init__(self, pos_margin=0.2, neg_margin=0.8, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin = real("pos_margin", pos_margin)
        self.neg_margin = real("neg_margin", neg_margin)

    def mask(self, embeddings, labels, ref_emb=None, ref_labels=None):
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        return self._call("pair_margin_mining", embeddings, labels, ref, ref_labels,
                          pos_margin=real("pos_margin", self.pos_margin),
                          neg_margin=real("neg_margin", self.neg_margin), distance=self._resolve_distance())

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self.mask(embeddings, labels, ref_emb, ref_labels).to_indices()


class BatchEasyHardMiner(_PMLMiner):
    """PML's BatchEasyHardMiner: per anchor one positive and one negative chosen by ``pos_strategy`` /
    ``neg_strategy`` ("easy", "semihard", "hard", or "all" for every pair of that kind), only among values in
    ``allowed_*_range`` = (low, high). Returns (a, p, a, n) for anchors with both (ascending); with "all" on a
    side, that side's every pair. ``per_row(...)`` returns the device form (an index per row, -1 for none)."""

    HARD, SEMIHARD, EASY, ALL = "hard", "semihard", "easy", "all"
    all_batch_mining_strategies = [HARD, SEMIHARD, EASY, ALL]

    def __init__(self, pos_strategy=EASY, neg_strategy=SEMIHARD, allowed_pos_range=None, allowed_neg_range=None,
                 **kwargs):
        super().__init__(**kwargs)
        for name, value in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
            if value not in self.all_batch_mining_strategies:
                raise ValueError(f"{name} must be one of {self.all_batch_mining_strategies}, got {value!r}")
        if pos_strategy == neg_strategy == self.SEMIHARD:
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if self.SEMIHARD in (pos_strategy, neg_strategy) and self.ALL in (pos_strategy, neg_strategy):
            raise ValueError('"semihard" cannot be used in combination with "all" (pos_strategy / neg_strategy)')
        value_range("allowed_pos_range", allowed_pos_range)
        value_range("allowed_neg_range", allowed_neg_range)
        self.pos_strategy, self.neg_strategy = pos_strategy, neg_strategy
        self.allowed_pos_range, self.allowed_neg_range = allowed_pos_range, allowed_neg_range

    def per_row(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(positive index (N,), negative index (N,)) on the device, -1 where a row has none; ``None`` for a
        side whose strategy is "all"."""
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        return self._call("batch_easy_hard_mining", embeddings, labels, ref, ref_labels,
                          pos_strategy=self.pos_strategy, neg_strategy=self.neg_strategy,
                          allowed_pos_range=value_range("allowed_pos_range", self.allowed_pos_range),
                          allowed_neg_range=value_range("allowed_neg_range", self.allowed_neg_range),
                          distance=self._resolve_distance())

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        pos_idx, neg_idx = self.per_row(embeddings, labels, ref_emb, ref_labels)
        if pos_idx is not None and neg_idx is not None:
            a = torch.where((pos_idx >= 0) & (neg_idx >= 0))[0]
            return a, pos_idx[a], a, neg_idx[a]
        labels, _, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        a1, p, a2, n = all_pairs(labels, ref_labels)
        if pos_idx is not None:
            a1 = torch.where(pos_idx >= 0)[0]
            p = pos_idx[a1]
        if neg_idx is not None:
            a2 = torch.where(neg_idx >= 0)[0]
            n = neg_idx[a2]
        return a1, p, a2, n


class HDCMiner(_PMLMiner):
    """PML's HDCMiner (Hard-Aware Deeply Cascaded embedding): the ceil(filter_percentage · count) hardest
    positive pairs and hardest negative pairs of the batch (globally, hardest first). As in PML the result is
    kept in ``a1, p, a2, n``; after ``set_idx_externally(indices_tuple, labels)`` each call filters the
    stored pairs again (the cascade) until ``reset_idx()``."""

    def __init__(self, filter_percentage=0.5, **kwargs):
        super().__init__(**kwargs)
        self.filter_percentage = real("filter_percentage", filter_percentage, low=0.0, high=1.0)
        self.reset_idx()

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        pairs = (self.a1, self.p, self.a2, self.n) if self.was_set_externally else None
        self.a1, self.p, self.a2, self.n = self._call(
            "hdc_mining", embeddings, labels, ref, ref_labels,
            filter_percentage=real("filter_percentage", self.filter_percentage, low=0.0, high=1.0),
            distance=self._resolve_distance(), pairs=pairs)
        return self.a1, self.p, self.a2, self.n

    def set_idx_externally(self, external_indices_tuple, labels):
        """Filter these pairs (a PML 3- or 4-tuple; a triplet (a, p, n) gives pairs (a, p) and (a, n))."""
        t = tuple(external_indices_tuple)
        if len(t) == 3:
            t = (t[0], t[1], t[0], t[2])
        if len(t) != 4:
            raise ValueError("external_indices_tuple must be a PML 3-tuple (a, p, n) or 4-tuple (a1, p, a2, n)")
        self.a1, self.p, self.a2, self.n = (torch.as_tensor(i).long() for i in t)
        self.was_set_externally = True

    def reset_idx(self):
        self.a1, self.p, self.a2, self.n = None, None, None, None
        self.was_set_externally = False


class UniformHistogramMiner(_PMLMiner):
    """PML's UniformHistogramMiner, random (torch's RNG, PML's draws): the range of the positive (negative)
    pair values is cut into ``num_bins`` equal bins and ``pos_per_bin`` (``neg_per_bin``) pairs are drawn
    with replacement from every non-empty bin."""

    def __init__(self, num_bins=100, pos_per_bin=10, neg_per_bin=10, **kwargs):
        super().__init__(**kwargs)
        self.num_bins = count("num_bins", num_bins)
        self.pos_per_bin = count("pos_per_bin", pos_per_bin)
        self.neg_per_bin = count("neg_per_bin", neg_per_bin)

    def mine(self, embeddings, labels, ref_emb=None, ref_labels=None):
        labels, ref, ref_labels = self._prepare(embeddings, labels, ref_emb, ref_labels)
        return self._call("uniform_histogram_mining", embeddings, labels, ref, ref_labels,
                          num_bins=count("num_bins", self.num_bins), pos_per_bin=count("pos_per_bin", self.pos_per_bin),
                          neg_per_bin=count("neg_per_bin", self.neg_per_bin), distance=self._resolve_distance())
