"""The CUDA kernels of the C++ extension (csrc/cuda/) against the float64 reference. GPU only: every test
skips without a CUDA device or without the compiled CUDA kernels (the reason is given).

What runs on a GPU: pairwise_similarity and every pair_reduce-based loss (multi-similarity with and without
fused mining, packed pairs, generalized lifted structure, contrastive, ProxyNCA, ProxyAnchor), fp64 tight,
fp32 by the "no worse than the reference in the same dtype" rule, fp16/bf16 inputs (accumulated in fp32),
gradcheck in fp64, opcheck, no host sync under CUDA-graph capture, agreement with the CPU kernels, and both
roles of the one backward kernel (query rows, reference rows) at tile edges.
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels.backends.cpp import loader
from patterns import DISTANCE_CASES, DISTANCES, PATTERNS, dist_kw, make

F = dk.functional


def _why():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return loader.unavailable_reason("cuda")


_WHY = _why()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA extension backend unavailable: {_WHY}")
TIGHT = dict(rtol=1e-10, atol=1e-10)


def _run(fn, tensors, backend, device):
    leaves = [t.detach().to(device).clone().requires_grad_() for t in tensors]
    out = fn(*leaves, backend=backend)
    grads = torch.autograd.grad(out, leaves) if out.requires_grad else [torch.zeros_like(t) for t in leaves]
    return out.detach().cpu(), [g.detach().cpu() for g in grads]


def _compare(fn, tensors, tol=TIGHT):
    v0, g0 = _run(fn, tensors, "reference", "cpu")
    v1, g1 = _run(fn, tensors, "cuda", "cuda")
    torch.testing.assert_close(v1, v0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)


def _labels(t):
    return t.cuda() if torch.cuda.is_available() else t


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_multi_similarity_fp64_self(pattern, distance, epsilon):
    x, y = make(pattern, n=37, d=19)

    def fn(x, backend):
        return F.multi_similarity_loss(x, y.to(x.device), **dist_kw(distance), epsilon=epsilon, backend=backend)
    _compare(fn, [x])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 130, 33), (130, 7, 2), (65, 300, 70)])
def test_multi_similarity_fp64_ref(distance, epsilon, shape):
    n, m, d = shape
    x, r = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    y, ry = torch.randint(0, 3, (n,)), torch.randint(0, 3, (m,))

    def fn(x, r, backend):
        return F.multi_similarity_loss(x, y.to(x.device), None, r, ry.to(x.device), **dist_kw(distance),
                                       epsilon=epsilon, backend=backend)
    _compare(fn, [x, r])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("shape", [(31, 33), (32, 64), (65, 1), (1, 65), (33, 97)])
def test_backward_both_roles_at_tile_edges(distance, shape):
    """pair_reduce_backward_kernel<T, TRANSPOSED> is one kernel for both roles: query rows against reference
    columns (dq) and, sides swapped, reference rows against query columns (dr). Both at tile edges (32 rows a
    tile), for the LSE kinds (multi-similarity, plain and mined; generalized lifted) and the hinge kind
    (contrastive); a detached reference set (no dr launch) gives the same dq."""
    n, m = shape
    x, r = torch.randn(n, 37, dtype=torch.float64), torch.randn(m, 37, dtype=torch.float64)
    y, ry = torch.randint(0, 3, (n,)), torch.randint(0, 3, (m,))
    kw = dist_kw(distance)
    losses = [
        lambda x, r, backend: F.multi_similarity_loss(x, y.to(x.device), None, r, ry.to(x.device), **kw,
                                                      backend=backend),
        lambda x, r, backend: F.multi_similarity_loss(x, y.to(x.device), None, r, ry.to(x.device), epsilon=0.1,
                                                      **kw, backend=backend),
        lambda x, r, backend: F.generalized_lifted_structure_loss(x, y.to(x.device), None, r, ry.to(x.device),
                                                                  **kw, backend=backend),
        lambda x, r, backend: F.contrastive_loss(x, y.to(x.device), None, r, ry.to(x.device), pos_margin=0.1,
                                                 neg_margin=0.9, **kw, backend=backend),
    ]
    for fn in losses:
        _compare(fn, [x, r])
        _compare(lambda x, backend: fn(x, r.to(x.device), backend), [x])


def test_multi_similarity_packed_pairs():
    x, y = make("random", n=45, d=9)
    mask = F.multi_similarity_mask(x, y, epsilon=0.3, backend="reference")

    def fn(x, backend):
        return F.multi_similarity_loss(x, None, mask.to(x.device), backend=backend)
    _compare(fn, [x])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
def test_other_pair_reduce_losses(distance):
    x, y = make("random", n=50, d=12)
    p = torch.randn(7, 12, dtype=torch.float64)
    cases = [
        lambda x, backend: F.generalized_lifted_structure_loss(x, y.to(x.device), **dist_kw(distance), backend=backend),
        lambda x, backend: F.contrastive_loss(x, y.to(x.device), **dist_kw(distance), pos_margin=0.1, neg_margin=0.9,
                                              backend=backend),
    ]
    for fn in cases:
        _compare(fn, [x])
    yp = y % 7
    for exclude in (False, True):
        _compare(lambda x, p, backend: F.proxy_nca_loss(x, yp.to(x.device), p, exclude_positive=exclude,
                                                        **dist_kw(distance), backend=backend), [x, p])
    _compare(lambda x, p, backend: F.proxy_anchor_loss(x, yp.to(x.device), p, **dist_kw(distance), backend=backend),
             [x, p])


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [True, False])
def test_pairwise_similarity(distance, normalize):
    x, r = torch.randn(70, 33, dtype=torch.float64), torch.randn(45, 33, dtype=torch.float64)
    w = torch.randn(70, 45, dtype=torch.float64)

    def fn(x, r, backend):
        return (F.pairwise_similarity(x, r, distance, normalize_embeddings=normalize, backend=backend)
                * w.to(x.device)).sum()
    _compare(fn, [x, r])


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_fp32_and_low_precision(epsilon, distance):
    x32 = torch.randn(300, 64)
    y = torch.randint(0, 20, (300,))

    def fn(x, backend):
        return F.multi_similarity_loss(x, y.to(x.device), epsilon=epsilon, distance=distance, backend=backend)

    exact, exact_g = _run(fn, [x32.double()], "reference", "cpu")
    ref32, ref32_g = _run(fn, [x32], "reference", "cuda")
    ours, ours_g = _run(fn, [x32], "cuda", "cuda")
    for a, b, t in zip([ours] + ours_g, [ref32] + ref32_g, [exact] + exact_g):
        err, err_ref = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-6 * max(1.0, t.abs().max().item()), (err, err_ref)
    for dt in (torch.float16, torch.bfloat16):
        xl = x32.to(dt)
        exact, exact_g = _run(fn, [xl.double()], "reference", "cpu")
        ref_l, ref_l_g = _run(fn, [xl], "reference", "cuda")
        ours, ours_g = _run(fn, [xl], "cuda", "cuda")
        assert ours.dtype == torch.float32
        for a, b, t in zip([ours] + ours_g, [ref_l] + ref_l_g, [exact] + exact_g):
            err, err_ref = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
            assert err <= err_ref + 1e-3 * max(1.0, t.abs().max().item()), (dt, err, err_ref)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("ref", [False, True])
def test_miners(pattern, distance, ref):
    x, y = make(pattern, n=45, d=7)
    r, ry = (torch.randn(70, 7, dtype=torch.float64), torch.randint(0, 3, (70,))) if ref else (None, None)
    args0 = (x, y, r, ry)
    args1 = tuple(None if t is None else t.cuda() for t in args0)
    hp0, hn0 = F.multi_similarity_thresholds(*args0, distance=distance, backend="reference")
    hp1, hn1 = F.multi_similarity_thresholds(*args1, distance=distance, backend="cuda")
    torch.testing.assert_close((hp1.cpu(), hn1.cpu()), (hp0, hn0), **TIGHT)
    for eps in (0.0, 0.1, 0.5):
        m0 = F.multi_similarity_mask(*args0, epsilon=eps, distance=distance, backend="reference")
        m1 = F.multi_similarity_mask(*args1, epsilon=eps, distance=distance, backend="cuda")
        assert torch.equal(m1.pos_bits.cpu(), m0.pos_bits) and torch.equal(m1.neg_bits.cpu(), m0.neg_bits)
    b0 = F.batch_hard_mining(*args0, distance=distance, backend="reference")
    b1 = F.batch_hard_mining(*args1, distance=distance, backend="cuda")
    assert torch.equal(b1[0].cpu(), b0[0]) and torch.equal(b1[1].cpu(), b0[1])


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", DISTANCE_CASES)
def test_n_pairs(pattern, distance):
    x, y = make(pattern, n=40, d=6)

    def fn(x, backend):
        return F.n_pairs_loss(x, y.to(x.device), **dist_kw(distance), backend=backend)
    _compare(fn, [x])


@pytest.mark.parametrize("distance", DISTANCE_CASES)
@pytest.mark.parametrize("swap", [False, True])
def test_triplet_batch_hard(distance, swap):
    x, y = make("random", n=40, d=6)

    def fn(x, backend):
        return F.triplet_margin_loss(x, y.to(x.device), mining="batch_hard", swap=swap, **dist_kw(distance),
                                     backend=backend)
    _compare(fn, [x])


def test_matches_cpu_kernels_at_size():
    x = torch.randn(1000, 128, dtype=torch.float64)
    y = torch.randint(0, 50, (1000,))

    def fn(x, backend):
        return F.multi_similarity_loss(x, y.to(x.device), epsilon=0.1, backend=backend)
    v_cpu, g_cpu = _run(fn, [x], "cpu", "cpu")
    v_gpu, g_gpu = _run(fn, [x], "cuda", "cuda")
    torch.testing.assert_close(v_gpu, v_cpu, **TIGHT)
    torch.testing.assert_close(g_gpu[0], g_cpu[0], **TIGHT)


def test_gradcheck_fp64():
    x = torch.randn(9, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(6, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    y, ry = _labels(torch.tensor([0, 1, 0, 2, 1, 1, 0, 2, 2])), _labels(torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.autograd.gradcheck(lambda x: F.multi_similarity_loss(x, y, epsilon=0.5, backend="cuda"), (x,))
    assert torch.autograd.gradcheck(
        lambda x, r: F.multi_similarity_loss(x, y, None, r, ry, distance="euclidean", backend="cuda"), (x, r))
    assert torch.autograd.gradcheck(lambda x, r: F.pairwise_similarity(x, r, "euclidean", backend="cuda"), (x, r))


def test_opcheck():
    q = torch.randn(40, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(33, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    y, ry = torch.randint(0, 3, (40,), device="cuda"), torch.randint(0, 3, (33,), device="cuda")
    ops = torch.ops.dml_kernels
    torch.library.opcheck(ops.pair_values.default, (q, r, 1))
    torch.library.opcheck(ops.pair_reduce.default, (q, None, y, None, None, None, 0, 1, -2.0, 0.5, 50.0, 0.5, 0.1))
    torch.library.opcheck(ops.pair_reduce.default, (q, r, y, ry, None, None, 2, 2, -1.0, 0.1, 1.0, 0.9, None))


def test_no_host_sync_cuda_graph_capture():
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 16, (256,), device="cuda")

    def step():
        loss = F.multi_similarity_loss(x, y, epsilon=0.1, backend="cuda", check_inputs=False)
        return torch.autograd.grad(loss, x)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step())
