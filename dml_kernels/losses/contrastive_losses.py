"""The contrastive family's modules (PML names, arguments and defaults; ``reducer=`` and
``embedding_regularizer=`` as in PML: see ``_base.py``); functional forms in
``dml_kernels/functional/contrastive_losses.py``."""
from __future__ import annotations

from .. import functional as F
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
