"""Triton signatures of the kernel launches ``aot_check.py`` compiles (no package imports: the kernel modules that
list their own launches — ``contrastive_losses.aot_variants``, ``margin_softmax.aot_variants`` — use them too)."""
from __future__ import annotations


def _pair_signature(fn, ct, ptr, consts):
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


_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _proxy_signature(fn, ptr, acc, consts):
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
