"""CPU target check for the C++ backend (not a test): MS loss with fused mining (epsilon=0.1), fp32.

  python benchmarks/cpu_target.py [--threads 2] [--b 4096] [--d 256] [--mem-b 16384] [--mem-d 128]

1. time forward+backward, cpu backend vs reference backend (torch.utils.benchmark, median);
2. peak extra resident memory of forward+backward at B=mem-b, D=mem-d, vs one B×B fp32 matrix
   (Linux: VmHWM reset through /proc/self/clear_refs). Target: speed-up ≥ 2×, memory ≤ ¼ B×B.
"""
import argparse
import json
import subprocess
import sys

import torch
import torch.utils.benchmark as benchmark

import dml_kernels as dk


def step(x, y, backend):
    xr = x.detach().requires_grad_()
    dk.functional.multi_similarity_loss(xr, y, epsilon=0.1, backend=backend).backward()
    return xr.grad


def peak_extra(fn):
    def read(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = read("VmRSS:")
    fn()
    return read("VmHWM:") - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--b", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--mem-b", type=int, default=16384)
    ap.add_argument("--mem-d", type=int, default=128)
    ap.add_argument("--skip-reference-memory", action="store_true")
    ap.add_argument("--memory-only", choices=["cpu", "reference"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.memory_only:
        xm = torch.randn(a.mem_b, a.mem_d)
        ym = torch.randint(0, a.mem_b // 8, (a.mem_b,))
        step(xm[:64], ym[:64], a.memory_only)  # load the library, start the thread pool
        print(peak_extra(lambda: step(xm, ym, a.memory_only)) / 2**20)
        return
    x = torch.randn(a.b, a.d)
    y = torch.randint(0, a.b // 8, (a.b,))
    g_cpu, g_ref = step(x, y, "cpu"), step(x, y, "reference")
    out = {"threads": a.threads, "B": a.b, "D": a.d, "max_abs_grad_diff": (g_cpu - g_ref).abs().max().item()}
    for backend in ("cpu", "reference"):
        t = benchmark.Timer("step(x, y, backend)", globals=dict(step=step, x=x, y=y, backend=backend),
                            num_threads=a.threads).blocked_autorange(min_run_time=3)
        out[f"{backend}_median_s"] = t.median
    out["speedup"] = out["reference_median_s"] / out["cpu_median_s"]
    out["mem_B"], out["mem_D"] = a.mem_b, a.mem_d
    out["BxB_fp32_MiB"] = a.mem_b * a.mem_b * 4 / 2**20
    backends = ["cpu"] + ([] if a.skip_reference_memory else ["reference"])
    for backend in backends:  # each in a fresh process, so earlier runs' freed pages do not hide the peak
        cmd = [sys.executable, __file__, "--memory-only", backend, "--threads", str(a.threads),
               "--mem-b", str(a.mem_b), "--mem-d", str(a.mem_d)]
        out[f"{backend}_peak_extra_MiB"] = float(subprocess.run(cmd, check=True, capture_output=True,
                                                                text=True).stdout.split()[-1])
    out["cpu_peak_over_BxB"] = out["cpu_peak_extra_MiB"] / out["BxB_fp32_MiB"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
