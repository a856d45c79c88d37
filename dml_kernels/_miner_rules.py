"""PML's BatchEasyHardMiner strategy rules, shared by the fused miners (``backends/cpp/mining.py``,
``backends/triton/mining.py``) — a private module, so no backend imports the public layer for them."""
from __future__ import annotations

STRATEGIES = ("hard", "semihard", "easy", "all")


def check_strategies(pos_strategy, neg_strategy):
    """PML's accepted strategy pairs (ValueError otherwise): each one of STRATEGIES; "semihard" never on both
    sides nor beside "all"."""
    if pos_strategy not in STRATEGIES or neg_strategy not in STRATEGIES:
        raise ValueError(f"pos_strategy and neg_strategy must be one of {STRATEGIES}, "
                         f"got {pos_strategy!r}, {neg_strategy!r}")
    both = (pos_strategy, neg_strategy)
    if "semihard" in both and (pos_strategy == neg_strategy or "all" in both):
        raise ValueError(f"pos_strategy={pos_strategy!r} with neg_strategy={neg_strategy!r} is not allowed")


def largest_sides(pos_strategy, neg_strategy, is_similarity):
    """(pos_largest, neg_largest): whether each side picks the largest value of its row or the smallest — "easy"
    positives and "hard" / "semihard" negatives are the closest ones (largest for a similarity, smallest for a
    distance)."""
    pos_largest = is_similarity if pos_strategy == "easy" else not is_similarity
    neg_largest = (not is_similarity) if neg_strategy == "easy" else is_similarity
    return pos_largest, neg_largest
