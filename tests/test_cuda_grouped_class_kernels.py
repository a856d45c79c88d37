"""The CUDA kernels of the grouped-column op pair (csrc/cuda/grouped_class_ops.cu) behind backend="cuda"'s
SubCenterArcFace / SoftTriple (dml_kernels/backends/cpp/grouped_kernels.py). GPU only: every test skips without a
CUDA device or without the compiled CUDA kernels (the reason is given). The same Python functions are tested on the
op's CPU implementation in tests/test_cpp_grouped_class_kernels.py.

backend="cuda" against the float64 reference (fp64 tight; fp32 by the no-worse-than-the-reference-in-fp32 rule),
class tiles that split and do not split K (K = 1, 2, 3, 10), row / class counts off the 32-tile, W in PML's D×C·K
layout and transposed, fp16/bf16 embeddings with fp32 weights (autocast), gradcheck, opcheck, agreement with the
CPU kernel, no host sync under CUDA-graph capture, and memory at large C (no B×C·K buffer).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels.backends.cpp import loader

F = dk.functional


def _why():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    why = loader.unavailable_reason("cuda")
    if why is None and not loader.has_kernel("grouped_class_rows", "cuda"):
        why = "the loaded extension has no grouped_class_rows CUDA kernel (rebuild it)"
    return why


_WHY = _why()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA grouped-column kernels unavailable: {_WHY}")
TIGHT = dict(rtol=1e-10, atol=1e-10)
CASES = [("subcenter_arcface_loss", {"sub_centers": 3, "margin": 28.6, "scale": 16}, 3),
         ("subcenter_arcface_loss", {"sub_centers": 1, "margin": 20.0, "scale": 8}, 1),
         ("soft_triple_loss", {"centers_per_class": 2, "la": 10, "gamma": 0.1, "margin": 0.01}, 2),
         ("soft_triple_loss", {"centers_per_class": 10}, 10),
         ("soft_triple_loss", {"centers_per_class": 3, "la": 4, "gamma": 0.5, "margin": 0.1, "distance": "dot",
                               "normalize_embeddings": False}, 3)]
IDS = ["sc-K3", "sc-K1", "st-K2", "st-K10", "st-dot-K3"]


def _data(b, d, c, k, dtype=torch.float64, colmajor=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=dtype, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    W = torch.randn(c * k, d, dtype=dtype, generator=g).t() if colmajor else torch.randn(d, c * k, dtype=dtype,
                                                                                         generator=g)
    return x, y, W


def _run(op, kw, x, y, W, backend, device, **more):
    xr = x.detach().to(device).clone().requires_grad_()
    Wr = (W.detach().t().to(device).clone().t() if W.stride(0) == 1 else W.detach().to(device).clone())
    Wr.requires_grad_()
    loss = getattr(F, op)(xr, y.to(device), Wr, backend=backend, **kw, **more)
    loss.backward()
    return [t.detach().cpu() for t in (loss, xr.grad, Wr.grad)]


@pytest.mark.parametrize("colmajor", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 5), (33, 9, 70), (65, 70, 3), (130, 17, 41)])
@pytest.mark.parametrize("op,kw,k", CASES, ids=IDS)
def test_fp64_equals_reference(op, kw, k, shape, colmajor):
    b, d, c = shape
    x, y, W = _data(b, d, c, k, colmajor=colmajor)
    got = _run(op, kw, x, y, W, "cuda", "cuda")
    for a, r in zip(got, _run(op, kw, x, y, W, "reference", "cpu")):
        torch.testing.assert_close(a, r, **TIGHT)


@pytest.mark.parametrize("op,kw,k", CASES, ids=IDS)
def test_fp32_no_worse_than_reference_fp32(op, kw, k):
    x, y, W = _data(96, 64, 300, k)
    exact = _run(op, kw, x, y, W, "reference", "cpu")
    ours = _run(op, kw, x.float(), y, W.float(), "cuda", "cuda")
    theirs = _run(op, kw, x.float(), y, W.float(), "reference", "cuda")
    for a, t, e in zip(ours, theirs, exact):
        err_ours, err_ref = (a.double() - e).abs().max(), (t.double() - e).abs().max()
        assert err_ours <= 2 * err_ref + 1e-6 * (1 + e.abs().max()), (float(err_ours), float(err_ref))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_half_embeddings_fp32_weights_and_autocast(op, kw, k, half):
    x, y, W = _data(64, 32, 200, k, dtype=torch.float32)
    xh = x.cuda().to(half).requires_grad_()
    Wc = W.cuda().requires_grad_()
    W0 = Wc.detach().clone()
    with torch.autocast("cuda", dtype=half):
        loss = getattr(F, op)(xh, y.cuda(), Wc, backend="cuda", **kw)
    loss.backward()
    assert loss.dtype == torch.float32 and Wc.grad.dtype == torch.float32 and xh.grad.dtype == half
    assert torch.equal(Wc.detach(), W0)
    ref = _run(op, kw, xh.detach().double().cpu(), y, W.double(), "reference", "cpu")
    torch.testing.assert_close(loss.double().cpu(), ref[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(Wc.grad.double().cpu(), ref[2], rtol=1e-3, atol=1e-4)


def test_gradcheck_opcheck_and_cpu_agreement():
    from dml_kernels.backends.cpp import grouped_kernels
    grouped_kernels.register_ops()
    op = torch.ops.dml_kernels.grouped_class_rows
    for k, mode in ((3, 0), (2, 1), (1, 1)):
        x, y, W = _data(37, 5, 11, k, seed=k)
        x, W, y = x.cuda().requires_grad_(), W.cuda().requires_grad_(), y.cuda()
        params = [3.0, 2.0, 1e-12]
        assert torch.autograd.gradcheck(lambda a, w: op(a, w, y, k, mode, params), (x, W))
        torch.library.opcheck(op, (x, W, y, k, mode, params))
        for a, b in zip(op(x, W, y, k, mode, params), op(x.cpu(), W.cpu(), y.cpu(), k, mode, params)):
            torch.testing.assert_close(a.cpu(), b, **TIGHT)


@pytest.mark.parametrize("op,kw,k", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_no_host_sync_under_graph_capture(op, kw, k):
    x, y, W = _data(64, 32, 500, k, dtype=torch.float32)
    x, y, W = x.cuda().requires_grad_(), y.cuda(), W.cuda().requires_grad_()

    def step():
        loss = getattr(F, op)(x, y, W, backend="cuda", check_inputs=False, **kw)
        return torch.autograd.grad(loss, (x, W))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph (lazy registrations, allocator)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, step()):
        torch.testing.assert_close(a, b)


def test_memory_at_large_classes():
    """B = 4096, D = 128, C·K = 2¹⁸ fp32: the peak extra memory of forward + backward stays far under one B×C·K
    matrix (4 GiB) — W's gradient (128 MiB) and O(B) statistics."""
    b, d, c, k = 4096, 128, 131072, 2
    x = torch.randn(b, d, device="cuda", requires_grad=True)
    W = torch.randn(d, c * k, device="cuda", requires_grad=True)
    y = torch.randint(0, c, (b,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.subcenter_arcface_loss(x, y, W, sub_centers=k, backend="cuda").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * W.numel() * 4, extra  # a few weight-sized buffers at most; B×C·K would be 32× W
