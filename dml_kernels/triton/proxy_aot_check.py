"""Compile every proxy-loss kernel variant for a GPU target without a GPU (a CI check).

The interpreter executes kernels as numpy code and accepts programs the GPU compiler rejects. This lowers
each kernel × loss × distance kind × dtype of ``proxy_kernels.py`` through Triton's whole pipeline down to
a cubin for ``sm_<cc>`` (default 90). ``python -m dml_kernels.triton.proxy_aot_check [cc]``, with
TRITON_INTERPRET unset; exits non-zero listing the failures.
"""
from __future__ import annotations

import os
import sys

_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _variants():
    import triton.language as tl

    from . import proxy_kernels as K
    from .proxies import _GPU_CFG

    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        pdt = "fp64" if dtype == "fp64" else "fp32"  # proxies: an fp32 parameter (fp64 in fp64 runs)
        cfg = _GPU_CFG["half" if dtype in ("fp16", "bf16") else dtype]
        cd, ac = getattr(tl, _DT[dtype]), getattr(tl, _DT[acc])
        prec = "tf32" if dtype == "fp32" else "ieee"
        ptr = dict(x_ptr=dtype, p_ptr=pdt, y_ptr="i64", haspos_ptr="i32", cnt_ptr="i32")
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


def _signature(fn, ptr, acc, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr.get(name, acc)
        elif name.startswith("s") and name[1:] in ("xb", "xd", "pc", "pd", "xr"):
            sig[name] = "i64" if name in ("spc", "sxr") else "i32"  # both widths of stride arguments
        else:
            sig[name] = "i32"
    return sig


def main(cc: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    failures, count = [], 0
    for fn, ptr, acc, consts, num_warps in _variants():
        count += 1
        label = f"{fn.fn.__name__}[{ptr['x_ptr']}] " + ",".join(
            f"{k}={v}" for k, v in consts.items() if k in ("COLUMNS", "LOSS", "KIND"))
        try:
            triton.compile(ASTSource(fn, _signature(fn, ptr, acc, consts), constexprs=consts), target=target,
                           options=dict(num_warps=num_warps, num_stages=2))
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures.append(f"{label}: {type(e).__name__}: {str(e)[-800:]}")
    for f in failures:
        print("FAIL", f)
    print(f"compiled {count - len(failures)}/{count} proxy kernel variants for sm_{cc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
