"""dml_kernels: fused deep-metric-learning losses, a drop-in replacement for pytorch-metric-learning's.

    import dml_kernels as dk
    loss_fn = dk.losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5, epsilon=0.1)
    loss = loss_fn(embeddings, labels)

Public families: ``losses``, ``miners``, ``distances``, ``reducers``, ``regularizers``, ``functional``,
``distributed``, ``evaluation``. Backends live in ``dml_kernels/backends/<name>/`` and are loaded by the
registry (``_registry.py``) on first use; the reference backend is loaded here, as it is always available.
"""
from . import _registry, distances, distributed, evaluation, functional, losses, miners, reducers, regularizers
from ._pairs import PackedPairMask
from ._registry import BACKENDS, BackendUnavailable, Unsupported
from .distances import Distance

_registry._load("reference")

__version__ = "0.1.0"

__all__ = ["functional", "losses", "miners", "distances", "distributed", "evaluation", "reducers", "regularizers",
           "BACKENDS", "BackendUnavailable", "Unsupported", "Distance", "PackedPairMask", "__version__"]
