"""The benchmark harness itself (dml_kernels/bench/): records, statuses, isolation modes, time budget, report.

Runs the ``cpu-smoke`` preset (tiny sizes, seconds) into a temporary directory. The GPU sweep cannot run
here, but its process layout can: ``--isolation worker`` runs the cells in one worker subprocess per op,
exactly as on the GPU, and the ``gpu`` preset's cell list is checked for its size limits.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dml_kernels.bench import cases as bench_cases, sweep as bench

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="the CPU memory measurement needs Linux /proc/self/clear_refs")


def _bench(*argv):
    """``python -m dml_kernels bench ...`` in a fresh process, as a user runs it: the harness forks a process
    per cell, which must not inherit this test process's OpenMP / BLAS thread pools (a fork of a process
    whose pools have run can deadlock)."""
    proc = subprocess.run([sys.executable, "-m", "dml_kernels", "bench", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _run(tmp_path, *extra):
    out = tmp_path / "results"
    _bench("--device", "cpu", "--preset", "cpu-smoke", "--cell-time", "0.05", "--out", str(out), *extra)
    (slug,) = os.listdir(out)
    data = json.load(open(out / slug / "cpu-smoke.json"))
    return out, slug, data["meta"], data["records"]


def _by_cell(records):
    return {(r["case"], r["provider"], r["B"]): r for r in records}


def test_smoke_sweep_records_and_oom(tmp_path):
    """Every record has the required keys; timed cells have positive times; the B=4096 memory-only cell runs
    the cpu backend in a few MiB and records the reference as "oom" under a 0.2 GiB cap (not a crash)."""
    out, slug, meta, records = _run(tmp_path, "--mem-limit-gb", "0.2", "--time-budget", "300")
    assert meta["preset"] == "cpu-smoke" and meta["command"].startswith("python -m dml_kernels bench")
    for r in records:
        assert set(bench.RECORD_KEYS) <= set(r), set(bench.RECORD_KEYS) - set(r)
        assert r["status"] in ("ok", "oom", "error", "skipped")
    cells = _by_cell(records)
    for case, b in (("ms_mining", 64), ("ms_mining_ref", 32), ("proxy_nca", 32)):
        for provider in ("cpu", "reference"):
            r = cells[(case, provider, b)]
            assert r["status"] == "ok", r
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_extra_bytes"] >= 0
            assert r["floor_fwd_bwd_ms"] > 0  # the GEMM floor is attached to every record
        assert cells[(case, "compile", b)]["status"] == "skipped"  # the preset's compile sizes are empty
    big_cpu, big_ref = cells[("ms_mining", "cpu", 4096)], cells[("ms_mining", "reference", 4096)]
    assert big_cpu["status"] == "ok" and big_cpu["fwd_ms"] is None  # memory only
    assert big_cpu["peak_extra_bytes"] < 4096 * 4096 * 4 / 4  # a quarter of one B×B fp32 matrix
    assert big_ref["status"] == "oom", big_ref
    # the report: a table per device and RESULTS.md next to the results directory
    _bench("--report-only", "--out", str(out))
    table = (out / slug / "table.md").read_text()
    assert "multi_similarity_loss (mining)" in table and "OOM" in table
    assert (tmp_path / "RESULTS.md").exists()


def test_worker_isolation_is_the_gpu_process_layout(tmp_path):
    """One worker subprocess per op, as the GPU sweep runs (--isolation worker), on the CPU."""
    _, _, _, records = _run(tmp_path, "--isolation", "worker", "--ops", "ms_mining", "--time-budget", "300",
                            "--no-report")
    cells = _by_cell(records)
    assert cells[("ms_mining", "cpu", 64)]["status"] == "ok" and cells[("ms_mining", "cpu", 64)]["fwd_ms"] > 0
    assert cells[("ms_mining", "reference", 4096)]["status"] == "ok"  # no per-cell cap in a worker


def test_time_budget_skips_what_does_not_fit(tmp_path):
    _, _, _, records = _run(tmp_path, "--ops", "proxy_nca", "--time-budget", "0.001", "--no-report")
    ran = [r for r in records if r["status"] != "skipped"]
    assert not ran, ran
    assert any("time budget" in (r.get("error") or "") for r in records)


def test_gpu_preset_cells():
    """The GPU sweep's cell list (built without a GPU): every case, the sizes the issue asks for, the O(B³)
    providers capped, torch.compile only at its few sizes, and at most ~500 cells for a 10-minute budget."""
    jobs = bench._jobs("gpu", "cuda", None, None, True, print)
    run = [j for j in jobs if "skip" not in j]
    assert {j["case"] for j in jobs} == set(bench_cases.CASES)
    assert max(j["B"] for j in jobs if j["case"] == "ms_mining") == 65536
    assert max(j["M"] or 0 for j in jobs) == 65536 and max(j["C"] or 0 for j in jobs) == 1_000_000
    assert {j["D"] for j in jobs} == {128, 512} and {j["dtype"] for j in jobs} == {"float32", "bfloat16", "float16"}
    assert not [j for j in run if j["case"] == "triplet_all" and j["provider"] == "reference" and j["B"] > 4096]
    compiled = [j for j in run if j["provider"] == "compile"]  # per-shape compile: a few cells only
    assert compiled and len(compiled) <= 10
    assert all(j["case"] in ("ms_mining", "ms", "proxy_nca", "proxy_anchor") and j["dtype"] == "bfloat16"
               and (j["C"] == 100000 if j["C"] else j["B"] == 16384) for j in compiled), compiled
    assert len(jobs) <= 500
