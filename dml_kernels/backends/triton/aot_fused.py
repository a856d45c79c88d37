"""The launch variants of the fused losses that came after the engines, for ``aot_check.py`` (GPU compile check).

Each generator yields ``(dtype, kernel, signature, constexprs, compile options)`` — the dtype of the inputs the
launch is made for, and exactly the constexpr combinations, tile shapes and ``num_warps`` its launcher picks on
CUDA (not under the interpreter):

* :func:`row_stats_variants` — per-row reducer statistics (``row_stats.py``): the contrastive statistics
  epilogues on the pair engine (forward, rows and columns gradients), the all-triplets band-statistics kernel
  and its tile gradient (rows, and columns: in self mode too) on the "triplet" tile shape;
* :func:`ranking_variants` — ``ranking_losses.py``: FastAP's soft-histogram kernel (num_bins 10, PML's squared
  euclidean default) and its pulse-derivative epilogue on the engine's row gradient kernel; RankedList's four-sum
  forward epilogue and its backward epilogue (euclidean); HistogramLoss's node-histogram kernel (101 nodes) and its
  backward epilogue;
* :func:`direction_variants` — direction regularisation (``direction.py``, ``direction_triplet.py``): the row LSE
  forward / row / column kernels in the three forms the losses launch (multi-similarity positive term without
  Cos, negative term with Cos and epsilon mining, ProxyNCA over the proxies) and the all-triplets kernels, in
  the two compute dtypes they run in (fp32 for fp16 / bf16 / fp32 inputs, fp64);
* :func:`proxy_gml_variants` — ProxyGML (``proxy_gml.py``): selection (K' = 48 → 64 slots), forward and both
  gradient kernels, 12 proxies per class (16 slots), with ``proxy_gml._GPU``'s tiles;
* :func:`language_guidance_variants` — ``language_guidance.py``'s forward (same-class mask) and backward ("backward"
  KL with the mask, "forward" KL without) with its ``GPU_BLOCKS``.

The constexprs are each launcher's keywords, so a keyword the kernel does not take (the interpreter drops it, a
GPU launch raises ``KeyError``) fails the compile as "'NAME' is not in list".
"""
from __future__ import annotations

_FLOAT_ARGS = ("p0", "p1", "p2", "p3", "margin", "low", "high", "temp", "shift", "delta32")
_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _signature(fn, consts, types, ptr_default):
    """Triton's signature of ``fn``: constexprs, the given types, ``*_ptr`` → ``ptr_default``, float scalars
    → fp32 (a Python float argument), every other argument an i32."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = ptr_default
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def _variant(dtype, fn, consts, types, ptr_default, warps, **options):
    return dtype, fn, _signature(fn, consts, types, ptr_default), consts, dict(num_warps=warps, **options)


def _pair_dtypes():
    """(input dtype, compute dtype, GPU block group, gradient dot precision) of the pair engine's launches."""
    for dtype, ct, group in (("fp16", "fp32", "half"), ("bf16", "fp32", "half"), ("fp32", "fp32", "fp32"),
                             ("fp64", "fp64", "fp64")):
        yield dtype, ct, group, "tf32" if group == "half" else "ieee"


def _pair_ptrs(dtype):
    return {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "lab_ptr": "*i64",
            "pos_bits": "*u8", "neg_bits": "*u8", "counts_ptr": "*i64"}


def row_stats_variants():
    from . import pair_engine as E
    from . import row_stats as RS

    for dtype, ct, group, gprec in _pair_dtypes():
        ptr = _pair_ptrs(dtype)

        def kw(kind, **extra):
            ba, bb, bd, bdo, warps = E.gpu_blocks(group, kind)
            consts = dict(SELF=True, HAS_LABELS=True, HAS_PAIRS=False, DIST=2, PREC="ieee", BA=ba, BB=bb, BD=bd)
            if "COLUMNS" in extra:
                consts.update(BDO=bdo, GPREC=gprec)
            consts.update(extra)
            return consts, warps

        consts, warps = kw("fwd", FWD=RS.contrastive_stats_fwd, FLAG=0, **{f"K{i}": E.SUM for i in range(6)})
        yield _variant(dtype, E._row_stats_kernel, consts, ptr, f"*{ct}", warps)
        for cols in (False, True):  # the column (reference-side) kernel only with a reference set
            consts, warps = kw("cols" if cols else "rows", TILE_GRAD=E.grad_tile, BWD=RS.contrastive_stats_bwd,
                               FLAG=0, COLUMNS=cols, SELF=not cols)
            yield _variant(dtype, E._grad_kernel, consts, ptr, f"*{ct}", warps)
        consts, warps = kw("triplet", SMOOTH=True)
        yield _variant(dtype, RS._triplet_stats_kernel, consts, ptr, f"*{ct}", warps)
        for cols in (False, True):  # in self mode both sides run (acc + acc_c)
            consts, warps = kw("triplet", TILE_GRAD=RS._triplet_stats_grad_tile, BWD=None, FLAG=1, COLUMNS=cols)
            yield _variant(dtype, E._grad_kernel, consts, ptr, f"*{ct}", warps)


def ranking_variants():
    from . import pair_engine as E
    from . import ranking_losses as RL

    ne = 11  # FastAP: num_bins = 10 (PML's default) + 1 triangular bins
    nodes = 101  # HistogramLoss: n_bins = 100 (PML's default), round(1 + 2/Δ) nodes
    for dtype, ct, group, gprec in _pair_dtypes():
        ptr = _pair_ptrs(dtype)
        ba, bb, bd, _, warps = E.gpu_blocks(group, "fwd")
        consts = dict(NE=ne, NEP=16, DIST=1, BA=ba, BB=bb, BD=bd, PREC="ieee")
        yield _variant(dtype, RL._fastap_hist_kernel, consts, ptr, f"*{ct}", warps)
        flags = dict(SELF=True, HAS_LABELS=True, HAS_PAIRS=False, PREC="ieee")
        # RankedList (PML's default: euclidean): four SUM slots of the engine's row statistics
        consts = dict(flags, FWD=RL.rll_fwd, K0=E.SUM, K1=E.SUM, K2=E.SUM, K3=E.SUM, K4=E.NONE, K5=E.NONE, DIST=2,
                      FLAG=0, BA=ba, BB=bb, BD=bd)
        yield _variant(dtype, E._row_stats_kernel, consts, ptr, f"*{ct}", warps)
        # HistogramLoss (cosine; PML's default 100 bins: 101 nodes in 128 slots) on the "triplet" tile
        hba, hbb, hbd, _, hwarps = E.gpu_blocks(group, "triplet")
        yield _variant(dtype, RL._histogram_kernel, dict(NODES=nodes, NP=128, BA=hba, BB=hbb, BD=hbd, PREC="ieee"),
                       ptr, f"*{ct}", hwarps)
        ba, bb, bd, bdo, warps = E.gpu_blocks(group, "rows")  # all three: self mode only, the row gradient kernel
        for bwd, dist, flag in ((RL.fastap_bwd, 1, ne), (RL.rll_bwd, 2, 0), (RL.histogram_bwd, 0, nodes)):
            consts = dict(flags, TILE_GRAD=E.grad_tile, BWD=bwd, COLUMNS=False, DIST=dist, FLAG=flag, BA=ba, BB=bb,
                          BD=bd, BDO=bdo, GPREC=gprec)
            yield _variant(dtype, E._grad_kernel, consts, ptr, f"*{ct}", warps)


def direction_variants():
    from . import direction as DR
    from . import direction_triplet as DT

    ba, bb = 32, 32  # direction._setup's CUDA blocks (the row LSE kernels)
    bd = bdo = 64  # _p2(D) for D >= 64
    lab = {"lq_ptr": "*i64", "lr_ptr": "*i64"}
    forms = (dict(DIST=0, HAS_DIR=False, MASK=1, MINE=1, SELF=True, WITH_ONE=True),  # multi-similarity, positives
             dict(DIST=2, HAS_DIR=True, MASK=0, MINE=2, SELF=True, WITH_ONE=True),  # negatives with Cos, mined
             dict(DIST=1, HAS_DIR=True, MASK=3, MINE=0, SELF=False, WITH_ONE=False))  # ProxyNCA, exclude_positive
    for dtype in ("fp32", "fp64"):  # the compute dtype: fp16 / bf16 / fp32 inputs run in fp32
        for flags in forms:
            consts = dict(flags, BI=ba, BK=bb, BD=bd, PREC="ieee")
            yield _variant(dtype, DR._lse_fwd_kernel, consts, lab, f"*{dtype}", 4)
            bwd = {k: v for k, v in consts.items() if k != "WITH_ONE"}  # the backward kernels have no WITH_ONE
            for fn in (DR._lse_bwd_rows, DR._lse_bwd_cols):
                yield _variant(dtype, fn, dict(bwd, BDO=bdo), lab, f"*{dtype}", 4)
        # all triplets: direction_triplet's own CUDA block (16 × 16 × 16, D-chunk 32 / fp64 16, GPU_WARPS)
        consts = dict(DIST=2, SMOOTH=True, SELF=True, BA=16, BB=16, BD=16 if dtype == "fp64" else 32, PREC="ieee")
        yield _variant(dtype, DT._fwd_kernel, consts, lab, f"*{dtype}", DT.GPU_WARPS)
        for fn in (DT._bwd_rows, DT._bwd_cols):
            yield _variant(dtype, fn, dict(consts, BDO=bdo), lab, f"*{dtype}", DT.GPU_WARPS)


def proxy_gml_variants():
    import triton.language as tl

    from . import proxy_gml as PG

    npad = 16  # 12 proxies per class (PML's default)
    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        group = "fp64" if dtype == "fp64" else ("fp32" if dtype == "fp32" else "half")
        bb, w, bk, bd, warps = PG._GPU[group]
        types = {"x_ptr": f"*{dtype}", "p_ptr": f"*{acc}", "y_ptr": "*i64", "kap_ptr": "*i32", "ya_ptr": "*i32"}
        common = dict(BB=bb, BG=max(1, w // npad), NP=npad, BK=bk, CD=getattr(tl, _DT[dtype]),
                      ACC=getattr(tl, _DT[acc]), EMU_BF16=False, PREC="ieee")
        yield _variant(dtype, PG._select_kernel, dict(common, KP=64), types, f"*{acc}", warps)
        yield _variant(dtype, PG._fwd_kernel, dict(common, MASK_RULE=0), types, f"*{acc}", warps)
        for fn, rule in ((PG._bwd_rows_kernel, 0), (PG._bwd_cols_kernel, 1)):
            consts = dict(common, MASK_RULE=rule, SCALE_G=dtype == "fp16", BD=bd)
            yield _variant(dtype, fn, consts, types, f"*{acc}", warps)


def language_guidance_variants():
    import triton.language as tl

    from . import language_guidance as LG

    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        ct = "fp64" if dtype == "fp64" else "fp32"
        group = "fp64" if dtype == "fp64" else ("fp32" if dtype == "fp32" else "half")
        ba, bb, bd, bdo, warps = LG.GPU_BLOCKS[group]
        types = {"x_ptr": f"*{dtype}", "l_ptr": f"*{dtype}", "lab_ptr": "*i64"}
        common = dict(BA=ba, BB=bb, BD=bd, BDL=bd, CD=getattr(tl, _DT[dtype]), ACC_T=getattr(tl, _DT[ct]),
                      EMU_BF16=False, PREC="ieee")
        yield _variant(dtype, LG._fwd_kernel, dict(common, MASK=True), types, f"*{ct}", warps)
        gprec = "tf32" if group == "half" else "ieee"
        for mask, forward in ((True, False), (False, True)):
            consts = dict(common, MASK=mask, FORWARD=forward, BDO=bdo, GPREC=gprec)
            yield _variant(dtype, LG._bwd_kernel, consts, types, f"*{ct}", warps)


def contrastive_losses_variants():
    """NT-Xent, SupCon, NCA, Circle, ThresholdConsistentMargin, IntraPairVariance (their module lists them)."""
    from . import contrastive_losses
    yield from contrastive_losses.aot_variants()


def pair_margin_losses_variants():
    """TupletMargin, MarginLoss, the SNR contrastive loss (their module lists them)."""
    from . import pair_margin_losses
    yield from pair_margin_losses.aot_variants()


def margin_softmax_variants():
    """The margin-softmax family on the class engine (its module lists them, in the proxy losses' convention)."""
    from . import margin_softmax
    from .aot_signatures import _proxy_signature
    for fn, ptr, acc, consts, warps in margin_softmax.aot_variants():
        yield ptr["x_ptr"], fn, _proxy_signature(fn, ptr, acc, consts), consts, {"num_warps": warps, "num_stages": 2}


def margin_softmax_row_stats_variants():
    """``margin_softmax_row_stats`` (row_stats.py): the margin-softmax kernels with SHARD (a class-column mask, the
    rest LSE for every row) in the six CE forms the op launches (value kinds, ‖w_y‖², sub-centres, SoftTriple)."""
    from . import margin_softmax
    from .aot_signatures import _proxy_signature
    for fn, ptr, acc, consts, warps in margin_softmax.aot_variants():
        if consts["LOSS"] == 0:
            consts = dict(consts, SHARD=True)
            yield ptr["x_ptr"], fn, _proxy_signature(fn, ptr, acc, consts), consts, {"num_warps": warps,
                                                                                     "num_stages": 2}


def mining_variants():
    """The per-row miners (``mining.py``: batch easy/hard in each strategy form, pair margin; its module lists them)."""
    from . import mining
    yield from mining.aot_variants()


def variants():
    """Every launch above, in the order of the generators."""
    for gen in (row_stats_variants, ranking_variants, direction_variants, proxy_gml_variants,
                language_guidance_variants, contrastive_losses_variants, margin_softmax_variants,
                pair_margin_losses_variants, margin_softmax_row_stats_variants):
        yield from gen()
    yield from mining_variants()  # the per-row miners (mining.py)
