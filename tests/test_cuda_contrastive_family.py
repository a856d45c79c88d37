"""The contrastive family on the CUDA ``pair_terms`` kernels (csrc/cuda/pair_terms_ops.cu; Python forms in
dml_kernels/backends/cpp/pair_terms.py, registered for backend="cuda"): NT-Xent, Circle, ThresholdConsistentMargin,
IntraPairVariance, TupletMargin, SNR contrastive, MarginLoss. GPU only: every test skips without a CUDA device or
without the compiled CUDA kernels of pair_terms (the reason is given). Written to run on a GPU; not yet run on one.

backend="cuda" equals the float64 reference (values and gradients to x, ref_emb and MarginLoss's β) in fp64 at
1e-9 and in fp32 within fp32 error, on the label patterns and with ref_emb at tile edges (33 / 65 rows); bf16
inputs at temperature 0.01 give finite values and gradients; the CUDA op equals the CPU op (sums, counts,
gradients); forward + backward at N = 16384 allocate far less than one N×N fp32 matrix; no host sync (CUDA-graph
capture of forward + backward).
"""
import pytest
import torch

import dml_kernels as dk
from dml_kernels.backends.cpp import loader
from patterns import PATTERNS

F = dk.functional


def _why():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    why = loader.unavailable_reason("cuda")
    if why is None and not torch._C._dispatch_has_kernel_for_dispatch_key("dml_kernels::pair_terms", "CUDA"):
        why = "the CUDA extension has no pair_terms kernel"
    return why


_WHY = _why()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA pair_terms kernels unavailable: {_WHY}")

# case: (functional, kwargs, takes ref_emb); "beta" marks MarginLoss (β is an input)
CASES = {
    "ntxent": (F.ntxent_loss, dict(temperature=0.1), True),
    "ntxent/euclidean": (F.ntxent_loss, dict(distance="euclidean", temperature=0.5), True),
    "circle": (F.circle_loss, dict(gamma=30), True),
    "tcm": (F.threshold_consistent_margin_loss, dict(margin_plus=0.3, margin_minus=-0.1), False),
    "ipv": (F.intra_pair_variance_loss, dict(pos_eps=0.1), True),
    "ipv/euclidean": (F.intra_pair_variance_loss, dict(distance="euclidean"), True),
    "ipv/sq-raw": (F.intra_pair_variance_loss, dict(distance="squared_euclidean", normalize_embeddings=False), True),
    "tuplet": (F.tuplet_margin_loss, dict(scale=16), True),
    "snr": (F.signal_to_noise_ratio_contrastive_loss, dict(neg_margin=1.1), True),
    "margin": (F.margin_loss, dict(beta="class", learn_beta=True, nu=0.2), True),
    "margin/cosine": (F.margin_loss, dict(beta="scalar", distance="cosine", margin=0.1), True),
}


def _fn(case, classes):
    fn, kw, _ = CASES[case]
    kw = dict(kw)
    if "beta" not in kw:
        return (lambda e, *r, backend, **more: fn(e, *r, backend=backend, **kw, **more)), []
    kind = kw.pop("beta")
    beta = torch.full((1,), 0.8, dtype=torch.float64) if kind == "scalar" else torch.linspace(
        0.6, 1.2, classes, dtype=torch.float64)
    return (lambda b, e, *r, backend, **more: fn(e, *r, beta=b, backend=backend, **kw, **more)), [beta]


def _run(case, x, y, r, ry, backend, device, dtype):
    classes = int(max(y.max(), -1 if ry is None else ry.max())) + 1
    fn, extra = _fn(case, classes)
    leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in extra + [x] + ([] if r is None else [r])]
    yy, rry = y.to(device), (None if ry is None else ry.to(device))

    def call(*t):
        return fn(*t, yy, backend=backend) if r is None else fn(*t[:-1], yy, None, t[-1], rry, backend=backend)

    out = call(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach().double().cpu(), [torch.zeros_like(t) if g is None else g.detach().double().cpu()
                                         for g, t in zip(grads, leaves)]


def _compare(case, x, y, r=None, ry=None, dtype=torch.float64, tol=1e-9):
    v0, g0 = _run(case, x, y, r, ry, "reference", "cpu", torch.float64)
    v1, g1 = _run(case, x, y, r, ry, "cuda", "cuda", dtype)
    scale = max(1.0, abs(float(v0)))
    assert abs(float(v1) - float(v0)) <= tol * scale, (float(v1), float(v0))
    for a, b in zip(g1, g0):
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def _data(n, d, m=None, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if m is None:
        return x, y, None, None
    return x, y, torch.randn(m, d, dtype=torch.float64, generator=g), torch.randint(0, classes, (m,), generator=g)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fp64_patterns(case, pattern):
    y = PATTERNS[pattern](37)
    x = torch.randn(len(y), 19, dtype=torch.float64, generator=torch.Generator().manual_seed(len(y)))
    _compare(case, x, y)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
@pytest.mark.parametrize("shape", [(33, 65), (65, 33), (1, 40)], ids=str)
def test_fp64_ref_emb_tile_edges(case, shape):
    x, y, r, ry = _data(shape[0], 35, shape[1], classes=4, seed=sum(shape))
    _compare(case, x, y, r, ry)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32(case):
    """fp32 kernels within fp32 error of the fp64 reference (sums over ~10^4 pairs: 2e-4 relative)."""
    x, y, r, ry = _data(130, 64, 97, classes=5, seed=1)
    _compare(case, x, y, None, None, dtype=torch.float32, tol=2e-4)
    if CASES[case][2]:
        _compare(case, x, y, r, ry, dtype=torch.float32, tol=2e-4)


@pytest.mark.parametrize("case", ["ntxent", "circle", "tuplet", "ipv", "snr", "margin"])
def test_bf16_finite_at_low_temperature(case):
    """bf16 inputs (upcast, fp32 accumulation) at temperature 0.01 / γ = 256 / scale 100: finite value and
    gradients."""
    x, y, _, _ = _data(256, 32, classes=8, seed=2)
    fn, kw, _ = CASES[case]
    kw = {k: v for k, v in kw.items() if k != "beta"}
    kw.update({"ntxent": dict(temperature=0.01), "circle": dict(gamma=256), "tuplet": dict(scale=100)}.get(case, {}))
    e = x.to("cuda", torch.bfloat16).requires_grad_()
    more = dict(beta=torch.ones(8, device="cuda")) if case == "margin" else {}
    loss = fn(e, y.cuda(), backend="cuda", **kw, **more)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad.float()).all()


def test_cuda_op_equals_cpu_op():
    """The same op on both devices: sums, counts, and the three gradients (q, r, row_stats)."""
    from dml_kernels.backends.cpp import pair_terms as PT

    x, y, r, ry = _data(70, 24, 45, classes=4, seed=3)
    x = x / x.norm(dim=1, keepdim=True) * 0.9
    r = r / r.norm(dim=1, keepdim=True) * 0.9
    cases = [(PT.VALUES, [], 0, 0), (PT.NTXENT, [3.0], 1, 1), (PT.CIRCLE, [0.25, 8.0], 0, 0), (PT.TCM, [0.3, 0.0], 0, 0),
             (PT.IPV, [-1.0, 0.9, 1.0, -1.1], 2, 2), (PT.TUPLET, [8.0, 0.99, 0.1], 1, 0), (PT.SNR, [0.3, 1.2], 1, 2),
             (PT.MARGIN, [1.0, 0.2], 1, 1)]
    for loss, params, k, dist in cases:
        stats = torch.rand(k, 70, dtype=torch.float64) + 0.5
        outs = []
        for dev in ("cpu", "cuda"):
            leaves = [t.to(dev).requires_grad_() for t in (x, r, stats)]
            sums, cnt = PT.pair_terms(leaves[0], leaves[1], y.to(dev), ry.to(dev), (None, None), dist, loss, params,
                                      leaves[2])
            grads = torch.autograd.grad((sums * torch.linspace(0.5, 1.5, 70, device=dev)).sum(), leaves,
                                        allow_unused=True)
            outs.append([sums.cpu(), cnt.cpu()] + [None if g is None else g.cpu() for g in grads])
        assert torch.equal(outs[0][1], outs[1][1])
        for a, b in zip(outs[0][:1] + outs[0][2:], outs[1][:1] + outs[1][2:]):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["ntxent", "circle", "ipv", "tuplet", "snr", "margin"])
def test_memory_far_below_one_matrix(case):
    """Forward + backward at N = 16384, D = 128 fp32: peak allocation < 1/8 of one N×N fp32 matrix (1 GiB)."""
    n = 16384
    x = torch.randn(n, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (n,), device="cuda")
    fn, extra = _fn(case, 1000)
    extra = [t.to("cuda", torch.float32).requires_grad_() for t in extra]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*extra, x, y, backend="cuda", check_inputs=False).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n * n * 4 / 8


@pytest.mark.parametrize("case", ["ntxent", "circle", "tcm", "ipv", "tuplet", "snr", "margin"])
def test_no_host_sync_under_graph_capture(case):
    """Forward + backward capture into a CUDA graph (a host sync would raise during capture)."""
    x, y, _, _ = _data(64, 16, classes=4, seed=4)
    fn, extra = _fn(case, 4)
    leaves = [t.to("cuda", torch.float32).requires_grad_() for t in extra + [x]]
    yy = y.cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (allocations, registration) outside the graph
        fn(*leaves, yy, backend="cuda", check_inputs=False).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*leaves, yy, backend="cuda", check_inputs=False).backward()
    graph.replay()
    torch.cuda.synchronize()
