"""SupConLoss on the cuda backend (``backends/cpp/contrastive_losses.supcon_loss``: one ``pair_reduce`` — CUDA
kernels — plus the positive-pair row sums from class sums). GPU only: every test skips without a CUDA device or
without the compiled CUDA kernels (the reason is given). Not yet run on a GPU when written.

Against the float64 reference on the SPEC §5 label patterns and the distances the form takes (a similarity, the
squared euclidean distance; raw or normalised), with ref_emb; fp32 within fp32 rounding of the float64 value;
the same as the cpu backend; no host sync (CUDA-graph capture of forward + backward).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels.backends.cpp import loader
from patterns import PATTERNS, make

F = dk.functional


def _why():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return loader.unavailable_reason("cuda")


_WHY = _why()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA extension backend unavailable: {_WHY}")
DISTANCES = {"cosine": dict(), "dot/raw": dict(distance="dot", normalize_embeddings=False),
             "squared_euclidean": dict(distance="squared_euclidean"),
             "squared_euclidean/raw": dict(distance="squared_euclidean", normalize_embeddings=False)}


def _run(tensors, labels, backend, device, dtype, **kw):
    leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in tensors]
    lab = [y.to(device) for y in labels]
    if len(leaves) == 2:
        kw = dict(kw, ref_emb=leaves[1], ref_labels=lab[1])
    out = F.supcon_loss(leaves[0], lab[0], backend=backend, **kw)
    grads = (torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves))
    return out.detach().cpu().double(), [(torch.zeros_like(t) if g is None else g).detach().cpu().double()
                                         for g, t in zip(grads, leaves)]


def _compare(tensors, labels, dtype, backend="cuda", **kw):
    """float64: the reference at 1e-9. float32: no worse than the reference in float32 — each error (value,
    every gradient) against the float64 reference at most 4× the float32 reference's own, or 1e-6 of the scale."""
    v0, g0 = _run(tensors, labels, "reference", "cpu", torch.float64, **kw)
    v1, g1 = _run(tensors, labels, backend, "cuda", dtype, **kw)
    if dtype == torch.float64:
        for a, b in zip([v1, *g1], [v0, *g0]):
            torch.testing.assert_close(a, b, **FP64)
        return
    v2, g2 = _run(tensors, labels, "reference", "cpu", dtype, **kw)
    for got, ref32, want in zip([v1, *g1], [v2, *g2], [v0, *g0]):
        err, err_ref = float((got - want).abs().max()), float((ref32 - want).abs().max())
        assert err <= 4 * err_ref + 1e-6 * max(1.0, float(want.abs().max())), (err, err_ref)


FP64 = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_self(pattern, distance, dtype):
    torch.manual_seed(0)
    x, y = make(pattern, n=37, d=19)
    _compare([x], [y], dtype, temperature=0.3, **DISTANCES[distance])


@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_ref_emb(distance, dtype):
    """Queries against references whose labels only partly overlap (ids above N + M: the class slots are N + M,
    indexed by dense ids, never by the label values)."""
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(45, 17, dtype=torch.float64, generator=g), torch.randn(70, 17, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 6, (45,), generator=g), torch.randint(0, 9, (70,), generator=g)
    ry[::7] = 150 + torch.arange(10)
    _compare([x, r], [y, ry], dtype, **DISTANCES[distance])


def test_same_as_cpu_backend():
    torch.manual_seed(2)
    x, y = make("random", n=64, d=8)
    _compare([x], [y], torch.float64)
    v_cpu, g_cpu = _run([x], [y], "cpu", "cpu", torch.float64)
    v_gpu, g_gpu = _run([x], [y], "cuda", "cuda", torch.float64)
    torch.testing.assert_close(v_gpu, v_cpu, **FP64)
    torch.testing.assert_close(g_gpu[0], g_cpu[0], **FP64)


def test_no_host_sync_cuda_graph_capture():
    """Forward + backward captured in a CUDA graph (a host sync raises during capture); the replay's gradient is
    the eager one."""
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 16, (256,), device="cuda")

    def step():
        loss = F.supcon_loss(x, y, backend="cuda", check_inputs=False)
        return torch.autograd.grad(loss, x)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step())


def test_no_host_sync_debug_mode():
    """The same with torch's sync debug mode set to raise on any synchronising call."""
    x = torch.randn(128, 32, device="cuda", requires_grad=True)
    r = torch.randn(96, 32, device="cuda")
    y, ry = torch.randint(0, 8, (128,), device="cuda"), torch.randint(0, 12, (96,), device="cuda")
    F.supcon_loss(x, y, ref_emb=r, ref_labels=ry, backend="cuda", check_inputs=False).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.supcon_loss(x, y, ref_emb=r, ref_labels=ry, backend="cuda", check_inputs=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
