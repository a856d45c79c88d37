"""The tile vocabulary of the Triton backend: the ``@triton.jit`` helpers both engines are written in.

``pair_engine.py`` (N×M: query rows × reference rows) and ``class_engine.py`` (N×C: embeddings × proxies)
form the same tiles the same way; what differs is only the masks and the epilogues around them:

* :func:`load_tile` / :func:`store_tile` — a rows × columns tile under a row mask × column mask, with 64-bit
  offsets (R·D passes 2³¹ long before R does); :func:`load_rows` — the per-row scale, squared norm and label
  of a block of rows;
* :func:`dot_tile` — the raw inner products of a tile, ``tl.dot`` over D-chunks in a compute dtype with an
  accumulator dtype (operands converted by :func:`dot_operand`);
* :func:`tile_values` — normalisation fused through per-row scales ``s`` (``1/max(‖x‖, eps)`` or 1) and
  squared norms ``n = ‖x s‖²``: the scaled dot ``cs``, then the similarity (DIST 0), the clamped squared
  distance ``max(dd, 0)`` with ``dd = n_a + n_b − 2cs`` (DIST 1) or ``sqrt(dd)``, 0 where dd ≤ 0 (DIST 2);
* :func:`lse_init` / :func:`lse_update` — the online log-sum-exp along either tile axis, empty or starting
  from the implicit zero term ``log(1 + Σ e^t)``.

Under ``TRITON_INTERPRET=1`` the interpreter's bf16 ``tl.dot`` is wrong (numpy has no bf16) and its
fp32→bf16 cast truncates: with ``EMU_BF16`` a bf16 compute dtype is emulated by rounding each operand to
bf16 exactly (round-to-nearest-even on the bit pattern) and multiplying in fp32 — what bf16 tensor cores
compute (exact products, fp32 accumulation).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rne_bf16(v):
    """Round fp32 ``v`` to the nearest bf16 (ties to even), returned as fp32."""
    b = v.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    b = (b >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(t, CD: tl.constexpr, EMU_BF16: tl.constexpr):
    """A loaded tile as a ``tl.dot`` operand of the compute dtype CD (with EMU_BF16 and a bf16 CD: the
    exactly bf16-rounded fp32 tile; a tile already in CD is returned as it is)."""
    if EMU_BF16:
        if CD == tl.bfloat16:
            return rne_bf16(t.to(tl.float32))
        else:
            return t.to(CD)
    else:
        return t.to(CD)


@triton.jit
def tile_ptrs(ptr, offs_r, stride_r, offs_c, stride_c):
    """Pointers to the tile rows offs_r × columns offs_c (64-bit offsets; the row pointers first)."""
    return ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c


@triton.jit
def load_tile(ptr, offs_r, in_r, stride_r, offs_c, in_c, stride_c):
    """ptr[offs_r, offs_c] (64-bit offsets) where in_r × in_c, else 0."""
    return tl.load(tile_ptrs(ptr, offs_r, stride_r, offs_c, stride_c), mask=in_r[:, None] & in_c[None, :],
                   other=0.0)


@triton.jit
def store_tile(ptr, value, offs_r, in_r, stride_r, offs_c, in_c, stride_c):
    """ptr[offs_r, offs_c] = value (64-bit offsets) where in_r × in_c."""
    tl.store(tile_ptrs(ptr, offs_r, stride_r, offs_c, stride_c), value, mask=in_r[:, None] & in_c[None, :])


@triton.jit
def load_rows(x_ptr, s_ptr, n_ptr, lab_ptr, offs, N, HAS_LABELS: tl.constexpr):
    """Per-row scale, squared norm and label of a block of rows (masked: 0, 0 and −1 outside [0, N));
    without labels the label of a row is its index."""
    inside = offs < N
    s = tl.load(s_ptr + offs, mask=inside, other=0.0)
    n = tl.load(n_ptr + offs, mask=inside, other=0.0)
    if HAS_LABELS:
        lab = tl.load(lab_ptr + offs, mask=inside, other=-1)
    else:
        lab = offs
    return s, n, lab


@triton.jit
def dot_tile(a_ptr, b_ptr, offs_a, in_a, offs_b, in_b, D, stride_a, stride_ad, stride_b, stride_bd,
             BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, CD: tl.constexpr, ACC_T: tl.constexpr,
             EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    """Raw inner products a_i · b_k of the BA×BB tile of rows offs_a (where in_a) × rows offs_b (where in_b):
    both sides loaded as rows × D-chunk tiles (64-bit offsets), multiplied in the compute dtype CD and
    accumulated over D-chunks of BD in ACC_T."""
    acc = tl.zeros((BA, BB), dtype=ACC_T)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        in_d = offs_d < D
        a = load_tile(a_ptr, offs_a, in_a, stride_a, offs_d, in_d, stride_ad)
        b = load_tile(b_ptr, offs_b, in_b, stride_b, offs_d, in_d, stride_bd)
        acc = tl.dot(dot_operand(a, CD, EMU_BF16), tl.trans(dot_operand(b, CD, EMU_BF16)), acc,
                     input_precision=PREC, out_dtype=ACC_T)
    return acc


@triton.jit
def tile_values(c, s_a, s_b, n_a, n_b, DIST: tl.constexpr, SYM: tl.constexpr):
    """(value, squared distance before the clamp) of a tile from its raw dots c and the per-row scales and
    squared norms; for DIST 0 both are the scaled inner product ``cs``. SYM: ``cs = c·(s_a s_b)``, rounded
    symmetrically in a and b (the pair engine: in self mode a tile and its transpose give the same values);
    otherwise ``cs = (c·s_a)·s_b`` (the class engine's rounding)."""
    if SYM:
        cs = c * (s_a[:, None] * s_b[None, :])
    else:
        cs = c * s_a[:, None] * s_b[None, :]
    if DIST == 0:
        return cs, cs
    dd = (n_a[:, None] + n_b[None, :]) - 2.0 * cs
    if DIST == 1:
        return tl.maximum(dd, 0.0), dd
    pos = dd > 0
    return tl.where(pos, tl.sqrt(tl.where(pos, dd, 1.0)), 0.0), dd


@triton.jit
def lse_init(N: tl.constexpr, CT: tl.constexpr, WITH_ONE: tl.constexpr):
    """(m, l) of an online LSE over N lanes (LSE = m + log l): empty (−inf, 0), or WITH_ONE holding the
    implicit zero term (0, 1), i.e. log(1 + Σ e^t), exactly 0 for an empty set."""
    if WITH_ONE:
        return tl.zeros((N,), CT), tl.full((N,), 1.0, CT)
    else:
        return tl.full((N,), float("-inf"), CT), tl.zeros((N,), CT)


@triton.jit
def lse_update(m, l, t, AXIS: tl.constexpr):
    """Merge a tile ``t`` into the running (m, l) of its lanes along AXIS (1: per row, 0: per column);
    entries outside the set hold −inf (an all −inf lane stays as it is)."""
    m_new = tl.maximum(m, tl.max(t, axis=AXIS))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l * tl.exp(m - safe) + tl.sum(tl.exp(t - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return m_new, l_new
