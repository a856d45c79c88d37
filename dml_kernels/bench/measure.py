"""Measuring one cell: providers, runners, timing (GPU and CPU), peak extra memory, process isolation."""
from __future__ import annotations

import ctypes
import gc
import itertools
import json
import os
import signal
import time
import traceback
import warnings

import torch

from . import cases as bc
from .machine import _cores, _llc_bytes, _status_kb


def providers_for(case, device_type, have_pml):
    """[(provider, why-not or None)] for this case on this device, in table order."""
    from .. import _registry

    out = []
    fused = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}.get(device_type, ())
    for b in fused:
        why = _registry.unavailable_reason(b, device_type)
        if why is None and b not in _registry.implemented(case.op):
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
    from .. import _registry

    if _is_oom(e):
        return "oom"
    if isinstance(e, (_registry.Unsupported, _registry.BackendUnavailable)):
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
