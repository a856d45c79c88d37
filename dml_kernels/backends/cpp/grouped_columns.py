"""SubCenterArcFace and SoftTriple on the cpu backend (grouped columns: the K centres of a class together), in torch
(BLAS tiles, no C++), in O(B × chunk) memory beyond the weight gradient — never a B×C·K or B×C tensor.

The weight keeps PML's layout, **D×C·K** (column c·K + k is centre k of class c), read through column slices
``W[:, j0:j1]`` (no transposed or normalised copy); the column normalisation is per-column reciprocal norms ``rw``
(O(C·K)), applied to the tile. A chunk is whole classes: its tile S = x̂·Ŵ_chunk (B × c·K, permuted to centre-major
order while ``rw`` is applied, so each centre's B × c block is contiguous) is reduced over each class's K centres to
the class values v (B × c):

* SubCenterArcFace: v = max_k S (the gradient to the first maximal centre, as ``torch.max``);
* SoftTriple:       v = Σ_k p_k S_k, p = softmax_k(S/γ)  (dv/dS_k = p_k (1 + (S_k − v)/γ)).

Per row, over the chunks: the target class's value t (an O(B) gather from the tile holding it) and the online
LSE R of the other classes' logits a·v (a = scale / la). The loss is the reference's own O(B) torch expression —
``arcface_target`` (PML's cos θ − m·sin m past θ > π − m) or la·(t − margin) — CE_i = logaddexp(z_t, R) − z_t,
times the miner weight, averaged over the rows (PML's MeanReducer; a label outside [0, C), possible with
``check_inputs=False``, contributes 0, as in the triton form). PML's SoftTripleLoss has no centre regulariser in
its loss (only the optional ``weight_regularizer``, added by the module).

Gradients in the forward (Liger / Cut-Cross-Entropy style): the op returns the scalar loss, so once the forward has
R and t, dL/dR_i and dL/dt_i (autograd on that O(B) expression) fix every tile's gradient up to ``grad_output``. A
second pass over the chunks forms them: dL/dv = dL/dR·a·e^{a·v − R} off the target, dL/dt at it; spread over the
centres; ·rw; dx̂ += dS·Wcᵀ; dW_chunk = x̂ᵀ·dS minus F.normalize's projection rw²(w·dW)w. The backward only scales
them by ``grad_output``; a second backward (``retain_graph=True``) recomputes them. The first pass keeps its tiles
S in the weight gradient's own buffer — chunk j's B × c·K tile inside the chunk's c·K × D gradient block, free
until the second pass overwrites it with that block's gradient — so with B ≤ D the second pass needs no recompute
GEMM: three GEMMs of B·C·K·D in all, as PML's autograd, and no extra memory (B > D, or no weight gradient: the
tiles are recomputed, four). No gradient wanted (``no_grad``, inputs without ``requires_grad``): one pass.

fp32 products go through oneDNN (class_losses._Products: ≈ 1.8× MKL's generic sgemm path on this AMD machine).
Its operands must be dense: a column slice of PML's D × C·K layout is padded (oneDNN reads it ~100× slower), so
there each chunk's columns are first packed into a c·K × D copy (``_Ctx.wchunk``: one chunk, ≤ TILE / B rows of W,
never all of W); when W is the transposed view of a C·K × D tensor its slices are dense already.

Inline on the caller's thread (torch's intra-op threads do the parallel work): an earlier form dealt the chunks
to Python worker threads, which on a quiet 2-core machine was 5–15 % slower and moved the caller onto another
malloc arena (the process's later peak-RSS measurements grew). Double backward raises. No host sync.
"""
from __future__ import annotations

import torch

from ..._registry import Unsupported, register
from ..reference.margin_softmax import arcface_target
from . import row_blocks
from .class_losses import _dense, _lin, _mm_nt, _onednn_ok
from .common import _NormalizeRows, _kernel_dtype, _out
from .library import refuse_double_backward

_EPS = 1e-12


def _chunks(b, n_classes, k):
    """Whole-class chunks: tiles of ≤ TILE elements (B × c·K; at least one class), of equal size but the last."""
    most = max(1, row_blocks.TILE // max(b * k, 1))
    n = -(-n_classes // most)
    return row_blocks.spans(n_classes, max(1, -(-n_classes // n)))


class _Cfg:
    def __init__(self, group, k, a, inv_gamma, norm_w, target_fn):
        self.group, self.k, self.a, self.inv_gamma, self.norm_w = group, k, a, inv_gamma, norm_w
        self.target_fn = target_fn  # the target logit from t (O(B) torch, differentiable)


class _Ctx:
    """One call's tensors: q (B × D), W (D × C·K), rw (C·K or None), labels, the stash (dW's buffer or None)."""

    def __init__(self, q, W, rw, labels, cfg, stash):
        self.q, self.W, self.rw, self.labels, self.cfg, self.stash = q, W, rw, labels, cfg, stash

    def store(self, j0, j1):
        """Chunk [j0, j1)'s B × c·K tile inside its c·K × D block of the stash (rows contiguous)."""
        b = self.q.shape[0]
        if self.stash.stride(0) == 1:  # column-major: the block is contiguous memory
            return self.stash.t()[j0:j1].reshape(-1)[:b * (j1 - j0)].view(b, j1 - j0)
        return self.stash[:b, j0:j1]

    def wchunk(self, j0, j1):
        """W's columns [j0, j1) (D × c·K) for the products: a dense view, or — a padded column slice of PML's layout
        under oneDNN — a contiguous copy of the slice (values unchanged)."""
        wc = self.W[:, j0:j1]
        if _onednn_ok(wc.dtype) and not _dense(wc):
            wc = wc.contiguous()
        return wc

    def tile(self, j0, j1, out=None, wc=None):
        """S of the chunk, centre-major (column k·c + i: centre k of the chunk's class i), scaled by rw."""
        c, k = (j1 - j0) // self.cfg.k, self.cfg.k
        raw = _mm_nt(self.q, (self.wchunk(j0, j1) if wc is None else wc).t())
        out = torch.empty_like(raw) if out is None else out
        src = raw.view(-1, c, k).transpose(1, 2)
        if self.rw is None:
            out.view(-1, k, c).copy_(src)
        else:
            torch.mul(src, self.rw[j0:j1].view(c, k).t(), out=out.view(-1, k, c))
        return out


def _reduce(s, c, cfg):
    """Class values v (B × c) of a centre-major tile s and, for SoftTriple, (e = e^{(S − max)/γ} (B × K·c), Σ_k e) —
    at K = 2 (None, p_0 = σ((S_0 − S_1)/γ))."""
    k = cfg.k
    if k == 1:
        return s.clone(), None, None
    blocks = [s[:, i * c:(i + 1) * c] for i in range(k)]
    if k == 2 and cfg.group == "softmax":  # p_0 = σ((S_0 − S_1)/γ), v = S_1 + p_0 (S_0 − S_1): (v, None, p_0)
        d = blocks[0] - blocks[1]
        p0 = torch.mul(d, cfg.inv_gamma).sigmoid_()
        return d.mul_(p0).add_(blocks[1]), None, p0
    m = torch.maximum(blocks[0], blocks[1])
    for blk in blocks[2:]:
        torch.maximum(m, blk, out=m)
    if cfg.group == "max":
        return m, None, None
    e = torch.empty(s.shape, dtype=s.dtype)
    den, num = torch.zeros_like(m), torch.zeros_like(m)
    for i, blk in enumerate(blocks):
        ei = e[:, i * c:(i + 1) * c]
        torch.sub(blk, m, out=ei).mul_(cfg.inv_gamma).exp_()
        den.add_(ei)
        num.addcmul_(ei, blk)
    return num.div_(den), e, den


def _target_slot(labels, c0, c1):
    """(index of the row's target inside the chunk (clamped), whether it is in the chunk) — O(B)."""
    inside = (labels >= c0) & (labels < c1)
    return (labels - c0).clamp(0, c1 - c0 - 1).unsqueeze(1), inside


def _merge(m, l, m_blk, a, v=None, l_blk=None):
    """The online LSE's (max, Σ e^{a(· − max)}) merged with a block's values v (B × c) or its own (max, sum)."""
    m_new = torch.maximum(m, m_blk)
    m_safe = torch.where(m_new > float("-inf"), m_new, 0)  # nothing but targets so far: every e^{−inf} is 0
    if v is not None:
        l_blk = torch.sub(v, m_safe.unsqueeze(1)).mul_(a).exp_().sum(1)
    else:
        l_blk = l_blk * torch.exp((m_blk - m_safe) * a)
    return m_new, l * torch.exp((m - m_safe) * a) + l_blk


def _pass1(cx, chunks):
    """Over ``chunks``: (t: the target's class value, 0 if its class is elsewhere; m: the max of v over the other
    classes; l: Σ e^{a(v − m)}) per row; each tile kept in the stash if there is one."""
    cfg, b = cx.cfg, cx.q.shape[0]
    t = cx.q.new_zeros(b)
    m = cx.q.new_full((b,), float("-inf"))
    l = cx.q.new_zeros(b)
    for c0, c1 in chunks:
        j0, j1 = c0 * cfg.k, c1 * cfg.k
        s = cx.tile(j0, j1, None if cx.stash is None else cx.store(j0, j1))
        v, _, _ = _reduce(s, c1 - c0, cfg)
        idx, inside = _target_slot(cx.labels, c0, c1)
        at = v.gather(1, idx).squeeze(1)
        t = torch.where(inside, at, t)
        v.scatter_(1, idx, torch.where(inside, float("-inf"), at).unsqueeze(1))
        m, l = _merge(m, l, v.amax(1), cfg.a, v=v)
    return t, m, l


def _pass2(cx, rest, g_t, g_r, dW, need_q, chunks):
    """Over ``chunks``: dL/dq (their share) and dL/dW into their columns of ``dW`` (None: not wanted) for the
    loss's upstream scalar 1, given dL/dt and dL/dR per row; tiles from the stash, else recomputed."""
    cfg, q, rw, k = cx.cfg, cx.q, cx.rw, cx.cfg.k
    dq = torch.zeros_like(q) if need_q else None
    shift, ga = (rest / cfg.a).unsqueeze(1), (g_r * cfg.a).unsqueeze(1)
    for c0, c1 in chunks:
        c, j0, j1 = c1 - c0, c0 * k, c1 * k
        wc = cx.wchunk(j0, j1)
        s = cx.tile(j0, j1, wc=wc) if cx.stash is None else cx.store(j0, j1)
        v, e, den = _reduce(s, c, cfg)
        idx, inside = _target_slot(cx.labels, c0, c1)
        g = torch.sub(v, shift).mul_(cfg.a).exp_().mul_(ga)  # dL/dv = dL/dR·a·e^{a·v − R} off the target
        g.scatter_(1, idx, torch.where(inside, g_t, g.gather(1, idx).squeeze(1)).unsqueeze(1))
        if k == 1:
            ds = g
        elif cfg.group == "max":  # all to the first maximal centre (torch.max's index): the rest passes on
            ds = torch.empty(s.shape, dtype=s.dtype)
            rem = g
            for i in range(k - 1):
                torch.mul(rem, s[:, i * c:(i + 1) * c] == v, out=ds[:, i * c:(i + 1) * c])
                rem = rem - ds[:, i * c:(i + 1) * c]
            ds[:, (k - 1) * c:].copy_(rem)
        elif e is None:  # K = 2: p_0 (α + β·S_0), (1 − p_0)(α + β·S_1), α = g (1 − v/γ), β = g/γ
            beta = g * cfg.inv_gamma
            alpha = torch.addcmul(g, beta, v, value=-1.0)
            ds = torch.empty(s.shape, dtype=s.dtype)
            torch.mul(torch.addcmul(alpha, beta, s[:, :c]), den, out=ds[:, :c])
            a1 = torch.addcmul(alpha, beta, s[:, c:])
            torch.sub(a1, a1.mul(den), out=ds[:, c:])
        else:  # p_k (1 + (S_k − v)/γ)·g = e_k/den·(α + β·S_k), α = g (1 − v/γ), β = g/γ
            gd = g.div_(den)
            beta = gd * cfg.inv_gamma
            alpha = torch.addcmul(gd, beta, v, value=-1.0)
            ds = e
            for i in range(k):
                ds[:, i * c:(i + 1) * c].mul_(torch.addcmul(alpha, beta, s[:, i * c:(i + 1) * c]))
        # back to W's column order, ·rw (the chain through Ŵ = W·rw; the projection below)
        dsn = torch.empty(ds.shape, dtype=ds.dtype)
        if rw is None:
            dsn.view(-1, c, k).copy_(ds.view(-1, k, c).transpose(1, 2))
        else:
            torch.mul(ds.view(-1, k, c).transpose(1, 2), rw[j0:j1].view(c, k), out=dsn.view(-1, c, k))
        dnn = _onednn_ok(q.dtype)  # (fp32: oneDNN's products, see class_losses._Products)
        if need_q:
            if dnn and _dense(wc):
                dq.add_(_lin(dsn, wc))
            else:
                dq.addmm_(dsn, wc.t())
        if dW is not None:  # overwrites the stashed tile (read above)
            dw = dW[:, j0:j1]
            if dnn and not dw.t().is_contiguous():  # PML's D × C·K layout: the block formed densely, then copied
                block = _lin(q.t(), dsn.t())
                _project(block, wc, rw, j0, j1)
                dw.copy_(block)
                continue
            if dnn:  # W's column-major layout: dwᵀ (c·K × D) rows are contiguous
                dw.t().copy_(_lin(dsn.t(), q.t()))
            else:
                torch.mm(q.t(), dsn, out=dw)
            _project(dw, wc, rw, j0, j1)
    return dq


def _project(dw, wc, rw, j0, j1):
    """F.normalize's chain on the chunk's weight gradient (D × c·K) in place: −rw² (w·dW) w per column of W, not
    where the norm is clamped; nothing without normalisation (rw None)."""
    if rw is not None:
        r = rw[j0:j1]
        dw.addcmul_(wc, torch.linalg.vecdot(wc, dw, dim=0).mul_(r * r * (r < 1 / _EPS)), value=-1.0)


def _parallel(fn, chunks):
    """[fn(chunks)] — one part, on the caller's thread (the chunks' shares of the passes' results)."""
    with torch.no_grad():
        return [fn(chunks)]


def _grads(cx, rest, g_tr, need_q, need_w, chunks):
    dW = cx.stash if cx.stash is not None else (_grad_buffer(cx.W) if need_w else None)
    dqs = _parallel(lambda cs: _pass2(cx, rest, *g_tr, dW, need_q, cs), chunks)
    dq = dqs[0]
    for d in dqs[1:] if need_q else ():
        dq = dq.add_(d)
    return dq, dW


def _grad_buffer(W):
    """W's gradient buffer: W's layout if column-major (a transposed C·K × D matrix), else row-major."""
    if W.stride(0) == 1 and W.stride(1) == W.shape[0]:
        return torch.empty_like(W)
    return torch.empty(W.shape, dtype=W.dtype, device=W.device)


def _column_norms(W):
    """‖W[:, j]‖ for every column of W (D × C·K). In PML's row-major layout a reduction over dim 0 strides across
    rows (measured 25–38 ms for 256 × 32768 on 2 cores); sums of squares over blocks of 16 rows run along the rows
    (~1.3 ms). The transposed view of a C·K × D tensor reduces along its rows already."""
    if W.dim() != 2 or W.stride(1) != 1 or W.shape[0] <= 16:
        return torch.linalg.vector_norm(W, dim=0)
    acc = W[:16].square().sum(0)
    for i in range(16, W.shape[0], 16):
        acc += W[i:i + 16].square().sum(0)
    return acc.sqrt_()


class _GroupedCE(torch.autograd.Function):
    """(q, W, weights) → the mean-reduced loss; the gradients are formed in the forward (see the module doc)."""

    @staticmethod
    def forward(ctx, q, W, weights, labels, n_classes, cfg):
        need_q, need_w, need_wt = ctx.needs_input_grad[:3]
        rw = 1.0 / _column_norms(W).clamp_min(_EPS) if cfg.norm_w else None
        stash = _grad_buffer(W) if need_w and q.shape[0] <= q.shape[1] else None
        cx = _Ctx(q, W, rw, labels, cfg, stash)
        chunks = _chunks(q.shape[0], n_classes, cfg.k)
        parts = _parallel(lambda cs: _pass1(cx, cs), chunks)
        t, m, l = parts[0]
        for t2, m2, l2 in parts[1:]:
            t = t + t2  # each row's target is in one part (0 in the others)
            m, l = _merge(m, l, m2, cfg.a, l_blk=l2)
        rest = torch.where(l > 0, torch.log(l) + cfg.a * m, float("-inf"))
        leaves = [t, rest] + ([weights] if need_wt else [])
        with torch.enable_grad():
            leaves = [u.detach().requires_grad_() for u in leaves]
            loss = _row_loss(leaves[0], leaves[1], labels, n_classes, leaves[2] if need_wt else weights, cfg)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if (need_q or need_w or need_wt) else None
        ctx.grads, ctx.g_weights = None, (grads[2] if need_wt else None)
        if need_q or need_w:
            ctx.g_tr = tuple(torch.zeros_like(t) if gi is None else gi for gi in grads[:2])
            ctx.grads = _grads(cx, rest, ctx.g_tr, need_q, need_w, chunks)
        cx.stash = None
        ctx.save_for_backward(q, W, rw, labels, rest)
        ctx.n_classes, ctx.cfg = n_classes, cfg
        return loss.detach()

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("cpu subcenter_arcface_loss / soft_triple_loss")
        need_q, need_w = ctx.needs_input_grad[:2]
        if ctx.grads is None and (need_q or need_w):  # a second backward (retain_graph): recompute the gradients
            q, W, rw, labels, rest = ctx.saved_tensors
            cx = _Ctx(q, W, rw, labels, ctx.cfg, None)
            ctx.grads = _grads(cx, rest, ctx.g_tr, need_q, need_w, _chunks(q.shape[0], ctx.n_classes, ctx.cfg.k))
        dq, dW = ctx.grads if ctx.grads is not None else (None, None)
        ctx.grads = None  # scaled in place: the buffers go to autograd
        return (None if dq is None else dq.mul_(g), None if dW is None else dW.mul_(g),
                None if ctx.g_weights is None else ctx.g_weights * g, None, None, None)


def _row_loss(t, rest, labels, n_classes, weights, cfg):
    """Mean over the rows of w_i·(logaddexp(z_t, R) − z_t); 0 for a label outside [0, C)."""
    z = cfg.target_fn(t)
    losses = torch.where(rest > float("-inf"), torch.logaddexp(z, rest), z) - z
    losses = torch.where((labels >= 0) & (labels < n_classes), losses, 0)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.mean()


def _grouped_loss(x, labels, W, k, cfg, weights, norm_x):
    if x.device.type != "cpu" or W.device.type != "cpu":
        raise Unsupported("the cpu grouped-column losses take CPU tensors")
    dt = _kernel_dtype(x)
    if k < 1 or W.shape[1] % k:
        raise ValueError(f"W has {W.shape[1]} columns: not a multiple of the {k} centres per class")
    q = x.to(dt)
    if norm_x:
        q = _NormalizeRows.apply(q, _EPS)
    return _out(_GroupedCE.apply(q, W.to(dt), weights, labels, W.shape[1] // k, cfg), x)


@register("subcenter_arcface_loss", "cpu")
def subcenter_arcface_loss(x, labels, W, *, margin, scale, sub_centers, weights=None):
    k, scale = int(sub_centers), float(scale)
    cfg = _Cfg("max", k, scale, 1.0, True, lambda t: scale * arcface_target(t, margin))
    return _grouped_loss(x, labels, W, k, cfg, weights, True)


@register("soft_triple_loss", "cpu")
def soft_triple_loss(x, labels, fc, *, centers_per_class, la, gamma, margin, distance, weights=None):
    if distance.name not in ("cosine", "dot"):
        raise Unsupported(f"soft_triple_loss: distance {distance.name!r} is not a similarity the cpu form computes")
    k, la, margin = int(centers_per_class), float(la), float(margin)
    cfg = _Cfg("softmax", k, la, 1.0 / float(gamma), bool(distance.normalize), lambda t: la * (t - margin))
    return _grouped_loss(x, labels, fc, k, cfg, weights, bool(distance.normalize))


__all__ = ["subcenter_arcface_loss", "soft_triple_loss"]
