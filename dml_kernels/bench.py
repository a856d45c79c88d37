"""``python -m dml_kernels bench``: speed and peak extra memory of every op × provider over size sweeps.

Providers: each dml_kernels backend that can run the op on the device (never the Triton interpreter on
CPU), ``reference``, ``compile`` (``torch.compile`` of the reference; compile time recorded separately
as ``compile_s`` and excluded), and ``pml`` (the equivalent pytorch-metric-learning 2.9 pipeline, when
installed). For each cell (op, variant, provider, dtype, size) it records forward, backward and
forward+backward time and the peak memory the op needs on top of its inputs.

How (see ``benchmarks/README.md``):

* GPU: ``triton.testing.do_bench`` (warm-up, L2 flushed before every call, median with 20/80 %
  quantiles) for forward and forward+backward; backward alone by CUDA events around ``autograd.grad``
  after an untimed forward, median. Memory: ``torch.cuda.max_memory_allocated()`` during one
  forward+backward minus the memory allocated before it (inputs excluded, gradients included).
  One worker subprocess per op, so a crashed CUDA context loses one op, not the sweep.
* CPU: every cell runs in a fresh forked process with an address-space limit (so an OOM is recorded,
  never the machine's OOM killer). Memory first: malloc returns every freed block ≥ 64 KiB to the OS
  (``mallopt``), one warm-up call, then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``)
  and ``VmHWM − VmRSS(before)`` over one forward+backward is the peak extra memory. Then
  ``torch.utils.benchmark.Timer`` (median of ``blocked_autorange``) for forward and forward+backward,
  and the median of timed ``autograd.grad`` calls after untimed forwards for backward, with
  ``torch.set_num_threads`` = the machine's cores.
* Inputs are rotated between several copies (together ≥ 2× the last-level cache) so caches do not
  flatter small sizes. Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` accumulation).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

from . import bench_cases as bc

RECORD_KEYS = ("op", "variant", "provider", "device", "dtype", "B", "M", "C", "D", "fwd_ms", "bwd_ms",
               "fwd_bwd_ms", "peak_extra_bytes", "status", "commit", "torch", "triton", "date")
CELL_KEY = ("op", "variant", "provider", "dtype", "B", "M", "C", "D")
DEFAULT_OUT = os.path.join("benchmarks", "results")


# --------------------------------------------------------------------------- environment


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dml_kernels", "csrc"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _slugify(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def device_slug(device):
    if device == "cuda":
        name = torch.cuda.get_device_name(0)  # e.g. "NVIDIA H100 80GB HBM3"
        words = _slugify(name).split("-")
        return "-".join(words[:2]) if words[0] == "nvidia" else _slugify(name)
    model = _slugify(_cpu_model().replace("(R)", "").replace("(TM)", ""))
    model = re.sub(r"-(\d+-core-)?processor$", "", model)
    return f"cpu-{model}-{_cores()}c"


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else f"{_cpu_model()} ({_cores()} cores)"


def _llc_bytes(device):
    if device == "cuda":
        try:
            return int(torch.cuda.get_device_properties(0).L2_cache_size)
        except Exception:  # noqa: BLE001
            return 50 << 20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            s = open(os.path.join(base, idx, "size")).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def _mem_available():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _status_kb(*fields):
    out = {}
    for line in open("/proc/self/status"):
        k = line.split(":", 1)[0]
        if k in fields:
            out[k] = int(line.split()[1]) * 1024
    return out


# --------------------------------------------------------------------------- providers


def providers_for(case, device_type, have_pml):
    """[(provider, why-not or None)] for this case on this device, in table order."""
    from . import _backends

    out = []
    fused = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}.get(device_type, ())
    for b in fused:
        why = _backends.unavailable_reason(b, device_type)
        if why is None and b not in _backends.implemented(case.op):
            why = f"op {case.op} has no {b!r} implementation yet"
        out.append((b, why))
    out.append(("reference", None))
    out.append(("compile", None))
    out.append(("pml", None if have_pml and case.pml is not None else
                ("pytorch-metric-learning is not installed" if not have_pml else "no PML equivalent")))
    order = {p: i for i, p in enumerate(bc.PROVIDERS_ORDER)}
    return sorted(out, key=lambda pw: order.get(pw[0], 99))


def _have_pml():
    try:
        import pytorch_metric_learning  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


def build_runner(case, provider, inputs):
    """(run() -> scalar tensor, leaves to differentiate) for one input set."""
    if provider == "pml":
        return bc.pml_runner(case, inputs)
    if provider == "compile":
        raise AssertionError("compile runners are built per case (see _compiled)")
    return (lambda: case.dk(inputs, provider)), bc.leaves(inputs)


def _compiled(case):
    """torch.compile of the reference path (dml_kernels functional → reference op), shapes static."""
    def ref_call(tensors):
        return case.dk(tensors, "reference")

    return torch.compile(ref_call, dynamic=False)


def _failure_status(e):
    """"oom", "skipped" (the backend declined this argument combination or cannot run here) or "error"."""
    from . import _backends

    if _is_oom(e):
        return "oom"
    if isinstance(e, (_backends.Unsupported, _backends.BackendUnavailable)):
        return "skipped"
    return "error"


def _is_oom(e):
    if isinstance(e, MemoryError):
        return True
    if torch.cuda.is_available() and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return ("out of memory" in msg.lower() or "can't allocate memory" in msg or "Cannot allocate memory" in msg
            or "std::bad_alloc" in msg)


# --------------------------------------------------------------------------- timing


def _cpu_time(fn, budget_s, t_est):
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=max(budget_s, 3 * t_est))
    return m.median * 1e3, len(m.times), min(m.times) * 1e3


def _manual_bwd(runs, reps, cuda):
    """Median ms of the backward alone: per rep, an untimed forward on the next input set (rotating), then
    a timed autograd.grad of its leaves."""
    times = []
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if cuda else None
    for i in range(reps):
        fn, leaves = runs[i % len(runs)]
        out = fn()
        if cuda:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.autograd.grad(out, leaves, allow_unused=True)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            torch.autograd.grad(out, leaves, allow_unused=True)
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    times.sort()
    return times[len(times) // 2]


def _rotating(sets, make_fn):
    """A no-arg callable that cycles through the input sets (so caches do not flatter)."""
    fns = [make_fn(s) for s in sets]
    it = itertools.cycle(fns)
    return lambda: next(it)()


# --------------------------------------------------------------------------- one cell (in-process)


def measure_cell(job, device, time_budget_s):
    """Measure one (case, provider, dtype, size) in this process; returns the record's measured fields."""
    case = bc.CASES[job["case"]]
    provider = job["provider"]
    B, M, C, D = job["B"], job["M"], job["C"], job["D"]
    dtype = getattr(torch, job["dtype"])
    cuda = device == "cuda"
    res = {}

    base_inputs = bc.make_inputs(case, B, M, C, D, dtype, device, seed=0)
    per_set = bc.input_bytes(base_inputs)
    n_sets = 1
    if job.get("time", True):
        n_sets = max(1, min(4, -(-2 * _llc_bytes(device) // max(1, per_set))))
        if per_set * n_sets > (1 << 30):
            n_sets = 1
    sets = [base_inputs] + [bc.make_inputs(case, B, M, C, D, dtype, device, seed=i) for i in range(1, n_sets)]

    compiled = _compiled(case) if provider == "compile" else None

    def runner(inputs):
        if compiled is not None:
            return (lambda: compiled(inputs)), bc.leaves(inputs)
        return build_runner(case, provider, inputs)

    runs = [runner(s) for s in sets]

    def fwd_bwd_of(r):
        fn, lv = r
        return lambda: torch.autograd.grad(fn(), lv, allow_unused=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Warm-up (and compile): one forward+backward. On CPU (except for torch.compile, which compiles per
    # shape) the warm-up runs at a small size: it initialises the libraries, not the op's buffers, and
    # the full-size memory call below warms the timing loops.
    timed = job.get("time", True)
    t0 = time.perf_counter()
    if cuda or provider == "compile":
        fwd_bwd_of(runs[0])()
    else:
        small = bc.make_inputs(case, min(B, 256), M and min(M, 1024), C and min(C, 1000), D, dtype, device, seed=99)
        fwd_bwd_of(runner(small))()
        del small
    sync()
    first_s = time.perf_counter() - t0

    # Peak extra memory of one forward+backward (inputs excluded, gradients included); its duration is
    # the estimate that sizes the timing loops.
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        grads = fwd_bwd_of(runs[0])()
        torch.cuda.synchronize()
        t_est = time.perf_counter() - t0
        res["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - before)
        del grads
    else:
        t0 = time.perf_counter()
        res["peak_extra_bytes"] = _cpu_peak_extra(fwd_bwd_of(runs[0]))
        t_est = time.perf_counter() - t0
    gc.collect()
    if provider == "compile":
        res["compile_s"] = round(max(0.0, first_s - t_est), 3)

    if not timed:
        res["single_fwd_bwd_s"] = round(t_est, 3)
        res["note"] = "memory only at this size in this preset"
        return res
    if not cuda:
        _malloc_for_timing()
    res["input_sets"] = n_sets
    res.update(_time_gpu(runs, fwd_bwd_of, time_budget_s, t_est) if cuda else
               _time_cpu(runs, fwd_bwd_of, time_budget_s, t_est))
    return res


def _time_gpu(runs, fwd_bwd_of, budget_s, t_est):
    import triton.testing as tt

    res = {}
    fwd = _rotating(runs, lambda r: r[0])
    fb = _rotating(runs, fwd_bwd_of)
    per_mode = max(0.1, budget_s / 3)
    grad_none = [t for r in runs for t in r[1]]
    for name, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fb)):
        q = tt.do_bench(fn, warmup=25, rep=max(20, int(per_mode * 1e3)), grad_to_none=grad_none,
                        quantiles=[0.5, 0.2, 0.8])
        res[name], res[name + "_q20"], res[name + "_q80"] = q
    reps = int(max(5, min(100, per_mode / max(t_est, 1e-4))))
    res["bwd_ms"], res["bwd_reps"] = _manual_bwd(runs, reps, True), reps
    return res


def _time_cpu(runs, fwd_bwd_of, budget_s, t_est):
    """Fast ops (< 50 ms): torch.utils.benchmark.Timer medians for forward and forward+backward, and a
    loop of timed backwards after untimed forwards. Slower ops: one loop whose every iteration times the
    forward and the backward separately (same median semantics, no wasted calls)."""
    res = {}
    if t_est < 0.05:
        fwd = _rotating(runs, lambda r: r[0])
        fb = _rotating(runs, fwd_bwd_of)
        per_mode = max(0.1, budget_s / 3)
        res["fwd_ms"], res["fwd_reps"], _ = _cpu_time(fwd, per_mode, t_est * 0.5)
        res["fwd_bwd_ms"], res["fwd_bwd_reps"], res["fwd_bwd_ms_min"] = _cpu_time(fb, per_mode, t_est)
        reps = int(max(5, min(200, per_mode / max(t_est, 1e-5))))
        res["bwd_ms"], res["bwd_reps"] = _manual_bwd(runs, reps, False), reps
        return res
    reps = int(max(3, min(100, budget_s / t_est)))
    tf, tb, tt_ = [], [], []
    for i in range(reps):
        fn, lv = runs[i % len(runs)]
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(out, lv, allow_unused=True)
        t2 = time.perf_counter()
        del out, grads
        tf.append(t1 - t0)
        tb.append(t2 - t1)
        tt_.append(t2 - t0)

    def med(v):
        v = sorted(v)
        return v[len(v) // 2] * 1e3

    res.update(fwd_ms=med(tf), bwd_ms=med(tb), fwd_bwd_ms=med(tt_), fwd_bwd_ms_min=min(tt_) * 1e3, reps=reps)
    return res


# --------------------------------------------------------------------------- CPU memory (fresh forked process)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(option, value):
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except OSError:
        pass


def _malloc_for_memory():
    # Every block ≥ 64 KiB is mmapped and returned on free: RSS follows the live bytes.
    _mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    _mallopt(_M_TRIM_THRESHOLD, 64 << 10)


def _malloc_for_timing():
    # Back to a steady-state heap (glibc's dynamic threshold tops out at 32 MiB), so timings do not pay
    # for a page fault on every temporary.
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _cpu_peak_extra(fn):
    rss0 = _status_kb("VmRSS")["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    hwm = _status_kb("VmHWM")["VmHWM"]
    del out
    return max(0, hwm - rss0)


def _fork_run(target, timeout_s, mem_limit_bytes):
    """Run ``target()`` (returns a JSON-able dict) in a forked child; (status, dict or message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                import resource

                vm = _status_kb("VmSize")["VmSize"]
                resource.setrlimit(resource.RLIMIT_AS, (vm + mem_limit_bytes, resource.RLIM_INFINITY))
            except Exception:  # noqa: BLE001 - no limit is better than no measurement
                pass
            _malloc_for_memory()
            try:
                payload = {"status": "ok", "result": target()}
            except BaseException as e:  # noqa: BLE001
                payload = {"status": _failure_status(e), "error": f"{type(e).__name__}: {e}"[:2000],
                           "trace": traceback.format_exc()[-2000:]}
            data = json.dumps(payload).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout_s
    import select

    timed_out = False
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([f], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(f.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, st = os.waitpid(pid, 0)
    if timed_out:
        return "skipped", f"timed out after {timeout_s:.0f} s (cell time limit)"
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        if sig == signal.SIGKILL:
            return "oom", "killed by SIGKILL (the kernel's OOM killer)"
        return "error", f"crashed with signal {sig} ({signal.Signals(sig).name})"
    try:
        payload = json.loads(b"".join(chunks).decode())
    except ValueError:
        return "error", f"child exited with status {os.WEXITSTATUS(st)} and no result"
    if payload["status"] == "ok":
        return "ok", payload["result"]
    return payload["status"], payload["error"]


def _preimport(have_pml):
    """Import once in the parent what every forked cell needs (forked children share it): PML's losses
    and miners, the benchmark timer, and torch.compile's stack. Nothing here starts a thread pool."""
    import torch.utils.benchmark  # noqa: F401

    if have_pml:
        from pytorch_metric_learning import distances, losses, miners  # noqa: F401
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.config as ic

        ic.compile_threads = 1
    except Exception:  # noqa: BLE001
        pass


def _cpu_cell(job, per_cell_s, mem_limit):
    def target():
        torch.set_num_threads(_cores())
        try:
            import torch._inductor.config as ic

            ic.compile_threads = 1  # compile in this process (no worker pool inside a forked child)
        except Exception:  # noqa: BLE001
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return measure_cell(job, "cpu", job.get("time_budget_s", 2.0))

    return _fork_run(target, per_cell_s, mem_limit)


def _cpu_gemm_tflops(dtype, mem_limit):
    def target():
        torch.set_num_threads(_cores())
        from torch.utils.benchmark import Timer

        n = 2048
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, dtype=getattr(torch, dtype))
        m = Timer("a @ b", globals={"a": a, "b": b}, num_threads=_cores()).blocked_autorange(min_run_time=1.0)
        return {"tflops": 2 * n ** 3 / m.median / 1e12, "shape": [n, n, n]}

    status, res = _fork_run(target, 60, mem_limit)
    return res if status == "ok" else None


def _gpu_gemm_tflops(dtype):
    import triton.testing as tt

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
    ms = tt.do_bench(lambda: a @ b, warmup=25, rep=200, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return {"tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12, "shape": [n, n, n],
            "tf32": torch.backends.cuda.matmul.allow_tf32}


# --------------------------------------------------------------------------- GPU worker (one subprocess per op)


def _gpu_worker(jobs_path, out_path):
    """Runs a group of cells in this process (one op's cells on the GPU; ``--isolation worker`` on CPU)."""
    jobs = json.load(open(jobs_path))
    warnings.simplefilter("ignore")
    device = jobs[0].get("device", "cuda") if jobs else "cuda"
    if device == "cpu":
        torch.set_num_threads(_cores())
        _malloc_for_memory()
    with open(out_path, "a") as out:
        for job in jobs:
            rec = {"_id": job["_id"]}
            if time.time() > job["deadline"]:
                rec.update(status="skipped", error="time budget of the preset exhausted")
            else:
                try:
                    rec.update(status="ok", **measure_cell(job, device, job.get("time_budget_s", 1.0)))
                    if device == "cpu":
                        _malloc_for_memory()
                except BaseException as e:  # noqa: BLE001
                    rec.update(status=_failure_status(e), error=f"{type(e).__name__}: {e}"[:2000])
                gc.collect()
                try:
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - a dead context: the rest of this op errors out
                    rec.setdefault("error", f"CUDA context unusable: {e}")
            out.write(json.dumps(rec) + "\n")
            out.flush()
    return 0


# --------------------------------------------------------------------------- sweep


def _jobs(preset, device, ops, dtypes, have_pml, log):
    pts = bc.PRESETS[preset]()
    if ops:
        unknown = [o for o in ops if o not in bc.CASES]
        if unknown:
            raise SystemExit(f"unknown --ops {unknown}; choose from {sorted(bc.CASES)}")
        pts = [p for p in pts if p.case in ops]
    if dtypes:
        pts = [p for p in pts if p.dtype in dtypes]
    dev_type = "cuda" if device == "cuda" else "cpu"
    provider_cache = {}
    jobs, skipped = [], []
    for p in pts:
        case = bc.CASES[p.case]
        if p.case not in provider_cache:
            provider_cache[p.case] = providers_for(case, dev_type, have_pml)
        for provider, why in provider_cache[p.case]:
            if p.providers is not None and provider not in p.providers:
                continue
            job = dict(case=p.case, op=case.op, variant=case.variant, provider=provider, dtype=p.dtype,
                       B=p.B, M=p.M, C=p.C, D=p.D, time=p.time)
            reason = why or bc.skip_reason(dev_type, preset, case, provider, p.B, p.M, p.C, p.dtype)
            if reason:
                job["skip"] = reason
            jobs.append(job)
    for i, j in enumerate(jobs):
        j["_id"] = i
    return jobs


def _record(job, meta, status, fields, error=None):
    rec = {k: None for k in RECORD_KEYS}
    rec.update({k: job[k] for k in ("op", "variant", "provider", "dtype", "B", "M", "C", "D")})
    rec.update(device=meta["device"], commit=meta["commit"], torch=meta["torch"], triton=meta["triton"],
               date=meta["date"], status=status, case=job["case"])
    try:
        rec["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other processes competing for the cores
    except OSError:
        pass
    if fields:
        for k, v in fields.items():
            rec[k] = round(v, 4) if isinstance(v, float) else v
    if error:
        rec["error"] = error
    gemm = meta.get("gemm", {}).get(job["dtype"])
    if gemm:
        case = bc.CASES[job["case"]]
        flops = bc.gemm_flops(case, job["B"], job["M"], job["C"], job["D"])
        rec["gemm_tflops"] = round(gemm["tflops"], 3)
        rec["floor_fwd_bwd_ms"] = round(flops / (gemm["tflops"] * 1e12) * 1e3, 4)
        if rec.get("fwd_bwd_ms"):
            rec["x_floor"] = round(rec["fwd_bwd_ms"] / rec["floor_fwd_bwd_ms"], 2)
    return rec


def _fmt_cell(job):
    size = f"B={job['B']}" + (f" M={job['M']}" if job["M"] else "") + (f" C={job['C']}" if job["C"] else "")
    return f"{job['case']:<20} {job['provider']:<10} {job['dtype']:<8} {size} D={job['D']}"


def run_sweep(args, log=print):
    device = args.device
    preset = args.preset
    have_pml = _have_pml()
    meta = dict(device=device_name(device), commit=_git_commit(), torch=torch.__version__,
                triton=_triton_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), preset=preset, threads=_cores() if device == "cpu" else None)
    try:
        meta["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    jobs = _jobs(preset, device, args.ops, args.dtypes, have_pml, log)
    if getattr(args, "resume", False):
        done = _done_keys(args.out, device_slug(device), preset)
        before = len(jobs)
        jobs = [j for j in jobs if tuple(j[k] for k in CELL_KEY) not in done]
        log(f"bench: --resume: {before - len(jobs)} cells already measured, {len(jobs)} to go")
    start = time.time()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    mem_avail = _mem_available()
    mem_limit = int(args.mem_limit_gb * (1 << 30)) if args.mem_limit_gb else int(min(0.6 * mem_avail, 16 << 30))
    log(f"bench: preset {preset} on {meta['device']}, {len(jobs)} cells "
        f"({sum('skip' in j for j in jobs)} skipped up front), commit {meta['commit']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, PML {'yes' if have_pml else 'no'}"
        + (f", CPU memory limit per cell {mem_limit / 2**30:.1f} GiB" if device == "cpu" else ""))

    dtypes = sorted({j["dtype"] for j in jobs})
    meta["gemm"] = {}
    for dt in dtypes:
        g = _gpu_gemm_tflops(dt) if device == "cuda" else _cpu_gemm_tflops(dt, mem_limit)
        if g:
            meta["gemm"][dt] = g
            log(f"  GEMM floor {dt}: {g['tflops']:.2f} TFLOP/s (square {g['shape'][0]})")

    records = {}
    per_cell_time = args.cell_time
    if device == "cpu" and args.isolation == "fork":
        _preimport(have_pml)
        for job in jobs:
            if "skip" in job:
                records[job["_id"]] = _record(job, meta, "skipped", None, job["skip"])
                continue
            left = deadline - time.time()
            if left < 5:
                records[job["_id"]] = _record(job, meta, "skipped", None, "time budget of the preset exhausted")
                continue
            job["time_budget_s"] = per_cell_time
            t0 = time.time()
            status, res = _cpu_cell(job, min(left, args.cell_timeout), mem_limit)
            if status == "skipped" and left < args.cell_timeout:
                res = "time budget of the preset exhausted (the cell was stopped)"
            if status == "ok":
                rec = _record(job, meta, "ok", res)
            else:
                rec = _record(job, meta, status, None, res)
            records[job["_id"]] = rec
            log(f"  {_fmt_cell(job)}  {_summary(rec)}  [{time.time() - t0:.1f} s]")
    else:
        groups = {}
        for job in jobs:
            if "skip" in job:
                records[job["_id"]] = _record(job, meta, "skipped", None, job["skip"])
            else:
                job["time_budget_s"] = per_cell_time
                job["device"] = device
                groups.setdefault(job["case"], []).append(job)
        # Interleave: the first point of every op, then the second, ... (presets list important sizes first).
        for case_key, group in groups.items():
            left = deadline - time.time()
            if left < 5:
                for job in group:
                    records[job["_id"]] = _record(job, meta, "skipped", None, "time budget of the preset exhausted")
                continue
            # Each op gets a share of the time left in proportion to its cells (×1.5: an op that ends
            # early leaves its time to the next), so one slow op cannot starve the rest of the sweep.
            cells_left = sum(len(g) for k, g in groups.items() if all(j["_id"] not in records for j in g))
            group_deadline = min(deadline, time.time() + 1.5 * left * len(group) / max(1, cells_left))
            for job in group:
                job["deadline"] = group_deadline
            with tempfile.TemporaryDirectory() as tmp:
                jp, op = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "out.jsonl")
                json.dump(group, open(jp, "w"))
                t0 = time.time()
                try:
                    proc = subprocess.run([sys.executable, "-m", "dml_kernels.bench", "--_worker", jp, op],
                                          timeout=max(30, group_deadline - time.time() + 90), capture_output=True,
                                          text=True)
                    tail = (proc.stderr or "")[-500:]
                except subprocess.TimeoutExpired:
                    tail = "worker timed out"
                done = {}
                if os.path.exists(op):
                    for line in open(op):
                        r = json.loads(line)
                        done[r.pop("_id")] = r
                for job in group:
                    r = done.get(job["_id"])
                    if r is None:
                        rec = _record(job, meta, "error", None, f"worker died before this cell: {tail}")
                    else:
                        st, err = r.pop("status"), r.pop("error", None)
                        rec = _record(job, meta, st, r, err)
                    records[job["_id"]] = rec
                    log(f"  {_fmt_cell(job)}  {_summary(rec)}")
                log(f"  ({case_key}: {time.time() - t0:.0f} s)")
    meta["wall_s"] = round(time.time() - start, 1)
    try:
        meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    ordered = [records[j["_id"]] for j in jobs]
    return meta, ordered


def _done_keys(out_dir, slug, preset):
    """Cells of an earlier run of this preset that need no re-run: all but those the time budget skipped."""
    path = os.path.join(out_dir, slug, f"{preset}.json")
    try:
        records = json.load(open(path))["records"]
    except (OSError, ValueError, KeyError):
        return set()
    return {tuple(r.get(k) for k in CELL_KEY) for r in records
            if not (r.get("status") == "skipped" and "time budget" in (r.get("error") or ""))}


def _summary(rec):
    if rec["status"] != "ok":
        return f"{rec['status']}: {(rec.get('error') or '')[:90]}"
    parts = []
    for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
        if rec.get(k) is not None:
            parts.append(f"{k[:-3]} {rec[k]:.2f} ms")
    parts.append(f"peak+ {rec['peak_extra_bytes'] / 2**20:.1f} MiB")
    if rec.get("compile_s") is not None:
        parts.append(f"compile {rec['compile_s']:.1f} s")
    return ", ".join(parts)


def save(out_dir, slug, preset, meta, records, merge=True):
    """Write ``<out>/<slug>/<preset>.json``; records of cells not re-run are kept (``--ops`` subsets)."""
    d = os.path.join(out_dir, slug)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{preset}.json")
    keep = []
    if merge and os.path.exists(path):
        try:
            old = json.load(open(path))
            prev = {tuple(r.get(k) for k in CELL_KEY): r for r in old.get("records", [])}
            # A cell this run skipped by a preset limit does not erase an earlier measurement of it: the
            # earlier record stays, with its own date and commit (time-budget skips do: --resume redoes them).
            records = [prev[key] if (r["status"] == "skipped" and key in prev
                                     and "time budget" not in (r.get("error") or "")
                                     and prev[key].get("status") in ("ok", "oom", "error")) else r
                       for r, key in ((r, tuple(r[k] for k in CELL_KEY)) for r in records)]
            new_keys = {tuple(r[k] for k in CELL_KEY) for r in records}
            keep = [r for r in old.get("records", []) if tuple(r.get(k) for k in CELL_KEY) not in new_keys]
        except (ValueError, AttributeError):
            keep = []
    if keep:
        try:
            prev = old.get("meta", {})
            meta["runs"] = prev.get("runs", [{k: prev.get(k) for k in ("command", "date", "wall_s", "commit",
                                                                       "loadavg_start", "loadavg_end")}])
            meta["runs"].append({k: meta.get(k) for k in ("command", "date", "wall_s", "commit", "loadavg_start",
                                                          "loadavg_end")})
        except (AttributeError, NameError):
            pass
    doc = {"meta": meta, "records": keep + records}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        return _gpu_worker(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m dml_kernels bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset (cpu-quick on CPU, gpu on CUDA)")
    parser.add_argument("--preset", choices=sorted(bc.PRESETS), default=None,
                        help="size preset (default: cpu-quick/gpu with --quick, else cpu-full/gpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--ops", nargs="*", default=None, help=f"subset of cases: {' '.join(bc.CASES)}")
    parser.add_argument("--dtypes", nargs="*", default=None, help="subset of dtypes (float32 bfloat16 float16)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results root (default: benchmarks/results)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole sweep; cells left when it runs out are recorded as skipped "
                             "(default: 560 for cpu-quick and gpu, none for cpu-full)")
    parser.add_argument("--cell-time", type=float, default=None,
                        help="seconds of timed runs per cell (split over fwd, fwd+bwd, bwd); default 1.5 CPU, "
                             "0.6 GPU")
    parser.add_argument("--cell-timeout", type=float, default=180, help="CPU: kill a cell after this many seconds")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="CPU: address-space headroom per cell (default: min(0.6 × available, 16 GiB))")
    parser.add_argument("--isolation", choices=("fork", "worker"), default=None,
                        help="CPU: a forked process per cell (default; fresh peak-RSS counter), or one worker "
                             "subprocess per op as on the GPU (for testing that path)")
    parser.add_argument("--resume", action="store_true",
                        help="run only the cells that the last run of this preset did not reach (time budget), "
                             "merging into its JSON")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate tables and plots")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate table.md, plots and benchmarks/RESULTS.md from the JSON files")
    args = parser.parse_args(argv)

    from . import bench_report

    if args.report_only:
        bench_report.write_all(args.out, log=print)
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.preset is None:
        args.preset = "gpu" if args.device == "cuda" else ("cpu-quick" if args.quick else "cpu-full")
    if args.preset.startswith("cpu") != (args.device == "cpu"):
        print(f"bench: preset {args.preset} does not match device {args.device}", file=sys.stderr)
        return 2
    if args.time_budget is None and args.preset in ("cpu-quick", "gpu"):
        args.time_budget = 560.0
    if args.isolation is None:
        args.isolation = "fork" if args.device == "cpu" else "worker"
    if args.cell_time is None:
        args.cell_time = 0.6 if args.device == "cuda" else 1.5
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        print("bench: CPU memory measurement needs Linux /proc/self/clear_refs", file=sys.stderr)
        return 2
    slug = device_slug(args.device)
    meta, records = run_sweep(args)
    meta["slug"] = slug
    meta["command"] = "python -m dml_kernels bench " + " ".join(argv)
    path = save(args.out, slug, args.preset, meta, records)
    print(f"bench: {len(records)} records → {path} ({meta['wall_s']:.0f} s)")
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("bench: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if not args.no_report:
        bench_report.write_all(args.out, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
