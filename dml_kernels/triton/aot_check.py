"""Compile every pair-engine kernel variant for a GPU target without a GPU (a CI check).

The interpreter runs kernels as numpy code and accepts programs the GPU compiler rejects (loop-carried
type changes, unsupported dtype combinations...). ``python -m dml_kernels.triton.aot_check [cc] [--quick]``
lowers every kernel × epilogue × dtype through Triton's full pipeline down to a cubin for ``sm_<cc>``
(default 90; ``ptxas`` ships with Triton) and exits non-zero listing the failures (about 4 s per variant,
108 variants). ``--quick``: every variant in bf16 plus one fp64 variant of each kernel (the CI subset).
Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import os
import sys


def _variants():
    from . import contrastive as C
    from . import engine as E
    from . import lifted_structure as LS
    from . import multi_similarity as MS
    from . import n_pairs as NP
    from . import similarity as SIM
    from . import triplet as T

    for dtype, ct in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        big = dtype != "fp64"
        blk = dict(BA=64 if big else 32, BB=64 if big else 32, BD=64 if big else 32)
        bdo = 64 if big else 32
        common = dict(SELF=True, HAS_LABELS=True, HAS_PAIRS=False, DIST=2, PREC="ieee", **blk)
        ptr = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "pos_bits": "*u8",
               "neg_bits": "*u8", "out_pos": "*u8", "out_neg": "*u8"}
        for fwd, kinds, flag in ((MS.ms_fwd, (3, 3, 1, 1, 0, 0), 1), (LS.gls_fwd, (2, 2, 1, 1, 0, 0), 0),
                                 (LS.lifted_neg_fwd, (2, 1, 1, 0, 0, 0), 0), (LS.lifted_pos_fwd, (1, 1), 0),
                                 (C.contrastive_fwd, (1,) * 6, 0), (NP.npairs_fwd, (2, 1), 0),
                                 (MS.thresholds_fwd, (5, 4), 0)):
            kinds = tuple(kinds) + (0,) * (6 - len(kinds))
            yield E._row_stats_kernel, dtype, ct, ptr, dict(
                FWD=fwd, FLAG=flag, **{f"K{i}": k for i, k in enumerate(kinds)}, **common)
        for bwd, flag in ((MS.ms_bwd, 1), (LS.gls_bwd, 0), (LS.lifted_bwd, 0), (C.contrastive_bwd, 0),
                          (NP.npairs_bwd, 0), (SIM.dout_bwd, 0)):
            for kern in (E._grad_rows_kernel, E._grad_cols_kernel):
                yield kern, dtype, ct, ptr, dict(BWD=bwd, FLAG=flag, BDO=bdo, GPREC="ieee", **common)
        pairs = dict(common, HAS_PAIRS=True, HAS_LABELS=False)
        yield E._grad_rows_kernel, dtype, ct, ptr, dict(BWD=MS.ms_bwd, FLAG=0, BDO=bdo, GPREC="ieee", **pairs)
        yield E._row_stats_kernel, dtype, ct, ptr, dict(FWD=MS.ms_fwd, FLAG=0, K0=3, K1=3, K2=1, K3=1, K4=0, K5=0,
                                                        **dict(pairs, SELF=False, DIST=0))
        yield MS._mask_kernel, dtype, ct, ptr, dict(common)
        yield SIM._batch_hard_kernel, dtype, ct, dict(ptr, out_ptr="*i64"), dict(common)
        yield SIM._similarity_kernel, dtype, ct, dict(ptr, out_ptr=f"*{dtype}"), {
            k: v for k, v in common.items() if k in ("DIST", "BA", "BB", "BD", "PREC")}
        tri = dict(common, BA=16, BB=32 if big else 16)
        yield T._triplet_fwd_kernel, dtype, ct, ptr, dict(SMOOTH=True, **tri)
        for cols in (False, True):
            yield T._triplet_grad_kernel, dtype, ct, ptr, dict(SMOOTH=False, COLUMNS=cols, BDO=bdo, GPREC="ieee",
                                                               **tri)


def _signature(fn, dtype, ct, ptr, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = ptr[name]
        elif name.endswith("_ptr"):
            sig[name] = f"*{ct}"
        elif name in ("p0", "p1", "p2", "p3", "margin", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main(cc: int = 90, quick: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    failures, count = [], 0
    fp64_seen = set()
    for fn, dtype, ct, ptr, consts in _variants():
        if quick:  # every variant in bf16; in fp64 (other dot / accumulator types) the first of each kernel
            if dtype == "fp64" and fn.fn.__name__ not in fp64_seen:
                fp64_seen.add(fn.fn.__name__)
            elif dtype != "bf16":
                continue
        count += 1
        label = f"{fn.fn.__name__}[{dtype}] " + ",".join(
            f"{k}={getattr(v, '__name__', v)}" for k, v in consts.items() if k in ("FWD", "BWD", "COLUMNS"))
        try:
            triton.compile(ASTSource(fn, _signature(fn, dtype, ct, ptr, consts), constexprs=consts), target=target)
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures.append(f"{label}: {type(e).__name__}: {str(e)[-800:]}")
    for f in failures:
        print("FAIL", f)
    print(f"compiled {count - len(failures)}/{count} kernel variants for sm_{cc}")
    return 1 if failures else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    sys.exit(main(int(args[0]) if args else 90, quick="--quick" in sys.argv[1:]))
