"""The base of every ``dk.losses`` class: PML's common constructor arguments plus ``backend=`` and
``check_inputs=``; PML features outside this package's scope raise a clear error."""
from __future__ import annotations

from torch import nn

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
