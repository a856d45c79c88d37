"""A sweep: the cells of a preset, their records, the results files, and the CLI."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from . import cases as bc
from .machine import _cores, _git_commit, _mem_available, _triton_version, device_name, device_slug
from .measure import _cpu_cell, _cpu_gemm_tflops, _gpu_gemm_tflops, _gpu_worker, _have_pml, _preimport, providers_for

RECORD_KEYS = ("op", "variant", "provider", "device", "dtype", "B", "M", "C", "D", "fwd_ms", "bwd_ms",
               "fwd_bwd_ms", "peak_extra_bytes", "status", "commit", "torch", "triton", "date")
CELL_KEY = ("op", "variant", "provider", "dtype", "B", "M", "C", "D")
DEFAULT_OUT = os.path.join("benchmarks", "results")


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


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress_bar(total, desc):
    """A tqdm progress bar over the cells on stderr (the log lines stay on stdout), or nothing without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)


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
    bar = _progress_bar(len(jobs), f"bench {preset}")

    def finish(job, rec):
        records[job["_id"]] = rec
        bar.update(1)
        bar.set_postfix_str(f"{job['case']} B={job['B']} {job['provider']}: {rec['status']}")

    per_cell_time = args.cell_time
    if device == "cpu" and args.isolation == "fork":
        _preimport(have_pml)
        for job in jobs:
            if "skip" in job:
                finish(job, _record(job, meta, "skipped", None, job["skip"]))
                continue
            left = deadline - time.time()
            if left < 5:
                finish(job, _record(job, meta, "skipped", None, "time budget of the preset exhausted"))
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
            finish(job, rec)
            log(f"  {_fmt_cell(job)}  {_summary(rec)}  [{time.time() - t0:.1f} s]")
    else:
        groups = {}
        for job in jobs:
            if "skip" in job:
                finish(job, _record(job, meta, "skipped", None, job["skip"]))
            else:
                job["time_budget_s"] = per_cell_time
                job["device"] = device
                groups.setdefault(job["case"], []).append(job)
        # Interleave: the first point of every op, then the second, ... (presets list important sizes first).
        for case_key, group in groups.items():
            left = deadline - time.time()
            if left < 5:
                for job in group:
                    finish(job, _record(job, meta, "skipped", None, "time budget of the preset exhausted"))
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
                    finish(job, rec)
                    log(f"  {_fmt_cell(job)}  {_summary(rec)}")
                log(f"  ({case_key}: {time.time() - t0:.0f} s)")
    bar.close()
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

    from . import report

    if args.report_only:
        report.write_all(args.out, log=print)
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
        report.write_all(args.out, log=print)
    return 0

