"""SubCenterArcFace and SoftTriple on the compiled op pair ``grouped_class_rows`` / ``grouped_class_rows_backward``
(csrc/grouped_classes.h; CPU driver csrc/cpu/grouped_class_ops.cpp, CUDA kernels csrc/cuda/grouped_class_ops.cu),
registered for the ``cuda`` backend. The functions are device-agnostic: on CPU tensors they run the op's CPU
implementation (that is how they are tested without a GPU); the ``cpu`` backend keeps its torch form
(``grouped_columns.py``).

The op reads W in PML's layout, **D×C·K** (column c·K + k is centre k of class c), through its strides — a
transposed view of a contiguous C·K×D matrix is read as is, never copied — with per-column reciprocal norms
computed inside (O(C·K·D)). Per row it returns the target class's value t and rest = LSE_{c≠y} a·v_c over the
other classes (v: the max over the class's K sub-centres — the first maximal one takes the gradient, as
``torch.max`` — or SoftTriple's softmax-weighted centre similarity), never a B×C·K (or B×C) tensor; its backward
recomputes the tiles (dx: a row-block pass, dW: a class-block pass, both with the normalisation's chain).
The margin (PML's ArcFace target with its cos θ − m·sin m branch, or la·(t − margin)), the cross-entropy
logaddexp(z_t, rest) − z_t, PML's miner weights and the mean are O(B) torch, the reference's own expressions.
A label outside [0, C) (possible with ``check_inputs=False``) contributes 0, as in the cpu and triton forms.
fp16/bf16 inputs are upcast (fp32 accumulation; fp32 weights are used as they are, never cast in place). No
host sync. Double backward raises.
"""
from __future__ import annotations

import torch

from ..._registry import Unsupported, register
from ..reference.margin_softmax import arcface_target
from .common import _NormalizeRows, _kernel_dtype, _need, _out
from .library import refuse_double_backward

_EPS = 1e-12
_MAX, _SOFTMAX = 0, 1  # csrc/grouped_classes.h GroupMode
_REGISTERED = False
CPU_TILING = None  # (tile elements, rows per block) for the CPU driver, None = its defaults (the tests' small tiles)


def _colmajor(W):
    """The layout the kernels give dW: W's own when W is the transpose of a row-major C·K×D matrix."""
    return W.dim() == 2 and W.shape[0] > 1 and W.stride(0) == 1 and W.stride(1) == W.shape[0]


def register_ops():
    """register_fake and register_autograd of the op pair (once, after the library loaded with them)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .loader import load
    if load() is not None or not any(torch._C._dispatch_has_kernel_for_dispatch_key(
            "dml_kernels::grouped_class_rows", key) for key in ("CPU", "CUDA")):
        return
    _REGISTERED = True
    lib = torch.library

    @lib.register_fake("dml_kernels::grouped_class_rows")
    def _(x, W, labels, K, mode, params):
        return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])

    @lib.register_fake("dml_kernels::grouped_class_rows_backward")
    def _(grad_t, grad_rest, x, W, labels, rest, K, mode, params, need_x, need_w):
        dx = x.new_empty(x.shape) if need_x else x.new_empty(0, x.shape[1])
        if not need_w:
            dW = W.new_empty(0, 0)
        else:
            dW = W.new_empty(W.shape[1], W.shape[0]).t() if _colmajor(W) else W.new_empty(W.shape)
        return dx, dW

    def setup(ctx, inputs, output):
        x, W, labels, K, mode, params = inputs
        ctx.params = (K, mode, params)
        ctx.save_for_backward(x, W, labels, output[1])

    def backward(ctx, g_t, g_rest):
        refuse_double_backward("C++ op dml_kernels::grouped_class_rows")
        x, W, labels, rest = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        g_t = torch.zeros_like(rest) if g_t is None else g_t
        g_rest = torch.zeros_like(rest) if g_rest is None else g_rest
        dx, dW = torch.ops.dml_kernels.grouped_class_rows_backward(g_t, g_rest, x, W, labels, rest, *ctx.params,
                                                                   need_x, need_w)
        return dx if need_x else None, dW if need_w else None, None, None, None, None

    lib.register_autograd("dml_kernels::grouped_class_rows", backward, setup_context=setup)


def grouped_rows(q, W, labels, k, mode, a, inv_gamma, norm_w):
    """(t, rest) per row: the op with its Python side registered."""
    register_ops()
    _need(q, "grouped_class_rows")
    params = [float(a), float(inv_gamma), _EPS if norm_w else 0.0]
    if CPU_TILING is not None and q.device.type == "cpu":
        params += [float(CPU_TILING[0]), float(CPU_TILING[1])]
    return torch.ops.dml_kernels.grouped_class_rows(q, W, labels, int(k), int(mode), params)


def _grouped_loss(x, labels, W, k, mode, a, inv_gamma, norm, target_fn, weights):
    if k < 1 or W.dim() != 2 or W.shape[1] % k:
        raise ValueError(f"W has shape {tuple(W.shape)}: its columns are not a multiple of the {k} centres per class")
    if W.device != x.device:
        raise ValueError(f"W is on {W.device}, the embeddings on {x.device}")
    dt = _kernel_dtype(x)
    q = x.to(dt)
    if norm:
        q = _NormalizeRows.apply(q, _EPS)
    n_classes = W.shape[1] // k
    labels = labels.to(device=x.device, dtype=torch.long)
    t, rest = grouped_rows(q, W.to(dt), labels, k, mode, a, inv_gamma, norm)
    z = target_fn(t)
    losses = torch.where(rest > float("-inf"), torch.logaddexp(z, rest), z) - z
    losses = torch.where((labels >= 0) & (labels < n_classes), losses, 0)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return _out(losses.mean(), x)


@register("subcenter_arcface_loss", "cuda")
def subcenter_arcface_loss(x, labels, W, *, margin, scale, sub_centers, weights=None):
    k, scale = int(sub_centers), float(scale)
    return _grouped_loss(x, labels, W, k, _MAX, scale, 1.0, True, lambda t: scale * arcface_target(t, margin),
                         weights)


@register("soft_triple_loss", "cuda")
def soft_triple_loss(x, labels, fc, *, centers_per_class, la, gamma, margin, distance, weights=None):
    if distance.name not in ("cosine", "dot"):
        raise Unsupported(f"soft_triple_loss: distance {distance.name!r} is not a similarity the grouped op computes")
    k, la, margin = int(centers_per_class), float(la), float(margin)
    return _grouped_loss(x, labels, fc, k, _SOFTMAX, la, 1.0 / float(gamma), bool(distance.normalize),
                         lambda t: la * (t - margin), weights)


__all__ = ["subcenter_arcface_loss", "soft_triple_loss", "grouped_rows", "register_ops"]
