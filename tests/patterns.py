"""Label patterns every op is tested on (SPEC §5)."""
import torch

PATTERNS = {
    "random": lambda n: torch.randint(0, 3, (n,)),
    "all_same": lambda n: torch.zeros(n, dtype=torch.long),
    "all_distinct": lambda n: torch.arange(n),
    "singletons_and_pairs": lambda n: torch.tensor([k // 2 if k < n // 2 * 2 - 2 else 100 + k for k in range(n)]),
    "pairs": lambda n: torch.arange(n) // 2,
    "one_sample": lambda n: torch.zeros(1, dtype=torch.long),
    "two_samples_same": lambda n: torch.zeros(2, dtype=torch.long),
    "two_samples_distinct": lambda n: torch.arange(2),
}


def make(pattern, n=9, d=5, dtype=torch.float64, device="cpu"):
    labels = PATTERNS[pattern](n)
    x = torch.randn(len(labels), d, dtype=dtype, device=device)
    return x, labels.to(device)


DISTANCES = ["cosine", "dot", "euclidean", "squared_euclidean"]
# ... plus the unnormalised ones: with L2-normalised inputs the radial part of a gradient (the ‖·‖² terms of
# the distances) is projected away by the normalisation's backward, so only raw embeddings test it.
DISTANCE_CASES = DISTANCES + ["dot/raw", "euclidean/raw", "squared_euclidean/raw"]


def dist_kw(case):
    """A DISTANCE_CASES entry as keyword arguments (``distance=``, ``normalize_embeddings=``)."""
    name, _, raw = case.partition("/")
    return dict(distance=name, normalize_embeddings=not raw)
