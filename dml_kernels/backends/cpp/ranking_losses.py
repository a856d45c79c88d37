"""FastAP and RankedList on the CPU in O(block × N) memory: the ``fastap_loss`` and ``ranked_list_loss`` ops of
the ``cpu`` backend (plain torch, no C++).

Both losses are functions of per-row statistics of the N×N distance matrix D (self mode): FastAP of the soft
histograms h⁺, h⁻ (N × (num_bins+1)) and the positive counts, RankedList of four per-row sums (A⁺, B⁺, A⁻, B⁻:
see the Triton form, ``dml_kernels/backends/triton/ranking_losses.py``). :class:`_RowBlockStats` streams blocks
of rows: a block's distances to all N rows come from one ``torch.mm`` (``TILE`` elements), its statistics are
taken while the tile is hot, and only the O(N·K) statistics are kept. Its backward recomputes each block's tile,
forms dL/dD of the block from the statistics' upstream gradients (elementwise, analytic), and adds G·q to the
block's rows and Gᵀ·q_block to every row (D is symmetric in its two arguments' roles). The loss itself is O(N·K)
torch on the statistics (autograd), the same code as the reference (``fastap_ap``), so the two agree to rounding.
The bin arithmetic and the distance formula are the reference's op for op. Peak extra memory: a few
``block × N`` tiles plus O(N·(D + K)), never N×N; nothing syncs with the host.
"""
from __future__ import annotations

import torch

from ..._registry import Unsupported, register
from ..reference.ranking_losses import fastap_ap, fastap_bin_centres
from ..reference.similarity import normalize_rows
from .library import refuse_double_backward

TILE = 1 << 19  # elements of one row block's distance tile (rows × N)


def _blocks(n):
    step = max(1, min(n, TILE // max(n, 1)))
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _tile(q, sqn, r0, r1, distance):
    """(D, sq) of rows r0:r1 against all rows: the reference's formula ((‖q_i‖² + ‖q_j‖²) − 2 q_i·q_j, clamped,
    sqrt with 0 at 0); sq is the unclamped squared distance (None for a similarity)."""
    c = torch.mm(q[r0:r1], q.T)
    if distance.is_similarity:
        return c, None
    sq = (sqn[r0:r1, None] + sqn[None, :]) - 2 * c
    d = sq.clamp_min(0)
    if distance.squared:
        return d, sq
    positive = d > 0
    return torch.where(positive, d.where(positive, 1).sqrt(), 0), sq


def _masks(labels, r0, r1):
    same = labels[r0:r1, None] == labels[None, :]
    diag = torch.arange(r0, r1, device=labels.device)[:, None] == torch.arange(labels.shape[0],
                                                                               device=labels.device)[None, :]
    return same & ~diag, ~same


class _RowBlockStats(torch.autograd.Function):
    """Per-row statistics ``spec.stats(D, pos, neg)`` of every row block; backward by recomputed blocks with
    ``spec.grad(D, pos, neg, upstream gradients of the block's statistics)`` = dL/dD of the block."""

    @staticmethod
    def forward(ctx, q, sqn, labels, spec):
        n = q.shape[0]
        outs = None
        for r0, r1 in _blocks(n):
            d, _ = _tile(q, sqn, r0, r1, spec.distance)
            pos, neg = _masks(labels, r0, r1)
            block = spec.stats(d, pos, neg)
            if outs is None:
                outs = [torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=q.device) for t in block]
            for out, t in zip(outs, block):
                out[r0:r1] = t
        ctx.spec = spec
        ctx.save_for_backward(q, sqn, labels)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward("cpu ranking loss")
        q, sqn, labels = ctx.saved_tensors
        spec = ctx.spec
        dq = torch.zeros_like(q)
        dsn = torch.zeros_like(sqn)
        for r0, r1 in _blocks(q.shape[0]):
            d, sq = _tile(q, sqn, r0, r1, spec.distance)
            pos, neg = _masks(labels, r0, r1)
            g = spec.grad(d, pos, neg, [None if t is None else t[r0:r1] for t in grads])
            if sq is not None:  # D of sq (clamp: gradient where sq ≥ 0; sqrt: 1/(2D) where sq > 0), sq of (c, ‖·‖²)
                if distance_is_plain(spec.distance):
                    g = torch.where(d > 0, g / (2 * torch.where(d > 0, d, 1)), 0)
                else:
                    g = torch.where(sq >= 0, g, 0)
                dsn[r0:r1] += g.sum(1)
                dsn += g.sum(0)
                g = -2 * g
            dq[r0:r1] += torch.mm(g, q)
            dq += torch.mm(g.T, q[r0:r1])
        return dq, dsn, None, None


def distance_is_plain(distance):
    """Euclidean (not squared) distance."""
    return not distance.is_similarity and not distance.squared


def _row_block_stats(x, labels, spec):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    q = normalize_rows(x.to(ct), spec.distance)
    sqn = (q * q).sum(1)
    return _RowBlockStats.apply(q.contiguous(), sqn, labels.contiguous(), spec)


# ---------------------------------------------------------------------------------------------- FastAP


class _FastAPSpec:
    """Per row: h⁺, h⁻ (soft histograms over the bins z_l, width δ) and the positive count."""

    def __init__(self, distance, z, delta):
        self.distance, self.z, self.delta = distance, z, delta

    def stats(self, d, pos, neg):
        posf, negf = pos.to(d.dtype), neg.to(d.dtype)
        hp = torch.empty(d.shape[0], self.z.numel(), dtype=d.dtype)
        hn = torch.empty_like(hp)
        for k in range(self.z.numel()):
            pulse = torch.relu(1 - torch.abs(d - self.z[k]) / self.delta)
            hp[:, k] = (pulse * posf).sum(1)
            hn[:, k] = (pulse * negf).sum(1)
        return hp, hn, pos.sum(1).to(d.dtype)

    def grad(self, d, pos, neg, grads):
        gp, gn, _ = grads
        g = torch.zeros_like(d)
        for k in range(self.z.numel()):
            t = d - self.z[k]
            dpulse = torch.where(1 - torch.abs(t) / self.delta > 0, -torch.sign(t) / self.delta, 0)
            g += torch.where(pos, gp[:, k:k + 1], torch.where(neg, gn[:, k:k + 1], 0)) * dpulse
        return g


@register("fastap_loss", "cpu")
def fastap_loss(x, labels, *, num_bins, distance, weights=None):
    if distance.name not in ("euclidean", "squared_euclidean") or not distance.normalize:
        raise Unsupported("fastap_loss: the fused cpu form takes the normalised euclidean distances only")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    z, delta = fastap_bin_centres(num_bins, 2 if distance.squared else 1, ct, x.device)
    h_pos, h_neg, n_pos = _row_block_stats(x, labels, _FastAPSpec(distance, z, delta))
    ap, any_safe = fastap_ap(h_pos, h_neg, n_pos)
    has = n_pos > 0
    w = torch.ones_like(ap) if weights is None else weights.to(ap.dtype)
    loss = torch.where(has, (1 - ap) * w, 0).sum() / has.sum().clamp_min(1).to(ap.dtype)
    zero = (x * 0).sum().to(loss.dtype)
    return torch.where(has.any() & any_safe, loss, zero)  # fp32 for fp16/bf16 inputs, as the other cpu ops


# ------------------------------------------------------------------------------------------ RankedList


class _RankedListSpec:
    """Per row: A⁺ = Σ_{P*} w⁺(D − c), B⁺ = Σ_{P*} w⁺, A⁻ = Σ_{N*} w⁻(α − D), B⁻ = Σ_{N*} w⁻ (PML's sets)."""

    def __init__(self, distance, alpha, c, tp, tn):
        self.distance, self.alpha, self.c, self.tp, self.tn = distance, alpha, c, tp, tn

    def _sets(self, d, pos, neg):
        in_p = pos & (d > self.c) & (d > 0)
        in_n = neg & (d < self.alpha) & (d > 0)
        w_p = torch.where(in_p, torch.exp(self.tp * (d - self.c)), 0)
        w_n = torch.where(in_n, torch.exp(self.tn * (self.alpha - d)), 0)
        return in_p, in_n, w_p, w_n

    def stats(self, d, pos, neg):
        in_p, in_n, w_p, w_n = self._sets(d, pos, neg)
        return (torch.where(in_p, w_p * (d - self.c), 0).sum(1), w_p.sum(1),
                torch.where(in_n, w_n * (self.alpha - d), 0).sum(1), w_n.sum(1))

    def grad(self, d, pos, neg, grads):
        ga_p, gb_p, ga_n, gb_n = (t[:, None] for t in grads)
        in_p, in_n, w_p, w_n = self._sets(d, pos, neg)
        g = torch.where(in_p, w_p * (ga_p * (self.tp * (d - self.c) + 1) + gb_p * self.tp), 0)
        return g - torch.where(in_n, w_n * (ga_n * (self.tn * (self.alpha - d) + 1) + gb_n * self.tn), 0)


@register("ranked_list_loss", "cpu")
def ranked_list_loss(x, labels, *, margin, Tn, imbalance, alpha, Tp, distance):
    if distance.name not in ("cosine", "dot", "euclidean", "squared_euclidean"):
        raise Unsupported(f"ranked_list_loss: the fused cpu form does not take the distance {distance.name!r}")
    n = x.shape[0]
    spec = _RankedListSpec(distance, float(alpha), float(alpha) - float(margin), float(Tp), float(Tn))
    a_p, b_p, a_n, b_n = _row_block_stats(x, labels, spec)
    loss_p = a_p / (b_p + n * 1e-5)
    loss_n = a_n / (b_n + n * 1e-5)
    return ((1 - imbalance) * loss_p + imbalance * loss_n).mean()
