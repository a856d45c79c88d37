"""k-nearest-neighbour search on the CPU in O(block × chunk) memory: the ``knn`` op of the ``cpu`` backend.

No C++ is needed: a block of query rows meets the references one chunk at a time, each chunk's similarity
tile comes from one BLAS call (``torch.mm``) into a reused buffer, the tile's best ``k`` per row are taken
with ``torch.topk``, and they are merged into the block's running top-k. The N×M matrix never exists: the
peak extra memory is one tile (``ROWS × CHUNK`` values, 4 MiB in fp32) plus the running candidates. For a
large k (2k >= a chunk, e.g. PML's default k = M − 1) a block holds whole rows instead (``TILE // M`` rows,
at least one), so no k-wide candidate lists are merged again and again.

Ties are exact and deterministic: equal values are ordered by the smaller reference index, as in the
reference backend (``dml_kernels/_ops.py``). ``torch.topk`` leaves the order of equal values unspecified,
so (1) the candidates of a chunk are re-sorted by index and then stably by value, (2) a row whose k-th
chunk value is tied with a value left out of the chunk's top-k, *and* could still enter the running
top-k, takes its chunk top-k from a stable sort of that row instead, and (3) the running set and the new
chunk (all of whose indices are larger) are merged with a stable sort. On rows without ties the
result is exactly ``torch.topk`` of the dense matrix. The values are computed with the reference
backend's formulas (same normalisation, ``|q|² + |r|² − 2 q·r``, clamp, sqrt), so they match it to the
last bit wherever the BLAS dot products do.
"""
from __future__ import annotations

import torch

from ..._registry import Unsupported, register
from ...distances import Distance
from ..reference.evaluation import _check_k
from ..reference.similarity import normalize_rows

ROWS = 512  # query rows per block
TILE = 1 << 20  # elements of one similarity tile (ROWS × CHUNK)
MIN_CHUNK = 1024


def _compute_dtype(x):
    if x.dtype == torch.float64:
        return torch.float64
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise Unsupported(f"knn computes in float32 or float64, not {x.dtype}")


def _stable_top(score, kk):
    """(values, indices) of the kk largest of every row, equal values by the smaller index (exact)."""
    values, order = torch.sort(score, dim=1, descending=True, stable=True)
    return values[:, :kk], order[:, :kk]


def _chunk_top(score, kk, running):
    """The chunk's kk best per row, in (value desc, index asc) order up to ties at the boundary that cannot
    reach the running top-k (those rows are re-done with a stable sort)."""
    top, idx = torch.topk(score, kk, dim=1, largest=True, sorted=True)
    if kk < score.shape[1]:
        edge = top[:, -1]
        if running is None:  # every row's boundary matters
            rows = ((score >= edge[:, None]).sum(1) > kk).nonzero().flatten()  # more values >= the k-th: a tie
        else:  # only rows whose k-th chunk value could still enter the running top-k
            rows = (edge >= running[:, -1]).nonzero().flatten()
            if rows.numel():
                rows = rows[(score[rows] >= edge[rows, None]).sum(1) > kk]
        if rows.numel():
            top[rows], idx[rows] = _stable_top(score[rows], kk)
    idx, perm = torch.sort(idx, dim=1)  # index order first, so the stable value sort keeps it among ties
    top = top.gather(1, perm)
    top, perm = torch.sort(top, dim=1, descending=True, stable=True)
    return top, idx.gather(1, perm)


def _merge(run_s, run_i, top, idx, k):
    """Merge the running best (smaller indices) with a chunk's best: a stable sort keeps index order on ties."""
    if run_s is None:
        return top[:, :k], idx[:, :k]
    if run_s.shape[1] >= k and not bool((top[:, 0] > run_s[:, -1]).any()):
        return run_s, run_i  # nothing in this chunk beats any row's k-th best
    s = torch.cat([run_s, top], dim=1)
    i = torch.cat([run_i, idx], dim=1)
    s, perm = torch.sort(s, dim=1, descending=True, stable=True)
    return s[:, :k], i.gather(1, perm[:, :k])


def knn(x, ref=None, *, k: int, distance: Distance, exclude_self: bool = False):
    """(values N×k, indices N×k int64) of the k nearest references of every query, in O(block × chunk) memory."""
    if ref is None:
        ref, exclude_self = x, True
    n, m = x.shape[0], ref.shape[0]
    _check_k(k, n, m, exclude_self)
    ct = _compute_dtype(x)
    values = torch.empty(n, k, dtype=ct, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if k == 0 or n == 0:
        return values.to(x.dtype), indices
    with torch.no_grad():
        q = normalize_rows(x.to(ct), distance)
        r = q if ref is x else normalize_rows(ref.to(ct), distance)
        euclid = not distance.is_similarity
        if euclid:
            qn, rn = (q * q).sum(1), (r * r).sum(1)
        rows = min(ROWS, n)
        chunk = min(m, max(MIN_CHUNK, TILE // rows))
        if chunk < m and 2 * k >= chunk:  # a large k (PML's k=None is M - 1): whole rows, no k-wide merges
            chunk, rows = m, max(1, min(n, ROWS, TILE // m))
        buf = torch.empty(rows, chunk, dtype=ct, device=x.device)
        buf2 = torch.empty(rows, chunk, dtype=ct, device=x.device) if euclid else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            qb = q[r0:r1]
            run_s = run_i = None
            for c0 in range(0, m, chunk):
                c1 = min(m, c0 + chunk)
                s = torch.mm(qb, r[c0:c1].T, out=buf[: r1 - r0, : c1 - c0])
                if euclid:  # score = −distance, with the reference's formula: (|q|² + |r|²) − 2 q·r, clamp, sqrt
                    t = torch.add(qn[r0:r1, None], rn[None, c0:c1], out=buf2[: r1 - r0, : c1 - c0])
                    s = t.sub_(s, alpha=2).clamp_min_(0)
                    if not distance.squared:
                        s.sqrt_()
                    s.neg_()
                if exclude_self:
                    lo, hi = max(r0, c0), min(r1, c1)
                    if lo < hi:
                        diag = torch.arange(lo, hi, device=x.device)
                        s[diag - r0, diag - c0] = float("-inf")
                top, idx = _chunk_top(s, min(k, c1 - c0), run_s if (run_s is not None and run_s.shape[1] >= k)
                                      else None)
                run_s, run_i = _merge(run_s, run_i, top, idx + c0, k)
            values[r0:r1] = run_s if not euclid else run_s.neg()
            indices[r0:r1] = run_i
    return values.to(x.dtype), indices


register("knn", "cpu")(knn)
