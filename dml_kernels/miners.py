"""``dk.miners``: PML's miner classes, returning PML's index tuples (this syncs with the host: the number
of mined pairs is data-dependent). For device-side results without a sync use
``dk.functional.multi_similarity_mask`` / ``batch_hard_mining``, or fuse mining into the loss.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _registry
from . import functional as F
from .distances import parse_distance
from ._validation import check_embeddings, check_labels, check_ref


class _Miner(nn.Module):
    _default_distance = "cosine"

    def __init__(self, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True):
        super().__init__()
        self.distance, self.normalize_embeddings = distance, normalize_embeddings
        self.backend, self.check_inputs = backend, check_inputs

    def _common(self):
        return dict(distance=self.distance, normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                    check_inputs=self.check_inputs)


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


class BatchHardMiner(_Miner):
    """Returns (a, p, n): per anchor with both sets, its hardest positive and hardest negative."""

    _default_distance = "euclidean"

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        hard_pos, hard_neg = F.batch_hard_mining(embeddings, labels, ref_emb, ref_labels, **self._common())
        anchors = torch.where(hard_pos >= 0)[0]
        return anchors, hard_pos[anchors], hard_neg[anchors]


class TripletMarginMiner(_Miner):
    """Returns (a, p, n) with t = D_an − D_ap (similarity: S_ap − S_an): all t ≤ m, hard t ≤ min(m, 0),
    semihard 0 < t ≤ m, easy t > m. Reference implementation only (its output is up to N·M² triplets)."""

    _default_distance = "euclidean"

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        super().__init__(**kwargs)
        if type_of_triplets not in ("all", "hard", "semihard", "easy"):
            raise ValueError(f"type_of_triplets must be 'all', 'hard', 'semihard' or 'easy', got {type_of_triplets!r}")
        self.margin, self.type_of_triplets = margin, type_of_triplets

    @torch.no_grad()
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        check_embeddings(embeddings, check_values=self.check_inputs)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        ref, ref_labels, _ = check_ref(embeddings, labels, ref_emb, ref_labels, check_values=self.check_inputs)
        dist = parse_distance(self.distance, self.normalize_embeddings, default=self._default_distance)
        return _registry.call("triplet_margin_mining", self.backend, embeddings.device.type, embeddings, labels, ref,
                              ref_labels, margin=float(self.margin), type_of_triplets=self.type_of_triplets,
                              distance=dist)


__all__ = ["MultiSimilarityMiner", "BatchHardMiner", "TripletMarginMiner"]
