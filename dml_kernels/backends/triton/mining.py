"""Per-row miners on the tiled pair engine: ``batch_easy_hard_mining`` (every strategy pair PML accepts) and
``pair_margin_mining`` (packed bits). Tested under the interpreter, not yet run on a GPU.

``batch_easy_hard_mining``: one program owns BA query rows and streams the reference tiles, keeping per row a
running arg-best for each side (batch-hard's :func:`similarity._best`: ties to the lowest index, tiles in index
order); a side picks the largest value of its row (``*_LARGEST``: the closest for a similarity, the farthest for
a distance) or the smallest, among values in its allowed range [lo, hi] (±inf when none is given). A semihard
side (``SEMI`` 1: positives, 2: negatives) is chosen in a second sweep, strictly on the near side of the value
the first sweep picked for the other side (an empty other side: the start of its search, ±inf, as in PML and
the cpu form). The rules are PML 2.9's
(the cpu form's docstring, ``backends/cpp/mining.py``); an "all" side is ``None``. No N×M buffer, no host sync.

``pair_margin_mining``: a program owns BA rows × BB/8 whole bytes and writes the pairs beyond the margins
(strict) straight into a :class:`PackedPairMask` (N×ceil(M/8) bytes per side).

The range bounds and margins travel as a device row of the compute dtype (no Python-float fp32 rounding, no
host-to-device copy): fp32 values are compared with fp32-rounded bounds, as torch compares an fp32 matrix with
a Python float.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._miner_rules import check_strategies, largest_sides
from ..._pairs import PackedPairMask
from ..._registry import Unsupported, register
from ...distances import Distance
from . import pair_engine
from .multi_similarity import _pack_bits
from .similarity import _best


@triton.jit
def _side_init(LARGEST: tl.constexpr, BA: tl.constexpr, CT: tl.constexpr):
    if LARGEST:
        best = tl.full((BA,), float("-inf"), CT)
    else:
        best = tl.full((BA,), float("inf"), CT)
    return best, tl.full((BA,), -1, tl.int32)


@triton.jit
def _side_update(best, idx, v, allowed, offs_b, LARGEST: tl.constexpr):
    if LARGEST:
        score = tl.where(allowed, v, float("-inf"))
    else:
        score = tl.where(allowed, v, float("inf"))
    return _best(best, idx, score, offs_b, LARGEST)


@triton.jit
def _near(v, threshold, LARGEST: tl.constexpr):
    """Strictly on the near side of the other side's pick (the semihard bound)."""
    if LARGEST:
        return v < threshold[:, None]
    return v > threshold[:, None]


@triton.jit
def _tile(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lr_ptr, pos_bits, neg_bits, nbytes, th_ptr, offs_a, s_a,
          n_a, lab_a, b0, N, M, D, stride_x, stride_r, SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
          HAS_PAIRS: tl.constexpr, DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
          PREC: tl.constexpr):
    """(values, admissible positives, admissible negatives, column offsets) of one reference tile."""
    offs_b = b0 + tl.arange(0, BB)
    s_b, n_b, lab_b = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
    v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                               DIST, BA, BB, BD, PREC)
    pos, neg = pair_engine.pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                                      SELF, HAS_LABELS, HAS_PAIRS, False)
    pos = pos & (v >= tl.load(th_ptr)) & (v <= tl.load(th_ptr + 1))
    neg = neg & (v >= tl.load(th_ptr + 2)) & (v <= tl.load(th_ptr + 3))
    return v, pos, neg, offs_b


@triton.jit
def _easy_hard_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                      th_ptr, out_ptr, N, M, D, stride_x, stride_r,
                      P_LARGEST: tl.constexpr, N_LARGEST: tl.constexpr, SEMI: tl.constexpr,
                      SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr,
                      BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Per row the chosen positive and negative index (-1: none admissible); see the module docstring."""
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    best_p, idx_p = _side_init(P_LARGEST, BA, CT)
    best_n, idx_n = _side_init(N_LARGEST, BA, CT)
    for b0 in range(0, M, BB):  # both sides, or the side a semihard side is bounded by
        v, pos, neg, offs_b = _tile(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lr_ptr, pos_bits, neg_bits,
                                    nbytes, th_ptr, offs_a, s_a, n_a, lab_a, b0, N, M, D, stride_x, stride_r,
                                    SELF, HAS_LABELS, HAS_PAIRS, DIST, BA, BB, BD, PREC)
        if SEMI != 1:
            best_p, idx_p = _side_update(best_p, idx_p, v, pos, offs_b, P_LARGEST)
        if SEMI != 2:
            best_n, idx_n = _side_update(best_n, idx_n, v, neg, offs_b, N_LARGEST)
    if SEMI != 0:
        for b0 in range(0, M, BB):  # the semihard side, bounded by the other side's pick
            v, pos, neg, offs_b = _tile(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lr_ptr, pos_bits, neg_bits,
                                        nbytes, th_ptr, offs_a, s_a, n_a, lab_a, b0, N, M, D, stride_x, stride_r,
                                        SELF, HAS_LABELS, HAS_PAIRS, DIST, BA, BB, BD, PREC)
            if SEMI == 1:
                best_p, idx_p = _side_update(best_p, idx_p, v, pos & _near(v, best_n, P_LARGEST), offs_b, P_LARGEST)
            else:
                best_n, idx_n = _side_update(best_n, idx_n, v, neg & _near(v, best_p, N_LARGEST), offs_b, N_LARGEST)
    inside = offs_a < N
    tl.store(out_ptr + offs_a, idx_p.to(tl.int64), mask=inside)
    tl.store(out_ptr + N + offs_a, idx_n.to(tl.int64), mask=inside)


@triton.jit
def _pair_margin_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                        th_ptr, out_pos, out_neg, N, M, D, stride_x, stride_r,
                        SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr,
                        BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Positives beyond ``pos_margin`` and negatives within ``neg_margin`` (strict), as packed bits."""
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    s_a, n_a, lab_a = pair_engine.load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    s_b, n_b, lab_b = pair_engine.load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
    v = pair_engine.value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                               DIST, BA, BB, BD, PREC)
    pos, neg = pair_engine.pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                                      SELF, HAS_LABELS, HAS_PAIRS, False)
    pos_margin = tl.load(th_ptr)
    neg_margin = tl.load(th_ptr + 1)
    if DIST == 0:  # a similarity: positives less similar than pos_margin, negatives more similar than neg_margin
        pos = pos & (v < pos_margin)
        neg = neg & (v > neg_margin)
    else:
        pos = pos & (v > pos_margin)
        neg = neg & (v < neg_margin)
    offs_y = tl.program_id(1) * (BB // 8) + tl.arange(0, BB // 8)
    nout = (M + 7) // 8
    where = offs_a.to(tl.int64)[:, None] * nout + offs_y[None, :]
    inside = (offs_a < N)[:, None] & (offs_y < nout)[None, :]
    tl.store(out_pos + where, _pack_bits(pos, BA, BB), mask=inside)
    tl.store(out_neg + where, _pack_bits(neg, BA, BB), mask=inside)


def _device_row(values, dtype, device):
    """A small device vector filled element by element (scalar fills: no host-to-device copy, no sync)."""
    row = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        row[i] = value
    return row


def _setup(x, labels, ref, ref_labels, distance):
    if not isinstance(distance, Distance):
        raise Unsupported(f"the fused miners take a dk Distance, not {type(distance).__name__} (reference only)")
    tiles = pair_engine.Tiles(x, labels, ref, ref_labels, distance)
    s, n, sr, nr = tiles.embed(x, ref)
    return tiles, tiles._common(x, s, n, ref, sr, nr)


def _bounds(value_range):
    return (float("-inf"), float("inf")) if value_range is None else (float(value_range[0]), float(value_range[1]))


@torch.no_grad()
def batch_easy_hard_mining(x, labels, ref, ref_labels, *, pos_strategy, neg_strategy, allowed_pos_range,
                           allowed_neg_range, distance):
    check_strategies(pos_strategy, neg_strategy)
    tiles, c = _setup(x, labels, ref, ref_labels, distance)
    pos_largest, neg_largest = largest_sides(pos_strategy, neg_strategy, distance.is_similarity)
    th = _device_row(_bounds(allowed_pos_range) + _bounds(allowed_neg_range), tiles.ct, x.device)
    out = torch.empty(2, tiles.n, dtype=torch.int64, device=x.device)
    kw = tiles.launch("tile")
    semi = 1 if pos_strategy == "semihard" else (2 if neg_strategy == "semihard" else 0)
    _easy_hard_kernel[(triton.cdiv(tiles.n, kw["BA"]),)](
        *c, th, out, tiles.n, tiles.m, tiles.d, c[0].stride(0), c[1].stride(0),
        P_LARGEST=pos_largest, N_LARGEST=neg_largest, SEMI=semi, **kw, **tiles._flags())
    return (None if pos_strategy == "all" else out[0]), (None if neg_strategy == "all" else out[1])


@torch.no_grad()
def pair_margin_mining(x, labels, ref, ref_labels, *, pos_margin, neg_margin, distance) -> PackedPairMask:
    tiles, c = _setup(x, labels, ref, ref_labels, distance)
    th = _device_row((float(pos_margin), float(neg_margin)), tiles.ct, x.device)
    nout = (tiles.m + 7) // 8
    out_pos = torch.empty(tiles.n, nout, dtype=torch.uint8, device=x.device)
    out_neg = torch.empty_like(out_pos)
    kw = tiles.launch("tile")
    grid = (triton.cdiv(tiles.n, kw["BA"]), triton.cdiv(tiles.m, kw["BB"]))
    _pair_margin_kernel[grid](*c, th, out_pos, out_neg, tiles.n, tiles.m, tiles.d, c[0].stride(0), c[1].stride(0),
                              **kw, **tiles._flags())
    return PackedPairMask(out_pos, out_neg, tiles.m)


register("batch_easy_hard_mining", "triton")(batch_easy_hard_mining)
register("pair_margin_mining", "triton")(pair_margin_mining)


def aot_variants():
    """(dtype, kernel, signature, constexprs, options) of every launch above on CUDA, for ``aot_check.py``:
    the easy/hard kernel for each (P_LARGEST, N_LARGEST, SEMI) a strategy pair produces (euclidean; SEMI
    variants also with a similarity), the pair-margin kernel for a distance and a similarity."""
    from .aot_signatures import _pair_signature

    forms = set()
    for p in ("hard", "semihard", "easy", "all"):
        for q in ("hard", "semihard", "easy", "all"):
            try:
                check_strategies(p, q)
            except ValueError:
                continue
            for sim in (False, True):
                semi = 1 if p == "semihard" else (2 if q == "semihard" else 0)
                forms.add((*largest_sides(p, q, sim), semi, 0 if sim else 2))
    for dtype, ct, group in (("fp16", "fp32", "half"), ("bf16", "fp32", "half"), ("fp32", "fp32", "fp32"),
                             ("fp64", "fp64", "fp64")):
        ptr = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "lx_ptr": "*i64", "lr_ptr": "*i64", "pos_bits": "*u8",
               "neg_bits": "*u8", "out_ptr": "*i64", "out_pos": "*u8", "out_neg": "*u8"}
        ba, bb, bd, _, warps = pair_engine.gpu_blocks(group, "tile")
        flags = dict(SELF=True, HAS_LABELS=True, HAS_PAIRS=False, PREC="ieee", BA=ba, BB=bb, BD=bd)
        launches = [(_easy_hard_kernel, dict(flags, P_LARGEST=pl, N_LARGEST=nl, SEMI=semi, DIST=dist))
                    for pl, nl, semi, dist in sorted(forms)]
        launches += [(_pair_margin_kernel, dict(flags, DIST=dist)) for dist in (0, 2)]
        for fn, consts in launches:
            yield dtype, fn, _pair_signature(fn, ct, ptr, consts), consts, {"num_warps": warps}
