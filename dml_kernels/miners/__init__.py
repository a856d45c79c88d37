"""``dk.miners``: PML's miner classes, returning PML's index tuples (this syncs with the host: the number
of mined pairs is data-dependent). For device-side results without a sync use
``dk.functional.multi_similarity_mask`` / ``batch_hard_mining``, ``PairMarginMiner.mask`` and
``BatchEasyHardMiner.per_row``, or fuse mining into the loss.
"""
from .pair_miners import BatchEasyHardMiner, HDCMiner, MultiSimilarityMiner, PairMarginMiner, UniformHistogramMiner
from .triplet_miners import (
    AngularMiner,
    BatchHardMiner,
    DistanceWeightedMiner,
    EmbeddingsAlreadyPackagedAsTriplets,
    TripletMarginMiner,
)

__all__ = ["MultiSimilarityMiner", "BatchHardMiner", "TripletMarginMiner", "PairMarginMiner", "BatchEasyHardMiner",
           "DistanceWeightedMiner", "AngularMiner", "HDCMiner", "UniformHistogramMiner",
           "EmbeddingsAlreadyPackagedAsTriplets"]
from .base_miner import BaseMiner  # noqa: E402,F401 - PML's base class for miners written against its API (abstract)
