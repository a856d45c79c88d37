"""Triton pair losses and the multi-similarity miner (registered on import).

Every op here runs on the tiled engine (``pair_engine.py``) with a loss-specific epilogue; each loss's module
documents its statistics and gradient.
"""
from ..._registry import register
from . import contrastive, lifted_structure, multi_similarity, n_pairs, triplet

_OPS = {
    "multi_similarity_loss": multi_similarity.multi_similarity_loss,
    "multi_similarity_thresholds": multi_similarity.multi_similarity_thresholds,
    "multi_similarity_mask": multi_similarity.multi_similarity_mask,
    "generalized_lifted_structure_loss": lifted_structure.generalized_lifted_structure_loss,
    "lifted_structure_loss": lifted_structure.lifted_structure_loss,
    "contrastive_loss": contrastive.contrastive_loss,
    "n_pairs_loss": n_pairs.n_pairs_loss,
    "triplet_margin_loss": triplet.triplet_margin_loss,
}

for _name, _fn in _OPS.items():
    register(_name, "triton")(_fn)
