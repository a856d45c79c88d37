"""The margin-softmax family (NormalizedSoftmax, CosFace, ArcFace, LargeMarginSoftmax, SphereFace) on the
existing ``pair_reduce`` kernel, no new C++: the weight's columns are the references and one pair_reduce per
call gives, per row, the raw target logit (the "positive" set is the target class, scale 1) and the LSE of the
scaled logits over every other class (the "negative" set). The margin transform of the target is then an O(B)
differentiable torch expression, and CE_i = logaddexp(target'_i, rest_i) − target'_i. No B×C buffer in the
forward or the backward (pair_reduce recomputes its tiles).

What is fed to the kernel (dot products, dist code 0, except NormalizedSoftmax with a euclidean distance):

* CosFace / ArcFace: x̂ against ŵ_c; target t = cos, rest = LSE s·cos;
* NormalizedSoftmax: x̂ (or x) against ŵ_c; target = the similarity (distance), rest = LSE ±sim/T;
* LargeMarginSoftmax: x against w_c (raw: its non-target logits are s·x·w_c); t = x·w_y / (‖x‖‖w_y‖);
* SphereFace: x against ŵ_c (non-target logits s·‖x‖·cos = s·x·ŵ_c); t = x·ŵ_y / ‖x‖.
"""
from __future__ import annotations

import torch

from ..reference.margin_softmax import arcface_target, cosface_target, large_margin_target
from ..._registry import Unsupported
from .class_losses import _class_ce, _fast_class_path
from .common import _DIST, _LSE, _NormalizeRows, _both, _kernel_dtype, _need, _out


def _row_stats(q, r, labels, code, scale):
    """(raw target value, LSE over the other columns of scale·value, has_other) per row; one pair_reduce."""
    classes = torch.arange(r.shape[0], device=q.device)
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, 1.0, 0.0, scale, 0.0, None)
    return target, rest, cnt[1] > 0


def _ce(target, rest, has_rest, weights):
    losses = torch.where(has_rest, torch.logaddexp(target, rest), target) - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.mean()


def _ce_rows(target_of):
    """The class engine's row loss: CE_i = logaddexp(t'_i, rest_i) − t'_i, t' = target_of(v, q_i, w_{y_i})."""
    def rows(v, rest, has_rest, q, ry):
        t = target_of(v, q, ry)
        return torch.where(has_rest, torch.logaddexp(t, rest), t) - t
    return rows


def _engine(x, labels, W, weights, target_of, *, scale, normalize_x, col_norm, col_eps=1e-12):
    """The loss on the CPU class engine (class_losses._class_ce): W's columns as its C×D rows, a view."""
    dt = _kernel_dtype(x)
    q = x.to(dt)
    if normalize_x:
        q = _NormalizeRows.apply(q, 1e-12)
    return _out(_class_ce(q, W.t().to(dt), labels, weights, _ce_rows(target_of), scale=scale,
                          col_norm=col_norm, col_eps=col_eps), x)


def _columns(W, dt, normalize):
    """W (D×C) → its columns as C×D rows in the kernel dtype, unit-norm if asked (O(C·D), the weight's size)."""
    r = W.t().to(dt)
    return _NormalizeRows.apply(r, 1e-12) if normalize else r.contiguous()


@_both
def normalized_softmax_loss(x, labels, W, *, temperature, distance, weights=None):
    sg = 1.0 if distance.is_similarity else -1.0
    if _fast_class_path(x) and _DIST[distance.name] == 0:
        # PML normalises W's columns, and a normalising distance again: w / max(max(‖w‖, ε)·…) = w / max(‖w‖, ε²)
        return _engine(x, labels, W, weights, lambda v, q, ry: v * (sg / temperature), scale=sg / temperature,
                       normalize_x=distance.normalize, col_norm=True, col_eps=1e-24 if distance.normalize else 1e-12)
    _need(x, "pair_reduce")
    dt = _kernel_dtype(x)
    q = x.to(dt)
    if distance.normalize:
        q = _NormalizeRows.apply(q, 1e-12)
    r = _columns(W, dt, True)  # PML normalises W's columns whatever the distance
    if distance.normalize:  # the distance normalises them again (PML does; a no-op up to rounding)
        r = _NormalizeRows.apply(r, 1e-12)
    target, rest, has_rest = _row_stats(q, r, labels, _DIST[distance.name], sg / temperature)
    return _out(_ce(sg * target / temperature, rest, has_rest, weights), x)


def _cos_margin(x, labels, W, transform, margin, scale, weights):
    if _fast_class_path(x):
        return _engine(x, labels, W, weights, lambda v, q, ry: scale * transform(v, margin), scale=scale,
                       normalize_x=True, col_norm=True)
    _need(x, "pair_reduce")
    dt = _kernel_dtype(x)
    q = _NormalizeRows.apply(x.to(dt), 1e-12)
    r = _columns(W, dt, True)
    t, rest, has_rest = _row_stats(q, r, labels, 0, scale)
    return _out(_ce(scale * transform(t, margin), rest, has_rest, weights), x)


@_both
def cosface_loss(x, labels, W, *, margin, scale, weights=None):
    return _cos_margin(x, labels, W, cosface_target, margin, scale, weights)


@_both
def arcface_loss(x, labels, W, *, margin, scale, weights=None):
    return _cos_margin(x, labels, W, arcface_target, margin, scale, weights)


@_both
def large_margin_softmax_loss(x, labels, W, *, margin, scale, weights=None):
    if _fast_class_path(x):
        def target(v, q, ry):
            x_norm, w_norm = torch.linalg.vector_norm(q, dim=1), torch.linalg.vector_norm(ry, dim=1)
            t = v / (x_norm.clamp_min(1e-12) * w_norm.clamp_min(1e-12))
            return large_margin_target(t, margin) * w_norm * x_norm * scale
        return _engine(x, labels, W, weights, target, scale=scale, normalize_x=False, col_norm=False)
    _need(x, "pair_reduce")
    dt = _kernel_dtype(x)
    q = x.to(dt)
    r = _columns(W, dt, False)
    dot, rest, has_rest = _row_stats(q, r, labels, 0, scale)
    x_norm = torch.linalg.vector_norm(q, dim=1)
    w_norm = torch.linalg.vector_norm(r, dim=1)[labels]  # O(C) norms, O(B) gathered
    t = dot / (x_norm.clamp_min(1e-12) * w_norm.clamp_min(1e-12))  # PML's cosine (F.normalize, eps 1e-12)
    target = large_margin_target(t, margin) * w_norm * x_norm * scale
    return _out(_ce(target, rest, has_rest, weights), x)


@_both
def sphereface_loss(x, labels, W, *, margin, scale, weights=None):
    if _fast_class_path(x):
        def target(v, q, ry):
            x_norm = torch.linalg.vector_norm(q, dim=1)
            return large_margin_target(v / x_norm.clamp_min(1e-12), margin) * x_norm * scale
        return _engine(x, labels, W, weights, target, scale=scale, normalize_x=False, col_norm=True)
    _need(x, "pair_reduce")
    dt = _kernel_dtype(x)
    q = x.to(dt)
    r = _columns(W, dt, True)
    dot, rest, has_rest = _row_stats(q, r, labels, 0, scale)
    x_norm = torch.linalg.vector_norm(q, dim=1)
    t = dot / x_norm.clamp_min(1e-12)
    return _out(_ce(large_margin_target(t, margin) * x_norm * scale, rest, has_rest, weights), x)


@_both
def p2sgrad_loss(x, labels, weight):
    """P2SGrad's mean over N·C of (cos_ic − δ_{c,y_i})², without the N×C cosines: Σ_c cos_ic² = x̂_iᵀ (W Wᵀ) x̂_i
    (a D×D Gram) and the target cosines are an O(N·D) gather, so
    loss = (Σ_i x̂_iᵀ G x̂_i − 2 Σ_i cos_{i,y_i} + N) / (N·C). PML's clamp of cos to [−1, 1] is not applied: it
    acts only on cosines that round past ±1 (an embedding exactly parallel to a unit column), where PML's
    gradient of that entry is 0. Plain torch (no kernel): exact to second order.

    That holds while every column has norm ≤ 1 (then |cos| ≤ 1): the module's columns are unit vectors. A
    weight with a longer column (the functional form takes any) would be clamped where this form cannot see
    it, so it raises ``Unsupported`` (``auto`` falls back to an exact backend) — one scalar read, a host sync
    on a GPU."""
    dt = _kernel_dtype(x)
    q = x.to(dt)
    w = weight.to(dt)
    if bool((torch.linalg.vector_norm(w.detach(), dim=0) > (1 + 1e-6) ** 0.5).any()):
        raise Unsupported("p2sgrad_loss: a weight column longer than 1 (cosines PML clamps): the C++ Gram form "
                          "assumes unit-ball columns; the reference and triton backends clamp exactly")
    x_norm = q.pow(2).sum(1).pow(0.5)  # PML's modulus (no eps)
    return _out(_P2SGram.apply(q / x_norm.unsqueeze(1), w, labels), x)


class _P2SGram(torch.autograd.Function):
    """(Σ_i ûᵢᵀ (W Wᵀ) ûᵢ − 2 Σ_i ûᵢ·w_{yᵢ} + N) / (N·C) for unit rows û (N×D) and W (D×C): the Gram G = W Wᵀ in the
    forward, dW = 2k (ÛᵀÛ) W − 2k Σ_i ûᵢ e_{yᵢ}ᵀ in the backward (k = g / (N·C)) — two D×D×C GEMMs in all (autograd
    through ``W @ W.t()`` takes three: one per operand) and one D×C gradient (no zero-filled gather gradient added
    to it). Under ``create_graph=True`` the backward recomputes G differentiably (exact to second order)."""

    @staticmethod
    def forward(ctx, u, w, labels):
        gram = w @ w.t()
        wy = w.t().index_select(0, labels)
        n, c = u.shape[0], w.shape[1]
        ctx.save_for_backward(u, w, labels, gram)
        return ((u @ gram) * u).sum().sub(2 * torch.linalg.vecdot(u, wy).sum()).add(n).div(n * c)

    @staticmethod
    def backward(ctx, g):
        u, w, labels, gram = ctx.saved_tensors
        if torch.is_grad_enabled():
            gram = w @ w.t()
        k = g * (2.0 / (u.shape[0] * w.shape[1]))
        du = dw = None
        if ctx.needs_input_grad[0]:
            du = (u @ gram - w.t().index_select(0, labels)) * k
        if ctx.needs_input_grad[1]:
            m = (u.t() @ u) * k
            # in w's own layout (a transposed view of a C×D leaf: computed C×D, so no copy to the leaf's strides)
            dw = (w.t() @ m).t() if w.stride(0) == 1 and w.stride(1) != 1 else m @ w
            dw.index_add_(1, labels, u.t() * -k)
        return du, dw, None


# ----------------------------------------------------------------- statistics of one class shard (distributed)


def _shard_inputs(x, W, loss, p):
    """(q, r, dist code, scale of the non-target logits) fed to pair_reduce for one class shard."""
    dt = _kernel_dtype(x)
    if loss == "normalized_softmax_loss":
        q, r = x.to(dt), _columns(W, dt, True)
        if p["distance"].normalize:
            q, r = _NormalizeRows.apply(q, 1e-12), _NormalizeRows.apply(r, 1e-12)
        sg = 1.0 if p["distance"].is_similarity else -1.0
        return q, r, _DIST[p["distance"].name], sg / p["temperature"]
    if loss in ("cosface_loss", "arcface_loss"):
        return _NormalizeRows.apply(x.to(dt), 1e-12), _columns(W, dt, True), 0, p["scale"]
    return x.to(dt), _columns(W, dt, loss == "sphereface_loss"), 0, p["scale"]


@_both
def margin_softmax_row_stats(x, labels, W, *, loss, columns=None, **p):
    """One class shard's per-row statistics (the reference's contract) with one pair_reduce: the target's raw
    value is the "positive" LSE (scale 1, one pair), the other classes' logits the "negative" LSE; classes outside
    ``columns`` are in neither set (the kernel's column mask). The margin is an O(B) torch expression."""
    if loss not in ("normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
                    "sphereface_loss"):
        raise Unsupported(f"the C++ margin_softmax_row_stats has no {loss!r} (grouped columns): reference only")
    _need(x, "pair_reduce")
    if W.shape[1] == 0:  # an empty shard (C < world size): nothing here, still graph-attached
        z = (x * 0).sum(1) + (W * 0).sum()
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return z, none, z, none
    q, r, code, scale = _shard_inputs(x, W, loss, p)
    classes = torch.arange(r.shape[0], device=x.device)
    mask = None if columns is None else columns.to(device=x.device, dtype=torch.bool).contiguous()
    raw, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, 1.0, 0.0, scale, 0.0, None, mask)
    has_target = cnt[0] > 0
    raw = torch.where(has_target, raw, 0)  # rows without a target here: a finite margin gradient, then zeroed
    index = torch.where(has_target, labels, 0)
    if loss == "normalized_softmax_loss":
        target = scale * raw  # ±similarity / T
    elif loss in ("cosface_loss", "arcface_loss"):
        target = scale * (cosface_target if loss == "cosface_loss" else arcface_target)(raw, p["margin"])
    else:  # raw = x·w_y (LargeMargin) or x·ŵ_y (SphereFace); t is PML's cosine
        norm = torch.linalg.vector_norm(q, dim=1)
        if loss == "large_margin_softmax_loss":
            norm = norm * torch.linalg.vector_norm(r, dim=1)[index]
        t = torch.where(has_target, raw / norm.clamp_min(1e-12), 0)
        target = large_margin_target(t, p["margin"]) * norm * scale
    target = torch.where(has_target, target, 0)
    return _row(target, x), has_target, _row(rest, x), cnt[1] > 0


def _row(v, x):
    return v if x.dtype in (torch.float16, torch.bfloat16) else v.to(x.dtype)


__all__ = ["normalized_softmax_loss", "cosface_loss", "arcface_loss", "large_margin_softmax_loss",
           "sphereface_loss", "p2sgrad_loss", "margin_softmax_row_stats"]
