"""Time and peak memory of the proxy losses, triton vs reference, on one CUDA GPU (not run in CI).

``python -m dml_kernels.triton.proxy_bench --B 512 --D 128 --C 1000 100000 1000000 --dtype bfloat16``
prints one line per (loss, backend, C): forward ms, forward+backward ms, and the peak memory above the
inputs (op-level delta, as Cut Cross-Entropy's benchmark measures it). An out-of-memory is reported as such.
"""
from __future__ import annotations

import argparse
import sys

import torch


def _measure(fn, iters):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(backward=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = {}
    for mode in (False, True):
        fn(backward=mode)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(backward=mode)
        end.record()
        torch.cuda.synchronize()
        times[mode] = start.elapsed_time(end) / iters
    return times[False], times[True], peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--C", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["triton", "reference"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from .. import functional as F

    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()} B={args.B} D={args.D} dtype={args.dtype}")
    print("loss,backend,C,forward_ms,forward_backward_ms,peak_extra_MB")
    for c in args.C:
        x = torch.randn(args.B, args.D, device="cuda", dtype=dtype, requires_grad=True)
        p = torch.randn(c, args.D, device="cuda", requires_grad=True)
        y = torch.randint(0, c, (args.B,), device="cuda")
        for name, loss in (("proxy_nca", F.proxy_nca_loss), ("proxy_anchor", F.proxy_anchor_loss)):
            for backend in args.backends:
                def fn(backward, loss=loss, backend=backend):
                    v = loss(x, y, p, backend=backend, check_inputs=False)
                    if backward:
                        torch.autograd.grad(v, (x, p))
                try:
                    fwd, both, peak = _measure(fn, args.iters)
                    print(f"{name},{backend},{c},{fwd:.3f},{both:.3f},{peak / 2**20:.1f}", flush=True)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name},{backend},{c},OOM,OOM,OOM", flush=True)
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
