"""dml_kernels: fused deep-metric-learning losses, a drop-in replacement for pytorch-metric-learning's.

    import dml_kernels as dk
    loss_fn = dk.losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5, epsilon=0.1)
    loss = loss_fn(embeddings, labels)
"""
from . import _reference_ops  # noqa: F401  (registers the always-available reference backend)
from . import functional, losses, miners
from ._backends import BACKENDS, BackendUnavailable, Unsupported
from ._distance import Distance
from ._pairs import PackedPairMask

__version__ = "0.1.0"

__all__ = ["functional", "losses", "miners", "BACKENDS", "BackendUnavailable", "Unsupported", "Distance",
           "PackedPairMask", "__version__"]
