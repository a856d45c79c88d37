"""The pair family's modules (PML names, arguments and defaults, ``reducer=`` and ``embedding_regularizer=``
as in PML: see ``_base.py``); functional forms in ``dml_kernels/functional/pair_losses.py``."""
from __future__ import annotations

from .. import functional as F
from ._base import _MetricLoss


class MultiSimilarityLoss(_MetricLoss):
    """Multi-similarity loss (Wang et al. 2019); ``epsilon=`` fuses PML's MultiSimilarityMiner(epsilon)."""

    _op = "multi_similarity_loss"

    def __init__(self, alpha=2, beta=50, base=0.5, *, epsilon=None, direction_gamma=0, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.direction_gamma = direction_gamma  # ≠ 0: the direction regulariser (seed 002 eq. 34)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.direction_gamma:
            return F.direction_multi_similarity_loss(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, direction_gamma=self.direction_gamma,
                alpha=self.alpha, beta=self.beta, base=self.base, epsilon=self.epsilon, **self._common(),
                **self._reduction(embeddings))
        return F.multi_similarity_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, alpha=self.alpha,
                                       beta=self.beta, base=self.base, epsilon=self.epsilon, **self._common(),
                                       **self._reduction(embeddings))


class LiftedStructureLoss(_MetricLoss):
    _op = "lifted_structure_loss"

    def __init__(self, neg_margin=1, pos_margin=0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.lifted_structure_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                       neg_margin=self.neg_margin, pos_margin=self.pos_margin, **self._common(),
                                       **self._reduction(embeddings))


class GeneralizedLiftedStructureLoss(_MetricLoss):
    _op = "generalized_lifted_structure_loss"

    def __init__(self, neg_margin=1, pos_margin=0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.generalized_lifted_structure_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                                   neg_margin=self.neg_margin, pos_margin=self.pos_margin,
                                                   **self._common(), **self._reduction(embeddings))


class NPairsLoss(_MetricLoss):
    _op = "n_pairs_loss"

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.n_pairs_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, **self._common(),
                              **self._reduction(embeddings))


class ContrastiveLoss(_MetricLoss):
    _op = "contrastive_loss"

    def __init__(self, pos_margin=0, neg_margin=1, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.contrastive_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, pos_margin=self.pos_margin,
                                  neg_margin=self.neg_margin, **self._common(), **self._reduction(embeddings))


class TripletMarginLoss(_MetricLoss):
    """Triplet margin loss; ``mining="batch_hard"`` fuses PML's BatchHardMiner."""

    _op = "triplet_margin_loss"

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", *, mining=None,
                 direction_gamma=0, **kwargs):
        super().__init__(**kwargs)
        self.margin, self.swap, self.smooth_loss = margin, swap, smooth_loss
        self.triplets_per_anchor, self.mining = triplets_per_anchor, mining
        self.direction_gamma = direction_gamma  # ≠ 0: the direction regulariser (seed 002 eq. 33)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self.direction_gamma:
            return F.direction_triplet_margin_loss(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, direction_gamma=self.direction_gamma,
                margin=self.margin, swap=self.swap, smooth_loss=self.smooth_loss,
                triplets_per_anchor=self.triplets_per_anchor, mining=self.mining, **self._common(),
                **self._reduction(embeddings))
        return F.triplet_margin_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=self.margin,
                                     swap=self.swap, smooth_loss=self.smooth_loss,
                                     triplets_per_anchor=self.triplets_per_anchor, mining=self.mining,
                                     **self._common(), **self._reduction(embeddings))
