"""The ranking and histogram family's modules (PML names, arguments and defaults; ``reducer=`` and
``embedding_regularizer=`` as in PML: see ``_base.py``); functional forms in
``dml_kernels/functional/ranking_losses.py``."""
from __future__ import annotations

import warnings

import torch

from .. import distances as _distances
from ..functional import ranking_losses as RF
from ._base import _MetricLoss


def _lp(power=1):
    """PML's ``get_default_distance()`` of the losses below (``self.distance`` when none is given)."""
    def get_default_distance(self):
        return _distances.LpDistance(power=power, normalize_embeddings=getattr(self, "normalize_embeddings", True))
    return get_default_distance


class FastAPLoss(_MetricLoss):
    """FastAP (Cakir et al. 2019): soft distance histograms per row; default distance LpDistance(power=2)."""

    _op = "fastap_loss"
    get_default_distance = _lp(power=2)

    def __init__(self, num_bins=10, **kwargs):
        super().__init__(**kwargs)
        RF._normalised_lp(self.distance, self.normalize_embeddings, "squared_euclidean", "FastAPLoss")
        self.num_bins = int(num_bins)
        self.num_edges = self.num_bins + 1

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return RF.fastap_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, num_bins=self.num_bins,
                              **self._common(), **self._reduction(embeddings))


class HistogramLoss(_MetricLoss):
    """Histogram loss (Ustinova & Lempitsky 2016); ``delta`` = 2 / n_bins (n_bins = 100 by default)."""

    _op = "histogram_loss"

    def __init__(self, n_bins: int = None, delta: float = None, **kwargs):
        super().__init__(**kwargs)
        self.delta = RF.histogram_delta(n_bins, delta)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return RF.histogram_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, delta=self.delta,
                                 **self._common(), **self._reduction(embeddings))


class PNPLoss(_MetricLoss):
    """PNP loss (Li et al. 2022), variants ``VARIANTS``; cosine only; an already-reduced scalar."""

    _op = "pnp_loss"
    VARIANTS = list(RF.PNP_VARIANTS)

    def __init__(self, b=2, alpha=1, anneal=0.01, variant="O", **kwargs):
        super().__init__(**kwargs)
        RF._cosine(self.distance, self.normalize_embeddings, "PNPLoss")
        self.b, self.alpha, self.anneal, self.variant = b, alpha, anneal, variant
        RF.check_pnp(b, alpha, anneal, variant)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return RF.pnp_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, b=self.b, alpha=self.alpha,
                           anneal=self.anneal, variant=self.variant, **self._common(),
                           **self._reduction(embeddings))


class RankedListLoss(_MetricLoss):
    """Ranked list loss (Wang et al. 2019); ``margin`` and ``Tn`` required, ``alpha`` default 1 + margin/2."""

    _op = "ranked_list_loss"
    _default_distance = "euclidean"
    get_default_distance = _lp()

    def __init__(self, margin, Tn, imbalance=0.5, alpha=None, Tp=0, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        if not 0 <= imbalance <= 1:
            raise AssertionError("Imbalance must be between 0 and 1")
        self.imbalance = imbalance
        self.alpha = RF.ranked_list_alpha(margin, alpha)
        if Tp > 5 or Tn > 5:
            warnings.warn("Values of Tp or Tn are too high. Too large temperature values may lead to overflow.")
        self.Tp, self.Tn = Tp, Tn

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return RF.ranked_list_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=self.margin,
                                   Tn=self.Tn, imbalance=self.imbalance, alpha=self.alpha, Tp=self.Tp,
                                   **self._common(), **self._reduction(embeddings))


class DynamicSoftMarginLoss(_MetricLoss):
    """CDF-based dynamic soft margin (Zhang & Rusinkiewicz 2019). ``hist_`` is PML's running histogram (a plain
    attribute, not in the state_dict), cast to the embeddings' device and dtype on each call. Unlike PML it is
    stored detached after each call, so training can take a second step (PML raises "Trying to backward through
    the graph a second time"); within a call the gradient flows through the CDF weights as in PML."""

    _op = "dynamic_soft_margin_loss"
    _default_distance = "euclidean"
    get_default_distance = _lp()

    def __init__(self, min_val=-2.0, num_bins=10, momentum=0.01, **kwargs):
        super().__init__(**kwargs)
        RF._normalised_lp(self.distance, self.normalize_embeddings, "euclidean", "DynamicSoftMarginLoss")
        self.min_val = min_val
        self.num_bins = int(num_bins)
        self.delta = 2 * abs(min_val) / num_bins
        self.momentum = momentum
        self.hist_ = torch.zeros((num_bins,))

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        loss, hist = RF.dynamic_soft_margin_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                                 min_val=self.min_val, num_bins=self.num_bins,
                                                 momentum=self.momentum, hist=self.hist_, return_hist=True,
                                                 **self._common(), **self._reduction(embeddings))
        self.hist_ = hist.detach()
        return loss


class SmoothAPLoss(_MetricLoss):
    """Smooth-AP (Brown et al. 2020) as PML 2.9 computes it (equal class counts; PML's block layout; a float32
    loss); cosine only. The loss dict's entry is "ap_loss" while ``sub_loss_names()`` says "loss", as PML's."""

    _op = "smooth_ap_loss"

    def __init__(self, temperature=0.01, **kwargs):
        super().__init__(**kwargs)
        RF._cosine(self.distance, self.normalize_embeddings, "SmoothAPLoss")
        self.temperature = temperature

    def _sub_loss_names(self):
        return ["loss"]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return RF.smooth_ap_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                 temperature=self.temperature, **self._common(), **self._reduction(embeddings))


__all__ = ["FastAPLoss", "HistogramLoss", "PNPLoss", "RankedListLoss", "DynamicSoftMarginLoss", "SmoothAPLoss"]
