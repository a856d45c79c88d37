"""AngularLoss, InstanceLoss, ManifoldLoss and VICRegLoss as modules (PML 2.9's names, arguments, defaults and
parameters; ``reducer=`` and ``embedding_regularizer=`` as in PML: see ``_base.py``); functional forms in
``dml_kernels/functional/embedding_losses.py``. All four run on the reference backend."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import distances as _distances
from ..functional import embedding_losses as EF
from ._base import _MetricLoss


class AngularLoss(_MetricLoss):
    """Angular loss (Wang et al. 2017); ``alpha`` in degrees, stored as PML stores it (``self.alpha``: a 0-dim
    float64 tensor of radians, not in the state_dict). The distance must be PML's default LpDistance."""

    _op = "angular_loss"

    def __init__(self, alpha=40, **kwargs):
        super().__init__(**kwargs)
        EF.angular_distance(self.distance, self.normalize_embeddings)
        self.alpha = torch.tensor(math.radians(alpha), dtype=torch.float64)

    def get_default_distance(self):
        return _distances.LpDistance(normalize_embeddings=self.normalize_embeddings)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return EF.angular_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               alpha=math.degrees(float(self.alpha)), **self._common(), **self._reduction(embeddings))


class InstanceLoss(_MetricLoss):
    """Instance loss (Zheng et al., TOMM 2020) as PML computes it (see ``dk.functional.instance_loss``)."""

    _op = "instance_loss"

    def __init__(self, gamma=64, **kwargs):
        super().__init__(**kwargs)
        EF.instance_distance(self.distance, self.normalize_embeddings)
        self.gamma = gamma

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return EF.instance_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, gamma=self.gamma,
                                **self._common(), **self._reduction(embeddings))


class ManifoldLoss(_MetricLoss):
    """Ensemble deep manifold similarity loss (Aziere & Todorovic 2019) with PML's ``proxies`` parameter (K, l),
    float32, ``torch.randn`` initialised (the same draw as PML's: one seed, PML's proxies), never cast. The
    meta-class of each sample is passed as ``indices_tuple`` (a length-N LongTensor); without it PML's random
    assignment is drawn. Keyword-only ``inverse_dtype`` (default float32, PML's): see
    ``dk.functional.manifold_loss``."""

    _op = "manifold_loss"

    def __init__(self, l: int, K: int = 50, lambdaC: float = 1.0, alpha: float = 0.8, margin: float = 5e-4,
                 *, inverse_dtype=torch.float32, **kwargs):
        super().__init__(**kwargs)
        EF.check_lambda(lambdaC)
        self.K, self.l = K, l
        self.proxies = nn.Parameter(torch.randn(K, l))
        self.lambdaC, self.alpha, self.margin = lambdaC, alpha, margin
        self.inverse_dtype = inverse_dtype

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if embeddings.dim() == 2 and embeddings.shape[1] != self.l:
            raise EF.ArgumentError(f"embeddings have size {embeddings.shape[1]} but ManifoldLoss was built with "
                                   f"l={self.l}")
        return EF.manifold_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, proxies=self.proxies,
                                lambdaC=self.lambdaC, alpha=self.alpha, margin=self.margin,
                                inverse_dtype=self.inverse_dtype, **self._common(), **self._reduction(embeddings))


class VICRegLoss(_MetricLoss):
    """VICReg (Bardes et al. 2022): ``loss(embeddings, ref_emb=other_view)``. Like PML it takes no ``distance=``
    and no ``embedding_regularizer=`` (``ValueError``)."""

    _op = "vicreg_loss"

    def __init__(self, invariance_lambda=25, variance_mu=25, covariance_v=1, eps=1e-4, **kwargs):
        if "distance" in kwargs:
            raise ValueError("VICRegLoss cannot use a distance function")
        if "embedding_regularizer" in kwargs:
            raise ValueError("VICRegLoss cannot use a regularizer")
        super().__init__(**kwargs)
        self.invariance_lambda, self.variance_mu = invariance_lambda, variance_mu
        self.covariance_v, self.eps = covariance_v, eps

    def get_default_distance(self):
        return _distances.LpDistance()  # created, unused, as in PML

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        common = self._common()
        common.pop("distance")
        common.pop("normalize_embeddings")
        return EF.vicreg_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                              invariance_lambda=self.invariance_lambda, variance_mu=self.variance_mu,
                              covariance_v=self.covariance_v, eps=self.eps, **common, **self._reduction(embeddings))


__all__ = ["AngularLoss", "InstanceLoss", "ManifoldLoss", "VICRegLoss"]
