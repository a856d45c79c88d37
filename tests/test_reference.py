"""The reference backend against the independent naive loops in tests/naive.py (float64, 1e-9),
values and gradients, every label pattern; plus gradcheck for every loss."""
import pytest
import torch

import dml_kernels as dk
import naive
from patterns import PATTERNS, make

F = dk.functional
TOL = dict(rtol=1e-9, atol=1e-9)
DISTANCES = ["cosine", "dot", "euclidean", "squared_euclidean"]


def check(ours_fn, naive_fn, x, *others):
    """Compare values and gradients w.r.t. x (and any extra leaf tensors) of two loss functions."""
    leaves_a = [t.clone().requires_grad_() for t in (x,) + others]
    leaves_b = [t.clone().requires_grad_() for t in (x,) + others]
    a, b = ours_fn(*leaves_a), naive_fn(*leaves_b)
    assert a.dim() == 0 and a.requires_grad
    torch.testing.assert_close(a, b.to(a.dtype) if torch.is_tensor(b) else torch.tensor(float(b), dtype=a.dtype),
                               **TOL)
    a.backward()
    if torch.is_tensor(b) and b.requires_grad:
        b.backward()
    for la, lb in zip(leaves_a, leaves_b):
        gb = lb.grad if lb.grad is not None else torch.zeros_like(lb)
        torch.testing.assert_close(la.grad, gb, **TOL)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_multi_similarity(pattern, distance, epsilon):
    x, y = make(pattern)
    kw = dict(alpha=2.0, beta=10.0, base=0.5)
    check(lambda e: F.multi_similarity_loss(e, y, distance=distance, epsilon=epsilon, backend="reference", **kw),
          lambda e: naive.multi_similarity(e, y, epsilon=epsilon, name=distance, **kw), x)


@pytest.mark.parametrize("epsilon", [None, 0.3])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_multi_similarity_ref_set(epsilon, distance):
    """A reference set much larger than the query batch (cross-batch memory shape); no self-exclusion."""
    x, y = make("random", n=5)
    ref, ref_y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 4, (23,))
    check(lambda e, r: F.multi_similarity_loss(e, y, None, r, ref_y, epsilon=epsilon, distance=distance,
                                               backend="reference"),
          lambda e, r: naive.multi_similarity(e, y, r, ref_y, epsilon=epsilon, name=distance), x, ref)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_generalized_lifted(pattern, distance):
    x, y = make(pattern)
    check(lambda e: F.generalized_lifted_structure_loss(e, y, distance=distance, neg_margin=0.7, pos_margin=0.1,
                                                        backend="reference"),
          lambda e: naive.generalized_lifted(e, y, neg_margin=0.7, pos_margin=0.1, name=distance), x)


def test_generalized_lifted_ref_set():
    x, y = make("random", n=4)
    ref, ref_y = torch.randn(13, 5, dtype=torch.float64), torch.randint(0, 3, (13,))
    check(lambda e, r: F.generalized_lifted_structure_loss(e, y, None, r, ref_y, backend="reference"),
          lambda e, r: naive.generalized_lifted(e, y, r, ref_y), x, ref)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_lifted(pattern, distance):
    x, y = make(pattern)
    check(lambda e: F.lifted_structure_loss(e, y, distance=distance, neg_margin=0.8, pos_margin=0.05,
                                            backend="reference"),
          lambda e: naive.lifted(e, y, neg_margin=0.8, pos_margin=0.05, name=distance), x)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_contrastive(pattern, distance):
    x, y = make(pattern)
    margins = dict(pos_margin=1.0, neg_margin=0.0) if distance in ("cosine", "dot") else dict(pos_margin=0.2,
                                                                                               neg_margin=1.2)
    check(lambda e: F.contrastive_loss(e, y, distance=distance, backend="reference", **margins),
          lambda e: naive.contrastive(e, y, name=distance, **margins), x)


def test_contrastive_ref_set():
    x, y = make("random", n=4)
    ref, ref_y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    check(lambda e, r: F.contrastive_loss(e, y, None, r, ref_y, backend="reference"),
          lambda e, r: naive.contrastive(e, y, r, ref_y), x, ref)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("variant", ["plain", "swap", "smooth", "batch_hard", "batch_hard_swap"])
def test_triplet(pattern, distance, variant):
    x, y = make(pattern)
    swap, smooth, hard = "swap" in variant, variant == "smooth", variant.startswith("batch_hard")
    check(lambda e: F.triplet_margin_loss(e, y, margin=0.3, swap=swap, smooth_loss=smooth,
                                          mining="batch_hard" if hard else None, distance=distance,
                                          backend="reference"),
          lambda e: naive.triplet(e, y, m=0.3, swap=swap, smooth=smooth, batch_hard=hard, name=distance), x)


@pytest.mark.parametrize("swap", [False, True])
def test_triplet_ref_set(swap):
    x, y = make("random", n=4)
    ref, ref_y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    check(lambda e, r: F.triplet_margin_loss(e, y, None, r, ref_y, margin=0.4, swap=swap, backend="reference"),
          lambda e, r: naive.triplet(e, y, r, ref_y, m=0.4, swap=swap), x, ref)


def test_triplet_chunking_matches_unchunked():
    """The anchor-chunked all-triplets loop gives the same value for any chunk size."""
    from dml_kernels.backends.reference.pair_losses import triplet_margin_loss
    x, y = make("random", n=11)
    d = dk.Distance("euclidean", True)
    values = [triplet_margin_loss(x, y, None, None, margin=0.3, distance=d, anchor_chunk=c) for c in (1, 3, 11)]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("distance", ["dot", "euclidean"])
def test_n_pairs(pattern, distance):
    x, y = make(pattern)
    check(lambda e: F.n_pairs_loss(e, y, distance=distance, backend="reference"),
          lambda e: naive.n_pairs(e, y, name=distance), x)


def test_n_pairs_unnormalized_dot():
    x, y = make("random", n=10)
    check(lambda e: F.n_pairs_loss(e, y, distance="dot", normalize_embeddings=False, backend="reference"),
          lambda e: naive.n_pairs(e, y, name="dot", normalize=False), x)


PROXY_PATTERNS = ["random", "all_same", "all_distinct", "one_sample"]


@pytest.mark.parametrize("pattern", PROXY_PATTERNS)
@pytest.mark.parametrize("exclude_positive", [False, True])
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_proxy_nca(pattern, exclude_positive, distance):
    x, y = make(pattern)
    proxies = torch.randn(12, 5, dtype=torch.float64)  # classes 9..11 are absent from every batch
    check(lambda e, p: F.proxy_nca_loss(e, y, p, softmax_scale=3.0, exclude_positive=exclude_positive,
                                        distance=distance, backend="reference"),
          lambda e, p: naive.proxy_nca(e, y, p, scale=3.0, exclude_positive=exclude_positive, name=distance),
          x, proxies)


@pytest.mark.parametrize("pattern", PROXY_PATTERNS)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_proxy_anchor(pattern, distance):
    x, y = make(pattern)
    proxies = torch.randn(12, 5, dtype=torch.float64)
    check(lambda e, p: F.proxy_anchor_loss(e, y, p, margin=0.2, alpha=8.0, distance=distance, backend="reference"),
          lambda e, p: naive.proxy_anchor(e, y, p, m=0.2, alpha=8.0, name=distance), x, proxies)


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "all_distinct"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_ms_mask_and_miner(pattern, distance):
    x, y = make(pattern)
    mask = F.multi_similarity_mask(x, y, epsilon=0.2, distance=distance, backend="reference")
    pos, neg = mask.to_dense()
    expected = naive.ms_mined_pairs(x, y, None, None, 0.2, distance)
    for i, (p, n) in enumerate(expected):
        assert torch.where(pos[i])[0].tolist() == p
        assert torch.where(neg[i])[0].tolist() == n


@pytest.mark.parametrize("pattern", ["random", "pairs", "all_same", "singletons_and_pairs"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_triplet_margin_miner(pattern, distance, kind):
    x, y = make(pattern)
    a, p, n = dk.miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind, distance=distance,
                                           backend="reference")(x, y)
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) == naive.triplet_margin_miner(x, y, m=0.3, kind=kind,
                                                                                      name=distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_similarity(distance):
    x, r = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    mat = F.pairwise_similarity(x, r, distance, backend="reference")
    for i in range(6):
        for k in range(9):
            torch.testing.assert_close(mat[i, k], naive.value(x[i], r[k], distance, True), **TOL)


# ------------------------------------------------------------------ gradcheck (float64) on every loss

GRADCHECK = {
    "multi_similarity": lambda e, y: F.multi_similarity_loss(e, y, beta=10, backend="reference"),
    "multi_similarity_mined": lambda e, y: F.multi_similarity_loss(e, y, beta=10, epsilon=0.1, backend="reference"),
    "lifted": lambda e, y: F.lifted_structure_loss(e, y, backend="reference"),
    "generalized_lifted": lambda e, y: F.generalized_lifted_structure_loss(e, y, backend="reference"),
    "n_pairs": lambda e, y: F.n_pairs_loss(e, y, backend="reference"),
    "contrastive": lambda e, y: F.contrastive_loss(e, y, neg_margin=1.5, backend="reference"),
    "triplet": lambda e, y: F.triplet_margin_loss(e, y, margin=0.5, backend="reference"),
    "triplet_batch_hard": lambda e, y: F.triplet_margin_loss(e, y, margin=0.5, mining="batch_hard",
                                                             backend="reference"),
}


@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck_pair_losses(name):
    x, y = make("random", n=8, d=4)
    assert torch.autograd.gradcheck(lambda e: GRADCHECK[name](e, y), (x.requires_grad_(),))


@pytest.mark.parametrize("loss", ["nca", "anchor"])
def test_gradcheck_proxy_losses(loss):
    x, y = make("random", n=7, d=4)
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    fn = {"nca": lambda e, q: F.proxy_nca_loss(e, y, q, softmax_scale=2, backend="reference"),
          "anchor": lambda e, q: F.proxy_anchor_loss(e, y, q, alpha=4, backend="reference")}[loss]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), p))
