"""Triton pair losses and miners (registered on import).

Every op here runs on the tiled engine (``engine.py``) with a loss-specific epilogue; see the module
of each loss for its statistics and gradient.
"""
from .._backends import register
from . import multi_similarity

_OPS = {
    "multi_similarity_loss": multi_similarity.multi_similarity_loss,
    "multi_similarity_thresholds": multi_similarity.multi_similarity_thresholds,
    "multi_similarity_mask": multi_similarity.multi_similarity_mask,
}

for _name, _fn in _OPS.items():
    register(_name, "triton")(_fn)
