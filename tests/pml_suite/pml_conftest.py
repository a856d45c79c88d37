"""Installed as ``conftest.py`` next to a copy of PML's ``tests/`` by ``run.py`` (not a conftest of this
repository's tests). Before PML's test modules are imported, it sets dml_kernels' classes as attributes of
PML's modules (``DK_PML_SWAP``: {PML module: {"module": dml_kernels module, "names": [class names]}}),
and records every test's outcome and the first line of its failure in ``DK_PML_RESULTS`` (JSON)."""
import importlib
import json
import os

SWAP = json.loads(os.environ.get("DK_PML_SWAP", "{}"))
_RESULTS = {}

for _family, _spec in SWAP.items():
    _pml = importlib.import_module(f"pytorch_metric_learning.{_family}")
    _dk = importlib.import_module(f"dml_kernels.{_spec['module']}")
    for _name in _spec["names"]:
        setattr(_pml, _name, getattr(_dk, _name))


def _first_line(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]  # a collection error's traceback
    if crash is None and errors:
        return errors[-1][:300]
    return lines[0][:300] if lines else ""


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        msg = _first_line(report) if report.outcome == "failed" else ""
        if report.outcome == "skipped":
            msg = ""
        _RESULTS[report.nodeid] = (report.outcome, msg)
    elif report.when == "teardown" and report.outcome == "failed":
        _RESULTS[report.nodeid] = ("failed", "teardown: " + _first_line(report))


def pytest_collectreport(report):
    if report.outcome == "failed":
        _RESULTS[report.nodeid + "::<collection>"] = ("failed", "collection: " + _first_line(report))


def pytest_sessionfinish(session):
    path = os.environ.get("DK_PML_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(_RESULTS, f)
