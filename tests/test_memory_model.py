"""The class-sharding memory model reproduces Partial FC's published dense-logit figure, and the README's
table is the script's output (so the README cannot drift from the script)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_model", ROOT / "benchmarks" / "memory_model.py")
mm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mm)


def test_partial_fc_published_logits():
    r = mm.per_gpu(10_000_000, 64, 512, 64)
    mib = r["dense logits (B_global × C/W, fp32)"] / 2 ** 20
    assert abs(mib - mm.PARTIAL_FC_PUBLISHED_MIB["unsampled"]) / mm.PARTIAL_FC_PUBLISHED_MIB["unsampled"] < 0.01
    sampled = r["dense logits, 10% sampled"] / 2 ** 20
    assert abs(sampled - mm.PARTIAL_FC_PUBLISHED_MIB["sampled 10%"]) / mm.PARTIAL_FC_PUBLISHED_MIB["sampled 10%"] < 0.03
    assert r["fused statistics"] < r["dense logits, 10% sampled"] / 100


def test_readme_table_is_the_scripts_output():
    readme = (ROOT / "README.md").read_text()
    assert mm.table(512, 64).splitlines()[2] in readme  # the C = 1M, 8 GPUs row
    assert mm.table(512, 64).splitlines()[4] in readme  # the C = 10M, 8 GPUs row
