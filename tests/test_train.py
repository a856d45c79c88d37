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


# ------------------------------------------------------------------------------ the seeds' methods (issue 16)

from dml_kernels import train_compare, train_methods  # noqa: E402

TINY = ["--steps", "2", "--eval-every", "2", "--batch-size", "20", "--embedding-size", "8", "--no-plot",
        "--no-progress"]
METHOD_RUNS = [m for _, _, m in train_compare.PAIRS]


@pytest.mark.parametrize("argv", METHOD_RUNS, ids=[" ".join(m[1:]) for m in METHOD_RUNS])
def test_each_seed_method_trains_through_the_command(tmp_path, argv):
    """Every method run of the comparison trains through ``train`` and writes its JSON log, named after the
    loss, its arguments, the base loss and the seed."""
    from dml_kernels.train import main, parse_args

    assert main([*argv, *TINY, "--seed", "3", "--out", str(tmp_path)]) == 0
    a = parse_args(argv)
    stem = "_".join(filter(None, [a.loss, "_".join(a.loss_args), a.base_loss, "seed3", "float32"]))
    log = json.loads((tmp_path / (stem + ".json")).read_text())
    assert log["config"]["loss"] == a.loss and log["config"]["base_loss"] == a.base_loss
    steps = log["providers"]["dml_kernels"]["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] == s["loss"] for s in steps)  # not NaN
    assert [e["step"] for e in log["providers"]["dml_kernels"]["evals"]] == [0, 2]
    if a.base_loss is not None:
        assert log["method"]["base_loss"] == a.base_loss and log["loss_kwargs"]["loss"] == "'<base loss>'"


def test_language_guidance_gets_each_samples_text_embedding():
    """The train command's LanguageGuidanceLoss sees ``language_embeddings[labels]`` of the toy encoder: its
    value equals a direct call with those rows (and differs from giving every sample digit 0's row)."""
    import torch

    import dml_kernels as dk
    from dml_kernels.train import parse_args

    args = parse_args(["--loss", "LanguageGuidanceLoss", "--base-loss", "MultiSimilarityLoss"])
    x = torch.rand(30, 64, dtype=torch.float64)
    y = torch.arange(30) % 5
    loss, kwargs, method = train_methods.build_loss(args, {}, 8, x, y, 5)
    emb = torch.randn(30, 8, dtype=torch.float64)
    table = train_methods.digit_text_embeddings(256, 0)
    want = dk.losses.LanguageGuidanceLoss(loss=dk.losses.MultiSimilarityLoss())(emb, y, table[y])
    assert float(loss(emb, y)) == pytest.approx(float(want), rel=1e-12)
    wrong = dk.losses.LanguageGuidanceLoss(loss=dk.losses.MultiSimilarityLoss())(emb, y, table[y * 0])
    assert abs(float(wrong) - float(want)) > 1e-6
    assert "no language model" in method["language_embeddings"]


def test_toy_text_encoder_is_a_deterministic_trigram_bag():
    import torch

    t = train_methods.digit_text_embeddings(256, 0)
    assert t.shape == (10, 256) and torch.equal(t, train_methods.digit_text_embeddings(256, 0))
    assert torch.allclose(t.norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(t, train_methods.digit_text_embeddings(256, 1))
    cos = t @ t.T - torch.eye(10, dtype=torch.float64)
    # "#one#" and "#nine#" share the trigram "ne#" (1 of 3 and 1 of 4): cosine ≈ 1/sqrt(12) ≈ 0.29
    assert int(cos.argmax()) // 10 in (1, 9) and 0.2 < float(cos[1, 9]) < 0.45
    assert float(cos[:5, :5].abs().max()) < 0.15  # 0-4 share no trigram: only the projection's noise
    # two words with the same trigram bag get the same embedding
    same = train_methods.digit_text_embeddings(16, 0, words=("abab", "baba", "abab"))
    assert torch.equal(same[0], same[2]) and not torch.equal(same[0], same[1])


def test_density_adaptivity_gets_the_raw_pixel_densities(tmp_path):
    """D⁽⁰⁾ = mean squared distance to the class mean of the 64 raw pixels (distractors excluded), per
    training digit: the loss's buffer and the log equal a plain numpy computation."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from dml_kernels.train import main

    assert main(["--loss", "DensityAdaptivityLoss", "--loss-args", "weight=10", "--base-loss", "ContrastiveLoss",
                 *TINY, "--out", str(tmp_path)]) == 0
    log = json.loads((tmp_path / "DensityAdaptivityLoss_weight=10_ContrastiveLoss_float32.json").read_text())
    data = load_digits()
    want = []
    for c in range(5):
        xc = data.data[data.target == c] / 16.0
        want.append(np.mean(np.sum((xc - xc.mean(axis=0)) ** 2, axis=1)))
    assert log["method"]["original_densities"] == pytest.approx(want, rel=1e-12)
    from dml_kernels.train import load_digits_split, parse_args
    args = parse_args(["--loss", "DensityAdaptivityLoss", "--base-loss", "ContrastiveLoss"])
    x, y, _, _ = load_digits_split(torch.float32, "cpu")
    loss, _, _ = train_methods.build_loss(args, {}, 8, x, y, 5)
    assert loss.original_densities.tolist() == pytest.approx(want, rel=1e-6)
    assert loss.num_classes == 5 and isinstance(loss.loss, __import__("dml_kernels").losses.ContrastiveLoss)


def test_proxy_gml_defaults_do_not_move_the_network(tmp_path):
    """Five classes with ProxyGML's defaults (N=12, r=0.05 → K=3 < N): only own-class proxies are selected,
    the class term is 0, the network gets no gradient: the unseen-digit metrics stay the untrained ones."""
    from dml_kernels.train import main

    assert main(["--loss", "ProxyGMLLoss", *TINY, "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "ProxyGMLLoss_float32.json").read_text())["summary"]
    assert s["trained_recall_at_1"] == s["untrained_recall_at_1"] and s["trained_map_at_r"] == s["untrained_map_at_r"]
    assert main(["--loss", "ProxyGMLLoss", "--loss-args", "r=0.5", *TINY, "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "ProxyGMLLoss_r=0.5_float32.json").read_text())["summary"]
    assert s["trained_map_at_r"] != s["untrained_map_at_r"]


def test_methods_table_is_built_from_the_logs(tmp_path):
    """The table's mean ± sample std over seeds, per run of a pair, from (synthetic) JSON logs."""
    from dml_kernels.train import parse_args

    base, method = train_compare.PAIRS[1][1], train_compare.PAIRS[1][2]
    values = {tuple(base): [(0.5, 0.2), (0.7, 0.4)], tuple(method): [(0.6, 0.1), (0.6, 0.3)]}
    for argv, runs in values.items():
        for seed, (r1, mapr) in enumerate(runs):
            config = {k: v for k, v in vars(parse_args([*argv, "--seed", str(seed), "--steps", "300"])).items()}
            evals = [{"step": 0, "recall_at_1": 0.25, "mean_average_precision_at_r": 0.1},
                     {"step": 300, "recall_at_1": r1, "mean_average_precision_at_r": mapr}]
            log = {"config": config, "environment": {"device": "cpu", "threads": 1},
                   "providers": {"dml_kernels": {"evals": evals}},
                   "summary": {"trained_recall_at_1": r1, "trained_map_at_r": mapr, "untrained_recall_at_1": 0.25,
                               "dml_kernels_median_step_ms": 1.0 + seed}}
            (tmp_path / f"{'_'.join(argv)}_{seed}.json").write_text(json.dumps(log))
    text = train_compare.table(str(tmp_path))
    assert (tmp_path / "table.md").read_text() == text
    rows = [line for line in text.splitlines() if "MultiSimilarityLoss(" in line]
    assert len(rows) == 4  # eq. 34's base and method; the two language pairs' base (same run); no other logs
    assert "ProxyNCALoss" not in text
    assert "| direction (eq. 34) | `MultiSimilarityLoss()` | 0,1 | 300 | 0.600 ± 0.141 | 0.300 ± 0.141 |  |  | " \
           "0.250 ± 0.000 | 1.50 ± 0.71 |" in rows[0]
    # Δ paired by seed: Recall@1 (+0.1, −0.1), MAP@R (−0.1, −0.1)
    assert "+ `MultiSimilarityLoss(direction_gamma=0.3)` | 0,1 | 300 | 0.600 ± 0.000 | 0.200 ± 0.141 | " \
           "+0.000 ± 0.141 | -0.100 ± 0.000 |" in rows[1]
    png = train_compare.plot(str(tmp_path))
    assert png is not None and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--loss", "MultiSimilarityLoss", "--base-loss", "ContrastiveLoss"], "applies to a wrapper loss"),
    (["--loss", "LanguageGuidanceLoss", "--base-loss-args", "margin=1"], "needs --base-loss"),
    (["--loss", "DensityAdaptivityLoss", "--base-loss", "ContrastiveLoss", "--compare", "pml"], "PML has no"),
])
def test_method_arguments_are_checked(argv, message, capsys):
    from dml_kernels.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
