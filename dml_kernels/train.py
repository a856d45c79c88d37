"""``python -m dml_kernels train``: see a loss learn — an embedding network on real data, unseen-class retrieval.

The data is scikit-learn's handwritten digits (1797 8×8 images, shipped inside scikit-learn). A small MLP
(64 + distractors → hidden → hidden → embedding) is trained with any ``dk.losses`` class on the digits 0–4
and evaluated on the digits 5–9, which it never sees: the metric-learning protocol of the papers (train on
some classes, retrieve among others). Every evaluation embeds all unseen-class digits, L2-normalises the
embeddings and runs :class:`~dml_kernels.evaluation.AccuracyCalculator` on them (same-set retrieval:
each digit queries all the others; Recall@1/2/4/8, MAP@R, R-precision, NMI, AMI).

Distractors: nearest neighbours on the raw 8×8 pixels already find the right digit ~98 % of the time, so
an untrained network (random weights roughly preserve distances) starts near the ceiling on plain digits,
and training on five classes only specialises it to them (measured: Recall@1 0.956 untrained, 0.83 after
200 MultiSimilarity steps). Each image therefore carries ``--distractors`` (default 64) extra Gaussian
features (std ``--distractor-std``, 0.5) that say nothing about the digit — fresh every training step,
fixed for the evaluation set. An untrained network mixes them into every embedding dimension; a trained
one learns which inputs matter, and that transfers to the unseen digits. ``--distractors 0`` runs plain
digits.

    python -m dml_kernels train --loss MultiSimilarityLoss --loss-args epsilon=0.1 --steps 200
    python -m dml_kernels train --loss MultiSimilarityLoss --compare pml --dtype float64

``--loss-args key=value ...`` are the loss's constructor arguments (values parsed as Python literals);
proxy losses get ``num_classes`` and ``embedding_size`` automatically. ``--compare pml`` trains a copy of
the same network (same initial weights, same batches, same optimiser) with PML's class of the same name —
the dk-only fused-mining switches become PML's miners (``epsilon=`` → ``MultiSimilarityMiner(epsilon)``,
``mining="batch_hard"`` → ``BatchHardMiner()``) — and reports how far the two loss trajectories drift
apart. Batches are class-balanced: ``batch_size // 5`` samples of each training digit.

The seeds' methods train through the same command (``dml_kernels/train_methods.py`` says how and with
which inputs: ``direction_gamma=`` on three losses, ``--loss LanguageGuidanceLoss --base-loss ...`` with a
toy text encoder's digit embeddings, ``--loss DensityAdaptivityLoss --base-loss ...`` with D⁽⁰⁾ from the raw
pixels, ``--loss ProxyGMLLoss``); ``python -m dml_kernels.train_compare run`` / ``table`` train each beside
its base loss and tabulate the logs.

Writes ``<out>/<Loss>[_<loss args>][_<base loss>[_<its args>]][_seed<N>]_<dtype>[_vs_pml].json``
(configuration, per-step loss and step time, every evaluation, summary) and a ``.png`` next to it: the
training loss, unseen-class Recall@1 and MAP@R, and the step time (forward + backward + optimiser step) of
each provider, against the step.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch import nn

from . import train_methods
from .train_methods import parse_loss_args

TRAIN_CLASSES = (0, 1, 2, 3, 4)
EVAL_CLASSES = (5, 6, 7, 8, 9)
DEFAULT_OUT = os.path.join("benchmarks", "results", "train")
EVAL_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI", "AMI")
RECALL_AT = (1, 2, 4, 8)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dml_kernels train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", default="MultiSimilarityLoss", help="a dk.losses class name (default %(default)s)")
    p.add_argument("--loss-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor arguments of the loss, values as Python literals (e.g. epsilon=0.1)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100, help="samples per step, balanced over digits 0-4")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (network and any proxies)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--embedding-size", type=int, default=32)
    p.add_argument("--distractors", type=int, default=64,
                   help="Gaussian noise features appended to the 64 pixels (0: plain digits; default %(default)s)")
    p.add_argument("--distractor-std", type=float, default=0.5, help="their standard deviation (pixels lie in [0, 1])")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate on the unseen digits every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--compare", choices=("none", "pml"), default="none",
                   help="also train with PML's class of the same name on the same batches from the same init")
    p.add_argument("--backend", default="auto", help="dml_kernels backend of the loss (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the JSON log and the plot (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / BLAS threads (default 1: the network is tiny, and one thread is fastest and "
                        "steady on a busy machine)")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_methods.add_arguments(p)
    args = p.parse_args(argv)
    train_methods.check_arguments(p, args)
    if args.distractors < 0 or args.distractor_std < 0:
        p.error("--distractors and --distractor-std must be >= 0")
    for name in ("steps", "batch_size", "hidden", "embedding_size", "eval_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2 * len(TRAIN_CLASSES):
        p.error(f"--batch-size must be at least {2 * len(TRAIN_CLASSES)} (two samples of each training digit)")
    return args


# ------------------------------------------------------------------------------------------------ data


def load_digits_split(dtype, device):
    """(x_train, y_train, x_eval, y_eval): pixels in [0, 1] of the digits 0–4 for training (labels 0..4) and
    5–9 for evaluation (labels 5..9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=dtype)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    train = torch.isin(y, torch.tensor(TRAIN_CLASSES))
    return x[train].to(device), y[train].to(device), x[~train].to(device), y[~train].to(device)


def make_batches(y_train, steps, batch_size, seed):
    """Class-balanced index batches, fixed up front so every provider sees the same ones."""
    rng = np.random.default_rng(seed)
    labels = y_train.cpu().numpy()
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per_class, extra = divmod(batch_size, len(by_class))
    batches = []
    for _ in range(steps):
        picks = [rng.choice(ix, per_class, replace=False) for ix in by_class]
        if extra:
            picks.append(rng.choice(np.concatenate(by_class), extra, replace=False))
        batch = np.concatenate(picks)
        rng.shuffle(batch)
        batches.append(torch.as_tensor(batch))
    return batches


class EmbeddingNet(nn.Sequential):
    def __init__(self, in_features, hidden, embedding_size):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, embedding_size))


# ---------------------------------------------------------------------------------------------- losses


def _pml_distance(dk_loss):
    """PML's distance object for a dk loss's distance (as the fused kernels read it)."""
    from pytorch_metric_learning import distances as pd

    from .distances import parse_distance

    d = parse_distance(dk_loss.distance, dk_loss.normalize_embeddings, default=dk_loss._default_distance)
    if d.name == "cosine":
        return pd.CosineSimilarity()
    if d.name == "dot":
        return pd.DotProductSimilarity(normalize_embeddings=d.normalize)
    return pd.LpDistance(p=2, power=1 if d.name == "euclidean" else 2, normalize_embeddings=d.normalize)


def build_pml_loss(name, dk_kwargs, dk_loss):
    """PML's class of the same name with the same arguments; dk-only fused mining becomes PML's miner."""
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    cls = getattr(pl, name, None)
    if cls is None:
        raise SystemExit(f"--compare pml: PML has no loss named {name!r}")
    kw = {k: v for k, v in dk_kwargs.items() if k not in ("backend", "check_inputs")}
    miner = None
    distance_given = "distance" in kw or "normalize_embeddings" in kw
    kw.pop("distance", None)
    kw.pop("normalize_embeddings", None)
    distance = _pml_distance(dk_loss) if distance_given else None
    if distance is not None:
        kw["distance"] = distance
    epsilon = kw.pop("epsilon", None)
    if epsilon is not None:
        miner = pm.MultiSimilarityMiner(epsilon=epsilon, **({"distance": distance} if distance else {}))
    mining = kw.pop("mining", None)
    if mining == "batch_hard":
        miner = pm.BatchHardMiner(**({"distance": distance} if distance else {}))
    elif mining is not None:
        raise SystemExit(f"--compare pml: no PML miner for mining={mining!r}")
    if kw.pop("exclude_positive", False):
        raise SystemExit("--compare pml: exclude_positive=True has no PML equivalent")
    try:
        loss = cls(**kw)
    except TypeError as e:
        raise SystemExit(f"--compare pml: PML's {name} does not take these arguments: {e}") from None
    for pname, p in dk_loss.named_parameters():  # same initial proxies
        getattr(loss, pname).data = p.detach().clone()
    return loss, miner


# ------------------------------------------------------------------------------------------- training


class Provider:
    """One training run: a network, its loss (and miner), an optimiser, the log of its steps."""

    def __init__(self, name, model, loss_fn, miner, lr, dtype, device):
        self.name, self.model, self.loss_fn, self.miner = name, model, loss_fn, miner
        self.loss_fn.to(device=device, dtype=dtype)
        self.opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=lr)
        self.steps, self.evals = [], []
        self.train_s = 0.0

    def step(self, step, xb, yb):
        sync = xb.is_cuda
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        emb = self.model(xb)
        if self.miner is not None:
            loss = self.loss_fn(emb, yb, self.miner(emb, yb))
        else:
            loss = self.loss_fn(emb, yb)
        loss.backward()
        self.opt.step()
        if sync:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.train_s += dt
        value = float(loss.detach())
        self.steps.append({"step": step, "loss": value, "step_ms": dt * 1e3})
        return value

    def evaluate(self, step, x_eval, y_eval, calculator):
        self.model.eval()
        with torch.no_grad():
            emb = torch.nn.functional.normalize(self.model(x_eval), dim=1)
        t0 = time.perf_counter()
        metrics = calculator.get_accuracy(emb, y_eval)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                  "eval_ms": (time.perf_counter() - t0) * 1e3}
        self.evals.append(record)
        return record


def add_distractors(x, count, std, generator):
    """x with ``count`` N(0, std²) features appended (drawn from ``generator``, on the CPU, then moved)."""
    if count == 0:
        return x
    noise = torch.randn(x.shape[0], count, generator=generator, dtype=torch.float64) * std
    return torch.cat([x, noise.to(device=x.device, dtype=x.dtype)], dim=1)


def run(args):
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency: caps its k-means threads too
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if threadpool_limits is None:
            return _run(args)
        with threadpool_limits(args.threads):
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    from . import __version__
    from .evaluation import AccuracyCalculator, KMeans

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wall0 = time.perf_counter()
    x_tr, y_tr, x_ev, y_ev = load_digits_split(dtype, device)
    noise = torch.Generator().manual_seed(args.seed + 1)
    x_ev = add_distractors(x_ev, args.distractors, args.distractor_std, noise)  # fixed for every evaluation
    batches = make_batches(y_tr, args.steps, args.batch_size, args.seed)
    loss_kwargs = parse_loss_args(args.loss_args)

    torch.manual_seed(args.seed)
    model = EmbeddingNet(x_ev.shape[1], args.hidden, args.embedding_size).to(device=device, dtype=dtype)
    init = copy.deepcopy(model.state_dict())
    dk_loss, dk_kwargs, method = train_methods.build_loss(args, loss_kwargs, args.embedding_size, x_tr, y_tr,
                                                          len(TRAIN_CLASSES))
    providers = [Provider("dml_kernels", model, dk_loss, None, args.lr, dtype, device)]
    if args.compare == "pml":
        pml_loss, pml_miner = build_pml_loss(args.loss, dk_kwargs, dk_loss)
        pml_model = EmbeddingNet(x_ev.shape[1], args.hidden, args.embedding_size).to(device=device, dtype=dtype)
        pml_model.load_state_dict(init)
        providers.append(Provider("pml", pml_model, pml_loss, pml_miner, args.lr, dtype, device))

    metrics = EVAL_METRICS + tuple(f"recall_at_{K}" for K in RECALL_AT)
    calculator = AccuracyCalculator(include=metrics, k="max_bin_count", recall_at_k=RECALL_AT, device=device,
                                    kmeans_func=KMeans(seed=args.seed), backend="auto")
    eval_steps = sorted({0, args.steps, *range(args.eval_every, args.steps + 1, args.eval_every)})
    for p in providers:
        p.evaluate(0, x_ev, y_ev, calculator)

    from tqdm import tqdm

    bar = tqdm(range(1, args.steps + 1), desc=f"train {args.loss}", unit="step", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    running = None
    max_abs = max_rel = 0.0
    for step in bar:
        idx = batches[step - 1].to(device)
        xb = add_distractors(x_tr[idx], args.distractors, args.distractor_std, noise)  # fresh every step
        yb = y_tr[idx]
        values = [p.step(step, xb, yb) for p in providers]  # every provider trains on the same batch
        running = values[0] if running is None else 0.9 * running + 0.1 * values[0]
        if len(values) > 1:
            diff = abs(values[0] - values[1])
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(abs(values[1]), 1e-300))
        if step in eval_steps:
            for p in providers:
                p.evaluate(step, x_ev, y_ev, calculator)
        post = {"loss": f"{running:.4f}", "R@1": f"{providers[0].evals[-1]['recall_at_1']:.3f}"}
        if len(providers) > 1:
            post["|Δloss|max"] = f"{max_abs:.1e}"
        bar.set_postfix(post, refresh=False)
    bar.close()
    wall = time.perf_counter() - wall0

    main = providers[0]
    summary = {
        "untrained_recall_at_1": main.evals[0]["recall_at_1"],
        "trained_recall_at_1": main.evals[-1]["recall_at_1"],
        "untrained_map_at_r": main.evals[0]["mean_average_precision_at_r"],
        "trained_map_at_r": main.evals[-1]["mean_average_precision_at_r"],
        "untrained_nmi": main.evals[0]["NMI"],
        "trained_nmi": main.evals[-1]["NMI"],
        "wall_s": wall,
    }
    for p in providers:
        summary[f"{p.name}_median_step_ms"] = float(np.median([s["step_ms"] for s in p.steps]))
    if len(providers) > 1:
        summary.update(max_abs_loss_diff=max_abs, max_rel_loss_diff=max_rel,
                       pml_trained_recall_at_1=providers[1].evals[-1]["recall_at_1"])

    from . import _registry

    log = {
        "command": "python -m dml_kernels train " + " ".join(args.argv),
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "loss_kwargs": {k: repr(v) for k, v in dk_kwargs.items()},
        **({"method": method} if method else {}),
        "dataset": {"name": "scikit-learn digits (8x8)", "distractors": args.distractors,
                    "distractor_std": args.distractor_std, "train_classes": list(TRAIN_CLASSES),
                    "eval_classes": list(EVAL_CLASSES), "n_train": int(len(y_tr)), "n_eval": int(len(y_ev)),
                    "eval": "same-set retrieval on L2-normalised embeddings, AccuracyCalculator(k='max_bin_count')"},
        "environment": {"dml_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(device), "threads": torch.get_num_threads(),
                        "auto_backends_available": [b for b in _registry.auto_candidates(device.type)
                                                    if _registry.unavailable_reason(b, device.type) is None]},
        "summary": summary,
        "providers": {p.name: {"loss": type(p.loss_fn).__module__ + "." + type(p.loss_fn).__name__,
                               "miner": None if p.miner is None else type(p.miner).__name__,
                               "train_s": p.train_s, "steps": p.steps, "evals": p.evals} for p in providers},
    }
    os.makedirs(args.out, exist_ok=True)
    tag = "".join(c if c.isalnum() or c in "=.-" else "_" for c in "_".join(args.loss_args))
    parts = [args.loss, tag, *train_methods.stem_parts(args), args.dtype]
    stem = os.path.join(args.out, "_".join(filter(None, parts))
                        + ("_vs_pml" if len(providers) > 1 else ""))
    with open(stem + ".json", "w") as f:
        json.dump(log, f, indent=1)
    png = None if args.no_plot else plot(log, stem + ".png")

    print(f"{args.loss} on digits {TRAIN_CLASSES[0]}-{TRAIN_CLASSES[-1]}, {args.steps} steps of {args.batch_size} "
          f"({args.dtype}, {device}); unseen digits {EVAL_CLASSES[0]}-{EVAL_CLASSES[-1]} ({len(y_ev)} images):")
    print(f"  Recall@1 untrained {summary['untrained_recall_at_1']:.4f} -> trained {summary['trained_recall_at_1']:.4f}"
          f"   MAP@R {summary['untrained_map_at_r']:.4f} -> {summary['trained_map_at_r']:.4f}"
          f"   NMI {summary['untrained_nmi']:.4f} -> {summary['trained_nmi']:.4f}")
    for p in providers:
        print(f"  {p.name}: median step {summary[p.name + '_median_step_ms']:.2f} ms, training {p.train_s:.2f} s")
    if len(providers) > 1:
        print(f"  PML {args.loss}: trained Recall@1 {summary['pml_trained_recall_at_1']:.4f}; loss trajectories: "
              f"max |dk - pml| = {max_abs:.3g} (relative {max_rel:.3g}) over {args.steps} steps")
    print(f"  wall time {wall:.1f} s; log {stem}.json" + (f"; plot {png}" if png else ""))
    return log


def plot(log, path):
    """Training loss, unseen-class Recall@1 / MAP@R and step time per provider against the step."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = log["providers"]
    colors = {"dml_kernels": "tab:blue", "pml": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, p in provs.items():
        st = [s["step"] for s in p["steps"]]
        style = "-" if name == "dml_kernels" else "--"
        axes[0].plot(st, [s["loss"] for s in p["steps"]], style, color=colors.get(name), label=name, lw=1.2)
        ev = [e["step"] for e in p["evals"]]
        axes[1].plot(ev, [e["recall_at_1"] for e in p["evals"]], style, marker="o", ms=3, color=colors.get(name),
                     label=f"{name} Recall@1")
        axes[1].plot(ev, [e["mean_average_precision_at_r"] for e in p["evals"]], style, marker="s", ms=3,
                     color=colors.get(name), alpha=0.55, label=f"{name} MAP@R")
        ms = np.array([s["step_ms"] for s in p["steps"]])
        axes[2].plot(st, ms, style, color=colors.get(name), lw=0.6, alpha=0.3)
        w = min(9, len(ms))
        rolling = [np.median(ms[max(0, i - w // 2): i + w // 2 + 1]) for i in range(len(ms))]
        axes[2].plot(st, rolling, style, color=colors.get(name), lw=1.6, label=f"{name}: median {np.median(ms):.2f} ms")
    cfg = log["config"]
    axes[0].set(title=f"training loss ({cfg['loss']}, {cfg['dtype']})", xlabel="step", ylabel="loss")
    axes[1].set(title="unseen digits 5-9: retrieval", xlabel="step", ylabel="score", ylim=(0, 1.02))
    axes[2].set(title="step time: fwd + bwd + Adam (line: rolling median)", xlabel="step", ylabel="ms")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, framealpha=0.6)
    fig.suptitle(log["command"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
