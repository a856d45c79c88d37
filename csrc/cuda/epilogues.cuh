// Loss- and miner-specific pieces of the CUDA kernels (device side), fed pair by pair by a sweep of
// pair_engine.cuh: the pair_reduce parameters and its lane-local online accumulators (forward), the
// per-pair gradient weight (backward, both roles), the MultiSimilarityMiner bits and the BatchHardMiner
// candidates. Conventions as in dml_kernels.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "pair_engine.cuh"

namespace dml {
namespace cuda {

template <typename T>
struct Params {
  int64_t dist, kind;
  T pa, pc, na, nc, eps;
  bool mine;
};

// ------------------------------------------------------------------------------------ pair_reduce fwd

// Lane-local online reduction state of one row (pos or neg set).
template <typename T>
struct Acc {
  T m, s;
  int64_t pairs, nonzero;
  // Every lane starts empty; the implicit zero term of kind 1 is added once, in finish().
  __device__ void init(int64_t kind) {
    m = kind == kHinge ? T(0) : -inf<T>();
    s = T(0);
    pairs = 0;
    nonzero = 0;
  }
  __device__ __forceinline__ void add(int64_t kind, T t) {
    ++pairs;
    if (kind == kHinge) {
      if (t > T(0)) { s += t; ++nonzero; }
      return;
    }
    ++nonzero;
    if (t > m) {
      s = (s == T(0) ? T(0) : s * exp(m - t)) + T(1);
      m = t;
    } else {
      s += exp(t - m);
    }
  }
  // The term a (v − c) of a pair (clamped at 0 for the hinge sum).
  __device__ __forceinline__ void add_pair(int64_t kind, T a, T c, T v) {
    const T t = a * (v - c);
    add(kind, kind == kHinge ? (t > T(0) ? t : T(0)) : t);
  }
  // Merge the 32 lanes; every lane returns the row's result.
  __device__ T finish(int64_t kind) {
    pairs = warp_sum(pairs);
    nonzero = warp_sum(nonzero);
    if (kind == kHinge) return warp_sum(s);
    T mm = warp_max(m);
    if (kind == kLse1) mm = max(mm, T(0));
    const T part = (s == T(0)) ? T(0) : s * exp(m - mm);
    T ss = warp_sum(part);
    if (kind == kLse1) ss += exp(-mm);
    if (ss == T(0)) return T(0);  // empty set (kind 0): PML's masked LSE gives 0
    return mm + log(ss);
  }
};

// ------------------------------------------------------------------------------------ pair_reduce bwd

// dL/dv of the pair (i, k) seen from query row i.
template <typename T>
struct RowGrad {
  Params<T> p;
  const T *gp, *gn, *rp, *rn, *hp, *hn;
  __device__ __forceinline__ T operator()(int64_t i, T v, bool pos, bool neg) const {
    if (p.mine) {
      pos = pos && keep_pos(p.dist, p.eps, v, hn[i]);
      neg = neg && keep_neg(p.dist, p.eps, v, hp[i]);
    }
    T w = T(0);
    if (pos) w += term(gp[i], p.pa, p.pc, rp[i], v);
    if (neg) w += term(gn[i], p.na, p.nc, rn[i], v);
    return w;
  }
  __device__ __forceinline__ T term(T g, T a, T c, T red, T v) const {
    if (g == T(0)) return T(0);
    const T t = a * (v - c);
    if (p.kind == kHinge) return t > T(0) ? g * a : T(0);
    return g * a * exp(t - red);
  }
  // dL/dv of the pair at (row a, column b) of a backward sweep.
  // TRANSPOSED = false: rows are queries, columns references. The weight is query a's, plus (self mode)
  //   query b's view of the pair (b, a).
  // TRANSPOSED = true: rows are references, columns queries. The weight is query b's.
  template <bool TRANSPOSED>
  __device__ __forceinline__ T weight(const Masks& mk, int64_t a, int64_t b, T v) const {
    bool pos, neg;
    if (TRANSPOSED) {
      mk.get(b, a, pos, neg);
      return (*this)(b, v, pos, neg);
    }
    mk.get(a, b, pos, neg);
    T w = (*this)(a, v, pos, neg);
    if (mk.self) {
      mk.get(b, a, pos, neg);
      w += (*this)(b, v, pos, neg);
    }
    return w;
  }
};

// ------------------------------------------------------------------------------------ miners

// MultiSimilarityMiner bits of the CTA's rows, given their thresholds: one __ballot_sync per row and 32
// references = 4 packed bytes (bit k%8 of byte k/8), written by lane 0.
template <typename T>
__device__ __forceinline__ void ms_bits(const Sweep<T>& sw, const Masks& mk, T eps, const T (&hp)[kRowsPerWarp],
                                        const T (&hn)[kRowsPerWarp], uint8_t* __restrict__ pbits,
                                        uint8_t* __restrict__ nbits) {
  const int64_t n = sw.a.n, nbytes = (sw.b.n + 7) / 8;
  sw.masked(mk, [&](int j, int64_t i, int64_t k, T v, bool pos, bool neg) {
    const bool kp = pos && keep_pos(sw.dist, eps, v, hn[j]), kn = neg && keep_neg(sw.dist, eps, v, hp[j]);
    const unsigned bp = __ballot_sync(0xffffffffu, kp), bn = __ballot_sync(0xffffffffu, kn);
    if (threadIdx.x % 32 == 0 && i < n) {  // lane 0: k is the tile's first column
      for (int b = 0; b < 4; ++b) {
        const int64_t byte = (k >> 3) + b;
        if (byte < nbytes) {
          pbits[i * nbytes + byte] = static_cast<uint8_t>((bp >> (8 * b)) & 0xffu);
          nbits[i * nbytes + byte] = static_cast<uint8_t>((bn >> (8 * b)) & 0xffu);
        }
      }
    }
  });
}

// BatchHardMiner candidates of one row, lane-local: the best (score, index) over the columns a lane sees.
// Score = v for a distance, −v for a similarity: hardest positive = largest score, hardest negative =
// smallest; ties go to the lowest index.
template <typename T>
struct BatchHard {
  T hp, hn;
  int64_t ip, in;
  __device__ __forceinline__ void init(bool sim) {
    hp = sim ? inf<T>() : -inf<T>();
    hn = -hp;
    ip = -1;
    in = -1;
  }
  __device__ __forceinline__ void add(bool sim, int64_t k, T v, bool pos, bool neg) {
    const T sc = sim ? -v : v;
    if (pos && (ip < 0 || sc > hp)) { hp = sc; ip = k; }
    if (neg && (in < 0 || sc < hn)) { hn = sc; in = k; }
  }
  // Merge the 32 lanes with shuffles; rows lacking a positive or a negative get −1 for both.
  __device__ __forceinline__ void finish(int64_t& pidx, int64_t& nidx) {
    for (int o = 16; o > 0; o >>= 1) {
      const T sp = __shfl_xor_sync(0xffffffffu, hp, o), sn = __shfl_xor_sync(0xffffffffu, hn, o);
      const int64_t jp = __shfl_xor_sync(0xffffffffu, ip, o), jn = __shfl_xor_sync(0xffffffffu, in, o);
      if (jp >= 0 && (ip < 0 || sp > hp || (sp == hp && jp < ip))) { hp = sp; ip = jp; }
      if (jn >= 0 && (in < 0 || sn < hn || (sn == hn && jn < in))) { hn = sn; in = jn; }
    }
    const bool valid = ip >= 0 && in >= 0;
    pidx = valid ? ip : -1;
    nidx = valid ? in : -1;
  }
};

}  // namespace cuda
}  // namespace dml
