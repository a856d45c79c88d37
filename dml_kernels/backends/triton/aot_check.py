"""Compile every Triton kernel variant for a GPU target without a GPU (a CI check).

The interpreter runs kernels as numpy code and accepts programs the GPU compiler rejects (loop-carried
type changes, unsupported dtype combinations, a global that is not a constexpr...). ``python -m
dml_kernels.backends.triton.aot_check [cc] [--quick] [--usage]`` lowers every kernel × epilogue × dtype of the
pair engine (with the tile shapes of ``pair_engine.GPU_BLOCKS``), of the k-NN op (``knn.GPU_BLOCKS``), of the
proxy losses (``class_losses._GPU_CFG``) and of the later fused losses (``aot_fused.py``: row statistics, FastAP,
RankedList, HistogramLoss, direction regularisation, ProxyGML, language guidance, the contrastive family and
TupletMargin / Margin / SNR, the margin-softmax family and its class-shard row statistics, the fused miners,
with their launchers' CUDA tiles) through Triton's whole pipeline down to a cubin for
``sm_<cc>`` (default 90; ``ptxas`` ships with Triton), and exits non-zero listing the failures (120 pair-engine
+ 80 proxy + 474 fused = 674 variants, a few seconds each).
``--quick`` (207 variants): every variant in bf16 (in fp32 for kernels that compute fp16 / bf16 inputs in fp32)
plus one fp64 variant of each kernel form. ``--usage``: print registers and spill stack per variant
(``cuobjdump -res-usage``). Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile


from .aot_signatures import _DT, _pair_signature, _proxy_signature  # noqa: E402


def _pair_variants():
    """(kernel, dtype, compute dtype, pointer types, constexprs, num_warps) for every launch the pair engine
    makes."""
    from . import contrastive as C
    from . import pair_engine as E
    from . import lifted_structure as LS
    from . import multi_similarity as MS
    from . import n_pairs as NP
    from . import similarity as SIM
    from . import knn as KNN
    from . import triplet as T

    for dtype, ct, group in (("fp16", "fp32", "half"), ("bf16", "fp32", "half"), ("fp32", "fp32", "fp32"),
                             ("fp64", "fp64", "fp64")):
        gprec = "tf32" if group == "half" else "ieee"

        def kw(kind, narrow=False, **extra):
            ba, bb, bd, bdo, warps = E.gpu_blocks(group, kind, narrow)
            consts = dict(SELF=True, HAS_LABELS=True, HAS_PAIRS=False, DIST=2, PREC="ieee", BA=ba, BB=bb, BD=bd)
            if "COLUMNS" in extra:  # the gradient kernels
                consts.update(BDO=bdo, GPREC=gprec)
            consts.update(extra)
            return consts, warps

        ptr = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "pos_bits": "*u8",
               "neg_bits": "*u8", "out_pos": "*u8", "out_neg": "*u8"}
        for fwd, kinds, flag in ((MS.ms_fwd, (3, 3, 1, 1), 1), (LS.gls_fwd, (2, 2, 1, 1), 0),
                                 (LS.lifted_neg_fwd, (2, 1, 1), 0), (LS.lifted_pos_fwd, (1, 1), 0),
                                 (C.contrastive_fwd, (1,) * 6, 0), (NP.npairs_fwd, (2, 1), 0),
                                 (MS.thresholds_fwd, (5, 4), 0)):
            kinds = tuple(kinds) + (0,) * (6 - len(kinds))
            yield (E._row_stats_kernel, dtype, ct, ptr,
                   *kw("fwd", fwd is NP.npairs_fwd, FWD=fwd, FLAG=flag, **{f"K{i}": k for i, k in enumerate(kinds)}))
        grad = dict(TILE_GRAD=E.grad_tile)
        for bwd, flag, narrow in ((MS.ms_bwd, 1, False), (LS.gls_bwd, 0, False), (LS.lifted_bwd, 0, False),
                                  (C.contrastive_bwd, 0, False), (NP.npairs_bwd, 0, True), (SIM.dout_bwd, 0, True)):
            yield E._grad_kernel, dtype, ct, ptr, *kw("rows", narrow, **grad, BWD=bwd, FLAG=flag, COLUMNS=False)
            # the column (reference-side) kernel runs only with a reference set: never in self mode
            yield E._grad_kernel, dtype, ct, ptr, *kw("cols", narrow, **grad, BWD=bwd, FLAG=flag, COLUMNS=True,
                                                      SELF=False)
        pairs = dict(HAS_PAIRS=True, HAS_LABELS=False)
        yield E._grad_kernel, dtype, ct, ptr, *kw("rows", True, **grad, BWD=MS.ms_bwd, FLAG=0, COLUMNS=False, **pairs)
        yield E._grad_kernel, dtype, ct, ptr, *kw("cols", True, **grad, BWD=MS.ms_bwd, FLAG=0, COLUMNS=True,
                                                  **dict(pairs, SELF=False))
        yield E._row_stats_kernel, dtype, ct, ptr, *kw("fwd", True, FWD=MS.ms_fwd, FLAG=0, K0=3, K1=3, K2=1, K3=1,
                                                       K4=0, K5=0, SELF=False, DIST=0, **pairs)
        yield MS._mask_kernel, dtype, ct, ptr, *kw("tile")
        yield SIM._batch_hard_kernel, dtype, ct, dict(ptr, out_ptr="*i64"), *kw("tile")
        consts, warps = kw("tile")
        yield SIM._similarity_kernel, dtype, ct, dict(ptr, out_ptr=f"*{dtype}"), {
            k: v for k, v in consts.items() if k in ("DIST", "BA", "BB", "BD", "PREC")}, warps
        for kp, dist in ((16, 0), (128, 1)):  # the k-NN op: narrow and wide running top-k blocks
            ba, bb, bd, warps = KNN.GPU_BLOCKS[group]
            yield KNN._knn_kernel, dtype, ct, dict(ptr, val_ptr=f"*{dtype}", idx_ptr="*i64"), dict(
                EXCLUDE=True, DIST=dist, KP=kp, BA=min(ba, 16) if kp >= 64 else ba, BB=bb, BD=bd, PREC="ieee"), warps
        yield T._triplet_fwd_kernel, dtype, ct, ptr, *kw("triplet", SMOOTH=True)
        for cols in (False, True):
            yield E._grad_kernel, dtype, ct, ptr, *kw("triplet", TILE_GRAD=T._triplet_grad_tile, BWD=None, FLAG=0,
                                                      COLUMNS=cols)


def _proxy_variants():
    """(kernel, pointer types, accumulator type, constexprs, num_warps) for every proxy-loss launch."""
    import triton.language as tl

    from . import class_engine as K
    from .class_losses import _GPU_CFG

    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        pdt = "fp64" if dtype == "fp64" else "fp32"  # proxies: an fp32 parameter (fp64 in fp64 runs)
        cfg = _GPU_CFG["half" if dtype in ("fp16", "bf16") else dtype]
        cd, ac = getattr(tl, _DT[dtype]), getattr(tl, _DT[acc])
        prec = "tf32" if dtype == "fp32" else "ieee"
        ptr = dict(x_ptr=dtype, p_ptr=pdt, y_ptr="i64", npos_ptr="i32", cnt_ptr="i32")
        dev = dict(CD=cd, ACC=ac, EMU_BF16=False, PREC=prec)

        def blk(name, with_d=False):
            bb, bc, bk, bd, nw = cfg[name]
            out = dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk, **({"BLOCK_D": bd} if with_d else {}))
            return out, nw

        yield K._sqnorm_kernel, ptr, acc, dict(ACC=ac, BLOCK_R=16, BLOCK_D=64), 4
        yield K._l2norm_bwd_kernel, dict(ptr, out_ptr=pdt), acc, dict(ACC=ac, BLOCK_R=16, BLOCK_D=64), 4
        for kind in (0, 1, 2):
            b, nw = blk("nca_fwd")
            yield K._nca_fwd_kernel, ptr, acc, dict(KIND=kind, EXCL=kind == 1, **dev, **b), nw
            b, nw = blk("pa_fwd")
            yield K._pa_fwd_kernel, ptr, acc, dict(KIND=kind, HAS_OFF=kind != 0, **dev, **b), nw
            for loss in (0, 1):
                for name in ("rows", "cols"):
                    b, nw = blk(name, with_d=True)
                    yield K._bwd_kernel, ptr, acc, dict(COLUMNS=name == "cols", LOSS=loss, KIND=kind,
                                                        EXCL=loss == 0 and kind == 2,
                                                        HAS_R0=loss == 0 or kind == 1, COUNT=kind == 2,
                                                        SCALE_G=dtype == "fp16", **dev, **b), nw


def variants():
    """Every launch of both families as (dtype, kernel, signature, constexprs, compile options)."""
    for fn, dtype, ct, ptr, consts, warps in _pair_variants():
        yield dtype, fn, _pair_signature(fn, ct, ptr, consts), consts, {"num_warps": warps}
    for fn, ptr, acc, consts, warps in _proxy_variants():
        options = {"num_warps": warps, "num_stages": 2}  # as class_losses.py launches them
        yield ptr["x_ptr"], fn, _proxy_signature(fn, ptr, acc, consts), consts, options
    from . import aot_fused  # row statistics, FastAP, direction regularisation, ProxyGML, language guidance

    yield from aot_fused.variants()


def _usage(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1)} spill-stack {m.group(2)}" if m else "usage unknown"


def main(cc: int = 90, quick: bool = False, usage: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    failures, count, fp64_seen = [], 0, set()
    every = list(variants())

    def form(fn, consts):  # a kernel form: (module, kernel, rows / columns)
        return fn.fn.__module__, fn.fn.__name__, consts.get("COLUMNS")

    # kernels that never see bf16 operands (they compute in fp32 for fp16 / bf16 inputs): their fp32 variants
    half_forms = {form(fn, consts) for dtype, fn, _, consts, _ in every if dtype == "bf16"}
    for dtype, fn, sig, consts, options in every:
        if quick:  # every variant in bf16 (fp32 where none is bf16); the first fp64 variant of each kernel form
            key = form(fn, consts)
            if dtype == "fp64" and key not in fp64_seen:
                fp64_seen.add(key)
            elif dtype != "bf16" and not (dtype == "fp32" and key not in half_forms):
                continue
        count += 1
        label = f"{fn.fn.__module__.rpartition('.')[2]}.{fn.fn.__name__}[{dtype}] " + ",".join(
            f"{k}={getattr(v, '__name__', v)}" for k, v in consts.items()
            if k in ("FWD", "TILE_GRAD", "BWD", "COLUMNS", "LOSS", "KIND", "HAS_DIR", "MASK", "FORWARD"))
        try:
            kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=options)
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures.append(f"{label}: {type(e).__name__}: {str(e)[-800:]}")
            continue
        if usage:
            print(f"{label}: {_usage(kernel.asm['cubin'])}", flush=True)
    for f in failures:
        print("FAIL", f)
    print(f"compiled {count - len(failures)}/{count} kernel variants for sm_{cc}")
    return 1 if failures else 0


if __name__ == "__main__":
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(int(args[0]) if args else 90, quick="--quick" in flags, usage="--usage" in flags))
