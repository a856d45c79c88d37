"""The margin-softmax family's modules (PML 2.9's NormalizedSoftmaxLoss, CosFaceLoss, ArcFaceLoss,
LargeMarginSoftmaxLoss, SphereFaceLoss): each owns ``self.W``, an ``nn.Parameter`` of PML's shape
(embedding_size, num_classes) and initialisation (N(0, 1), or ``weight_init_func(W)``), so PML's state_dicts
load with ``strict=True``. ``weight_regularizer=`` sees Wᵀ (C×D), as PML's. Functional forms in
``dml_kernels/functional/margin_softmax.py``.

Dtype: W becomes float64 (in place, once) for float64 embeddings, as PML's; it is never cast in place for
fp16 / bf16 embeddings (PML casts it permanently).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from ..backends.reference import margin_softmax as _ref
from ..distances import parse_distance
from ..functional import margin_softmax as _fm
from ._base import _MetricLoss


class _WeightLoss(_MetricLoss):
    _has_weight_regularizer = True

    def __init__(self, num_classes, embedding_size, *, weight_init_func=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.weight_init_func = weight_init_func
        self.W = nn.Parameter(torch.empty(self.embedding_size, self.num_classes))
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight_init_func is not None:
            self.weight_init_func(self.W)
        else:
            nn.init.normal_(self.W)  # PML's WeightMixin default

    def _W_for(self, embeddings):
        if embeddings.dtype == torch.float64 and self.W.dtype != torch.float64:
            self.W.data = self.W.data.double()
        return self.W

    def _kw(self):
        return dict(backend=self.backend, check_inputs=self.check_inputs)


class NormalizedSoftmaxLoss(_WeightLoss):
    _default_distance = "dot"
    _op = "normalized_softmax_loss"

    def __init__(self, num_classes, embedding_size, temperature=0.05, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = temperature

    def _distance(self):
        return parse_distance(self.distance, self.normalize_embeddings, default="dot")

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.normalized_softmax_loss(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb,
                                         ref_labels, temperature=self.temperature, **self._common(),
                                         **self._reduction(embeddings, self.W.t()))

    def get_logits(self, embeddings):
        return _ref.normalized_softmax_logits(embeddings, self.W, temperature=self.temperature,
                                              distance=self._distance())


class _MarginLoss(_WeightLoss):
    _kind = None

    def __init__(self, num_classes, embedding_size, margin, scale, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        _fm._cosine_only(self.distance, type(self).__name__)
        self.margin, self.scale = margin, scale
        self.init_margin()

    def init_margin(self):
        self.margin = _fm._int_margin(self.margin, type(self).__name__)

    def _op_margin(self):
        return self.margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        fn = getattr(_fm, self._op)
        return fn(embeddings, labels, self._W_for(embeddings), indices_tuple, ref_emb, ref_labels,
                  margin=self._fn_margin(), scale=self.scale, distance=self.distance, **self._kw(),
                  **self._reduction(embeddings, self.W.t()))

    def _fn_margin(self):
        return self.margin

    def get_logits(self, embeddings):
        """PML's ``get_logits``: the logits without the margin."""
        return _ref.margin_logits(self._kind, embeddings, None, self.W, margin=self._op_margin(), scale=self.scale)


class LargeMarginSoftmaxLoss(_MarginLoss):
    _op = "large_margin_softmax_loss"
    _kind = "large_margin"

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    _op = "sphereface_loss"
    _kind = "sphereface"


class ArcFaceLoss(_MarginLoss):
    """``self.margin`` is in radians after construction (PML's ``init_margin``); the argument is in degrees."""
    _op = "arcface_loss"
    _kind = "arcface"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def init_margin(self):
        self._degrees = self.margin
        self.margin = math.radians(self.margin)

    def _fn_margin(self):
        return self._degrees if math.radians(self._degrees) == self.margin else math.degrees(self.margin)


class CosFaceLoss(_MarginLoss):
    _op = "cosface_loss"
    _kind = "cosface"

    def __init__(self, *args, margin=0.35, scale=64, **kwargs):
        super().__init__(*args, margin=margin, scale=scale, **kwargs)

    def init_margin(self):
        pass
