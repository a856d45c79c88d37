"""The class-weight family on the cpu backend (ProxyNCA, Proxy Anchor; the margin-softmax losses use the same
engine from margin_softmax.py / grouped_columns.py).

* The class engine (``_class_ce`` / ``_ClassCE``): row blocks of all C logits, the block's softmax work in one C++
  pass (op ``class_rows``), the gradient formed in the forward (3 products, no recompute); a column normalisation is
  a per-column scale, never a normalised C×D copy. fp32 products through oneDNN where the operands are dense
  (``_Products``, ``_mm_nt``), else torch.mm.
* Proxy Anchor, fp32: blocks of classes × all B embeddings (``_ProxyAnchor``), each class's statistics complete in
  its block, the gradient formed there; float64 and the other cases on ``pair_reduce`` (the proxies as queries: a
  per-proxy LSE is a row reduction of the transposed problem), as ProxyNCA's fallback without ``class_rows``.
"""
from __future__ import annotations

import torch

from ..._registry import Unsupported
from .library import refuse_double_backward
from .loader import has_kernel
from .common import _DIST, _LSE, _LSE1, _NormalizeRows, _both, _need, _out, _prep, _sg, _zero


@_both
def proxy_nca_loss(x, labels, proxies, *, softmax_scale, exclude_positive=False, distance, weights=None):
    if _fast_class_path(x) and _DIST[distance.name] != 1:
        s = softmax_scale * _sg(distance)
        code = _DIST[distance.name]
        # a normalising distance: the proxies' normalisation is a per-column scale of the engine's tiles (no
        # normalised C×D copy; with the squared euclidean distance it needs the class_rows op)
        col_norm = distance.normalize and (code == 0 or _has_class_rows())
        q, r, _ = _prep(x, None, distance)
        r = proxies.to(q.dtype)
        if distance.normalize and not col_norm:
            r = _NormalizeRows.apply(r, 1e-12)

        def rows(v, rest, has_rest, q, ry):
            t = s * v
            return rest - t if exclude_positive else torch.where(has_rest, torch.logaddexp(t, rest), t) - t
        return _out(_class_ce(q, r, labels, weights, rows, scale=s, sq_euclid=code == 2, col_norm=col_norm), x)
    _need(x, "pair_reduce")
    q, r, code = _prep(x, proxies.to(x.dtype), distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    s = softmax_scale * _sg(distance)
    # "positive" = the target proxy (its logit), "negative" = every other proxy (their LSE).
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, s, 0.0, s, 0.0, None)
    if exclude_positive:
        losses = rest - target
    else:
        losses = torch.where(cnt[1] > 0, torch.logaddexp(target, rest), target) - target
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return _out(losses.mean(), x)


@_both
def proxy_anchor_loss(x, labels, proxies, *, margin, alpha, distance, weights=None):
    if weights is not None:
        raise Unsupported("the C++ proxy_anchor_loss takes no miner weights")
    if _pa_fast(x, proxies, distance, alpha):
        q = x.to(torch.float32)
        if distance.normalize:
            q = _NormalizeRows.apply(q, 1e-12)
        return _out(_proxy_anchor_blocks(q, proxies.to(torch.float32), labels, float(margin), float(alpha),
                                        distance.normalize), x)
    _need(x, "pair_reduce")
    num_classes = proxies.shape[0]
    # Transposed: rows = proxies, columns = embeddings, so each proxy's LSE is a row reduction.
    q, r, code = _prep(proxies.to(x.dtype), x, distance)
    classes = torch.arange(num_classes, device=x.device)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, classes, labels, None, None, code, _LSE1, -sg * alpha, margin, sg * alpha, -margin, None)
    num_with_pos = (cnt[0] > 0).sum()
    pos_loss = torch.where(num_with_pos > 0, lp.sum() / num_with_pos.clamp_min(1), _zero(lp))
    return _out(pos_loss + ln.sum() / num_classes, x)


def _pa_fast(x, proxies, distance, alpha):
    """fp32 Proxy Anchor on oneDNN class blocks (_ProxyAnchor below): CPU, outside torch.compile, a cosine / dot
    similarity, alpha > 0, row-major proxies, a non-empty batch; else pair_reduce's form."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and x.dtype == torch.float32
            and _DIST[distance.name] == 0 and distance.is_similarity and float(alpha) > 0 and x.shape[0] > 0
            and proxies.dtype == torch.float32 and proxies.is_contiguous() and _onednn_ok(torch.float32)
            and _has_class_rows())


# ----------------------------------------------------------------- statistics of one class shard (distributed)


@_both
def proxy_nca_row_stats(x, labels, proxies, *, softmax_scale, distance, columns=None):
    """ProxyNCA's per-row statistics over this shard's classes: one pair_reduce (target = the "positive"
    LSE, rest = the "negative" LSE); labels outside [0, C) match no column; ``columns`` (C,) bool: the kernel's
    column mask (only these classes take part)."""
    _need(x, "pair_reduce")
    if proxies.shape[0] == 0:  # an empty shard (C < world size): nothing here, still graph-attached
        z = (x * 0).sum(1) + (proxies * 0).sum()
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return z, none, z, none
    q, r, code = _prep(x, proxies.to(x.dtype), distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    s = softmax_scale * _sg(distance)
    mask = None if columns is None else columns.to(device=x.device, dtype=torch.bool).contiguous()
    target, rest, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, labels, classes, None, None, code, _LSE, s, 0.0, s, 0.0, None, mask)
    return _row(target, x), cnt[0] > 0, _row(rest, x), cnt[1] > 0


@_both
def proxy_anchor_class_terms(x, labels, proxies, *, margin, alpha, distance):
    """Proxy Anchor's per-class terms over this shard (the transposed pair_reduce of proxy_anchor_loss)."""
    _need(x, "pair_reduce")
    if proxies.shape[0] == 0:
        z = (proxies * 0).sum(1) + (x * 0).sum()
        return z, torch.zeros(0, dtype=torch.bool, device=x.device), z
    q, r, code = _prep(proxies.to(x.dtype), x, distance)
    classes = torch.arange(proxies.shape[0], device=x.device)
    sg = _sg(distance)
    lp, ln, _, cnt = torch.ops.dml_kernels.pair_reduce(
        q, r, classes, labels, None, None, code, _LSE1, -sg * alpha, margin, sg * alpha, -margin, None)
    return _row(lp, x), cnt[0] > 0, _row(ln, x)


def _row(v, x):
    """A per-row statistic in the dtype losses come back in (see _out)."""
    return v if x.dtype in (torch.float16, torch.bfloat16) else v.to(x.dtype)


# ----------------------------------------------------------------- the CPU class engine (softmax CE over classes)
# Mean-reduced softmax cross-entropies over C class columns (the margin family, ProxyNCA), CPU tensors, when a
# gradient is wanted: the gradient is formed in the forward, Cut-Cross-Entropy style — row blocks of all C
# logits (one torch.mm), the row LSE, the softmax weights, then dq_blk = E·R and dR += Eᵀ·q_blk: 3 GEMMs and no
# recompute (pair_reduce's forward + backward take 4). A column normalisation (Ŵ = W / max(‖w_c‖, eps)) is a
# per-column scale of the tiles, never a normalised C×D copy; its backward is one pass over dR at the end.
# Memory: one block of ≤ _BLOCK_ELEMS logits, dq and dR (the size of the inputs); backward = grad_output ×
# the saved gradients. A create_graph=True backward raises (the saved gradients are constants).

_BLOCK_ELEMS = 1 << 22  # logits per row block (16 MiB in fp32)


def _fast_class_path(x, *tensors):
    """The class engine serves CPU tensors outside torch.compile (elsewhere pair_reduce's form runs)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _row_dots(a, b):
    """(a_c · b_c) per row in one pass (einsum's batched dot; vecdot / (a*b).sum(1) form an a-sized temporary)."""
    return torch.einsum("cd,cd->c", a, b)


def _add_rows(G, idx, src):
    """G[idx] += src (repeated indices accumulate). Along dim 1 of the transposed view: index_add_ along dim 0 of
    a C×D tensor runs a parallel region over all of G (measured 150 ms for 128 rows on a busy 2-core machine)."""
    G.t().index_add_(1, idx, src.t())


def _has_class_rows():
    """The extension has the fused row op (an older build of the library may not: the torch passes then run)."""
    return has_kernel("class_rows", "cpu")


_ONEDNN = True  # fp32 products through oneDNN when torch has it (tests switch it off to compare)


def _onednn_ok(dt):
    """oneDNN's matmul serves fp32 products: torch built with it, enabled, fp32 products in IEEE fp32 (no bf16 /
    tf32 down-conversion asked for)."""
    mk = torch.backends.mkldnn
    return (_ONEDNN and dt == torch.float32 and mk.is_available() and torch._C._get_mkldnn_enabled()
            and getattr(getattr(mk, "matmul", None), "fp32_precision", "none") in ("none", "ieee")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _lin(x, w):
    """x·wᵀ by oneDNN (w read in place when dense; a transposed x is copied first)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _dense(t):
    """Row- or column-major without padding: oneDNN reads such a w in place; a padded leading dimension (a column
    slice) falls to a path measured 100–1000× slower."""
    return t.dim() == 2 and (t.is_contiguous() or t.t().is_contiguous())


def _mm_nt(x, w):
    """x·wᵀ: oneDNN for fp32 dense operands, else torch.mm."""
    return _lin(x, w) if _onednn_ok(x.dtype) and _dense(x) and _dense(w) else torch.mm(x, w.t())


class _Products:
    """The engine's three products for one call: A = q_blk·Rᵀ, dq_blk = A·R, G (+)= Aᵀ·u (u = rho·q_blk), G in R's
    layout (D×C memory when R is W's transposed view). fp32: oneDNN's matmul (y = x·wᵀ, ``_lin``) for the logits,
    dq and the first block's G in the D×C layout — measured 1.6–1.9× MKL's sgemm single-threaded on this AMD EPYC
    (MKL takes a generic path there), the same fp32 arithmetic. G in C×D and a later block's accumulation stay on
    MKL's addmm: oneDNN reads a transposed x through a copy of it (the block's size), and a column slice of Aᵀ as
    w (leading dimension ≠ width) falls to a path measured 100× slower; MKL is as fast there. Else torch.mm."""

    def __init__(self, R, nb, C):
        self.R, self.G = R, None
        self.dnn = _onednn_ok(R.dtype) and _dense(R)
        self.buf = None if self.dnn else torch.empty(nb, C, dtype=R.dtype)
        self.col_major = R.dim() == 2 and R.stride(0) == 1 and R.shape[1] > 1

    def logits(self, qb):
        return _lin(qb, self.R) if self.dnn else torch.mm(qb, self.R.t(), out=self.buf[:qb.shape[0]])

    def dq(self, A):
        return _lin(A, self.R.t()) if self.dnn else torch.mm(A, self.R)

    def add_dR(self, A, u):
        if self.G is None and self.dnn and self.col_major:  # Gᵀ (D×C) = uᵀ·A = lin(uᵀ, Aᵀ): no copy, no zero fill
            self.G = _lin(u.t(), A.t()).t()
        elif self.G is None:
            self.G = torch.empty_like(self.R).addmm_(A.t(), u, beta=0)  # beta = 0: no zero fill
        else:
            self.G.addmm_(A.t(), u)

    def grad(self):
        return torch.zeros_like(self.R) if self.G is None else self.G  # (B = 0: no block ran)


def _class_ce(q, R, labels, weights, row_loss, *, scale, col_norm=False, col_eps=1e-12, sq_euclid=False):
    """mean_i(w_i · row_loss_i) where row_loss(v, rest, has_rest, q_i, r_{y_i}) gets v_i = the target's value,
    rest_i = LSE over c ≠ y_i of scale·value_ic. value_ic = q_i·r̂_c (r̂_c = r_c / max(‖r_c‖, 1e-12) when
    ``col_norm``, eps = ``col_eps``, else r_c) or, ``sq_euclid``, max(‖q_i‖² + ‖r_c‖² − 2 q_i·r_c, 0) (the kernels' formula).
    q (B×D) and R (C×D) in the kernel dtype; differentiable in both (first order)."""
    need = torch.is_grad_enabled() and (q.requires_grad or R.requires_grad)
    if not need:
        with torch.no_grad():
            return _ClassCE.run(q, R, labels, weights, row_loss, scale, col_norm and col_eps, sq_euclid, False,
                                False)[0]
    return _ClassCE.apply(q, R, labels, weights, row_loss, scale, col_norm and col_eps, sq_euclid)


class _ClassCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, R, labels, weights, row_loss, scale, col_norm, sq_euclid):
        ctx.args = (labels, weights, row_loss, scale, col_norm, sq_euclid)
        loss, *grads = _ClassCE.run(q, R, *ctx.args, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = tuple(grads)
        ctx.save_for_backward(q, R)  # for a second backward (retain_graph=True): the gradients are recomputed
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("cpu class engine")
        if ctx.grads is None:  # a second backward (retain_graph=True): the first handed its buffers on
            q, R = ctx.saved_tensors
            ctx.grads = _ClassCE.run(q, R, *ctx.args, ctx.needs_input_grad[0], ctx.needs_input_grad[1])[1:]
        dq, dR = ctx.grads
        ctx.grads = None  # scaled in place (no fresh C×D tensor, no page faults): the buffers go to autograd
        return (None if dq is None else dq.mul_(g)), (None if dR is None else dR.mul_(g)), *(None,) * 6

    @staticmethod
    def run(q, R, labels, weights, row_loss, scale, col_norm, sq_euclid, need_q, need_r):
        q, R = q.detach(), R.detach()
        B, D = q.shape
        C = R.shape[0]
        dt = q.dtype
        any_grad = need_q or need_r
        if col_norm:
            norm = torch.linalg.vector_norm(R, dim=1)
            s = 1.0 / norm.clamp_min(col_norm)  # col_norm: the eps
            col = s * scale  # logits of the non-target columns = A_ic · s_c · scale
        if sq_euclid:  # with col_norm: rn = the normalised columns' squared norms, ‖r_c‖²·s_c²
            qn, rn = _row_dots(q, q), _row_dots(R, R)
            if col_norm:
                rn.mul_(s * s)
            colsum = torch.zeros(C, dtype=dt) if need_r else None
        w = None if weights is None else weights.to(dt)
        dq = torch.zeros_like(q) if need_q else None
        total = torch.zeros((), dtype=dt)
        direct = []
        fused = dt in (torch.float32, torch.float64) and _has_class_rows()
        assert fused or not (col_norm and sq_euclid), "squared euclidean to normalised columns needs class_rows"
        nb = max(1, min(B, _BLOCK_ELEMS // max(C, 1)))
        mm = _Products(R, min(nb, B), C)
        for b0 in range(0, B, nb):
            qb, yb = q[b0:b0 + nb], labels[b0:b0 + nb]
            n = qb.shape[0]
            A = mm.logits(qb)
            idx = yb.unsqueeze(1)
            if fused:  # one parallel pass per row (csrc/cpu/class_ops.cpp): A ← P' (0 at y and at clamped entries)
                v, m, S, Sw = torch.ops.dml_kernels.class_rows(
                    A, yb, scale, s if col_norm else None, qn[b0:b0 + n] if sq_euclid else None,
                    rn if sq_euclid else None, bool(col_norm)).unbind(0)
                if sq_euclid:
                    cut_y = v < 0
                    v = v.clamp_min(0)
            elif sq_euclid:  # A ← raw squared distances (clamped below; the clamp's gradient is 0 where raw < 0)
                A.mul_(-2).add_(qn[b0:b0 + n].unsqueeze(1)).add_(rn)
                cut = A < 0
                A.clamp_min_(0)
                v = A.gather(1, idx).squeeze(1)
                A.mul_(scale)
            elif col_norm:
                v = A.gather(1, idx).squeeze(1) * s[yb]
                A.mul_(col)
            else:
                v = A.gather(1, idx).squeeze(1)
                A.mul_(scale)
            if not fused:
                A.scatter_(1, idx, float("-inf"))
                m = A.amax(1) if C > 1 else torch.zeros(n, dtype=dt)
                A.sub_(m.unsqueeze(1)).exp_()  # P' = exp(logit − m): the softmax over c ≠ y_i times S_i
                S = A.sum(1)
            rest = m + S.log()
            has_rest = torch.full((n,), C > 1)
            ry = R.index_select(0, yb)
            if not any_grad:
                del A
                losses = row_loss(v, rest, has_rest, qb, ry)
                total += (losses if w is None else losses * w[b0:b0 + n]).sum()
                continue
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (v, rest, qb, ry)]
                losses = row_loss(*leaves[:2], has_rest, *leaves[2:])
                if w is not None:
                    losses = losses * w[b0:b0 + n]
                gv, grest, gq, gry = torch.autograd.grad(losses.sum() / B, leaves, allow_unused=True)
                total += losses.detach().sum()
            zero = torch.zeros(n, dtype=dt)
            gv = zero if gv is None else gv
            rho = zero if grest is None else torch.where(S > 0, grest * scale / S, 0)  # dL/dvalue = rho_i · P'_ic
            if sq_euclid:  # d value / d(q·r) = −2 where raw ≥ 0; the norm terms from the row / column sums
                if not fused:
                    A.masked_fill_(cut, 0)
                    cut_y = cut.gather(1, idx).squeeze(1)
                    Sw = A.sum(1)
                gv = gv * ~cut_y
                rho, gv = -2 * rho, -2 * gv
                rowsum = rho * Sw + gv
            if need_r:  # G += Eᵀ·q_blk (dL/dr̂ with col_norm — s_c·dL/dr̂ when fused: A holds P'·s —, else dL/dr)
                mm.add_dR(A, qb * rho.unsqueeze(1))
                _add_rows(mm.G, yb, qb * (gv * s[yb] if fused and col_norm else gv).unsqueeze(1))
                if gry is not None:  # the loss's own use of the raw target columns (LargeMargin's ‖w_y‖)
                    direct.append((yb, gry))
                if sq_euclid:
                    colsum.add_(A.t() @ rho).index_add_(0, yb, gv * s[yb] if col_norm else gv)
            if need_q:
                if col_norm:
                    if not fused:
                        A.mul_(s)
                    ty = ry * (gv * s[yb]).unsqueeze(1)
                else:
                    ty = ry * gv.unsqueeze(1)
                db = mm.dq(A).mul_(rho.unsqueeze(1)).add_(ty)
                if sq_euclid:
                    db.addcmul_(qb, rowsum.unsqueeze(1), value=-1)
                if gq is not None:
                    db.add_(gq)
                dq[b0:b0 + n] = db
            del A  # before the next block's logits
        G = mm.grad() if need_r else None
        if need_r:
            if sq_euclid:  # (col_norm: colsum_c carries one s_c, A being P'·s; the chain through r̂_c = s_c·r_c another)
                G.addcmul_(R, (colsum * s if col_norm else colsum).unsqueeze(1), value=-1)
            if col_norm:  # dL/dr_c = s_c (g_c − r̂_c (r̂_c·g_c)), the projection dropped where the norm is clamped
                if fused:  # G = s_c·dL/dr̂ already: dL/dr_c = g_c − r_c s_c² (r_c·g_c)
                    coef = _row_dots(R, G) * s.pow(2) * (norm >= col_norm)
                    G.addcmul_(R, coef.unsqueeze(1), value=-1)
                else:
                    coef = _row_dots(R, G) * s.pow(3) * (norm >= col_norm)
                    G.mul_(s.unsqueeze(1)).addcmul_(R, coef.unsqueeze(1), value=-1)
            for yb, gry in direct:
                _add_rows(G, yb, gry)
        return total / B, dq, G


# ----------------------------------------------------------------- Proxy Anchor on oneDNN class blocks (fp32)
# Transposed blocks: rows = a block of classes, columns = all B embeddings (Aᵀ = P_blk·qᵀ, one oneDNN product), so
# each class's negative LSE completes inside its block and its gradient is formed there, no recompute: 3 products
# (Aᵀ, dP_blk = E·q, dq += Eᵀ·P_blk) against pair_reduce's 4. The positives (one per row) are B values: their
# per-class LSEs and gradients come from q_i·p_{y_i} before the blocks. Cosine: the proxies' normalisation is a
# per-row scale s_c of the blocks (no normalised C×D copy); its backward is the block's projection, written into
# dP's slice. Memory: one block of ≤ _BLOCK_ELEMS logits, its dP block, dP (the proxies' size), dq.


def _proxy_anchor_blocks(q, P, labels, margin, alpha, normalize):
    if torch.is_grad_enabled() and (q.requires_grad or P.requires_grad):
        return _ProxyAnchor.apply(q, P, labels, margin, alpha, normalize)
    with torch.no_grad():
        return _ProxyAnchor.run(q, P, labels, margin, alpha, normalize, False, False)[0]


class _ProxyAnchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, P, labels, margin, alpha, normalize):
        ctx.args = (labels, margin, alpha, normalize)
        loss, *grads = _ProxyAnchor.run(q, P, *ctx.args, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = tuple(grads)
        ctx.save_for_backward(q, P)  # a second backward (retain_graph=True) recomputes
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("cpu proxy_anchor_loss (oneDNN class blocks)")
        if ctx.grads is None:
            q, P = ctx.saved_tensors
            ctx.grads = _ProxyAnchor.run(q, P, *ctx.args, ctx.needs_input_grad[0], ctx.needs_input_grad[1])[1:]
        dq, dP = ctx.grads
        ctx.grads = None
        return (None if dq is None else dq.mul_(g)), (None if dP is None else dP.mul_(g)), *(None,) * 4

    @staticmethod
    def run(q, P, labels, margin, alpha, normalize, need_q=True, need_p=True):
        q, P = q.detach(), P.detach()
        B, C = q.shape[0], P.shape[0]
        any_grad = need_q or need_p
        dt = q.dtype
        if normalize:
            norm = torch.linalg.vector_norm(P, dim=1)
            s = 1.0 / norm.clamp_min(1e-12)
        else:
            s = torch.ones(C, dtype=dt)
        y = labels
        ar = torch.arange(B)
        # positives: l_i = −α (v_i − margin), v_i = s_y q_i·p_y; T⁺_c = log(1 + Σ_{y_i=c} e^{l_i})
        sy = s.index_select(0, y)
        py = P.index_select(0, y)
        v = _row_dots(q, py) * sy
        lpos = (v - margin) * -alpha
        m = torch.zeros(C, dtype=dt).scatter_reduce_(0, y, lpos, "amax")  # include_self: the "1 +" term's 0
        e = (lpos - m.index_select(0, y)).exp_()
        S = torch.exp(-m).index_add_(0, y, e)
        n_pos = torch.zeros(C, dtype=dt).index_fill_(0, y, 1.0).sum()
        pos_loss = (m + S.log()).sum() / n_pos  # (B > 0: n_pos ≥ 1)
        gv = e / S.index_select(0, y) / n_pos * -alpha  # dL/dv_i
        dq = torch.addcmul(torch.zeros_like(q), py, (gv * sy).unsqueeze(1)) if need_q else None  # gv_i s_y p_y
        dP = torch.empty_like(P) if need_p else None
        neg = torch.zeros((), dtype=dt)
        src = q * (gv * sy).unsqueeze(1) if need_p else None  # s_y · dL/dp̂_y from the positives
        # negatives, per block of classes: A = P̂_blk·q_extᵀ (q_ext: q and a zero dummy row B, the column class_rows
        # leaves out), positives set to a sentinel whose logit (−1e30) class_rows' exp takes to 0
        q_ext = torch.cat([q, q.new_zeros(1, q.shape[1])])
        cb = max(1, min(C, _BLOCK_ELEMS // (B + 1)))
        dummy = torch.full((cb,), B, dtype=torch.long)
        sentinel = torch.tensor(-1e30 / alpha, dtype=dt)
        for c0 in range(0, C, cb):
            Pb = P[c0:c0 + cb]
            n = Pb.shape[0]
            sb = s[c0:c0 + n]
            Ph = Pb * sb.unsqueeze(1) if normalize else Pb
            A = _lin(Ph, q_ext)  # n×(B+1)
            inb = (y >= c0) & (y < c0 + n)
            rows = (y - c0).clamp_(0, n - 1)
            A.index_put_((rows, torch.where(inb, ar, B)), sentinel)  # (out-of-block labels: the dummy column)
            _, m, S, _ = torch.ops.dml_kernels.class_rows(A, dummy[:n], alpha, None, None, None, False).unbind(0)
            z = m + S.log() + alpha * margin  # T_c = log(1 + e^z) = log(1 + Σ_{y_i≠c} e^{α(p̂_c·q_i + margin)})
            T = z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))
            neg += T.sum()
            if not any_grad:
                continue
            r = torch.exp(z - T) / S * (alpha / C)  # dL/dÂ_ci = A_ci · r_c (A ← e^{logit − m}, 0 at positives)
            A.mul_((r * sb if normalize else r).unsqueeze(1))  # with s_c: dq takes the raw p_c, dP s_c·dL/dp̂_c
            if need_q:
                # oneDNN copies a transposed x: the smaller of P_blk (n×D, giving dqᵀ) and the block (n×(B+1))
                dq.add_(_lin(Pb.t(), A.t()).t()[:B] if Pb.shape[1] <= B + 1 else _lin(A.t(), Pb.t())[:B])
            if need_p:
                h = _lin(A, q_ext.t())
                _add_rows(h, rows, src * inb.unsqueeze(1))
                if normalize:  # dL/dp_c = s_c (g − p̂ (p̂·g)) = h − p̂_c (p̂_c·h_c) (h = s_c g), 0 projection if clamped
                    coef = _row_dots(Ph, h) * (norm[c0:c0 + n] >= 1e-12)
                    torch.addcmul(h, Ph, coef.neg_().unsqueeze(1), out=dP[c0:c0 + n])
                elif n == C:
                    dP = h
                else:
                    dP[c0:c0 + n] = h
            del A
        return pos_loss + neg / C, dq, dP
