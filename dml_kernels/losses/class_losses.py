"""The class-weight family's modules: losses that own per-class weights (``nn.Parameter``); functional forms
in ``dml_kernels/functional/class_losses.py``."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ._base import _MetricLoss


class _ProxyLoss(_MetricLoss):
    """A loss that owns its proxies: ``self.proxies`` is an ``nn.Parameter`` (num_classes × embedding_size).
    ``weight_regularizer=`` (PML's WeightRegularizerMixin) is applied to the proxies (C × D)."""

    _has_weight_regularizer = True

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
    _op = "proxy_nca_loss"

    def __init__(self, num_classes, embedding_size, softmax_scale=1, *, exclude_positive=False, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.softmax_scale, self.exclude_positive = softmax_scale, exclude_positive

    def reset_parameters(self):
        nn.init.normal_(self.proxies)  # PML's default weight_init_func for ProxyNCALoss

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.proxy_nca_loss(embeddings, labels, self.proxies, indices_tuple, ref_emb, ref_labels,
                                softmax_scale=self.softmax_scale, exclude_positive=self.exclude_positive,
                                **self._common(), **self._reduction(embeddings, self.proxies))


class ProxyNCAPlusPlusLoss(ProxyNCALoss):
    """ProxyNCA++ (Teh et al. 2020): ProxyNCA at temperature T, i.e. softmax_scale = 1/T."""

    def __init__(self, num_classes, embedding_size, temperature=1 / 9, **kwargs):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(num_classes, embedding_size, softmax_scale=1.0 / temperature, **kwargs)
        self.temperature = temperature


class ProxyAnchorLoss(_ProxyLoss):
    _op = "proxy_anchor_loss"

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.alpha = margin, alpha

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # PML's init

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.proxy_anchor_loss(embeddings, labels, self.proxies, indices_tuple, ref_emb, ref_labels,
                                   margin=self.margin, alpha=self.alpha, **self._common(),
                                   **self._reduction(embeddings, self.proxies))
