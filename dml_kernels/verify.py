"""``python -m dml_kernels verify``: check every backend available on this machine against the float64
reference (values and gradients, a few sizes and dtypes) — and the reference against PML 2.9 when PML
is installed — print a table, exit non-zero on any mismatch.

Accuracy rule (SPEC §5, after Cut Cross-Entropy): in a low-precision dtype a backend's error against the
float64 reference may be at most 2× the reference's own error in that dtype plus a small slack; in float64
it must agree to 1e-9 (relative).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from . import _registry
from . import functional as F

SLACK = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _cases():
    """(name, op, call(x, labels, backend, proxies, ref, ref_labels) -> loss, uses_proxies, uses_ref)."""
    return [
        ("multi_similarity", "multi_similarity_loss",
         lambda x, y, b, p, r, ry: F.multi_similarity_loss(x, y, backend=b), False, False),
        ("multi_similarity+mining", "multi_similarity_loss",
         lambda x, y, b, p, r, ry: F.multi_similarity_loss(x, y, epsilon=0.1, backend=b), False, False),
        ("multi_similarity ref set", "multi_similarity_loss",
         lambda x, y, b, p, r, ry: F.multi_similarity_loss(x, y, None, r, ry, epsilon=0.1, backend=b), False, True),
        ("lifted_structure", "lifted_structure_loss",
         lambda x, y, b, p, r, ry: F.lifted_structure_loss(x, y, backend=b), False, False),
        ("generalized_lifted", "generalized_lifted_structure_loss",
         lambda x, y, b, p, r, ry: F.generalized_lifted_structure_loss(x, y, backend=b), False, False),
        ("n_pairs", "n_pairs_loss", lambda x, y, b, p, r, ry: F.n_pairs_loss(x, y, backend=b), False, False),
        ("contrastive", "contrastive_loss",
         lambda x, y, b, p, r, ry: F.contrastive_loss(x, y, backend=b), False, False),
        ("triplet (all)", "triplet_margin_loss",
         lambda x, y, b, p, r, ry: F.triplet_margin_loss(x, y, margin=0.2, backend=b), False, False),
        ("triplet (batch_hard)", "triplet_margin_loss",
         lambda x, y, b, p, r, ry: F.triplet_margin_loss(x, y, margin=0.2, mining="batch_hard", backend=b),
         False, False),
        ("proxy_nca", "proxy_nca_loss",
         lambda x, y, b, p, r, ry: F.proxy_nca_loss(x, y, p, softmax_scale=3, backend=b), True, False),
        ("proxy_anchor", "proxy_anchor_loss",
         lambda x, y, b, p, r, ry: F.proxy_anchor_loss(x, y, p, backend=b), True, False),
    ]


def _lang(x, labels):
    """Fixed per-class "language" embeddings (a constant, as language guidance takes them)."""
    table = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return table.to(device=x.device, dtype=x.dtype)[labels % 64]


def _grouped(p, k):
    """D × (C·k) class weights from C × D proxies: column c·k + j belongs to class c (ProxyGML's layout)."""
    return torch.stack([p * (0.7 ** j) + 0.1 * j for j in range(k)], 1).reshape(-1, p.shape[1]).t()


def _second_wave_cases():
    """The families added after the first ten losses (registered on fewer backends: the others say so)."""
    from . import reducers as R

    return [
        ("ntxent", "ntxent_loss", lambda x, y, b, p, r, ry: F.ntxent_loss(x, y, backend=b), False, False),
        ("supcon", "supcon_loss", lambda x, y, b, p, r, ry: F.supcon_loss(x, y, backend=b), False, False),
        ("nca", "nca_loss", lambda x, y, b, p, r, ry: F.nca_loss(x, y, backend=b), False, False),
        ("circle", "circle_loss", lambda x, y, b, p, r, ry: F.circle_loss(x, y, gamma=8, backend=b), False, False),
        ("contrastive, Threshold reducer", "contrastive_loss_row_stats",
         lambda x, y, b, p, r, ry: F.contrastive_loss(x, y, reducer=R.ThresholdReducer(low=0.1), backend=b),
         False, False),
        ("triplet, AvgNonZero reducer", "triplet_margin_loss_row_stats",
         lambda x, y, b, p, r, ry: F.triplet_margin_loss(x, y, margin=0.2, reducer=R.AvgNonZeroReducer(),
                                                         backend=b), False, False),
        ("normalized_softmax", "normalized_softmax_loss",
         lambda x, y, b, p, r, ry: F.normalized_softmax_loss(x, y, p.t(), backend=b), True, False),
        ("cosface", "cosface_loss", lambda x, y, b, p, r, ry: F.cosface_loss(x, y, p.t(), scale=8, backend=b),
         True, False),
        ("arcface", "arcface_loss", lambda x, y, b, p, r, ry: F.arcface_loss(x, y, p.t(), scale=8, backend=b),
         True, False),
        ("large_margin_softmax", "large_margin_softmax_loss",
         lambda x, y, b, p, r, ry: F.large_margin_softmax_loss(x, y, p.t(), margin=3, backend=b), True, False),
        ("sphereface", "sphereface_loss",
         lambda x, y, b, p, r, ry: F.sphereface_loss(x, y, p.t(), margin=3, backend=b), True, False),
        ("p2sgrad (unit columns)", "p2sgrad_loss",
         lambda x, y, b, p, r, ry: F.p2sgrad_loss(x, y, torch.nn.functional.normalize(p, dim=1).t(), backend=b),
         True, False),
        ("p2sgrad (long columns)", "p2sgrad_loss",
         lambda x, y, b, p, r, ry: F.p2sgrad_loss(x, y, 3 * p.t(), backend=b), True, False),
        ("fastap", "fastap_loss", lambda x, y, b, p, r, ry: F.fastap_loss(x, y, backend=b), False, False),
        ("language_guidance", "language_guidance_loss",
         lambda x, y, b, p, r, ry: F.language_guidance_loss(x, y, _lang(x, y), backend=b), False, False),
        ("direction triplet", "direction_triplet_margin_loss",
         lambda x, y, b, p, r, ry: F.direction_triplet_margin_loss(x, y, direction_gamma=0.3, margin=0.2, backend=b),
         False, False),
        ("direction multi_similarity", "direction_multi_similarity_loss",
         lambda x, y, b, p, r, ry: F.direction_multi_similarity_loss(x, y, direction_gamma=0.3, backend=b),
         False, False),
        ("direction proxy_nca", "direction_proxy_nca_loss",
         lambda x, y, b, p, r, ry: F.direction_proxy_nca_loss(x, y, p, direction_gamma=0.3, backend=b), True, False),
        ("proxy_gml", "proxy_gml_loss",
         lambda x, y, b, p, r, ry: F.proxy_gml_loss(x, y, _grouped(p, 2), proxies_per_class=2, r=0.3, backend=b),
         True, False),
    ]


def _pml_cases():
    """(name, dml_kernels call, PML call) pairs for the reference-vs-PML check."""
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    ms_miner, bh_miner = pm.MultiSimilarityMiner(0.1), pm.BatchHardMiner()
    return [
        ("multi_similarity", lambda x, y: F.multi_similarity_loss(x, y, backend="reference"),
         lambda x, y: pl.MultiSimilarityLoss()(x, y)),
        ("multi_similarity+mining", lambda x, y: F.multi_similarity_loss(x, y, epsilon=0.1, backend="reference"),
         lambda x, y: pl.MultiSimilarityLoss()(x, y, ms_miner(x, y))),
        ("lifted_structure", lambda x, y: F.lifted_structure_loss(x, y, backend="reference"),
         lambda x, y: pl.LiftedStructureLoss()(x, y)),
        ("generalized_lifted", lambda x, y: F.generalized_lifted_structure_loss(x, y, backend="reference"),
         lambda x, y: pl.GeneralizedLiftedStructureLoss()(x, y)),
        ("n_pairs", lambda x, y: F.n_pairs_loss(x, y, backend="reference"), lambda x, y: pl.NPairsLoss()(x, y)),
        ("contrastive", lambda x, y: F.contrastive_loss(x, y, backend="reference"),
         lambda x, y: pl.ContrastiveLoss()(x, y)),
        ("triplet (all)", lambda x, y: F.triplet_margin_loss(x, y, margin=0.2, backend="reference"),
         lambda x, y: pl.TripletMarginLoss(margin=0.2)(x, y)),
        ("triplet (batch_hard)",
         lambda x, y: F.triplet_margin_loss(x, y, margin=0.2, mining="batch_hard", backend="reference"),
         lambda x, y: pl.TripletMarginLoss(margin=0.2)(x, y, bh_miner(x, y))),
    ]


def _loss_and_grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return loss.detach().double(), [g.double() for g in grads]


def _max_rel_err(got, want):
    """Largest |got − want| relative to the size of ``want`` (max-abs of the tensor, at least 1e-6)."""
    scale = max(want.abs().max().item(), 1e-6)
    return (got - want).abs().max().item() / scale


def _backends_to_check(device_type, requested):
    names = [b for b in _registry.BACKENDS if b != "reference"] if requested is None else requested
    out = []
    for b in names:
        if b == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            why = "skipped on CPU: the Triton interpreter is for tests (set TRITON_INTERPRET=1 to include it)"
        else:
            why = _registry.unavailable_reason(b, device_type)
        out.append((b, why))
    return out


def run(device: str, sizes, dtypes, backends=None, out=sys.stdout) -> int:
    failures = 0
    rows = []
    device_type = torch.device(device).type
    for backend, why in _backends_to_check(device_type, backends):
        if why is not None:
            rows.append((backend, "-", "-", "-", "unavailable", why))
            continue
        for name, op, call, uses_proxies, uses_ref in _cases() + _second_wave_cases():
            if (op, backend) not in _registry._IMPLS:
                rows.append((backend, name, "-", "-", "not implemented", ""))
                continue
            for n, d in sizes:
                for dtype in dtypes:
                    g = torch.Generator().manual_seed(n * 1000 + d)
                    x = torch.randn(n, d, generator=g, dtype=torch.float64)
                    y = torch.randint(0, max(2, n // 4), (n,), generator=g)
                    p = torch.randn(max(3, n // 3), d, generator=g, dtype=torch.float64)
                    y_proxy = y % p.shape[0]
                    r = torch.randn(2 * n + 5, d, generator=g, dtype=torch.float64)
                    ry = torch.randint(0, max(2, n // 4), (2 * n + 5,), generator=g)
                    labels = (y_proxy if uses_proxies else y).to(device)
                    leaves = [x] + ([p] if uses_proxies else []) + ([r] if uses_ref else [])

                    def as_fn(b, dt):
                        def fn(*ls):
                            xx = ls[0]
                            pp = ls[1] if uses_proxies else None
                            rr = ls[-1] if uses_ref else None
                            return call(xx, labels, b, pp, rr, None if rr is None else ry.to(device))
                        return lambda *ls: fn(*[t.to(device=device, dtype=dt) for t in ls])

                    status, detail = "ok", ""
                    try:
                        want, want_g = _loss_and_grads(as_fn("reference", torch.float64), leaves)
                        got, got_g = _loss_and_grads(as_fn(backend, dtype), leaves)
                        err = max([_max_rel_err(got, want)] + [_max_rel_err(a, b) for a, b in zip(got_g, want_g)])
                        if dtype == torch.float64:
                            bound = SLACK[dtype]
                        else:
                            ref_l, ref_g = _loss_and_grads(as_fn("reference", dtype), leaves)
                            ref_err = max([_max_rel_err(ref_l, want)] +
                                          [_max_rel_err(a, b) for a, b in zip(ref_g, want_g)])
                            bound = 2 * ref_err + SLACK[dtype]
                        detail = f"err {err:.1e} ≤ {bound:.1e}"
                        if not err <= bound:
                            status, failures = "MISMATCH", failures + 1
                            detail = f"err {err:.1e} > {bound:.1e}"
                    except _registry.Unsupported as e:
                        status, detail = "unsupported", str(e)[:60]
                    except Exception as e:  # noqa: BLE001 - a crash is a failure, reported in the table
                        status, failures = "ERROR", failures + 1
                        detail = f"{type(e).__name__}: {e}"[:100]
                    rows.append((backend, name, f"N={n} D={d}", str(dtype).replace("torch.", ""), status, detail))
    failures += _check_pml(rows)
    _print_table(rows, out)
    print(f"\n{'FAIL' if failures else 'OK'}: {failures} mismatch(es)", file=out)
    return 1 if failures else 0


def _check_pml(rows) -> int:
    try:
        cases = _pml_cases()
    except ImportError:
        rows.append(("reference vs PML", "-", "-", "-", "skipped", "pytorch-metric-learning not installed"))
        return 0
    failures = 0
    for name, ours, theirs in cases:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(37, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 9, (37,), generator=g)
        a, ga = _loss_and_grads(lambda t: ours(t, y), [x])
        b, gb = _loss_and_grads(lambda t: theirs(t, y), [x])
        err = max(_max_rel_err(a, b), _max_rel_err(ga[0], gb[0]))
        ok = err <= 1e-9
        failures += not ok
        rows.append(("reference vs PML", name, "N=37 D=16", "float64", "ok" if ok else "MISMATCH",
                     f"err {err:.1e} {'≤' if ok else '>'} 1.0e-09"))
    return failures


def _print_table(rows, out):
    header = ("backend", "op", "size", "dtype", "status", "detail")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[5]
    print(line, file=out)
    print("-" * min(len(line) + 20, 140), file=out)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[5]), file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dml_kernels verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--backends", nargs="*", default=None, help="backends to check (default: all but reference)")
    parser.add_argument("--dtypes", nargs="*", default=None,
                        help="float64 float32 bfloat16 float16 (default: float64 float32, + bfloat16 on cuda)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes]
    else:
        dtypes = [torch.float64, torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    sizes = [(33, 16), (130, 33)]
    start = time.time()
    print(f"dml_kernels verify on {device} (torch {torch.__version__})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code = run(device, sizes, dtypes, args.backends)
    print(f"({time.time() - start:.1f} s)")
    return code
