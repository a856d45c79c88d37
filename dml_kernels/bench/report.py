"""Tables and plots from the benchmark JSON files: ``<out>/<slug>/table.md``, ``<out>/<slug>/plots/*.png``
and the combined ``benchmarks/RESULTS.md`` (which the README links). Plots need matplotlib (optional:
without it they are skipped with a message)."""
from __future__ import annotations

import glob
import json
import os

from . import cases as bc

FUSED = ("cpu", "cuda", "triton")
PROVIDER_LABEL = {"cpu": "dk cpu", "cuda": "dk cuda", "triton": "dk triton", "reference": "reference",
                  "compile": "compile(ref)", "pml": "PML 2.9"}
SHORT = {"skipped": "skip", "error": "err", "oom": "OOM"}


def load(out_dir):
    """{slug: [(preset, meta, records)]} for every JSON under out_dir/<slug>/."""
    res = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "*.json"))):
        try:
            doc = json.load(open(path))
            meta, records = doc["meta"], doc["records"]
        except (ValueError, KeyError, TypeError):
            continue
        slug = os.path.basename(os.path.dirname(path))
        preset = os.path.splitext(os.path.basename(path))[0]
        res.setdefault(slug, []).append((preset, meta, records))
    return res


def _mib(b):
    if b is None:
        return "—"
    mib = b / 2 ** 20
    if mib >= 1024:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.1f} MiB" if mib < 100 else f"{mib:.0f} MiB"


def _ms(v):
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _size(r, case):
    parts = []
    if case.family == "ref":
        parts.append(f"B={r['B']} M={r['M']}")
    elif case.family == "proxy":
        parts.append(f"B={r['B']} C={r['C']}")
    else:
        parts.append(f"B={r['B']}")
    parts.append(f"D={r['D']}")
    return " ".join(parts)


def _sort_key(r):
    return (r["D"], r["B"], r["M"] or 0, r["C"] or 0)


def _cell(r):
    if r is None:
        return ""
    if r["status"] != "ok":
        if r["status"] == "skipped" and "time budget" in (r.get("error") or ""):
            return "skip (time)"
        return SHORT.get(r["status"], r["status"])
    t = r.get("fwd_bwd_ms")
    return f"{_ms(t)} ms · {_mib(r.get('peak_extra_bytes'))}" if t is not None else f"— · {_mib(r.get('peak_extra_bytes'))}"


def _best_fused(rows):
    ok = [r for p, r in rows.items() if p in FUSED and r and r["status"] == "ok"]
    return min(ok, key=lambda r: r.get("fwd_bwd_ms") or float("inf")) if ok else None


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(x):
    if x is None:
        return "—"
    return f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


def slug_table(slug, entries):
    lines = [f"# Benchmark results: `{slug}`", ""]
    for preset, meta, records in entries:
        lines += [f"## Preset `{preset}`", "",
                  f"- device: {meta.get('device')}; torch {meta.get('torch')}, triton {meta.get('triton')}"]
        runs = meta.get("runs") or [{k: meta.get(k) for k in ("command", "date", "wall_s", "commit", "loadavg_start",
                                                              "loadavg_end")}]
        for run in runs:
            lines.append(f"- run: `{run.get('command')}` — {run.get('date')}, sweep wall time {run.get('wall_s')} s, "
                         f"commit `{run.get('commit')}`, load average (1/5/15 min) {run.get('loadavg_start')} → "
                         f"{run.get('loadavg_end')}" + (" (later runs replace the cells they re-measured; each "
                                                       "record has its own date and commit)" if len(runs) > 1 and
                                                      run is runs[0] else ""))
        if meta.get("loadavg_start"):
            lines.append(f"- a load average above the core count ({meta.get('threads') or '?'}) means other processes "
                         "were competing for the CPU: timings are inflated and noisy (memory is not affected); "
                         "per-record `loadavg_1m` in the JSON")
        gemm = meta.get("gemm") or {}
        if gemm:
            lines.append("- GEMM floor (dense square matmul): " + ", ".join(
                f"{dt} {g['tflops']:.2f} TFLOP/s" for dt, g in sorted(gemm.items())))
        lines += ["- cells: forward+backward time (median) · peak extra memory (inputs excluded, gradients "
                  "included). `skip` = not run (preset limit, or backend / op unavailable), `skip (time)` = the preset's time budget ran out before this cell, `OOM` = out of memory "
                  "(CPU: the per-cell address-space limit), `err` = failed (message in the JSON).",
                  "- ratios: reference ÷ the fastest dml_kernels backend (time, memory); > 1 means dml_kernels "
                  "is faster / smaller.", ""]
        providers = [p for p in bc.PROVIDERS_ORDER if any(r["provider"] == p for r in records)]
        by_case = {}
        for r in records:
            by_case.setdefault((r.get("case") or _case_key(r), r["dtype"]), []).append(r)
        for key in bc.CASES:
            for dtype in ("float32", "bfloat16", "float16"):
                rs = by_case.get((key, dtype))
                if not rs:
                    continue
                case = bc.CASES[key]
                lines.append(f"### {case.op} ({case.variant}), {dtype}")
                lines.append("")
                pml = f"PML: `{case.pml_desc}`." if case.pml_desc else "PML: none."
                lines.append(pml + (f" {case.note}." if case.note else ""))
                lines.append("")
                hdr = ["size"] + [PROVIDER_LABEL[p] for p in providers] + ["ref ÷ dk (time)", "ref ÷ dk (mem)"]
                if any(r.get("x_floor") for r in rs):
                    hdr.append("dk × GEMM floor")
                lines.append("| " + " | ".join(hdr) + " |")
                lines.append("|" + "---|" * len(hdr))
                sizes = {}
                for r in rs:
                    sizes.setdefault((r["D"], r["B"], r["M"] or 0, r["C"] or 0), {})[r["provider"]] = r
                for sk in sorted(sizes):
                    row = sizes[sk]
                    any_r = next(iter(row.values()))
                    best = _best_fused(row)
                    ref = row.get("reference")
                    ref_ok = ref if ref and ref["status"] == "ok" else None
                    tr = _ratio(ref_ok and ref_ok.get("fwd_bwd_ms"), best and best.get("fwd_bwd_ms"))
                    mr = _ratio(ref_ok and ref_ok.get("peak_extra_bytes"), best and best.get("peak_extra_bytes"))
                    cells = [_size(any_r, case)] + [_cell(row.get(p)) for p in providers]
                    cells += [_fmt_ratio(tr), _fmt_ratio(mr)]
                    if "dk × GEMM floor" in hdr:
                        cells.append(f"{best['x_floor']:.1f}×" if best and best.get("x_floor") else "—")
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
        compile_s = [r["compile_s"] for r in records if r.get("compile_s") is not None]
        if compile_s:
            lines.append(f"torch.compile time (excluded above): median {sorted(compile_s)[len(compile_s) // 2]:.1f} s "
                         f"per shape, max {max(compile_s):.1f} s ({len(compile_s)} shapes).")
            lines.append("")
    return "\n".join(lines)


def _case_key(r):
    for k, c in bc.CASES.items():
        if c.op == r["op"] and c.variant == r["variant"]:
            return k
    return r["op"]


def headlines(data):
    """A few sentences computed from the records (the numbers the README quotes)."""
    out = []
    for slug, entries in data.items():
        for preset, meta, records in entries:
            idx = {}
            for r in records:
                idx[(r.get("case") or _case_key(r), r["provider"], r["dtype"], r["B"], r["M"], r["C"], r["D"])] = r

            def get(case, prov, dtype, B, D, M=None, C=None):
                r = idx.get((case, prov, dtype, B, M, C, D))
                return r if r and r["status"] == "ok" else None

            dtype = "float32" if slug.startswith("cpu") else "bfloat16"
            for B, D in ((4096, 256), (16384, 128), (4096, 128), (65536, 128)):
                ref = get("ms_mining", "reference", dtype, B, D)
                pml = get("ms_mining", "pml", dtype, B, D)
                for prov in FUSED:
                    dk = get("ms_mining", prov, dtype, B, D)
                    if not dk:
                        continue
                    parts = []
                    if dk.get("fwd_bwd_ms") and ref and ref.get("fwd_bwd_ms"):
                        parts.append(f"fwd+bwd {dk['fwd_bwd_ms']:.1f} ms vs reference {ref['fwd_bwd_ms']:.1f} ms "
                                     f"({ref['fwd_bwd_ms'] / dk['fwd_bwd_ms']:.1f}× faster, medians")
                        if dk.get("fwd_bwd_ms_min") and ref.get("fwd_bwd_ms_min"):
                            parts[-1] += (f"; fastest runs {dk['fwd_bwd_ms_min']:.1f} vs {ref['fwd_bwd_ms_min']:.1f} ms, "
                                          f"{ref['fwd_bwd_ms_min'] / dk['fwd_bwd_ms_min']:.1f}×")
                        parts[-1] += ")"
                    if dk.get("fwd_bwd_ms") and pml and pml.get("fwd_bwd_ms"):
                        parts.append(f"vs PML {pml['fwd_bwd_ms']:.1f} ms ({pml['fwd_bwd_ms'] / dk['fwd_bwd_ms']:.1f}×)")
                    if ref:
                        parts.append(f"peak extra memory {_mib(dk['peak_extra_bytes'])} vs reference "
                                     f"{_mib(ref['peak_extra_bytes'])} "
                                     f"({ref['peak_extra_bytes'] / max(1, dk['peak_extra_bytes']):.0f}× less)")
                    elif (idx.get(("ms_mining", "reference", dtype, B, None, None, D)) or {}).get("status") == "oom":
                        parts.append(f"peak extra memory {_mib(dk['peak_extra_bytes'])}; reference: OOM")
                    pml_raw = idx.get(("ms_mining", "pml", dtype, B, None, None, D)) or {}
                    if pml:
                        parts.append(f"PML {_mib(pml['peak_extra_bytes'])}")
                    elif pml_raw.get("status") == "oom":
                        parts.append("PML: out of memory (" + (pml_raw.get("error") or "")[:0]
                                     + ("per-cell memory limit" if slug.startswith("cpu") else "GPU memory") + ")")
                    if parts:
                        out.append(f"- `{slug}` ({preset}), MS + mining, {dtype}, B={B}, D={D}, backend `{prov}`: "
                                   + "; ".join(parts) + ".")
            # Without a fused backend, still state the reference / PML memory at the headline size.
            for B, D in ((16384, 128),):
                if any(get("ms_mining", p, dtype, B, D) for p in FUSED):
                    continue
                ref, pml = get("ms_mining", "reference", dtype, B, D), get("ms_mining", "pml", dtype, B, D)
                pml_raw = idx.get(("ms_mining", "pml", dtype, B, None, None, D))
                if ref:
                    out.append(f"- `{slug}` ({preset}), MS + mining, {dtype}, B={B}, D={D}: reference peak extra "
                               f"memory {_mib(ref['peak_extra_bytes'])}; PML "
                               + (_mib(pml["peak_extra_bytes"]) if pml else (pml_raw or {}).get("status", "—"))
                               + " (no fused backend measured here yet).")
    return out


def write_plots(slug_dir, entries, log=print):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("bench: matplotlib is not installed; plots skipped (pip install matplotlib)")
        return []
    paths = []
    plot_dir = os.path.join(slug_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for preset, meta, records in entries:
        groups = {}
        for r in records:
            key = r.get("case") or _case_key(r)
            case = bc.CASES.get(key)
            if case is None:
                continue
            fixed = (r["B"] if case.family != "pair" else None, r["D"], r["dtype"])
            groups.setdefault((key, fixed), []).append(r)
        for (key, fixed), rs in groups.items():
            case = bc.CASES[key]
            axis = {"pair": "B", "ref": "M", "proxy": "C"}[case.family]
            xs = sorted({r[axis] for r in rs})
            if len(xs) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for prov in bc.PROVIDERS_ORDER:
                pr = sorted([r for r in rs if r["provider"] == prov and r["status"] == "ok"], key=lambda r: r[axis])
                pt = [(r[axis], r["fwd_bwd_ms"]) for r in pr if r.get("fwd_bwd_ms")]
                pm = [(r[axis], r["peak_extra_bytes"] / 2 ** 20) for r in pr if r.get("peak_extra_bytes") is not None]
                if pt:
                    ax_t.plot(*zip(*pt), marker="o", label=PROVIDER_LABEL[prov])
                if pm:
                    ax_m.plot(*zip(*pm), marker="o", label=PROVIDER_LABEL[prov])
                bad = [r[axis] for r in rs if r["provider"] == prov and r["status"] == "oom"]
                for x in bad:
                    ax_m.annotate("OOM", (x, 1), fontsize=7)
            for ax, ylab in ((ax_t, "forward+backward (ms, median)"), (ax_m, "peak extra memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylab)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
            desc = f"{case.op} ({case.variant}), {fixed[2]}, D={fixed[1]}" + (
                f", B={fixed[0]}" if fixed[0] is not None else "")
            fig.suptitle(f"{desc} — {meta.get('device')}", fontsize=10)
            fig.tight_layout()
            name = f"{preset}-{key}-{fixed[2]}-D{fixed[1]}" + (f"-B{fixed[0]}" if fixed[0] is not None else "") + ".png"
            path = os.path.join(plot_dir, name)
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def write_all(out_dir, log=print, results_md=None):
    data = load(out_dir)
    if not data:
        log(f"bench: no results under {out_dir}")
        return
    for slug, entries in data.items():
        slug_dir = os.path.join(out_dir, slug)
        with open(os.path.join(slug_dir, "table.md"), "w") as f:
            f.write(slug_table(slug, entries) + "\n")
        plots = write_plots(slug_dir, entries, log)
        log(f"bench: {slug_dir}/table.md" + (f" and {len(plots)} plots in {slug_dir}/plots/" if plots else ""))
    if results_md is None:
        results_md = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "RESULTS.md")
    lines = ["# Benchmark results", "",
             "Generated by `python -m dml_kernels bench` (re-generate the tables and plots from the JSON files with "
             "`python -m dml_kernels bench --report-only`). How the numbers are measured: "
             "[benchmarks/README.md](README.md). Raw records: `benchmarks/results/<device>/<preset>.json`.", ""]
    hl = headlines(data)
    if hl:
        lines += ["## Headlines", ""] + hl + [""]
    for slug, entries in data.items():
        lines.append(f"- [`{slug}`](results/{slug}/table.md): " + ", ".join(
            f"preset `{p}` ({len(r)} cells, {m.get('date')})" for p, m, r in entries))
    lines.append("")
    for slug, entries in data.items():
        body = slug_table(slug, entries).split("\n")
        body = ["#" + l if l.startswith("#") else l for l in body]  # nest the headings one level
        lines += body + [""]
    with open(results_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"bench: {results_md}")
