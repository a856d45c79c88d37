"""IntraPairVarianceLoss on the cpu backend, on the contrastive row-block sweep (``contrastive_losses._Sweep``),
no N×M buffer, no host sync.

* A similarity or the squared euclidean distance: the global means μ_P, μ_N from class sums in closed form
  (``_set_sums``: no tile), then ONE sweep forms the loss and its gradient (``row_blocks.grad_in_forward``): per
  block the tile u = σ·v − c_N μ_N comes out of the GEMM (addmm), the hinges of both sets live in one signed tile
  (−h_P on P, h_N elsewhere) and dL/dv = 2σ·that·(1/#P or 1/#N) — about ten elementwise passes per tile; dL/dv
  is symmetric, so in self mode one GEMM pulls it back (twice the query side): 2 GEMMs in all (3 with ref_emb).
  The means' gradient is the closed form's, after the sweep.
* The euclidean (square-root) distance is not linear in the embeddings' sums: two sweeps forward (row sums →
  means; hinge sums) and one recomputing backward (``_RowTerms``).
* A PML 4-tuple (duplicates count): its O(T) pair values (``_listed``).
"""
from __future__ import annotations

import torch

from ..._registry import register
from . import row_blocks as RB
from .common import _out, _zero
from .contrastive_losses import _eager_apply, _listed, _pair_rule_few, _rows, _sweep


def _row_dots(a, b):
    """Σ_j a_ij·b_ij per row in one pass (einsum's batched dot: no tile-sized temporary)."""
    return torch.einsum("ij,ij->i", a, b)


def _set_sums(q, r, qid, rid, code):
    """(Σ_P v, Σ_N v, #P, #N) over the label pairs, in closed form from class sums — O((N + M)·D), no tile; linear
    in v for a similarity and the squared euclidean distance; differentiable. r is None in self mode."""
    self_mode = r is None
    r = q if self_mode else r
    n, m, slots = q.shape[0], r.shape[0], q.shape[0] + r.shape[0]
    rid, qid = rid.long(), qid.long()
    cls = r.new_zeros(slots, r.shape[1]).index_add(0, rid, r)[qid]  # Σ of row i's class in r
    cnt = r.new_zeros(slots).index_add(0, rid, torch.ones_like(r[:, 0]))[qid]
    dot = torch.linalg.vecdot(q, cls)
    cross = torch.linalg.vecdot(q.sum(0), r.sum(0))
    qq = torch.linalg.vecdot(q, q)
    if code == 0:
        same, total, diag = dot.sum(), cross, (qq.sum() if self_mode else 0)
    else:  # Σ (|q|² + |r|² − 2 q·r); the (i, i) terms are 0
        rr = torch.linalg.vecdot(r, r)
        rsq = r.new_zeros(slots).index_add(0, rid, rr)[qid]
        same = (cnt * qq + rsq - 2 * dot).sum()
        total, diag = m * qq.sum() + n * rr.sum() - 2 * cross, 0
    npos = cnt.sum() - (n if self_mode else 0)
    return same - diag, total - same, npos, n * m - cnt.sum()


class _IPV:
    """mean_P h_P² + mean_N h_N², h the hinge around (1∓ε)·μ (the global means, in closed form before the sweep):
    per block (``tile_block``) Σh²/#set, Σh and dL/dv = 2h·∂h/∂v/#set; the means' gradient (Σ 2h·∂h/∂μ/#set²)
    by the same closed form after the sweep. Similarity h_P = [(1−ε⁺)μ_P − v]₊, h_N = [v − (1+ε⁻)μ_N]₊; a distance reversed."""

    symmetric = True  # dL/dv_ij depends on v_ij and the pair's set only: in self mode one GEMM pulls it back

    @property
    def tile(self):
        """Elements of a block's tile: row_blocks' (4× the contrastive sweep's) — fewer, larger blocks, 1.4–1.6× the
        reference instead of 1.3× on a loaded 2-core machine (load ~4, B = 4096), as fast on one quiet thread."""
        return RB.TILE

    def __init__(self, pos_eps, neg_eps, similarity, pair_rule):
        self.pair_rule = pair_rule
        if similarity:  # (∂h/∂v, ∂h/∂μ) of h_P and h_N
            self.cp, self.cn = (-1.0, 1 - pos_eps), (1.0, -(1 + neg_eps))
        else:
            self.cp, self.cn = (1.0, -(1 + pos_eps)), (-1.0, 1 - neg_eps)

    def prepare(self, sweep):
        with torch.no_grad():
            sp, sn, self.np, self.nn = _set_sums(sweep.q, None if sweep.self_mode else sweep.r, sweep.qid,
                                                 sweep.rid, sweep.code)
        self.mu = (sp / self.np.clamp_min(1), sn / self.nn.clamp_min(1))
        self.wp = 2 * self.cn[0] / self.np.clamp_min(1)  # dL/dv = wp·s on P, wn·s on N (s the signed tile)
        self.wn = 2 * self.cn[0] / self.nn.clamp_min(1)

    def hinges(self, v, pos, neg):
        hp = torch.where(pos, (self.cp[0] * v + self.cp[1] * self.mu[0]).clamp_min_(0), 0)
        hn = torch.where(neg, (self.cn[0] * v + self.cn[1] * self.mu[1]).clamp_min_(0), 0)
        return hp, hn

    def block(self, v, pos, neg, r0, r1, grad):
        """(Σ_P h², Σ_N h², Σ_P h, Σ_N h) per row of a tile (the two-pass euclidean form)."""
        hp, hn = self.hinges(v, pos, neg)
        return torch.stack([_row_dots(hp, hp), _row_dots(hn, hn), hp.sum(1), hn.sum(1)]), None

    def tile_block(self, sweep, r0, r1, grad):
        """The one-sweep block: (per row Σ_P h_P²/#P + Σ_N h_N²/#N, Σ_P h_P, Σ_N h_N) and dL/dv. With σ = ∂h_N/∂v
        = −∂h_P/∂v and u = σ·v + c_N·μ_N: h_N = [u]₊, h_P = [δ − u]₊ (δ = c_P·μ_P + c_N·μ_N), so the signed tile
        s = −h_P on P, h_N elsewhere (0 on the (i, i) pair) gives dL/dv = 2σ·s/#set and the loss Σ s²/#set."""
        sig = self.cn[0]
        c = self.cn[1] * self.mu[1]
        if sweep.code == 0:  # u straight out of the GEMM (IPV's sweep has k = 1)
            u = torch.addmm(c, sweep.q[r0:r1], sweep.r.T, alpha=sig)
        else:  # squared euclidean: the sweep's clamped values (it keeps them for accumulate)
            u = torch.add(c, sweep.tile(r0, r1)[0], alpha=sig)
        pos = sweep.qid[r0:r1, None] == sweep.rid[None, :]
        if sweep.self_mode:
            pos[:, r0:r1].fill_diagonal_(False)
        a = u.sub(self.cp[1] * self.mu[0] + c).clamp_max_(0)  # −h_P on every pair (read on P only)
        s = torch.where(pos, a, u.clamp_min_(0))
        if sweep.self_mode:
            s[:, r0:r1].fill_diagonal_(0)
        sum_p, sum_n = -_row_dots(a, pos.to(a.dtype)), s.clamp_min(0).sum(1)
        w = torch.where(pos, self.wp, self.wn).mul_(s)
        return torch.stack([_row_dots(s, w) * (0.5 * sig), sum_p, sum_n]), (w if grad else None)

    def finish(self, sweep, st, dq, dr):
        tp, tn = self.np.clamp_min(1), self.nn.clamp_min(1)
        loss = st[0].sum()  # already divided by #set (an empty set has no terms)
        keep = torch.logical_not(_pair_rule_few(self.np, self.nn, self.pair_rule)).to(loss.dtype)
        if dq is not None or dr is not None:  # through the means: c·∂(Σ_set v)/∂(q, r), c = Σ 2h·∂h/∂μ / #set²
            cp, cn = 2 * self.cp[1] * st[1].sum() / tp ** 2, 2 * self.cn[1] * st[2].sum() / tn ** 2
            leaves = [t.detach().requires_grad_() for t in (sweep.q, sweep.r)]
            with torch.enable_grad():
                sp, sn, _, _ = _set_sums(leaves[0], None if sweep.self_mode else leaves[1], sweep.qid, sweep.rid,
                                         sweep.code)
                gq, gr = torch.autograd.grad(cp * sp + cn * sn, leaves, allow_unused=True)
            dq = None if dq is None else dq.add_(gq).mul_(keep)
            dr = None if dr is None or sweep.self_mode else dr.add_(gr).mul_(keep)
        return loss * keep, dq, dr


class _IPVTwoPass:
    """The euclidean (square-root) distance, not linear in the embeddings' sums: pass 1 Σ_P v, Σ_N v per row → the
    means; pass 2 Σ_P h², Σ_N h² per row and Σh (for the means' gradient); a recomputing backward (_RowTerms)
    whose dL/dv adds the means' gradient (Σ_i g_i·2·∂h/∂μ·Σh_i)/#set on every pair of the set."""

    def __init__(self, ipv):
        self.ipv = ipv

    def forward(self, sweep):
        ipv = self.ipv
        one = torch.cat([torch.stack([torch.where(pos, v, 0).sum(1), torch.where(neg, v, 0).sum(1), pos.sum(1),
                                      neg.sum(1)]) for v, pos, neg in (sweep.tile(*b) for b in sweep.blocks())], 1)
        self.total = one[2:].sum(1).clamp_min(1)
        ipv.mu = one[:2].sum(1) / self.total
        two = torch.cat([ipv.block(*sweep.tile(r0, r1), r0, r1, False)[0] for r0, r1 in sweep.blocks()], 1)
        return two[:2], one[2:].long(), (two[2:],)

    def backward(self, saved, g):
        ipv, (hsum,) = self.ipv, saved
        dmu = 2 * (g * hsum).sum(1) * g.new_tensor([ipv.cp[1], ipv.cn[1]]) / self.total

        def weights(v, pos, neg, r0, r1):
            hp, hn = ipv.hinges(v, pos, neg)
            w = torch.where(pos, (2 * ipv.cp[0]) * g[0, r0:r1, None] * hp + dmu[0], 0)
            return w + torch.where(neg, (2 * ipv.cn[0]) * g[1, r0:r1, None] * hn + dmu[1], 0)
        return weights


@register("intra_pair_variance_loss", "cpu")
def intra_pair_variance_loss(x, labels, ref, ref_labels, *, pos_eps, neg_eps, distance, pairs=None, pair_rule=True):
    """mean_P h_P² + mean_N h_N² around the (differentiable) global means: a similarity or the squared euclidean
    distance takes the means from class sums and one sweep gives loss and gradient; the euclidean distance two
    sweeps forward and one backward. O(N) statistics. A PML 4-tuple (duplicates count): its O(T) pair values."""
    ipv = _IPV(float(pos_eps), float(neg_eps), distance.is_similarity, pair_rule)
    if pairs is None and distance.name != "euclidean":
        sweep, q, r = _sweep(x, labels, ref, ref_labels, distance)
        ipv.prepare(sweep)
        return _out(_eager_apply(ipv, sweep, q, r), x)
    zero = _zero(x)
    if pairs is None:
        vals, cnt = _rows(_IPVTwoPass(ipv), x, labels, ref, ref_labels, distance)
        tp, tn = cnt[0].sum(), cnt[1].sum()
        loss = (torch.where(tp > 0, vals[0].sum() / tp.clamp_min(1), 0)
                + torch.where(tn > 0, vals[1].sum() / tn.clamp_min(1), 0))
        return _out(torch.where(_pair_rule_few(tp, tn, pair_rule), 0, loss) + zero, x)
    pv, a1, nv, a2 = _listed(x, ref, distance, pairs)
    if pair_rule and len(a1) <= 1 and len(a2) <= 1:
        return _out(zero.to(pv.dtype), x)
    total = zero.to(pv.dtype)
    for vals, eps, inc in ((pv, pos_eps, distance.is_similarity), (nv, neg_eps, not distance.is_similarity)):
        if len(vals):
            mean = vals.mean()
            total = total + torch.relu((1 - eps) * mean - vals if inc else vals - (1 + eps) * mean).pow(2).mean()
    return _out(total, x)
