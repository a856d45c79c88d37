# python benchmarks/grouped_weight_layouts.py  (2-core CPU; a scratch comparison outside the bench harness)
"""SubCenterArcFace / SoftTriple at B=256, D=256, C=16384 classes x K=2 (C·K=32768), fp32 fwd+bwd, 2 threads:
W in PML's own layout (a contiguous D×C·K parameter, what dk.losses modules hold) vs the benchmark's transposed view.
check_inputs=False for every provider, as the bench harness (no value checks: what a training loop runs); min of 6."""
import time, torch, dml_kernels as dk
torch.set_num_threads(2)
F = dk.functional
B, D, C, K = 256, 256, 16384, 2
g = torch.Generator().manual_seed(0)
x = torch.randn(B, D, generator=g).requires_grad_()
y = torch.randint(0, C, (B,), generator=g)
Wp = torch.randn(D, C * K, generator=g).requires_grad_()                 # PML layout
Wt = torch.randn(C * K, D, generator=g).t().detach().requires_grad_()    # benchmark's layout (transposed view)
def run(op, W, backend, kw):
    fn = getattr(F, op)
    def step():
        loss = fn(x, y, W, backend=backend, check_inputs=False, **kw)
        loss.backward()
    return step
def tmin(step, n=6):
    step(); step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return min(ts) * 1e3
for op, kw in (("subcenter_arcface_loss", dict(sub_centers=K)), ("soft_triple_loss", dict(centers_per_class=K))):
    for name, W in (("PML layout D×C·K", Wp), ("transposed view", Wt)):
        ref = run(op, W, "reference", kw)
        comp_fn = torch.compile(lambda: getattr(F, op)(x, y, W, backend="reference", check_inputs=False, **kw))
        def comp():
            comp_fn().backward()
        print(f"{op:24s} {name:18s} cpu {tmin(run(op, W, 'cpu', kw)):7.1f} ms  reference {tmin(ref):7.1f}  compile {tmin(comp):7.1f}", flush=True)
