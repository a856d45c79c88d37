"""The tiled pair engine: one similarity tile, many loss epilogues.

A program owns a block of query rows (``BA``) and streams reference tiles (``BB``). Each tile is formed
with ``tl.dot`` over D-chunks from the *raw* embeddings; normalisation is fused through per-row scales
computed once on the host (``s = 1/max(‖x‖, 1e-12)`` or 1, and for euclidean distances the squared norm
``n = ‖x s‖²``):

    c  = (x_i · r_k) · (s_i s_k)                         cosine / dot    (DIST = 0)
    sq = max(n_i + n_k − 2c, 0)                           squared L2      (DIST = 1)
    d  = sqrt(sq) if sq > 0 else 0 (zero gradient at 0)   L2              (DIST = 2)

The tile itself (dot over D-chunks, fused scales, 64-bit tile loads, online LSE) is ``tiles.py``'s, the
vocabulary the class engine is written in too; this module adds the pair masks, epilogues and launches.

Label / diagonal / packed-pair masking is applied to the tile, which is then handed to a loss-specific
``@triton.jit`` epilogue passed as a ``tl.constexpr`` argument. Two epilogue kinds exist:

* forward ``FWD(v, pos, neg, ia, ib, na, nb, st, nst, p0, p1, p2, p3, DIST, FLAG)`` returns six tiles,
  each reduced along the row by the kind named in ``KINDS`` (sum, LSE, LSE with the implicit zero
  term, max, min) into per-row statistics (:meth:`Tiles.row_stats`);
* backward ``BWD(v, pos, neg, ia, ib, na, nb, st, nst, sc, p0, p1, p2, p3, DIST, FLAG)`` returns
  dL/dv for the tile (:meth:`Tiles.grad`); ``sc`` points at device scalars (upstream gradient × 1/N, the
  ≤1-pair flag, ...), so nothing is read back to the host.

``ia``/``ib`` are the anchor / reference indices broadcastable to the tile (``[:, None]`` / ``[None, :]``,
or swapped for the transposed role), so an epilogue loads whichever per-row statistics it needs from
``st`` (K rows of ``nst`` values). In self mode the backward forms G_IJ (rows as anchors) *and* G_JI
(the columns as anchors, from the same tile) so a row-block program owns its output rows: dX = (G + Gᵀ)X
without atomics. With a reference set the same kernel, in its column form (a program owns a block of
references), produces dRef. A tile whose gradient is exactly zero (masked out, not mined) skips its
gradient dot. The tile gradient is a ``TILE_GRAD`` function: by default :func:`grad_tile` (recompute,
mask, ``BWD``); all-triplets passes its own.

The autograd plumbing (:class:`FusedPairLoss`) saves the inputs plus the O(N) statistics a loss returns
and recomputes every tile in the backward. Nothing here syncs with the host.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._registry import Unsupported  # noqa: F401  (re-exported for the loss modules)
from ...distances import Distance
from .tiles import dot_tile, load_rows, load_tile, lse_init, lse_update, store_tile, tile_values
# (``load_rows`` is also the loss modules' ``pair_engine.load_rows``)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's tl.dot mis-reads bfloat16 operands (numpy has no bf16): there only, bf16 tiles are
# multiplied as (exact) fp32 tiles (``tiles.dot_operand``).
_UPCAST_BF16 = tl.constexpr(INTERPRET)

# Row-reduction kinds of the forward slots.
NONE, SUM, LSE, LSE1, MAX, MIN = 0, 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------------------------- tiles


@triton.jit
def sim_sign(DIST: tl.constexpr):
    """+1 for a similarity (larger = closer), −1 for a distance: PML's margin(a, b) = sign·(b − a)."""
    if DIST == 0:
        return 1.0
    return -1.0


@triton.jit
def chain(w, v, DIST: tl.constexpr):
    """dL/dv → (dL/dc, dL/dn) elementwise, c = scaled inner product, n = squared norm of either side."""
    if DIST == 0:
        return w, w * 0.0
    if DIST == 1:
        g = tl.where(v > 0, w, 0.0)
    else:
        g = tl.where(v > 0, w / (2.0 * tl.where(v > 0, v, 1.0)), 0.0)
    return -2.0 * g, g


@triton.jit
def load_bits(bits_ptr, nbytes, rows, cols, mask):
    """Bit (row, col) of a packed N×ceil(M/8) uint8 mask, for broadcastable index tensors."""
    byte = tl.load(bits_ptr + rows.to(tl.int64) * nbytes + (cols // 8), mask=mask, other=0)
    return ((byte.to(tl.int32) >> (cols % 8).to(tl.int32)) & 1) != 0


@triton.jit
def pair_masks(lab_a, lab_b, offs_a, offs_b, NA, NB, pos_bits, neg_bits, nbytes,
               SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, TRANS: tl.constexpr):
    """(pos, neg) of the tile rows offs_a × cols offs_b; TRANS reads the pair bits of (col, row)."""
    valid = (offs_a < NA)[:, None] & (offs_b < NB)[None, :]
    if HAS_PAIRS:
        if TRANS:
            pos = load_bits(pos_bits, nbytes, offs_b[None, :], offs_a[:, None], valid) & valid
            neg = load_bits(neg_bits, nbytes, offs_b[None, :], offs_a[:, None], valid) & valid
        else:
            pos = load_bits(pos_bits, nbytes, offs_a[:, None], offs_b[None, :], valid) & valid
            neg = load_bits(neg_bits, nbytes, offs_a[:, None], offs_b[None, :], valid) & valid
    elif HAS_LABELS:
        same = lab_a[:, None] == lab_b[None, :]
        pos = same & valid
        if SELF:
            pos = pos & (offs_a[:, None] != offs_b[None, :])
        neg = (same == 0) & valid
    else:
        pos = valid & (offs_a[:, None] != offs_b[None, :])
        neg = valid
    return pos, neg


@triton.jit
def value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
               DIST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """The values (:func:`tiles.tile_values`) of the tile rows offs_a × references offs_b, in the compute
    dtype of the scales (contiguous rows: unit D-strides)."""
    c = dot_tile(x_ptr, r_ptr, offs_a, offs_a < N, offs_b, offs_b < M, D, stride_x, 1, stride_r, 1, BA, BB, BD,
                 x_ptr.dtype.element_ty, s_a.dtype, _UPCAST_BF16, PREC)
    v, dd = tile_values(c, s_a, s_b, n_a, n_b, DIST, True)
    return v


# ------------------------------------------------------------------------------- online row reductions


@triton.jit
def acc_init(KIND: tl.constexpr, BA: tl.constexpr, CT: tl.constexpr):
    if KIND == 2:  # LSE: empty → -inf
        return lse_init(BA, CT, False)
    elif KIND == 3:  # LSE with the implicit zero term: m = 0, l = 1
        return lse_init(BA, CT, True)
    elif KIND == 4:
        return tl.full((BA,), float("-inf"), CT), tl.zeros((BA,), CT)
    elif KIND == 5:
        return tl.full((BA,), float("inf"), CT), tl.zeros((BA,), CT)
    else:
        return tl.zeros((BA,), CT), tl.zeros((BA,), CT)


@triton.jit
def acc_update(m, l, t, KIND: tl.constexpr):
    """Merge a tile's row contributions ``t`` (entries outside the set hold the identity) into (m, l)."""
    if KIND == 1:
        return m + tl.sum(t, axis=1), l
    elif KIND == 2 or KIND == 3:
        return lse_update(m, l, t, 1)
    elif KIND == 4:
        return tl.maximum(m, tl.max(t, axis=1)), l
    elif KIND == 5:
        return tl.minimum(m, tl.min(t, axis=1)), l
    else:
        return m, l


@triton.jit
def acc_final(m, l, KIND: tl.constexpr):
    if KIND == 2 or KIND == 3:
        return m + tl.log(l)
    return m


@triton.jit
def _row_stats_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                      st_ptr, nst, out_ptr, N, M, D, stride_x, stride_r, p0, p1, p2, p3,
                      FWD: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                      K3: tl.constexpr, K4: tl.constexpr, K5: tl.constexpr,
                      SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr,
                      DIST: tl.constexpr, FLAG: tl.constexpr,
                      BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    s_a, n_a, lab_a = load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
    m0, l0 = acc_init(K0, BA, CT)
    m1, l1 = acc_init(K1, BA, CT)
    m2, l2 = acc_init(K2, BA, CT)
    m3, l3 = acc_init(K3, BA, CT)
    m4, l4 = acc_init(K4, BA, CT)
    m5, l5 = acc_init(K5, BA, CT)
    for b0 in range(0, M, BB):
        offs_b = b0 + tl.arange(0, BB)
        s_b, n_b, lab_b = load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
        v = value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                       DIST, BA, BB, BD, PREC)
        pos, neg = pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                              SELF, HAS_LABELS, HAS_PAIRS, False)
        t0, t1, t2, t3, t4, t5 = FWD(v, pos, neg, offs_a[:, None], offs_b[None, :], N, M, st_ptr, nst,
                                     p0, p1, p2, p3, DIST, FLAG)
        m0, l0 = acc_update(m0, l0, t0, K0)
        m1, l1 = acc_update(m1, l1, t1, K1)
        m2, l2 = acc_update(m2, l2, t2, K2)
        m3, l3 = acc_update(m3, l3, t3, K3)
        m4, l4 = acc_update(m4, l4, t4, K4)
        m5, l5 = acc_update(m5, l5, t5, K5)
    inside = offs_a < N
    tl.store(out_ptr + offs_a, acc_final(m0, l0, K0), mask=inside)
    tl.store(out_ptr + N + offs_a, acc_final(m1, l1, K1), mask=inside)
    tl.store(out_ptr + 2 * N + offs_a, acc_final(m2, l2, K2), mask=inside)
    tl.store(out_ptr + 3 * N + offs_a, acc_final(m3, l3, K3), mask=inside)
    tl.store(out_ptr + 4 * N + offs_a, acc_final(m4, l4, K4), mask=inside)
    tl.store(out_ptr + 5 * N + offs_a, acc_final(m5, l5, K5), mask=inside)


# ------------------------------------------------------------------------------------------- backward


@triton.jit
def grad_tile(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, lab_a, lab_b,
              pos_bits, neg_bits, nbytes, st_ptr, nst, sc_ptr, N, M, D, stride_x, stride_r, p0, p1, p2, p3,
              BWD: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr,
              DIST: tl.constexpr, FLAG: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
              PREC: tl.constexpr):
    """The default ``TILE_GRAD`` of :func:`_grad_kernel`: (dL/dc, dL/dn) of the tile rows offs_a × cols
    offs_b, recomputed from the embeddings, with the backward epilogue ``BWD`` giving dL/dv. In self mode
    the columns also play the anchors (G_IJ + G_JIᵀ from the same tile), so a row block owns its rows.
    (A loss whose tile gradient is not elementwise in O(1) row statistics, like all-triplets, passes its
    own function with this signature; ``sr_ptr`` / ``nr_ptr`` / ``lr_ptr`` let it stream other columns.)"""
    v = value_tile(x_ptr, r_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, N, M, D, stride_x, stride_r,
                   DIST, BA, BB, BD, PREC)
    pos, neg = pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                          SELF, HAS_LABELS, HAS_PAIRS, False)
    w = BWD(v, pos, neg, offs_a[:, None], offs_b[None, :], N, M, st_ptr, nst, sc_ptr, p0, p1, p2, p3, DIST, FLAG)
    if SELF:
        pos_t, neg_t = pair_masks(lab_a, lab_b, offs_a, offs_b, N, M, pos_bits, neg_bits, nbytes,
                                  SELF, HAS_LABELS, HAS_PAIRS, True)
        w += BWD(v, pos_t, neg_t, offs_b[None, :], offs_a[:, None], M, N, st_ptr, nst, sc_ptr,
                 p0, p1, p2, p3, DIST, FLAG)
    return chain(w, v, DIST)


@triton.jit
def accumulate_grad(acc, g, e_ptr, offs_e, n_e, stride_e, offs_o, D, GPREC: tl.constexpr):
    """acc += g · E[offs_e, offs_o] for a gradient tile g (owned rows × streamed rows) and the streamed
    side's embeddings E. An all-zero g (masked out, not mined) skips the load and the dot: exact."""
    if tl.max(tl.abs(g)) > 0:
        e = load_tile(e_ptr, offs_e, offs_e < n_e, stride_e, offs_o, offs_o < D, 1).to(acc.dtype)
        acc = tl.dot(g, e, acc, input_precision=GPREC, out_dtype=acc.dtype)
    return acc


@triton.jit
def store_grad(acc_ptr, dn_ptr, acc, dn, offs, n_rows, offs_o, D):
    """Write a program's (rows × D-chunk) accumulator and, once per row block, its dL/dn."""
    inside = offs < n_rows
    store_tile(acc_ptr, acc, offs, inside, D, offs_o, offs_o < D, 1)
    if tl.program_id(1) == 0:
        tl.store(dn_ptr + offs, dn, mask=inside)


@triton.jit
def _grad_kernel(x_ptr, r_ptr, sx_ptr, sr_ptr, nx_ptr, nr_ptr, lx_ptr, lr_ptr, pos_bits, neg_bits, nbytes,
                 st_ptr, nst, sc_ptr, acc_ptr, dn_ptr, N, M, D, stride_x, stride_r, p0, p1, p2, p3,
                 TILE_GRAD: tl.constexpr, BWD: tl.constexpr, COLUMNS: tl.constexpr, SELF: tl.constexpr,
                 HAS_LABELS: tl.constexpr, HAS_PAIRS: tl.constexpr, DIST: tl.constexpr, FLAG: tl.constexpr,
                 BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr,
                 GPREC: tl.constexpr):
    """The backward of every pair loss. Rows (COLUMNS=False): acc_i = Σ_k (G_ik [+ G_ki in self mode]) s_k r_k
    and dn_i = Σ_k dL/dn_i for a block of query rows. Columns (the reference side): acc_k = Σ_i G_ik s_i x_i
    and dn_k = Σ_i dL/dn_k for a block of references. G and dL/dn of a tile come from ``TILE_GRAD``."""
    CT: tl.constexpr = sx_ptr.dtype.element_ty
    offs_o = tl.program_id(1) * BDO + tl.arange(0, BDO)
    if COLUMNS:
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        s_b, n_b, lab_b = load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
        acc = tl.zeros((BB, BDO), CT)
        dn = tl.zeros((BB,), CT)
        for a0 in range(0, N, BA):
            offs_a = a0 + tl.arange(0, BA)
            s_a, n_a, lab_a = load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
            gc, gn = TILE_GRAD(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, lab_a, lab_b,
                               pos_bits, neg_bits, nbytes, st_ptr, nst, sc_ptr, N, M, D, stride_x, stride_r,
                               p0, p1, p2, p3, BWD, SELF, HAS_LABELS, HAS_PAIRS, DIST, FLAG, BA, BB, BD, PREC)
            acc = accumulate_grad(acc, tl.trans(gc * s_a[:, None]), x_ptr, offs_a, N, stride_x, offs_o, D, GPREC)
            dn += tl.sum(gn, axis=0)
        store_grad(acc_ptr, dn_ptr, acc, dn, offs_b, M, offs_o, D)
    else:
        offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
        s_a, n_a, lab_a = load_rows(x_ptr, sx_ptr, nx_ptr, lx_ptr, offs_a, N, HAS_LABELS)
        acc = tl.zeros((BA, BDO), CT)
        dn = tl.zeros((BA,), CT)
        for b0 in range(0, M, BB):
            offs_b = b0 + tl.arange(0, BB)
            s_b, n_b, lab_b = load_rows(r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_b, M, HAS_LABELS)
            gc, gn = TILE_GRAD(x_ptr, r_ptr, sr_ptr, nr_ptr, lr_ptr, offs_a, offs_b, s_a, s_b, n_a, n_b, lab_a, lab_b,
                               pos_bits, neg_bits, nbytes, st_ptr, nst, sc_ptr, N, M, D, stride_x, stride_r,
                               p0, p1, p2, p3, BWD, SELF, HAS_LABELS, HAS_PAIRS, DIST, FLAG, BA, BB, BD, PREC)
            acc = accumulate_grad(acc, gc * s_b[None, :], r_ptr, offs_b, M, stride_r, offs_o, D, GPREC)
            dn += tl.sum(gn, axis=1)
        store_grad(acc_ptr, dn_ptr, acc, dn, offs_a, N, offs_o, D)


# ----------------------------------------------------------------------------------------------- host


def compute_dtype(dtype):
    """fp64 stays fp64 (gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dist_code(distance: Distance) -> int:
    return {"cosine": 0, "dot": 0, "squared_euclidean": 1, "euclidean": 2}[distance.name]


def row_scales(x, distance: Distance):
    """(s, n): the fused normalisation scale and the squared norm of the scaled row (O(N), autograd)."""
    ct = compute_dtype(x.dtype)
    if distance.normalize:
        norm = torch.linalg.vector_norm(x, dim=1, dtype=ct)
        s = 1.0 / norm.clamp_min(1e-12)
    else:
        norm = None
        s = torch.ones(x.shape[0], dtype=ct, device=x.device)
    if distance.is_similarity:
        n = torch.zeros(x.shape[0], dtype=ct, device=x.device)
    elif norm is not None:
        n = (norm * s) ** 2
    else:
        n = (x.to(ct) * x.to(ct)).sum(1)
    return s, n


class Blocks(NamedTuple):
    ba: int  # query rows per program (or per inner step in a column kernel)
    bb: int  # reference columns per tile
    bd: int  # D-chunk of the similarity dot
    bdo: int  # D-columns of the gradient accumulator per program
    warps: int


# GPU tile shapes per dtype group and kernel kind (BA, BB, BD, BDO, num_warps), chosen so that ptxas reports no
# register spills on sm_90 (cuobjdump -res-usage on the AOT-compiled cubins; fp64 triplets still spill and
# exist for gradcheck). Not yet timed on hardware.
GPU_BLOCKS = {
    "half": {"fwd": (64, 64, 32, 0, 8), "rows": (64, 64, 32, 128, 8), "cols": (64, 64, 32, 128, 8),
             "tile": (64, 64, 32, 0, 8), "triplet": (16, 16, 32, 64, 8)},
    "fp32": {"fwd": (32, 64, 32, 0, 8), "rows": (64, 32, 32, 64, 8), "cols": (32, 64, 32, 64, 8),
             "tile": (32, 64, 32, 0, 8), "triplet": (16, 16, 32, 32, 8)},
    "fp64": {"fwd": (32, 32, 32, 0, 4), "rows": (32, 32, 16, 32, 4), "cols": (32, 32, 16, 32, 4),
             "tile": (32, 32, 16, 0, 4), "triplet": (16, 16, 16, 32, 8)},
}


def gpu_blocks(group, kind, narrow=False):
    """The GPU tile shape of a kernel kind; ``narrow`` halves the streamed tile for epilogues that gather
    per element (packed pair bits, the upstream matrix, N-pairs flags), which otherwise spill registers."""
    ba, bb, bd, bdo, warps = GPU_BLOCKS[group][kind]
    if narrow and kind in ("fwd", "rows", "tile"):
        bb = max(16, bb // 2)
    elif narrow and kind == "cols":
        ba = max(16, ba // 2)
    return ba, bb, bd, bdo, warps


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


class Tiles:
    """The tile space of one call: queries × references, their masks, distance and launch shapes."""

    def __init__(self, x, labels, ref, ref_labels, distance: Distance, pairs=None, *, use_labels=True,
                 narrow=False):
        self.self_mode = ref is None
        self.narrow = narrow or pairs is not None
        self.n, self.d = x.shape
        self.m = self.n if ref is None else ref.shape[0]
        self.device = x.device
        self.ct = compute_dtype(x.dtype)
        self.distance = distance
        self.dist = dist_code(distance)
        self.has_pairs = pairs is not None
        self.has_labels = use_labels and labels is not None and not self.has_pairs
        dummy_i = torch.zeros(1, dtype=torch.int64, device=x.device)
        dummy_u = torch.zeros(1, dtype=torch.uint8, device=x.device)
        self.labels = labels.contiguous() if self.has_labels else dummy_i
        self.ref_labels = (self.labels if ref_labels is None else ref_labels.contiguous()) if self.has_labels \
            else dummy_i
        if self.has_pairs:
            self.pos_bits, self.neg_bits = pairs.pos_bits.contiguous(), pairs.neg_bits.contiguous()
            self.nbytes = self.pos_bits.shape[1]
        else:
            self.pos_bits = self.neg_bits = dummy_u
            self.nbytes = 1
        self.gpu = x.is_cuda and not INTERPRET
        # fp32 inputs use tf32 only when the user allows it. The backward dot (fp32 gradient tile × the
        # upcast embeddings) runs in tf32 for fp16/bf16 inputs: its rounding (2^-11) is that of the inputs.
        allow_tf32 = self.gpu and torch.backends.cuda.matmul.allow_tf32
        self.prec = "tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee"
        half = x.dtype in (torch.float16, torch.bfloat16)
        self.gprec = "tf32" if (self.gpu and half) or (allow_tf32 and x.dtype == torch.float32) else "ieee"
        self.group = "fp64" if x.dtype == torch.float64 else ("fp32" if x.dtype == torch.float32 else "half")

    def blocks(self, kind):
        """(BA, BB, BD, BDO, num_warps) of one kernel kind (see ``GPU_BLOCKS``), BD / BDO clipped to D."""
        if self.gpu:
            ba, bb, bd, bdo, warps = gpu_blocks(self.group, kind, self.narrow)
        else:  # the interpreter: small tiles so the tests' odd shapes span several of them
            ba, bb, bd, bdo, warps = 16, 16, 32, 64, 1
        return Blocks(ba, bb, min(bd, _pow2(self.d)), min(bdo, _pow2(self.d)), warps)

    def launch(self, kind):
        """The launch keywords shared by every tile kernel of this kind."""
        b = self.blocks(kind)
        return dict(BA=b.ba, BB=b.bb, BD=b.bd, PREC=self.prec, num_warps=b.warps)

    def embed(self, x, ref, distance=None):
        """Per-row scales of both sides (autograd-tracked): (s, n, sr, nr)."""
        distance = distance or self.distance
        s, n = row_scales(x, distance)
        if ref is None:
            return s, n, None, None
        sr, nr = row_scales(ref, distance)
        return s, n, sr, nr

    def _common(self, x, s, n, r, sr, nr):
        r, sr, nr = (x, s, n) if r is None else (r, sr, nr)
        return (x.contiguous(), r.contiguous(), s.contiguous(), sr.contiguous(), n.contiguous(), nr.contiguous(),
                self.labels, self.ref_labels, self.pos_bits, self.neg_bits, self.nbytes)

    def _flags(self):
        return dict(SELF=self.self_mode, HAS_LABELS=self.has_labels, HAS_PAIRS=self.has_pairs, DIST=self.dist)

    def row_stats(self, xs, fwd, kinds, params=(0.0, 0.0, 0.0, 0.0), stats=None, flag=0):
        """(6, N) per-row reductions of the forward epilogue ``fwd`` (compute dtype)."""
        kinds = tuple(kinds) + (NONE,) * (6 - len(kinds))
        out = torch.empty(6, self.n, dtype=self.ct, device=self.device)
        st = stats if stats is not None else out
        c = self._common(*xs)
        kw = self.launch("fwd")
        grid = (triton.cdiv(self.n, kw["BA"]),)
        _row_stats_kernel[grid](*c, st, st.shape[-1], out, self.n, self.m, self.d, c[0].stride(0), c[1].stride(0),
                                *[float(p) for p in params], FWD=fwd, K0=kinds[0], K1=kinds[1], K2=kinds[2],
                                K3=kinds[3], K4=kinds[4], K5=kinds[5], FLAG=flag, **kw, **self._flags())
        return out

    def grad_side(self, xs, columns, bwd, stats, sc, params=(0.0, 0.0, 0.0, 0.0), flag=0, tile_grad=None,
                  kind=None):
        """(acc, dn) of one side. Rows: acc_i = Σ_k G_ik s_k r_k (plus Gᵀ in self mode, with the default
        ``grad_tile``); columns: acc_k = Σ_i G_ik s_i x_i. ``kind`` picks the tile shape (default rows / cols)."""
        c = self._common(*xs)
        kind = kind or ("cols" if columns else "rows")
        b = self.blocks(kind)
        count = self.m if columns else self.n
        acc = torch.empty(count, self.d, dtype=self.ct, device=self.device)
        dn = torch.empty(count, dtype=self.ct, device=self.device)
        grid = (triton.cdiv(count, b.bb if columns else b.ba), triton.cdiv(self.d, b.bdo))
        _grad_kernel[grid](*c, stats, stats.shape[-1], sc.to(self.ct).contiguous(), acc, dn, self.n, self.m, self.d,
                           c[0].stride(0), c[1].stride(0), *[float(v) for v in params],
                           TILE_GRAD=tile_grad or grad_tile, BWD=bwd, COLUMNS=columns, FLAG=flag, BDO=b.bdo,
                           GPREC=self.gprec, **self.launch(kind), **self._flags())
        return acc, dn

    def grad(self, xs, bwd, stats, sc, params=(0.0, 0.0, 0.0, 0.0), flag=0, need_x=True, need_r=False):
        """(acc, dn, acc_r, dn_r) with acc_i = Σ_k G_ik s_k r_k (plus Gᵀ in self mode); None where not needed."""
        acc = dn = acc_r = dn_r = None
        if need_x:
            acc, dn = self.grad_side(xs, False, bwd, stats, sc, params, flag)
        if need_r:
            acc_r, dn_r = self.grad_side(xs, True, bwd, stats, sc, params, flag)
        return acc, dn, acc_r, dn_r


def embedding_grads(x, s, acc, dn, needs):
    """Turn a kernel's (acc, dn) into the gradients of (x, s, n): v depends on x only through s·x and n."""
    if acc is None:
        return None, None, None
    dx = (acc * s.unsqueeze(1)).to(x.dtype) if needs[0] else None
    ds = torch.einsum("nd,nd->n", x.to(acc.dtype), acc) if needs[1] else None
    return dx, ds, (dn if needs[2] else None)


def refuse_double_backward():
    """Call at the top of a recomputing backward: with create_graph=True it would silently return a
    gradient that is not differentiable, so say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("double backward (create_graph=True) through a fused triton op is not supported; use "
                           "backend='reference' for second-order gradients")


class FusedPairLoss(torch.autograd.Function):
    """loss = impl(x, ref): forward via ``impl.forward`` (kernels → scalar + O(N) stats), backward via the
    engine's gradient kernels with ``impl``'s backward epilogue and device scalars (no host sync)."""

    @staticmethod
    def forward(ctx, impl, tiles, x, s, n, r, sr, nr):
        xs = (x, s, n, r, sr, nr)
        loss, stats, aux = impl.forward(tiles, xs)
        ctx.impl, ctx.tiles = impl, tiles
        ctx.save_for_backward(x, s, n, r, sr, nr, stats, aux)
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward()
        x, s, n, r, sr, nr, stats, aux = ctx.saved_tensors
        impl, tiles = ctx.impl, ctx.tiles
        needs = ctx.needs_input_grad
        need_x, need_r = any(needs[2:5]), (r is not None and any(needs[5:8]))
        sc = impl.grad_scalars(g, aux)
        acc, dn, acc_r, dn_r = impl.grad(tiles, (x, s, n, r, sr, nr), stats, sc, need_x, need_r)
        dx, ds, dnx = embedding_grads(x, s, acc, dn, needs[2:5])
        dr = dsr = dnr = None
        if need_r:
            dr, dsr, dnr = embedding_grads(r, sr, acc_r, dn_r, needs[5:8])
        return None, None, dx, ds, dnx, dr, dsr, dnr


def autocast_inputs(x, ref):
    """Under autocast the kernels read the embeddings in the autocast dtype (a differentiable cast) and still
    accumulate in fp32; the loss stays fp32."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype != torch.float64:
            x = x.to(dtype)
            ref = None if ref is None else ref.to(dtype)
    return x, ref


def fused_loss(impl, x, labels, ref, ref_labels, distance, pairs=None, *, use_labels=True):
    """Run ``impl`` (an object with forward / grad_scalars / grad) as a differentiable fused pair loss."""
    x, ref = autocast_inputs(x, ref)
    tiles = Tiles(x, labels, ref, ref_labels, distance, pairs, use_labels=use_labels,
                  narrow=getattr(impl, "NARROW", False))
    s, n, sr, nr = tiles.embed(x, ref)
    return FusedPairLoss.apply(impl, tiles, x, s, n, ref, sr, nr)


class PairLossImpl:
    """Base of a loss run by the generic engine: subclasses set ``BWD`` (a backward epilogue), ``params``
    and ``flag`` and implement ``forward(tiles, xs) -> (loss, stats (K, N), aux (device scalars))`` and
    ``grad_scalars(g, aux) -> sc``."""

    BWD = None
    params = (0.0, 0.0, 0.0, 0.0)
    flag = 0

    def grad(self, tiles, xs, stats, sc, need_x, need_r):
        return tiles.grad(xs, self.BWD, stats, sc, self.params, self.flag, need_x, need_r)


def few_pairs_keep(n_pos, n_neg, pair_rule):
    """PML's "≤1 positive and ≤1 negative pair → 0" as a device 0/1 factor (1 = keep the loss)."""
    if not pair_rule:
        return torch.ones((), dtype=n_pos.dtype, device=n_pos.device)
    return (~((n_pos <= 1) & (n_neg <= 1))).to(n_pos.dtype)
