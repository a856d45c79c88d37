// The CUDA pair engine (device side, SPEC §4.7): CTA geometry, tiles of dot products, the stored / value /
// edge forms of a pair, label and packed-bit masks, the tile sweep every kernel is built on, and the per-row
// MultiSimilarity thresholds (mining). Loss- and miner-specific pieces are in epilogues.cuh; kernels, launches
// and op entry points in pair_ops.cu.
//
// Layout: a CTA of 256 threads (8 warps) owns BM = 32 rows; warp w holds rows 4w..4w+3 and lane l the
// column l of each 32 × 32 tile, whose dot products come from 32-wide shared-memory stages of both
// operands (padded by one to avoid bank conflicts). Reductions along a row are lane-local (online
// log-sum-exp per lane over the columns it sees) and merged once per row with warp shuffles, so a CTA
// writes only its own rows: deterministic, no atomics. Offsets are 64-bit.
//
// Roles: a sweep runs the CTA's rows of one side against every column tile of the other. The forward
// kernels and the miners sweep query rows against reference columns; the backward sweeps them both ways
// (pair_reduce_backward_kernel<T, TRANSPOSED>: the same sweep with the two sides swapped).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../dml_kernels.h"

namespace dml {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kTile = 32;  // BM = BN = BK
constexpr int kRowsPerWarp = 4;

template <typename T>
__device__ __forceinline__ T inf() {
  return std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------------------------ masks, values

// Masks: the shared struct of ../dml_kernels.h.

// Stored value: similarity → dot; euclidean → sqrt(raw) if raw > 0 else 0; squared euclidean → raw.
template <typename T>
__device__ __forceinline__ T stored_of(T dot, T na, T nb, int64_t dist) {
  if (dist == kSim) return dot;
  const T raw = (na + nb) - T(2) * dot;
  if (dist == kSqEuclid) return raw;
  return raw > T(0) ? sqrt(raw) : T(0);
}
template <typename T>
__device__ __forceinline__ T value_of(T stored, int64_t dist) {
  return dist == kSqEuclid ? (stored > T(0) ? stored : T(0)) : stored;
}
template <typename T>
__device__ __forceinline__ T edge_of(T w, T stored, int64_t dist) {
  if (dist == kSim) return w;
  if (dist == kSqEuclid) return stored >= T(0) ? T(-2) * w : T(0);
  return stored > T(0) ? -w / stored : T(0);
}

// MultiSimilarityMiner rule: a positive is kept against the row's hardest negative hn, a negative against
// its hardest positive hp.
template <typename T>
__device__ __forceinline__ bool keep_pos(int64_t dist, T eps, T v, T hn) {
  return dist == kSim ? (v - eps < hn) : (v + eps > hn);
}
template <typename T>
__device__ __forceinline__ bool keep_neg(int64_t dist, T eps, T v, T hp) {
  return dist == kSim ? (v + eps > hp) : (v - eps < hp);
}

// ------------------------------------------------------------------------------------ tiles

// The two shared-memory stages of a tile of dot products (one per operand).
template <typename T>
struct Stages {
  T a[kTile][kTile + 1];
  T b[kTile][kTile + 1];
};

// Dot products of rows [a0, a0+32) of A (na × d) with rows [b0, b0+32) of B (nb × d): thread (warp w,
// lane l) gets acc[j] = A[a0 + 4w + j] · B[b0 + l]. Rows past the end read as zero.
template <typename T>
__device__ __forceinline__ void tile_dots(const T* __restrict__ A, int64_t na, int64_t a0, const T* __restrict__ B,
                                          int64_t nb, int64_t b0, int64_t d, T (*sA)[kTile + 1],
                                          T (*sB)[kTile + 1], T (&acc)[kRowsPerWarp]) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) acc[j] = T(0);
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    for (int t = tid; t < kTile * kTile; t += kThreads) {
      const int row = t / kTile, c = t % kTile;
      const int64_t ga = a0 + row, gb = b0 + row, gc = d0 + c;
      sA[row][c] = (ga < na && gc < d) ? A[ga * d + gc] : T(0);
      sB[row][c] = (gb < nb && gc < d) ? B[gb * d + gc] : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTile; ++c) {
      const T b = sB[lane][c];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) acc[j] = fma(sA[warp * kRowsPerWarp + j][c], b, acc[j]);
    }
    __syncthreads();
  }
}

// Stage rows [i0, i0 + 32) × columns [d0, d0 + 32) of x (n × d, contiguous) into sA[r][c] (zero past the ends).
template <typename T>
__device__ __forceinline__ void stage_rows(const T* __restrict__ x, int64_t n, int64_t i0, int64_t d0, int64_t d,
                                           T (*sA)[kTile + 1]) {
  for (int t = threadIdx.x; t < kTile * kTile; t += kThreads) {
    const int r = t / kTile, c = t % kTile;
    sA[r][c] = (i0 + r < n && d0 + c < d) ? x[(i0 + r) * d + d0 + c] : T(0);
  }
}

// The backward's row update of every kernel: out[a0 + r, :] += E (32 × 32, shared: sE[r][k]) · B for the CTA's 32
// rows, B's 32 rows staged 32 columns at a time by stage(c0, sB) (sB[k][c] = B[k][c0 + c], zero past the ends).
// Every thread calls; the caller has made sE visible. The CTA owns rows a0 .. a0 + 31 of out: no race.
template <typename T, typename Stage>
__device__ __forceinline__ void add_edge_product(const T (*sE)[kTile + 1], T (*sB)[kTile + 1], Stage&& stage,
                                                 int64_t d, int64_t a0, int64_t nrows, T* __restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c0 = 0; c0 < d; c0 += kTile) {
    stage(c0, sB);
    __syncthreads();
    const int64_t gc = c0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int row = warp * kRowsPerWarp + j;
      T s = T(0);
#pragma unroll 8
      for (int kk = 0; kk < kTile; ++kk) s = fma(sE[row][kk], sB[kk][lane], s);
      const int64_t a = a0 + row;
      if (a < nrows && gc < d) out[a * d + gc] += s;
    }
    __syncthreads();
  }
}

// One side of the pair matrix: its rows x (n × d, contiguous) and their squared norms (read for distances
// only). The kernels take these pointers as __restrict__ parameters (read-only data path) and build the
// sides inside.
template <typename T>
struct Side {
  const T* x;
  const T* sq;
  int64_t n;
};

// A CTA's rows [a0, a0 + 32) of side a against the columns (rows) of side b, one 32-column tile at a time.
template <typename T>
struct Sweep {
  Side<T> a, b;
  int64_t d, dist, a0;
  Stages<T>* sm;

  // The tile of columns [b0, b0 + 32): pair(j, ia, ib, ok, st) for this warp's rows ia = a0 + 4w + j and the
  // lane's column ib = b0 + lane; ok = both in range, st = the stored value (0 when !ok). Every thread calls.
  template <typename Pair>
  __device__ __forceinline__ void tile(int64_t b0, Pair&& pair) const {
    const bool sim = dist == kSim;
    T acc[kRowsPerWarp];
    tile_dots(a.x, a.n, a0, b.x, b.n, b0, d, sm->a, sm->b, acc);
    const int64_t ib = b0 + threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t ia = row(j);
      const bool ok = ia < a.n && ib < b.n;
      T st = T(0);
      if (ok) st = stored_of(acc[j], sim ? T(0) : a.sq[ia], sim ? T(0) : b.sq[ib], dist);
      pair(j, ia, ib, ok, st);
    }
  }

  // Every column tile in order: tile(b0, pair), then tile_end(b0) (on every thread).
  template <typename Pair, typename TileEnd>
  __device__ __forceinline__ void run(Pair&& pair, TileEnd&& tile_end) const {
    for (int64_t b0 = 0; b0 < b.n; b0 += kTile) {
      tile(b0, pair);
      tile_end(b0);
    }
  }

  // run() over (query row i, reference column k) pairs with their masks and value: f(j, i, k, v, pos, neg);
  // pos = neg = false for a pair out of range. Every thread calls f (warp-wide votes are allowed in it).
  template <typename F>
  __device__ __forceinline__ void masked(const Masks& mk, F&& f) const {
    run(
        [&](int j, int64_t i, int64_t k, bool ok, T st) {
          bool pos = false, neg = false;
          if (ok) mk.get(i, k, pos, neg);
          f(j, i, k, value_of(st, dist), pos, neg);
        },
        [](int64_t) {});
  }

  // The row (of side a) that this warp holds as its j-th.
  __device__ __forceinline__ int64_t row(int j) const { return a0 + (threadIdx.x / 32) * kRowsPerWarp + j; }
};

// Per-row hardest positive hp and hardest negative hn over the masked pairs (similarity: min over the
// positives / max over the negatives; distance: max / min; ±inf for an empty set), merged over the warp so
// every lane holds its rows' values. Lane 0 writes them to thr (2 × n: hp row, then hn row) if thr is given.
template <typename T>
__device__ __forceinline__ void row_thresholds(const Sweep<T>& sw, const Masks& mk, T (&hp)[kRowsPerWarp],
                                               T (&hn)[kRowsPerWarp], T* __restrict__ thr) {
  const bool sim = sw.dist == kSim;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    hp[j] = sim ? inf<T>() : -inf<T>();
    hn[j] = -hp[j];
  }
  sw.masked(mk, [&](int j, int64_t, int64_t, T v, bool pos, bool neg) {
    if (pos) hp[j] = sim ? min(hp[j], v) : max(hp[j], v);
    if (neg) hn[j] = sim ? max(hn[j], v) : min(hn[j], v);
  });
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    hp[j] = sim ? warp_min(hp[j]) : warp_max(hp[j]);
    hn[j] = sim ? warp_max(hn[j]) : warp_min(hn[j]);
    const int64_t i = sw.row(j);
    if (thr != nullptr && lane == 0 && i < sw.a.n) {
      thr[i] = hp[j];
      thr[sw.a.n + i] = hn[j];
    }
  }
}

}  // namespace cuda
}  // namespace dml
