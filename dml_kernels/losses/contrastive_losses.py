"""The contrastive family's modules (PML names, arguments and defaults; ``reducer=`` and
``embedding_regularizer=`` as in PML: see ``_base.py``); functional forms in
``dml_kernels/functional/contrastive_losses.py``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from ..functional import contrastive_losses as CF
from ..functional.contrastive_losses import check_temperature
from ._base import _MetricLoss


class NTXentLoss(_MetricLoss):
    """NT-Xent (SimCLR's InfoNCE over label pairs); default reducer MeanReducer over positive pairs."""

    _op = "ntxent_loss"

    def __init__(self, temperature=0.07, **kwargs):
        check_temperature(temperature)
        super().__init__(**kwargs)
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.ntxent_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=self.temperature,
                             **self._common(), **self._reduction(embeddings))


class SupConLoss(_MetricLoss):
    """Supervised contrastive loss (Khosla et al. 2020); default reducer AvgNonZeroReducer over anchors."""

    _op = "supcon_loss"

    def __init__(self, temperature=0.1, **kwargs):
        check_temperature(temperature)
        super().__init__(**kwargs)
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.supcon_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=self.temperature,
                             **self._common(), **self._reduction(embeddings))


class NCALoss(_MetricLoss):
    """Neighbourhood components analysis (Goldberger et al. 2004); default distance squared euclidean."""

    _op = "nca_loss"

    def __init__(self, softmax_scale=1, **kwargs):
        super().__init__(**kwargs)
        self.softmax_scale = softmax_scale

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return F.nca_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, softmax_scale=self.softmax_scale,
                          **self._common(), **self._reduction(embeddings))


class _Simple(_MetricLoss):
    """A loss whose constructor arguments are passed as they are to its functional form."""

    _fn = None
    _args = ()

    def __init__(self, *args, **kwargs):
        own = dict(self._args)
        for name, value in zip(own, args):
            own[name] = value
        for name in list(kwargs):
            if name in own:
                own[name] = kwargs.pop(name)
        super().__init__(**kwargs)
        for name, value in own.items():
            setattr(self, name, value)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        own = {name: getattr(self, name) for name, _ in self._args}
        return getattr(CF, self._fn)(embeddings, labels, indices_tuple, ref_emb, ref_labels, **own, **self._common(),
                                     **self._reduction(embeddings))


class CircleLoss(_Simple):
    _op = _fn = "circle_loss"
    _args = (("m", 0.4), ("gamma", 80))


class TupletMarginLoss(_Simple):
    """``margin`` given in degrees and stored in radians, as PML does (``self.margin``)."""

    _op = _fn = "tuplet_margin_loss"
    _args = (("margin", 5.73), ("scale", 64))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = math.radians(self.margin)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return CF.tuplet_margin_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                     margin=math.degrees(self.margin), scale=self.scale, **self._common(),
                                     **self._reduction(embeddings))


class IntraPairVarianceLoss(_Simple):
    _op = _fn = "intra_pair_variance_loss"
    _args = (("pos_eps", 0.01), ("neg_eps", 0.01))


class SignalToNoiseRatioContrastiveLoss(_Simple):
    _op = "snr_contrastive_loss"
    _fn = "signal_to_noise_ratio_contrastive_loss"
    _args = (("pos_margin", 0), ("neg_margin", 1))


class ThresholdConsistentMarginLoss(_Simple):
    _op = _fn = "threshold_consistent_margin_loss"
    _args = (("lambda_plus", 1.0), ("lambda_minus", 1.0), ("margin_plus", 0.9), ("margin_minus", 0.5))


class MarginLoss(_MetricLoss):
    """PML's MarginLoss: ``beta`` is a (1,) tensor, (num_classes,) with ``num_classes``, an ``nn.Parameter``
    (PML's name and shape, in the state_dict) with ``learn_beta=True``."""

    _op = "margin_loss"

    def __init__(self, margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.margin, self.nu, self.learn_beta = margin, nu, learn_beta
        self.triplets_per_anchor = triplets_per_anchor
        b = torch.tensor([float(beta)])
        if num_classes:
            b = torch.ones(num_classes) * b
        self.beta = nn.Parameter(b) if learn_beta else b

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        beta = self.beta.to(embeddings.device)
        return F.margin_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, beta=beta, margin=self.margin,
                             nu=self.nu, learn_beta=self.learn_beta, triplets_per_anchor=self.triplets_per_anchor,
                             **self._common(), **self._reduction(embeddings))
