"""What ``python -m dml_kernels bench`` measures: the benchmark cases (op × variant, each with a
dml_kernels call and the equivalent PML pipeline) and the size presets.

A *case* builds its inputs for one size and returns callables that run the op; a *cell* is one
(case, provider, dtype, size) measurement. Sizes: ``B`` queries, ``M`` references (None = the batch
itself, self-pairs excluded), ``C`` proxies (None for pair ops), ``D`` embedding size.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

SAMPLES_PER_CLASS = 4  # PK batches: every class in a batch has exactly 4 samples (the usual DML sampler)


@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # unique, used by --ops (e.g. "ms_mining")
    op: str  # the registry op (dml_kernels/_ops.py), e.g. "multi_similarity_loss"
    variant: str  # "plain", "mining", "batch_hard", ...
    family: str  # "pair" (x-axis B), "ref" (x-axis M), "proxy" (x-axis C)
    dk: Callable  # (inputs: dict, backend: str) -> tensor
    pml: Optional[Callable]  # (inputs: dict) -> (callable() -> tensor, extra leaves); None: no PML equivalent
    pml_desc: str = ""
    note: str = ""


# --------------------------------------------------------------------------- inputs


def _pk_labels(n, gen, num_classes=None):
    classes = max(1, n // SAMPLES_PER_CLASS) if num_classes is None else num_classes
    return torch.randperm(n, generator=gen) % classes


def make_inputs(case: Case, B, M, C, D, dtype, device, seed=0):
    """Tensors of one input set (leaves require grad, except a reference set: a detached memory bank)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    t = {}
    if case.family == "proxy":
        t["labels"] = torch.randint(0, C, (B,), generator=gen)
        t["proxies"] = torch.randn(C, D, generator=gen)
    elif case.family == "ref":
        ref_classes = max(1, M // SAMPLES_PER_CLASS)
        t["ref_labels"] = _pk_labels(M, gen, ref_classes)
        t["ref"] = torch.randn(M, D, generator=gen)
        t["labels"] = torch.randint(0, ref_classes, (B,), generator=gen)
    else:
        t["labels"] = _pk_labels(B, gen)
    if case.key == "language_guidance":  # one D-dim "text embedding" per class, gathered per sample (a constant)
        t["lang"] = torch.randn(int(t["labels"].max()) + 1, D, generator=gen)[t["labels"]]
    t["x"] = x
    out = {}
    for k, v in t.items():
        v = v.to(device)
        if v.is_floating_point():
            v = v.to(dtype)
            if k in ("x", "proxies"):
                v.requires_grad_(True)
        out[k] = v
    return out


def leaves(inputs):
    return [v for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad]


def pml_runner(case: Case, inputs):
    """(run() -> loss, leaves) of the PML pipeline; PML proxy losses own a copy of the proxies, so the
    benchmark's own proxies are not a leaf there (the module's are)."""
    fn, extra = case.pml(inputs)
    own = [v for k, v in inputs.items() if k != "proxies" or not extra]
    return fn, [v for v in own if torch.is_tensor(v) and v.requires_grad] + list(extra)


def input_bytes(inputs):
    return sum(v.numel() * v.element_size() for v in inputs.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------- cases


def _F():
    from .. import functional

    return functional


def _pml():
    from pytorch_metric_learning import distances, losses, miners

    return losses, miners, distances


def _no_extra(fn):
    return fn, []


def _pml_proxy(cls_name, **kw):
    def build(t):
        losses, _, _ = _pml()
        C, D = t["proxies"].shape
        mod = getattr(losses, cls_name)(C, D, **kw).to(t["x"].device)
        # Share the benchmark's proxies (same values, same dtype) and count their gradient.
        mod.proxies = torch.nn.Parameter(t["proxies"].detach().clone())
        return (lambda: mod(t["x"], t["labels"])), [mod.proxies]
    return build


_KW = dict(check_inputs=False)  # no host syncs for value checks: what a training loop would run


def _plain_pair(key, op, pml_cls, variant="plain", pml_desc=None, note=""):
    """A pair case with default arguments on both sides: ``functional.<op>(x, labels)`` against
    ``pml.losses.<pml_cls>()(x, labels)``."""
    return Case(key, op, variant, "pair",
                lambda t, b: getattr(_F(), op)(t["x"], t["labels"], backend=b, **_KW),
                lambda t: _no_extra(lambda: getattr(_pml()[0], pml_cls)()(t["x"], t["labels"])),
                pml_desc or f"{pml_cls}()", note=note)


def _cases():
    kw = _KW
    cs = [
        _plain_pair("ms", "multi_similarity_loss", "MultiSimilarityLoss"),
        Case("ms_mining", "multi_similarity_loss", "mining", "pair",
             lambda t, b: _F().multi_similarity_loss(t["x"], t["labels"], epsilon=0.1, backend=b, **kw),
             lambda t: _no_extra(lambda: _pml()[0].MultiSimilarityLoss()(
                 t["x"], t["labels"], _pml()[1].MultiSimilarityMiner(0.1)(t["x"], t["labels"]))),
             "MultiSimilarityMiner(0.1) + MultiSimilarityLoss()"),
        Case("ms_mining_ref", "multi_similarity_loss", "mining+ref", "ref",
             lambda t, b: _F().multi_similarity_loss(t["x"], t["labels"], None, t["ref"], t["ref_labels"],
                                                     epsilon=0.1, backend=b, **kw),
             lambda t: _no_extra(lambda: _pml()[0].MultiSimilarityLoss()(
                 t["x"], t["labels"],
                 _pml()[1].MultiSimilarityMiner(0.1)(t["x"], t["labels"], t["ref"], t["ref_labels"]),
                 t["ref"], t["ref_labels"])),
             "MultiSimilarityMiner(0.1) + MultiSimilarityLoss() with ref_emb",
             note="B queries against a detached memory bank of M references (cross-batch memory)"),
        _plain_pair("lifted", "lifted_structure_loss", "LiftedStructureLoss",
                    note="PML builds a (#pos pairs × #neg pairs) matrix: O(B³) memory"),
        _plain_pair("generalized_lifted", "generalized_lifted_structure_loss", "GeneralizedLiftedStructureLoss"),
        _plain_pair("contrastive", "contrastive_loss", "ContrastiveLoss"),
        _plain_pair("triplet_all", "triplet_margin_loss", "TripletMarginLoss", variant="all",
                    pml_desc="TripletMarginLoss() (all triplets)",
                    note="every valid triplet: O(B·P·B) epilogue work; the reference is O(B³) in time"),
        Case("triplet_batch_hard", "triplet_margin_loss", "batch_hard", "pair",
             lambda t, b: _F().triplet_margin_loss(t["x"], t["labels"], mining="batch_hard", backend=b, **kw),
             lambda t: _no_extra(lambda: _pml()[0].TripletMarginLoss()(
                 t["x"], t["labels"], _pml()[1].BatchHardMiner()(t["x"], t["labels"]))),
             "BatchHardMiner() + TripletMarginLoss()"),
        _plain_pair("n_pairs", "n_pairs_loss", "NPairsLoss"),
        Case("pairwise_similarity", "pairwise_similarity", "cosine", "pair",
             lambda t, b: _F().pairwise_similarity(t["x"], backend=b, **kw).sum(),
             lambda t: _no_extra(lambda: _pml()[2].CosineSimilarity()(t["x"]).sum()),
             "CosineSimilarity()(x)",
             note="the B×B matrix is the output (materialised by definition); timed as .sum() of it"),
        Case("proxy_nca", "proxy_nca_loss", "plain", "proxy",
             lambda t, b: _F().proxy_nca_loss(t["x"], t["labels"], t["proxies"], backend=b, **kw),
             _pml_proxy("ProxyNCALoss"), "ProxyNCALoss(C, D) with the same proxies"),
        Case("proxy_anchor", "proxy_anchor_loss", "plain", "proxy",
             lambda t, b: _F().proxy_anchor_loss(t["x"], t["labels"], t["proxies"], backend=b, **kw),
             _pml_proxy("ProxyAnchorLoss"), "ProxyAnchorLoss(C, D) with the same proxies"),
    ]
    cs.append(Case("language_guidance", "language_guidance_loss", "release", "pair",
                   lambda t, b: _F().language_guidance_loss(t["x"], t["labels"], t["lang"], mask_same_class=True,
                                                            backend=b, **kw), None,
                   note="seed 002 eq. 29 with the release's same-class masking; no PML equivalent"))
    return {c.key: c for c in cs}


CASES = _cases()


# --------------------------------------------------------------------------- GEMM floor (FLOPs that cannot be avoided)


def gemm_flops(case: Case, B, M, C, D):
    """Matmul FLOPs of forward + backward: the similarity tile S (2·B·R·D) and the gradient GEMMs
    (dX = G·R, plus dR = Gᵀ·X when the references / proxies get a gradient). Self mode: dX = (G + Gᵀ)·X,
    one GEMM. N-pairs: the anchors × positives block only. Triplet-all's O(B·P·B) epilogue is not counted
    (so its floor is loose)."""
    if case.family == "proxy":
        return 6.0 * B * C * D
    if case.family == "ref":  # detached memory bank: S and dX only
        return 4.0 * B * M * D
    if case.key == "n_pairs":  # only anchors × positives matter: K = B / SAMPLES_PER_CLASS pairs in a PK batch
        k = max(1, B // SAMPLES_PER_CLASS)
        return 4.0 * k * k * D
    if case.key == "language_guidance":  # S_I and S_L (language size D) once, one (G + Gᵀ)·X GEMM
        return 6.0 * B * B * D
    return 4.0 * B * B * D


# --------------------------------------------------------------------------- presets

PROVIDERS_ORDER = ("cpu", "cuda", "triton", "reference", "compile", "pml")


@dataclasses.dataclass(frozen=True)
class Point:
    case: str
    B: int
    M: Optional[int] = None
    C: Optional[int] = None
    D: int = 256
    dtype: str = "float32"
    time: bool = True  # False: memory only (a size where timing every provider would not fit the preset)
    providers: Optional[tuple] = None  # None: every provider; else only these (the rest are not recorded)


PAIR_CASES = ("ms", "ms_mining", "lifted", "generalized_lifted", "contrastive", "triplet_batch_hard", "n_pairs",
              "pairwise_similarity")


def preset_cpu_quick():
    """≤ 10 min on a 2-core CPU (a time budget guards it; cells are ordered most important first): MS with
    mining at B 1024 … 4096 and, memory only, B=16384 D=128; every other pair op at B 512 and 2048
    (triplet-all at 256 … 1024); B=256 against a memory bank M up to 16384; proxies B=256, C up to 32768.
    D=256 unless stated."""
    pts = [Point("ms_mining", 16384, D=128, time=False, providers=("cpu", "reference"))]
    for B in (4096, 2048, 1024):
        pts.append(Point("ms_mining", B))
    for C in (32768, 4096):
        pts.append(Point("proxy_anchor", 256, C=C))
        pts.append(Point("proxy_nca", 256, C=C))
    for B in (2048, 512):
        for c in ("ms", "generalized_lifted", "contrastive", "triplet_batch_hard", "n_pairs", "lifted",
                  "pairwise_similarity"):
            pts.append(Point(c, B))
    for M in (16384, 4096):
        pts.append(Point("ms_mining_ref", 256, M=M))
    for B in (512, 1024, 256):
        pts.append(Point("triplet_all", B))
    for B in (4096, 1024):
        pts.append(Point("language_guidance", B))
    # PML at the memory headline size (it runs out of the per-cell memory limit after ~1 min): last.
    pts.append(Point("ms_mining", 16384, D=128, time=False, providers=("pml",)))
    return pts


def preset_cpu_full():
    """The full CPU sweep (hours on 2 cores): B 512 … 16384, D 128 and 512, M and C sweeps."""
    pts = []
    for D in (128, 512):
        for B in (512, 1024, 2048, 4096, 8192, 16384):
            for c in PAIR_CASES:
                pts.append(Point(c, B, D=D, time=B <= 8192))
        for B in (256, 512, 1024, 2048):
            pts.append(Point("triplet_all", B, D=D))
        for M in (4096, 16384, 65536):
            pts.append(Point("ms_mining_ref", 1024, M=M, D=D))
        for C in (1000, 10000, 100000, 1000000):
            pts.append(Point("proxy_nca", 1024, C=C, D=D))
            pts.append(Point("proxy_anchor", 1024, C=C, D=D))
    return pts


def preset_gpu():
    """≤ 10 min on one H100 (a time budget guards it): bf16 main sweep B 4096 … 65536 (MS with mining from
    1024), D=128; D=512, fp16 and fp32 at two sizes; M up to 65536; C up to 1M. Cells are ordered most
    important first."""
    pts = []
    for B in (4096, 16384, 65536, 1024):
        pts.append(Point("ms_mining", B, D=128, dtype="bfloat16"))
    for C in (100000, 1000000, 10000, 1000):
        pts.append(Point("proxy_nca", 4096, C=C, D=128, dtype="bfloat16"))
        pts.append(Point("proxy_anchor", 4096, C=C, D=128, dtype="bfloat16"))
    for B in (4096, 16384, 65536):  # (B=1024 dropped: the ~500-cell budget went to the later families)
        for c in ("ms", "lifted", "generalized_lifted", "contrastive", "triplet_batch_hard", "n_pairs",
                  "pairwise_similarity"):
            pts.append(Point(c, B, D=128, dtype="bfloat16"))
    for M in (16384, 65536, 4096):
        pts.append(Point("ms_mining_ref", 1024, M=M, D=128, dtype="bfloat16"))
    for B in (1024, 4096, 16384, 512):
        pts.append(Point("triplet_all", B, D=128, dtype="bfloat16"))
    for dtype in ("float32", "float16"):
        for B in (4096, 16384):
            pts.append(Point("ms_mining", B, D=128, dtype=dtype))
            pts.append(Point("proxy_anchor", B, C=100000, D=128, dtype=dtype))
    for B in (16384, 4096):
        pts.append(Point("language_guidance", B, D=128, dtype="bfloat16"))
    for B in (4096, 16384):
        pts.append(Point("ms_mining", B, D=512, dtype="bfloat16"))
        pts.append(Point("proxy_nca", B, C=100000, D=512, dtype="bfloat16"))
    return pts


def preset_cpu_smoke():
    """Seconds on a CPU: the harness's own test (tests/test_bench.py). One tiny cell per family, and a
    memory-only cell whose reference needs ~0.3 GB (a test runs it under a smaller cap: status "oom")."""
    return [Point("ms_mining", 64, D=16), Point("ms_mining_ref", 32, M=128, D=16), Point("proxy_nca", 32, C=100, D=16),
            Point("ms_mining", 4096, D=16, time=False, providers=("cpu", "reference"))]


PRESETS = {"cpu-quick": preset_cpu_quick, "cpu-full": preset_cpu_full, "gpu": preset_gpu,
           "cpu-smoke": preset_cpu_smoke}

# the contrastive family (issue 12): default arguments on both sides (PML's default distances), PK batches
_CONTRASTIVE = (("ntxent", "ntxent_loss", "NTXentLoss"), ("supcon", "supcon_loss", "SupConLoss"),
                ("nca", "nca_loss", "NCALoss"), ("circle", "circle_loss", "CircleLoss"),
                ("threshold_consistent_margin", "threshold_consistent_margin_loss", "ThresholdConsistentMarginLoss"),
                ("intra_pair_variance", "intra_pair_variance_loss", "IntraPairVarianceLoss"))
CASES.update({key: _plain_pair(key, op, cls) for key, op, cls in _CONTRASTIVE})
# cpu-quick: the B=4096 (time) and B=16384 (peak memory of the cpu form only: the reference needs several
# 1 GiB B×B matrices there), D=256
for _name, _pts in (("cpu-quick", lambda: [Point(k, B) for B in (4096, 512) for k, _, _ in _CONTRASTIVE]
                     + [Point(k, 16384, time=False, providers=("cpu",)) for k, _, _ in _CONTRASTIVE]),
                    ("cpu-full", lambda: [Point(k, B, D=128) for B in (1024, 4096, 16384) for k, _, _ in _CONTRASTIVE]),
                    # GPU: NTXent / SupCon / NCA at three sizes (the 64k case), the other three at two (the
                    # sweep's ~500-cell, 10-minute budget)
                    ("gpu", lambda: [Point(k, B, D=128, dtype="bfloat16") for k, _, _ in _CONTRASTIVE
                                     for B in ((4096, 16384, 65536) if k in ("ntxent", "supcon", "nca")
                                               else (4096, 65536))])):
    PRESETS[_name] = (lambda base, extra: lambda: base() + extra())(PRESETS[_name], _pts)

# Provider × case size limits: beyond these a provider is recorded as "skipped" (it would take too long).
# Keys: (device_type, case, provider) -> largest B (pair) / M (ref) / C (proxy) that is run.
_CPU_LIMITS = {
    ("cpu", "triplet_all", "reference"): 512,  # O(B³) in time: ~50 s per call at B=1024 on 2 cores
    ("cpu", "triplet_all", "compile"): 512,
    ("cpu", "triplet_all", "pml"): 1024,  # materialises every (a, p, n) index triple
}
_PRESET_LIMITS = {
    # PML's LiftedStructureLoss at B=512, D=256 took ~30 s per forward+backward and 8.4 GB on 2 cores
    # (measured; kept in the committed cpu-quick.json): more than the quick preset's budget allows.
    ("cpu-quick", "lifted", "pml"): 256,
}
_GPU_LIMITS = {
    ("cuda", "triplet_all", "reference"): 4096,
    ("cuda", "triplet_all", "compile"): 4096,
    ("cuda", "triplet_all", "pml"): 4096,
}
# The compile provider re-compiles per shape (compile time is excluded from the timings but not from the
# preset's wall-clock budget), so the presets run it at fewer sizes.
COMPILE_SIZES = {
    "cpu-quick": {"pair": (4096,), "ref": (), "proxy": (32768,)},
    "cpu-smoke": {"pair": (), "ref": (), "proxy": ()},
    "gpu": {"pair": (16384,), "ref": (), "proxy": (100000,)},
}
COMPILE_CASES = {"gpu": ("ms_mining", "ms", "proxy_nca", "proxy_anchor")}
COMPILE_DTYPES = {"gpu": ("bfloat16",)}


def axis_value(case: Case, B, M, C):
    return {"pair": B, "ref": M, "proxy": C}[case.family]


def skip_reason(device_type, preset, case: Case, provider, B, M, C, dtype=None):
    """Why this provider is not run at this size in this preset (recorded as status "skipped"), or None."""
    size = axis_value(case, B, M, C)
    limit = {**_CPU_LIMITS, **_GPU_LIMITS}.get((device_type, case.key, provider))
    limit = _PRESET_LIMITS.get((preset, case.key, provider), limit)
    if limit is not None and size > limit:
        return f"{provider} is too slow beyond {case.family}-size {limit} on {device_type} (preset limit)"
    if provider == "compile" and preset in COMPILE_CASES and case.key not in COMPILE_CASES[preset]:
        return f"torch.compile is run only for {COMPILE_CASES[preset]} in the {preset} preset (per-shape compile)"
    if provider == "compile" and dtype and preset in COMPILE_DTYPES and dtype not in COMPILE_DTYPES[preset]:
        return f"torch.compile is run only in {COMPILE_DTYPES[preset]} in the {preset} preset (per-shape compile)"
    if provider == "compile" and preset in COMPILE_SIZES:
        allowed = COMPILE_SIZES[preset][case.family]
        if size not in allowed:
            return f"torch.compile is run only at sizes {allowed} in the {preset} preset (per-shape compile)"
    return None


# --------------------------------------------------------------------------- the margin-softmax family (issue 13)
# W = proxiesᵀ: PML's D×C layout, a view (the benchmark's proxies get the gradient). SubCenterArcFace and
# SoftTriple: the C columns are C/2 classes of K = 2 centres (labels taken modulo C/2; every size, and the harness's
# 1000-column value check, is even). P2SGrad: unit columns, renormalised before each call as PML's module does.
# Same GEMM floor (6·B·C·D).
_MARGIN_K = 2
_MARGIN = {  # key: (op, PML class, PML's weight attribute, keyword arguments, centres per class)
    "normalized_softmax": ("normalized_softmax_loss", "NormalizedSoftmaxLoss", "W", {}, 1),
    "cosface": ("cosface_loss", "CosFaceLoss", "W", {}, 1),
    "arcface": ("arcface_loss", "ArcFaceLoss", "W", {}, 1),
    "sphereface": ("sphereface_loss", "SphereFaceLoss", "W", {}, 1),
    "subcenter_arcface": ("subcenter_arcface_loss", "SubCenterArcFaceLoss", "W", {"sub_centers": _MARGIN_K}, _MARGIN_K),
    "soft_triple": ("soft_triple_loss", "SoftTripleLoss", "fc", {"centers_per_class": _MARGIN_K}, _MARGIN_K),
    "p2sgrad": ("p2sgrad_loss", "P2SGradLoss", "weight", {}, 1),
}


def _margin_case(key, op, cls_name, attr, kw, k):
    def labels(t):
        if op == "p2sgrad_loss":
            with torch.no_grad():
                t["proxies"].div_(t["proxies"].norm(dim=1, keepdim=True))
        return t["labels"] % max(1, t["proxies"].shape[0] // k)

    def pml(t):
        losses, _, _ = _pml()
        C, D = t["proxies"].shape
        mod = (losses.P2SGradLoss(D, C) if cls_name == "P2SGradLoss"
               else getattr(losses, cls_name)(num_classes=C // k, embedding_size=D, **kw)).to(t["x"].device)
        w = torch.nn.Parameter(t["proxies"].detach().t().clone())
        setattr(mod, attr, w)
        return (lambda: mod(t["x"], labels(t))), [w]

    return Case(key, op, "plain", "proxy",
                lambda t, b: getattr(_F(), op)(t["x"], labels(t), t["proxies"].t(), backend=b, **kw, **_KW),
                pml, f"{cls_name}(C{'/2' if k > 1 else ''}, D{', ' + str(kw) if kw else ''}) with W = the proxiesᵀ")


CASES.update({key: _margin_case(key, *spec) for key, spec in _MARGIN.items()})


def _with_margin_points(preset, points):
    return lambda: preset() + points()


PRESETS["cpu-quick"] = _with_margin_points(PRESETS["cpu-quick"], lambda: [  # after the existing cells (budget)
    Point(key, 256, C=C) for C in (32768, 4096) for key in _MARGIN])
PRESETS["cpu-full"] = _with_margin_points(PRESETS["cpu-full"], lambda: [
    Point(key, 1024, C=C, D=D) for D in (128, 512) for C in (10000, 100000, 1000000) for key in _MARGIN])
PRESETS["gpu"] = _with_margin_points(PRESETS["gpu"], lambda: [
    Point(key, 4096, C=C, D=128, dtype="bfloat16") for C in (1000000, 100000) for key in _MARGIN])


# --------------------------------------------------------------------------- the ranking losses (issue 14)
# FastAP (PML defaults: 10 bins, squared euclidean on normalised rows) and RankedList (margin 0.4, Tn 1, PML's other
# defaults), PK batches; the fused forms keep O(B·bins) / O(B) per-row statistics and recompute tiles backward.
CASES["fastap"] = _plain_pair("fastap", "fastap_loss", "FastAPLoss",
                              note="the reference / PML form an (num_bins+1)×B×B pulse tensor")
CASES["ranked_list"] = Case(
    "ranked_list", "ranked_list_loss", "plain", "pair",
    lambda t, b: _F().ranked_list_loss(t["x"], t["labels"], margin=0.4, Tn=1.0, backend=b, **_KW),
    lambda t: _no_extra(lambda: _pml()[0].RankedListLoss(margin=0.4, Tn=1.0)(t["x"], t["labels"])),
    "RankedListLoss(margin=0.4, Tn=1)")
# cpu-quick: FastAP at B=1024 only (its (bins+1)-pulse reference / PML take minutes per cell at 4096 on 2 cores).
for _name, _pts in (("cpu-quick", lambda: [Point("ranked_list", 4096), Point("ranked_list", 1024),
                                           Point("fastap", 1024)]),
                    ("cpu-full", lambda: [Point(k, B, D=128, time=B <= 8192) for B in (1024, 4096, 16384)
                                          for k in ("fastap", "ranked_list")]),
                    ("gpu", lambda: [Point(k, B, D=128, dtype="bfloat16") for B in (16384, 4096)
                                     for k in ("fastap", "ranked_list")])):
    PRESETS[_name] = (lambda base, extra: lambda: base() + extra())(PRESETS[_name], _pts)


# --------------------------------------------------------------------------- the seed methods (issue 16)
# Direction regularisation (γ = 0.3) on MultiSimilarity (default arguments), batch-hard TripletMargin and ProxyNCA,
# and ProxyGML (the C proxies as PML's D×(C·N) layout, N = 4 per class: C/4 classes, r = 0.05, λ = 0.3); no PML
# equivalent. cpu: row blocks in O(block × M), the reference forms N×M (B×C) matrices.
_GML_N = 4
CASES["direction_ms"] = Case(
    "direction_ms", "direction_multi_similarity_loss", "plain", "pair",
    lambda t, b: _F().direction_multi_similarity_loss(t["x"], t["labels"], direction_gamma=0.3, backend=b, **_KW),
    None, note="seed 002 eq. 34; no PML equivalent")
CASES["direction_triplet_batch_hard"] = Case(
    "direction_triplet_batch_hard", "direction_triplet_margin_loss", "batch_hard", "pair",
    lambda t, b: _F().direction_triplet_margin_loss(t["x"], t["labels"], direction_gamma=0.3, mining="batch_hard",
                                                    backend=b, **_KW),
    None, note="seed 002 eq. 33 on the batch-hard triplets; no PML equivalent")
CASES["direction_proxy_nca"] = Case(
    "direction_proxy_nca", "direction_proxy_nca_loss", "plain", "proxy",
    lambda t, b: _F().direction_proxy_nca_loss(t["x"], t["labels"], t["proxies"], direction_gamma=0.3, backend=b,
                                               **_KW),
    None, note="seed 002 eq. 35; no PML equivalent")
CASES["proxy_gml"] = Case(
    "proxy_gml", "proxy_gml_loss", "plain", "proxy",
    lambda t, b: _F().proxy_gml_loss(t["x"], t["labels"] % max(1, t["proxies"].shape[0] // _GML_N),
                                     t["proxies"].t(), proxies_per_class=_GML_N, backend=b, **_KW),
    None, note="C proxies = C/4 classes × 4 (D×(C·N) layout), r = 0.05 (K = 0.05·C), λ = 0.3; no PML equivalent")
for _name, _pts in (("cpu-quick", lambda: [Point("direction_ms", B) for B in (4096, 1024)]
                     + [Point("direction_triplet_batch_hard", B) for B in (4096, 1024)]
                     + [Point(k, 256, C=C) for C in (32768, 4096) for k in ("direction_proxy_nca", "proxy_gml")]),
                    ("cpu-full", lambda: [Point(k, B, D=128) for B in (1024, 4096, 16384)
                                          for k in ("direction_ms", "direction_triplet_batch_hard")]
                     + [Point(k, 1024, C=C, D=128) for C in (10000, 100000) for k in ("direction_proxy_nca", "proxy_gml")]),
                    ("gpu", lambda: [Point(k, B, D=128, dtype="bfloat16") for B in (16384, 4096)
                                     for k in ("direction_ms", "direction_triplet_batch_hard")]
                     + [Point(k, 4096, C=C, D=128, dtype="bfloat16") for C in (100000,)
                        for k in ("direction_proxy_nca", "proxy_gml")])):
    PRESETS[_name] = (lambda base, extra: lambda: base() + extra())(PRESETS[_name], _pts)


# --------------------------------------------------------------------------- the self-supervised shape (issue 12)
# SimCLR / CLIP: the B rows are two views of B/2 pairs (rows [0, B/2) and [B/2, B): slices of x, so both views get
# the gradient), PML's SelfSupervisedLoss(NTXentLoss()) with symmetric=True — NT-Xent over the B rows of the two
# views with labels arange(B/2) twice (each row's one positive is its other view). Same GEMM floor as any pair case.
def _two_views(t):
    half = t["x"].shape[0] // 2
    return t["x"][:half], t["x"][half:2 * half]


def _self_supervised_dk(t, b):
    from ..losses import NTXentLoss, SelfSupervisedLoss
    return SelfSupervisedLoss(NTXentLoss(backend=b, **_KW), symmetric=True)(*_two_views(t))


CASES["ntxent_self_supervised"] = Case(
    "ntxent_self_supervised", "ntxent_loss", "self_supervised", "pair", _self_supervised_dk,
    lambda t: _no_extra(lambda: _pml()[0].SelfSupervisedLoss(_pml()[0].NTXentLoss(), symmetric=True)(*_two_views(t))),
    "SelfSupervisedLoss(NTXentLoss()) on the two halves of the B rows",
    note="B rows = B/2 pairs of two views (symmetric=True)")
for _name, _pts in (("cpu-quick", lambda: [Point("ntxent_self_supervised", B) for B in (4096, 512)]),
                    ("cpu-full", lambda: [Point("ntxent_self_supervised", B, D=128) for B in (1024, 4096, 16384)]),
                    # the headline: B = 65,536 rows (32,768 pairs), D = 512, bf16
                    ("gpu", lambda: [Point("ntxent_self_supervised", 65536, D=512, dtype="bfloat16")])):
    PRESETS[_name] = (lambda base, extra: lambda: base() + extra())(PRESETS[_name], _pts)


# --------------------------------------------------------------------------- TupletMargin, Margin, SNR (issue 12)
# PML's defaults on both sides (TupletMargin: margin 5.73°, scale 64, cosine; MarginLoss: margin 0.2, β = 1.2 as a
# (1,) tensor, ν = 0, all triplets, euclidean; SNR contrastive: margins 0 / 1 on normalised rows), PK batches. The
# reference / PML MarginLoss enumerate every triplet (a B×B×B mask) and PML's SNRDistance forms a B×B×D tensor.
CASES["tuplet_margin"] = _plain_pair("tuplet_margin", "tuplet_margin_loss", "TupletMarginLoss")
CASES["margin"] = Case(
    "margin", "margin_loss", "all", "pair",
    lambda t, b: _F().margin_loss(t["x"], t["labels"], beta=torch.tensor([1.2], device=t["x"].device), backend=b,
                                  **_KW),
    lambda t: _no_extra(lambda: _pml()[0].MarginLoss()(t["x"], t["labels"])), "MarginLoss() (all triplets)",
    note="every (a, p, n) triplet: the reference and PML build a B×B×B mask and O(B·P·B) index lists")
CASES["snr_contrastive"] = Case(
    "snr_contrastive", "snr_contrastive_loss", "plain", "pair",
    lambda t, b: _F().signal_to_noise_ratio_contrastive_loss(t["x"], t["labels"], backend=b, **_KW),
    lambda t: _no_extra(lambda: _pml()[0].SignalToNoiseRatioContrastiveLoss()(t["x"], t["labels"])),
    "SignalToNoiseRatioContrastiveLoss()", note="PML's SNRDistance forms a B×B×D difference tensor")
_MARGIN_PAIR = ("tuplet_margin", "margin", "snr_contrastive")
for _name, _pts in (("cpu-quick", lambda: [Point(k, B) for B in (4096, 512) for k in _MARGIN_PAIR]
                     + [Point(k, 16384, time=False, providers=("cpu",)) for k in _MARGIN_PAIR]),
                    ("cpu-full", lambda: [Point(k, B, D=128) for B in (1024, 4096, 16384) for k in _MARGIN_PAIR]),
                    ("gpu", lambda: [Point(k, 65536, D=128, dtype="bfloat16") for k in _MARGIN_PAIR])):
    PRESETS[_name] = (lambda base, extra: lambda: base() + extra())(PRESETS[_name], _pts)
