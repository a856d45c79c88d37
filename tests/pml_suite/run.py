"""Run PML's own test suite with dml_kernels' classes swapped in for PML's.

    python tests/pml_suite/run.py --pml-tests /path/to/pytorch-metric-learning/tests [--only ContrastiveLoss ...]

PML's tests live in its repository (``tests/``), not in its wheel, so this is not part of CI (CI cannot
reach the repository; our own tests check the same properties). For every class dml_kernels exports under
a PML name (``dk.losses``, ``dk.miners``, ``dk.distances``, ``dk.reducers``, ``dk.regularizers``, and
``dk.distributed`` for ``pytorch_metric_learning.utils.distributed``; a family dml_kernels lacks is
skipped), ``pml_conftest.py`` sets it as the attribute of PML's module before any test module
is imported (``pytorch_metric_learning.losses.ContrastiveLoss = dk.losses.ContrastiveLoss``), so PML's
tests — and PML's own code that looks classes up through those modules — get ours. The PML test files run
are those that name a swapped class. PML's tests read ``TEST_DEVICE`` / ``TEST_DTYPES`` (``tests/__init__
.py``); we run them on the CPU in float32 and float64, as PML's CI does.

The tests are copied to a temporary directory and run from there, so PML's ``sys.path.insert(0, "src")``
cannot pick up a source tree: the installed PML (2.9.0) is what they test against. Every test that fails
with the swap is run again without it: "also fails un-swapped" marks a test that fails against PML
itself (the repository's newest tests may be older than the installed PML, e.g. 2.8.1's), which must be
judged by what the installed PML does.

PML's tests draw their data without a seed, so a test that sits on a floating-point tie can pass or fail
from run to run (with or without the swap); rerun a single file with ``--files`` to tell.

Prints, per test file: ran / passed / failed / skipped and the first line of each failure; ``--json``
writes the same as a file. Exit status 0 when no test fails only because of the swap.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# PML module (under pytorch_metric_learning) → dml_kernels module with the same classes
FAMILIES = {"losses": "losses", "miners": "miners", "distances": "distances", "reducers": "reducers",
            "regularizers": "regularizers", "utils.distributed": "distributed"}


def swappable(only=None):
    """{family: [class names]} that dml_kernels exports under a PML name (PML has a class of that name)."""
    sys.path.insert(0, str(REPO))
    out = {}
    for fam, dk_name in FAMILIES.items():
        try:
            dk_mod = importlib.import_module(f"dml_kernels.{dk_name}")
        except ModuleNotFoundError as e:
            if e.name != f"dml_kernels.{dk_name}":
                raise  # a module that exists but does not import is an error, not a missing family
            print(f"(dml_kernels has no {dk_name} module: PML's {fam} not swapped)")
            continue
        pml_mod = importlib.import_module(f"pytorch_metric_learning.{fam}")
        names = [n for n in getattr(dk_mod, "__all__", dir(dk_mod))
                 if not n.startswith("_") and isinstance(getattr(dk_mod, n, None), type)
                 and isinstance(getattr(pml_mod, n, None), type)]
        if only:
            names = [n for n in names if n in only]
        if names:
            out[fam] = sorted(names)
    return out


def select_files(tests_dir: Path, swap):
    names = [n for ns in swap.values() for n in ns]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return sorted(p.relative_to(tests_dir.parent).as_posix() for p in tests_dir.rglob("test_*.py")
                  if pattern.search(p.read_text()))


def run_pytest(tests_dir: Path, swap, targets, dtypes, timeout):
    """Run ``targets`` (paths or node ids) in a copy of PML's tests; {nodeid: (outcome, first line)}."""
    with tempfile.TemporaryDirectory(prefix="pml_suite_") as tmp:
        tmp = Path(tmp)
        shutil.copytree(tests_dir, tmp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(HERE / "pml_conftest.py", tmp / "conftest.py")
        results = tmp / "results.json"
        spec = {fam: dict(module=FAMILIES[fam], names=names) for fam, names in swap.items()}
        env = dict(os.environ, TEST_DEVICE="cpu", TEST_DTYPES=dtypes, DK_PML_SWAP=json.dumps(spec),
                   DK_PML_RESULTS=str(results), PYTHONPATH=os.pathsep.join(
                       [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("WITH_COLLECT_STATS", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp),
               "-o", "python_files=test_*.py", "--continue-on-collection-errors", "-W", "ignore::DeprecationWarning",
               *targets]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if not results.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit("pytest did not run (see above)")
        return json.loads(results.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pml-tests", required=True, type=Path, help="PML repository's tests/ directory")
    ap.add_argument("--only", nargs="+", help="swap only these class names (and run only their files)")
    ap.add_argument("--files", nargs="+", help="run only these test files (paths relative to tests/..)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-swap", action="store_true", help="run the selected files against PML itself")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args(argv)

    tests_dir = args.pml_tests.resolve()
    if not (tests_dir / "__init__.py").exists():
        raise SystemExit(f"{tests_dir} is not PML's tests/ package (no __init__.py)")
    swap = swappable(set(args.only) if args.only else None)
    files = args.files or select_files(tests_dir, swap)
    import pytorch_metric_learning
    print(f"PML {pytorch_metric_learning.__version__} installed; tests from {tests_dir}; dtypes {args.dtypes}")
    print("swapped: " + ("nothing (--no-swap)" if args.no_swap else
                         "; ".join(f"{f}: {', '.join(ns)}" for f, ns in swap.items())))
    res = run_pytest(tests_dir, {} if args.no_swap else swap, files, args.dtypes, args.timeout)

    failed = [k for k, (o, _) in res.items() if o == "failed"]
    pml_itself = {}
    if failed and not args.no_swap:
        rerun = sorted({k.replace("::<collection>", "") for k in failed})
        pml_itself = run_pytest(tests_dir, {}, rerun, args.dtypes, args.timeout)

    per_file = {}
    for nodeid, (outcome, msg) in res.items():
        f = per_file.setdefault(nodeid.split("::")[0], dict(ran=0, passed=0, failed=0, skipped=0, failures=[]))
        if outcome == "skipped":
            f["skipped"] += 1
            continue
        f["ran"] += 1
        f[outcome] += 1
        if outcome == "failed":
            if nodeid.endswith("::<collection>"):  # a file that does not import: did it fail on PML too?
                also = any(k.startswith(nodeid.split("::")[0]) and o == "failed" for k, (o, _) in pml_itself.items())
            else:
                also = pml_itself.get(nodeid, ("?",))[0] == "failed"
            f["failures"].append(dict(test=nodeid.split("::", 1)[1], message=msg, fails_unswapped=also))
    tot = {k: sum(f[k] for f in per_file.values()) for k in ("ran", "passed", "failed", "skipped")}
    swap_only = sum(1 for f in per_file.values() for x in f["failures"] if not x["fails_unswapped"])

    width = max([len(k) for k in per_file] + [10])
    print(f"\n{'file':<{width}}  ran  passed  failed  skipped")
    for name, f in sorted(per_file.items()):
        print(f"{name:<{width}}  {f['ran']:>3}  {f['passed']:>6}  {f['failed']:>6}  {f['skipped']:>7}")
        for x in f["failures"]:
            tag = "  [also fails un-swapped, on PML itself]" if x["fails_unswapped"] else ""
            print(f"    FAILED {x['test']}: {x['message']}{tag}")
    print(f"\n{len(per_file)} files: {tot['ran']} ran, {tot['passed']} passed, {tot['failed']} failed "
          f"({tot['failed'] - swap_only} of them also fail on PML itself), {tot['skipped']} skipped")
    if args.json:
        args.json.write_text(json.dumps(dict(swap=swap, files=per_file, total=tot), indent=1))
    return 1 if swap_only else 0


if __name__ == "__main__":
    sys.exit(main())
