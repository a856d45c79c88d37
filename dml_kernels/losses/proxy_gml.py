"""``ProxyGMLLoss``: ProxyGML (Zhu et al., NeurIPS 2020; seed 002 §5.3) as a module owning its proxies.

The parameter has the official code's name and layout: ``self.Proxies``, an ``nn.Parameter`` of shape
(embedding_size, num_classes·proxies_per_class), column k = proxy ``k mod N`` of class ``k // N``, initialised
``kaiming_uniform_(a=√5)`` as the official code. The equations, defaults and variants are in
``dml_kernels/functional/proxy_gml.py`` (defaults: the official CUB/Cars setting N = 12, r = 0.05,
weight_lambda = 0.3). PML-style arguments: ``reducer=`` (MeanReducer over the "loss" per-row and "reg_loss"
per-proxy elements by default), ``embedding_regularizer=``, ``weight_regularizer=`` (sees Proxiesᵀ, C·N × D),
``backend=``, ``check_inputs=``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import proxy_gml as _fg
from .margin_softmax import _WeightLoss


class ProxyGMLLoss(_WeightLoss):
    _op = "proxy_gml_loss"
    _weight_name = "Proxies"
    _default_distance = "dot"

    def __init__(self, num_classes, embedding_size, proxies_per_class=12, r=0.05, weight_lambda=0.3, *, top_k=None,
                 class_mask="selected", release_eps=False, **kwargs):
        n = proxies_per_class
        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ValueError(f"proxies_per_class must be a positive integer, got {n!r}")
        if isinstance(num_classes, bool) or int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.proxies_per_class = int(n)
        super().__init__(num_classes, embedding_size, _columns=int(num_classes) * self.proxies_per_class, **kwargs)
        cn = self.num_classes * self.proxies_per_class
        self.top_k = _fg.resolve_top_k(r, top_k, cn)  # validates r / top_k now
        self.r, self._top_k_arg = r, top_k
        if class_mask not in _fg.CLASS_MASKS:
            raise ValueError(f"class_mask must be one of {_fg.CLASS_MASKS}, got {class_mask!r}")
        if not isinstance(weight_lambda, (int, float)) or isinstance(weight_lambda, bool) or not weight_lambda >= 0:
            raise ValueError(f"weight_lambda must be a number >= 0, got {weight_lambda!r}")
        self.weight_lambda, self.class_mask, self.release_eps = weight_lambda, class_mask, bool(release_eps)

    def _default_init(self, w):
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # the official code's initialisation

    @property
    def instance_label(self):
        """The class of every proxy column (the official code's ``instance_label``)."""
        return torch.arange(self.Proxies.shape[1], device=self.Proxies.device) // self.proxies_per_class

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return _fg.proxy_gml_loss(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb, ref_labels,
                                  proxies_per_class=self.proxies_per_class, r=self.r, top_k=self._top_k_arg,
                                  weight_lambda=self.weight_lambda, class_mask=self.class_mask,
                                  release_eps=self.release_eps, **self._common(),
                                  **self._reduction(embeddings, self.Proxies.t()))
