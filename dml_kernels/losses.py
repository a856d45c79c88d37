"""``dk.losses``: PML's loss classes under PML's names, constructor arguments and defaults.

Switching from PML is one import line: ``from dml_kernels import losses``. Every class also takes the
keyword-only ``backend=`` ("auto" | "reference" | "triton" | "cuda" | "cpu") and ``check_inputs=``.
PML features outside this package's scope (``reducer=``, ``embedding_regularizer=``, ...) raise a
clear error instead of being silently ignored.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F

_PML_ONLY = ("reducer", "embedding_regularizer", "embedding_reg_weight", "weight_regularizer", "weight_reg_weight",
             "collect_stats")


class _MetricLoss(nn.Module):
    _default_distance = "cosine"

    def __init__(self, distance=None, normalize_embeddings=True, backend="auto", check_inputs=True, **unsupported):
        super().__init__()
        for key in unsupported:
            if key in _PML_ONLY:
                raise NotImplementedError(f"{type(self).__name__}({key}=...) is a PML feature dml_kernels does not "
                                          "implement; use the PML class for it")
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        self.distance = distance
        self.normalize_embeddings = normalize_embeddings
        self.backend = backend
        self.check_inputs = check_inputs

    def _common(self):
        return dict(distance=self.distance, normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                    check_inputs=self.check_inputs)


class MultiSimilarityLoss(_MetricLoss):
    """Multi-similarity loss (Wang et al. 2019); ``epsilon=`` fuses PML's MultiSimilarityMiner(epsilon)."""

    def __init__(self, alpha=2, beta=50, base=0.5, *, epsilon=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.multi_similarity_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, alpha=self.alpha,
                                       beta=self.beta, base=self.base, epsilon=self.epsilon, **self._common())


class LiftedStructureLoss(_MetricLoss):
    def __init__(self, neg_margin=1, pos_margin=0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.lifted_structure_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                       neg_margin=self.neg_margin, pos_margin=self.pos_margin, **self._common())


class GeneralizedLiftedStructureLoss(_MetricLoss):
    def __init__(self, neg_margin=1, pos_margin=0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.generalized_lifted_structure_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                                   neg_margin=self.neg_margin, pos_margin=self.pos_margin,
                                                   **self._common())


class NPairsLoss(_MetricLoss):
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.n_pairs_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, **self._common())


class ContrastiveLoss(_MetricLoss):
    def __init__(self, pos_margin=0, neg_margin=1, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.contrastive_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, pos_margin=self.pos_margin,
                                  neg_margin=self.neg_margin, **self._common())


class TripletMarginLoss(_MetricLoss):
    """Triplet margin loss; ``mining="batch_hard"`` fuses PML's BatchHardMiner."""

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", *, mining=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.margin, self.swap, self.smooth_loss = margin, swap, smooth_loss
        self.triplets_per_anchor, self.mining = triplets_per_anchor, mining

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.triplet_margin_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=self.margin,
                                     swap=self.swap, smooth_loss=self.smooth_loss,
                                     triplets_per_anchor=self.triplets_per_anchor, mining=self.mining,
                                     **self._common())


class _ProxyLoss(_MetricLoss):
    """A loss that owns its proxies: ``self.proxies`` is an ``nn.Parameter`` (num_classes × embedding_size)."""

    def __init__(self, num_classes, embedding_size, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.reset_parameters()

    def get_logits(self, embeddings):
        """PML's ``get_logits``: the distance / similarity matrix of embeddings against the proxies."""
        return F.pairwise_similarity(embeddings, self.proxies.to(embeddings.dtype),
                                     self.distance or self._default_distance,
                                     normalize_embeddings=self.normalize_embeddings, backend=self.backend,
                                     check_inputs=self.check_inputs)


class ProxyNCALoss(_ProxyLoss):
    _default_distance = "squared_euclidean"

    def __init__(self, num_classes, embedding_size, softmax_scale=1, *, exclude_positive=False, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.softmax_scale, self.exclude_positive = softmax_scale, exclude_positive

    def reset_parameters(self):
        nn.init.normal_(self.proxies)  # PML's default weight_init_func for ProxyNCALoss

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.proxy_nca_loss(embeddings, labels, self.proxies, indices_tuple, ref_emb, ref_labels,
                                softmax_scale=self.softmax_scale, exclude_positive=self.exclude_positive,
                                **self._common())


class ProxyNCAPlusPlusLoss(ProxyNCALoss):
    """ProxyNCA++ (Teh et al. 2020): ProxyNCA at temperature T, i.e. softmax_scale = 1/T."""

    def __init__(self, num_classes, embedding_size, temperature=1 / 9, **kwargs):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(num_classes, embedding_size, softmax_scale=1.0 / temperature, **kwargs)
        self.temperature = temperature


class ProxyAnchorLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.alpha = margin, alpha

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # PML's init

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.proxy_anchor_loss(embeddings, labels, self.proxies, indices_tuple, ref_emb, ref_labels,
                                   margin=self.margin, alpha=self.alpha, **self._common())


__all__ = ["MultiSimilarityLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss", "NPairsLoss",
           "ContrastiveLoss", "TripletMarginLoss", "ProxyNCALoss", "ProxyNCAPlusPlusLoss", "ProxyAnchorLoss"]
