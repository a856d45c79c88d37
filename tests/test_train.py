"""``python -m dml_kernels train`` end to end (a few steps): the JSON log and the PNG exist and parse, and the
``--compare pml`` loss trajectory equals PML's to float64 rounding."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_metric_learning")


def test_train_command_writes_log_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    cmd = [sys.executable, "-m", "dml_kernels", "train", "--loss", "MultiSimilarityLoss", "--loss-args",
           "epsilon=0.1", "--steps", "6", "--eval-every", "3", "--batch-size", "30", "--dtype", "float64",
           "--compare", "pml", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Recall@1 untrained" in proc.stdout and "train MultiSimilarityLoss" in proc.stderr  # tqdm bar

    stem = tmp_path / "MultiSimilarityLoss_epsilon=0.1_float64_vs_pml"
    log = json.loads((tmp_path / (stem.name + ".json")).read_text())
    dk, pml = log["providers"]["dml_kernels"], log["providers"]["pml"]
    assert [s["step"] for s in dk["steps"]] == list(range(1, 7)) == [s["step"] for s in pml["steps"]]
    assert [e["step"] for e in dk["evals"]] == [0, 3, 6]
    assert pml["miner"] == "MultiSimilarityMiner"
    for e in dk["evals"]:
        assert 0 <= e["recall_at_1"] <= 1 and 0 <= e["mean_average_precision_at_r"] <= 1
        assert e["recall_at_1"] == pytest.approx(e["precision_at_1"])
    for a, b in zip(dk["steps"], pml["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12, abs=1e-12)
    s = log["summary"]
    assert s["max_abs_loss_diff"] < 1e-12 and s["untrained_recall_at_1"] == dk["evals"][0]["recall_at_1"]

    png = tmp_path / (stem.name + ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread  # parses the file (raises on a truncated or corrupt PNG)
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300


def test_train_proxy_loss_gets_its_sizes(tmp_path):
    """A proxy loss gets num_classes / embedding_size automatically, and PML's copy starts from the same
    proxies (equal first losses)."""
    from dml_kernels.train import main

    assert main(["--loss", "ProxyAnchorLoss", "--steps", "2", "--eval-every", "2", "--batch-size", "20",
                 "--embedding-size", "8", "--dtype", "float64", "--compare", "pml", "--no-plot", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    log = json.loads((tmp_path / "ProxyAnchorLoss_float64_vs_pml.json").read_text())
    assert log["loss_kwargs"]["num_classes"] == "5" and log["loss_kwargs"]["embedding_size"] == "8"
    assert log["summary"]["max_abs_loss_diff"] < 1e-12


def test_train_rejects_unknown_loss(tmp_path):
    from dml_kernels.train import main

    with pytest.raises(SystemExit, match="not a dk.losses class"):
        main(["--loss", "NoSuchLoss", "--steps", "1", "--out", str(tmp_path)])
