"""The main job: ``python -m dml_kernels verify`` passes here and really fails on a wrong backend."""
import io
import os
import subprocess
import sys

import torch

from dml_kernels import _registry, verify
from dml_kernels.backends.reference import multi_similarity_loss as reference_ms


def test_verify_command_runs_and_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it (conftest sets it)
    proc = subprocess.run([sys.executable, "-m", "dml_kernels", "verify"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 0 mismatch(es)" in proc.stdout


def test_verify_catches_a_wrong_backend(monkeypatch):
    def off_by_a_bit(*args, **kwargs):
        return reference_ms(*args, **kwargs) * (1 + 1e-6)

    monkeypatch.setitem(_registry._IMPLS, ("multi_similarity_loss", "cpu"), off_by_a_bit)
    monkeypatch.setattr(_registry, "unavailable_reason", lambda b, d: None)
    out = io.StringIO()
    code = verify.run("cpu", [(9, 4)], [torch.float64], ["cpu"], out=out)
    assert code == 1 and "MISMATCH" in out.getvalue()


def test_verify_accepts_a_correct_backend(monkeypatch):
    monkeypatch.setattr(_registry, "unavailable_reason", lambda b, d: None)
    monkeypatch.setattr(_registry, "_IMPLS", {k: v for k, v in _registry._IMPLS.items() if k[1] != "cpu"} |
                        {("multi_similarity_loss", "cpu"): reference_ms})
    out = io.StringIO()
    assert verify.run("cpu", [(9, 4)], [torch.float64, torch.float32], ["cpu"], out=out) == 0, out.getvalue()


def test_unknown_command():
    from dml_kernels.__main__ import main
    assert main(["frobnicate"]) == 2


def test_readme_ops_table_is_the_commands_output():
    """The README's op × backend table is what ``python -m dml_kernels ops`` prints (regenerate it when an op
    or a backend registration changes)."""
    from dml_kernels.__main__ import ops_table

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme.split("<!-- ops-table:start -->\n")[1].split("<!-- ops-table:end -->")[0]
    assert block.strip() == ops_table().strip()
