// CUDA kernels of the dml_kernels extension (SPEC §4.7): pair_values and pair_reduce (forward and
// backward, fused MultiSimilarity mining), fp32 / fp64 with FMA (fp16/bf16 inputs are upcast by the
// caller and accumulate in fp32).
//
// Layout: a CTA of 256 threads (8 warps) owns BM = 32 rows; warp w holds rows 4w..4w+3 and lane l the
// column l of each 32 × 32 tile, whose dot products come from 32-wide shared-memory stages of both
// operands (padded by one to avoid bank conflicts). Reductions along a row are lane-local (online
// log-sum-exp per lane over the columns it sees) and merged once per row with warp shuffles, so a CTA
// writes only its own rows: deterministic, no atomics. Offsets are 64-bit. Every launch is checked
// and nothing syncs with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../dml_kernels.h"
#include "../values_backward.h"

namespace dml {
namespace cuda {
namespace {

using at::Tensor;

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

// ------------------------------------------------------------------------------------ shared pieces

struct Masks {
  const int64_t* lab;
  const int64_t* rlab;
  const uint8_t* pb;
  const uint8_t* nb;
  int64_t nbytes;
  bool self;
  const bool* cm;  // optional column mask: references outside it are in neither set

  __device__ __forceinline__ void get(int64_t i, int64_t k, bool& pos, bool& neg) const {
    if (cm != nullptr && !cm[k]) {
      pos = neg = false;
      return;
    }
    if (pb != nullptr) {
      const int64_t byte = i * nbytes + (k >> 3);
      const int bit = static_cast<int>(k & 7);
      pos = (pb[byte] >> bit) & 1;
      neg = (nb[byte] >> bit) & 1;
    } else {
      const bool same = lab[i] == rlab[k];
      pos = same && !(self && i == k);
      neg = !same;
    }
  }
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

template <typename T>
struct Params {
  int64_t dist, kind;
  T pa, pc, na, nc, eps;
  bool mine;
};

template <typename T>
__device__ __forceinline__ bool keep_pos(const Params<T>& p, T v, T hn) {
  return p.dist == kSim ? (v - p.eps < hn) : (v + p.eps > hn);
}
template <typename T>
__device__ __forceinline__ bool keep_neg(const Params<T>& p, T v, T hp) {
  return p.dist == kSim ? (v + p.eps > hp) : (v - p.eps < hp);
}

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

// ------------------------------------------------------------------------------------ pair_values

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_values_kernel(const T* __restrict__ q, const T* __restrict__ r,
                                                               const T* __restrict__ qn, const T* __restrict__ rn,
                                                               T* __restrict__ out, int64_t n, int64_t m, int64_t d,
                                                               int64_t dist) {
  __shared__ T sA[kTile][kTile + 1];
  __shared__ T sB[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  T acc[kRowsPerWarp];
  tile_dots(q, n, i0, r, m, k0, d, sA, sB, acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k = k0 + lane;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t i = i0 + warp * kRowsPerWarp + j;
    if (i < n && k < m) {
      const T st = stored_of(acc[j], dist == kSim ? T(0) : qn[i], dist == kSim ? T(0) : rn[k], dist);
      out[i * m + k] = value_of(st, dist);
    }
  }
}

void check_inputs(const Tensor& q, const c10::optional<Tensor>& r, int64_t dist) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 2, "dml_kernels: q must be a 2-D CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dml_kernels: the CUDA kernels take float32 or float64 (the caller upcasts fp16/bf16), got ",
              q.scalar_type());
  if (r.has_value()) {
    TORCH_CHECK(r->device() == q.device() && r->scalar_type() == q.scalar_type() && r->dim() == 2 &&
                    r->size(1) == q.size(1),
                "dml_kernels: r must be M×", q.size(1), " on q's device with q's dtype");
  }
  TORCH_CHECK(dist == kSim || dist == kEuclid || dist == kSqEuclid, "dml_kernels: bad dist code ", dist);
}

Tensor sq_norms(const Tensor& x) { return (x * x).sum(1).contiguous(); }

unsigned int blocks_for(int64_t rows) {
  const int64_t b = (rows + kTile - 1) / kTile;
  TORCH_CHECK(b < (int64_t(1) << 31), "dml_kernels: too many rows");
  return static_cast<unsigned int>(std::max<int64_t>(b, 1));
}

Tensor pair_values_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const int64_t n = q.size(0), m = r.size(0), d = q.size(1);
  Tensor out = at::empty({n, m}, q.options());
  if (n == 0 || m == 0) return out;
  Tensor qn = sq_norms(q), rn = r_.has_value() ? sq_norms(r) : qn;
  const dim3 grid(blocks_for(m), blocks_for(n));
  TORCH_CHECK(grid.y <= 65535, "dml_kernels: pair_values supports at most ", 65535 * kTile, " query rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_values_cuda", [&] {
    pair_values_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), qn.data_ptr<scalar_t>(), rn.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), n, m, d, dist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> pair_values_backward_cuda(const Tensor& grad, const Tensor& values, const Tensor& q,
                                                     const c10::optional<Tensor>& r, int64_t dist) {
  check_inputs(q, r, dist);
  const c10::cuda::CUDAGuard guard(q.device());
  return values_backward(grad, values, q, r, dist);
}

// ------------------------------------------------------------------------------------ pair_reduce fwd

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_reduce_kernel(
    const T* __restrict__ q, const T* __restrict__ r, const T* __restrict__ qn, const T* __restrict__ rn, Masks mk,
    Params<T> p, int64_t n, int64_t m, int64_t d, T* __restrict__ red_pos, T* __restrict__ red_neg,
    T* __restrict__ thr, int64_t* __restrict__ cnt) {
  __shared__ T sA[kTile][kTile + 1];
  __shared__ T sB[kTile][kTile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool sim = p.dist == kSim;
  T hp[kRowsPerWarp], hn[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    hp[j] = sim ? inf<T>() : -inf<T>();
    hn[j] = -hp[j];
  }
  // Pass 1 (mining): per-row hardest positive / hardest negative values.
  if (p.mine) {
    for (int64_t k0 = 0; k0 < m; k0 += kTile) {
      tile_dots(q, n, i0, r, m, k0, d, sA, sB, acc);
      const int64_t k = k0 + lane;
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const int64_t i = i0 + warp * kRowsPerWarp + j;
        if (i >= n || k >= m) continue;
        bool pos, neg;
        mk.get(i, k, pos, neg);
        const T v = value_of(stored_of(acc[j], sim ? T(0) : qn[i], sim ? T(0) : rn[k], p.dist), p.dist);
        if (pos) hp[j] = sim ? min(hp[j], v) : max(hp[j], v);
        if (neg) hn[j] = sim ? max(hn[j], v) : min(hn[j], v);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      hp[j] = sim ? warp_min(hp[j]) : warp_max(hp[j]);
      hn[j] = sim ? warp_max(hn[j]) : warp_min(hn[j]);
      const int64_t i = i0 + warp * kRowsPerWarp + j;
      if (lane == 0 && i < n) {
        thr[i] = hp[j];
        thr[n + i] = hn[j];
      }
    }
  }
  // Pass 2: the two reductions over the (kept) pairs.
  Acc<T> ap[kRowsPerWarp], an[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    ap[j].init(p.kind);
    an[j].init(p.kind);
  }
  for (int64_t k0 = 0; k0 < m; k0 += kTile) {
    tile_dots(q, n, i0, r, m, k0, d, sA, sB, acc);
    const int64_t k = k0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t i = i0 + warp * kRowsPerWarp + j;
      if (i >= n || k >= m) continue;
      bool pos, neg;
      mk.get(i, k, pos, neg);
      const T v = value_of(stored_of(acc[j], sim ? T(0) : qn[i], sim ? T(0) : rn[k], p.dist), p.dist);
      if (p.mine) {
        pos = pos && keep_pos(p, v, hn[j]);
        neg = neg && keep_neg(p, v, hp[j]);
      }
      if (pos) {
        const T t = p.pa * (v - p.pc);
        ap[j].add(p.kind, p.kind == kHinge ? (t > T(0) ? t : T(0)) : t);
      }
      if (neg) {
        const T t = p.na * (v - p.nc);
        an[j].add(p.kind, p.kind == kHinge ? (t > T(0) ? t : T(0)) : t);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const T rp = ap[j].finish(p.kind), rn_ = an[j].finish(p.kind);
    const int64_t i = i0 + warp * kRowsPerWarp + j;
    if (lane == 0 && i < n) {
      red_pos[i] = rp;
      red_neg[i] = rn_;
      cnt[i] = ap[j].pairs;
      cnt[n + i] = an[j].pairs;
      cnt[2 * n + i] = ap[j].nonzero;
      cnt[3 * n + i] = an[j].nonzero;
    }
  }
}

struct MaskHolder {
  Masks mk;
  Tensor keep[3];
};

void set_col_mask(MaskHolder& h, const Tensor& q, int64_t m, const c10::optional<Tensor>& col_mask) {
  if (!col_mask.has_value()) return;
  TORCH_CHECK(col_mask->scalar_type() == at::kBool && col_mask->dim() == 1 && col_mask->size(0) == m &&
                  col_mask->device() == q.device(),
              "dml_kernels: col_mask must be a bool tensor of shape (", m, ") on q's device");
  h.keep[2] = col_mask->contiguous();
  h.mk.cm = h.keep[2].data_ptr<bool>();
}

MaskHolder make_masks(const Tensor& q, int64_t n, int64_t m, bool self, const c10::optional<Tensor>& labels,
                      const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
                      const c10::optional<Tensor>& neg_bits) {
  MaskHolder h;
  h.mk = Masks{nullptr, nullptr, nullptr, nullptr, 0, self, nullptr};
  if (pos_bits.has_value() || neg_bits.has_value()) {
    TORCH_CHECK(pos_bits.has_value() && neg_bits.has_value(), "dml_kernels: pos_bits and neg_bits go together");
    const int64_t nbytes = (m + 7) / 8;
    for (const auto* t : {&*pos_bits, &*neg_bits}) {
      TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 2 && t->size(0) == n && t->size(1) == nbytes &&
                      t->device() == q.device(),
                  "dml_kernels: packed pair bits must be uint8 of shape (", n, ", ", nbytes, ") on q's device");
    }
    h.keep[0] = pos_bits->contiguous();
    h.keep[1] = neg_bits->contiguous();
    h.mk.pb = h.keep[0].data_ptr<uint8_t>();
    h.mk.nb = h.keep[1].data_ptr<uint8_t>();
    h.mk.nbytes = nbytes;
    return h;
  }
  TORCH_CHECK(labels.has_value(), "dml_kernels: labels or packed pair bits are required");
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == n &&
                  labels->device() == q.device(),
              "dml_kernels: labels must be int64 of shape (", n, ") on q's device");
  h.keep[0] = labels->contiguous();
  h.mk.lab = h.keep[0].data_ptr<int64_t>();
  if (self) {
    h.mk.rlab = h.mk.lab;
  } else {
    TORCH_CHECK(ref_labels.has_value() && ref_labels->scalar_type() == at::kLong && ref_labels->dim() == 1 &&
                    ref_labels->size(0) == m && ref_labels->device() == q.device(),
                "dml_kernels: ref_labels must be int64 of shape (", m, ") on q's device");
    h.keep[1] = ref_labels->contiguous();
    h.mk.rlab = h.keep[1].data_ptr<int64_t>();
  }
  return h;
}

template <typename T>
Params<T> make_params(int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
                      c10::optional<double> eps) {
  TORCH_CHECK(kind == kLse || kind == kLse1 || kind == kHinge, "dml_kernels: bad reduce kind ", kind);
  return Params<T>{dist, kind, T(pa), T(pc), T(na), T(nc), T(eps.has_value() ? *eps : 0.0), eps.has_value()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_reduce_cuda(
    const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
    c10::optional<double> eps, const c10::optional<Tensor>& col_mask) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const int64_t n = q.size(0), m = r.size(0), d = q.size(1);
  MaskHolder h = make_masks(q, n, m, !r_.has_value(), labels, ref_labels, pos_bits, neg_bits);
  set_col_mask(h, q, m, col_mask);
  Tensor red_pos = at::empty({n}, q.options()), red_neg = at::empty({n}, q.options());
  Tensor thr = at::zeros({2, n}, q.options());
  Tensor cnt = at::empty({4, n}, q.options().dtype(at::kLong));
  if (n == 0) return {red_pos, red_neg, thr, cnt};
  Tensor qn = sq_norms(q), rn = r_.has_value() ? sq_norms(r) : qn;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_reduce_cuda", [&] {
    pair_reduce_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), qn.data_ptr<scalar_t>(), rn.data_ptr<scalar_t>(), h.mk,
        make_params<scalar_t>(dist, kind, pa, pc, na, nc, eps), n, m, d, red_pos.data_ptr<scalar_t>(),
        red_neg.data_ptr<scalar_t>(), thr.data_ptr<scalar_t>(), cnt.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {red_pos, red_neg, thr, cnt};
}

// ------------------------------------------------------------------------------------ pair_reduce bwd

// dL/dv of the pair (i, k) seen from query row i.
template <typename T>
struct RowGrad {
  Params<T> p;
  const T *gp, *gn, *rp, *rn, *hp, *hn;
  __device__ __forceinline__ T operator()(int64_t i, T v, bool pos, bool neg) const {
    if (p.mine) {
      pos = pos && keep_pos(p, v, hn[i]);
      neg = neg && keep_neg(p, v, hp[i]);
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
};

// TRANSPOSED = false: rows are queries (q, qn), columns references; writes dq for its 32 rows.
//   The weight of (row i, column k) is row i's, plus (self mode) row k's view of the pair (k, i).
// TRANSPOSED = true: rows are references (r, rn), columns queries; writes dr for its 32 rows.
//   The weight of (row k, column i) is query row i's.
template <typename T, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) pair_reduce_backward_kernel(
    const T* __restrict__ rows, const T* __restrict__ rows_n, int64_t nrows, const T* __restrict__ cols,
    const T* __restrict__ cols_n, int64_t ncols, int64_t d, Masks mk, RowGrad<T> rg, T* __restrict__ out) {
  __shared__ T sA[kTile][kTile + 1];
  __shared__ T sB[kTile][kTile + 1];
  __shared__ T sE[kTile][kTile + 1];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t dist = rg.p.dist;
  const bool sim = dist == kSim;
  T rowsum[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) rowsum[j] = T(0);
  for (int64_t b0 = 0; b0 < ncols; b0 += kTile) {
    tile_dots(rows, nrows, a0, cols, ncols, b0, d, sA, sB, acc);
    const int64_t b = b0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t a = a0 + warp * kRowsPerWarp + j;
      T e = T(0);
      if (a < nrows && b < ncols) {
        const T st = stored_of(acc[j], sim ? T(0) : rows_n[a], sim ? T(0) : cols_n[b], dist);
        const T v = value_of(st, dist);
        bool pos, neg;
        T w;
        if (!TRANSPOSED) {
          mk.get(a, b, pos, neg);
          w = rg(a, v, pos, neg);
          if (mk.self) {
            mk.get(b, a, pos, neg);
            w += rg(b, v, pos, neg);
          }
        } else {
          mk.get(b, a, pos, neg);
          w = rg(b, v, pos, neg);
        }
        e = edge_of(w, st, dist);
      }
      sE[warp * kRowsPerWarp + j][lane] = e;
      rowsum[j] += e;
    }
    __syncthreads();
    // out[a0 + row, :] += E (32 × 32) @ cols[b0 : b0 + 32, :], 32 embedding columns at a time.
    for (int64_t c0 = 0; c0 < d; c0 += kTile) {
      for (int t = tid; t < kTile * kTile; t += kThreads) {
        const int kk = t / kTile, c = t % kTile;
        const int64_t gb = b0 + kk, gc = c0 + c;
        sB[kk][c] = (gb < ncols && gc < d) ? cols[gb * d + gc] : T(0);
      }
      __syncthreads();
      const int64_t gc = c0 + lane;
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const int row = warp * kRowsPerWarp + j;
        T s = T(0);
#pragma unroll 8
        for (int kk = 0; kk < kTile; ++kk) s = fma(sE[row][kk], sB[kk][lane], s);
        const int64_t a = a0 + row;
        if (a < nrows && gc < d) out[a * d + gc] += s;  // this CTA owns row a: no race
      }
      __syncthreads();
    }
  }
  if (!sim) {
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const T total = warp_sum(rowsum[j]);
      const int64_t a = a0 + warp * kRowsPerWarp + j;
      if (a < nrows) {
        for (int64_t c = lane; c < d; c += 32) out[a * d + c] -= total * rows[a * d + c];
      }
    }
  }
}

std::tuple<Tensor, Tensor> pair_reduce_backward_cuda(
    const Tensor& grad_pos, const Tensor& grad_neg, const Tensor& q_, const c10::optional<Tensor>& r_,
    const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
    const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind,
    double pa, double pc, double na, double nc, c10::optional<double> eps, const Tensor& red_pos,
    const Tensor& red_neg, const Tensor& thr, const c10::optional<Tensor>& col_mask, bool need_r) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const bool self = !r_.has_value();
  const int64_t n = q.size(0), m = r.size(0), d = q.size(1);
  MaskHolder h = make_masks(q, n, m, self, labels, ref_labels, pos_bits, neg_bits);
  set_col_mask(h, q, m, col_mask);
  for (const Tensor* t : {&grad_pos, &grad_neg, &red_pos, &red_neg})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == q.device(),
                "dml_kernels: per-row statistics must have shape (", n, ") on q's device");
  TORCH_CHECK(thr.dim() == 2 && thr.size(0) == 2 && thr.size(1) == n && thr.device() == q.device(),
              "dml_kernels: thresholds must be 2×", n);
  const auto st = q.scalar_type();
  Tensor gp = grad_pos.to(st).contiguous(), gn = grad_neg.to(st).contiguous();
  Tensor rp = red_pos.to(st).contiguous(), rnn = red_neg.to(st).contiguous(), th = thr.to(st).contiguous();
  Tensor dq = at::zeros({n, d}, q.options());
  need_r = need_r && !self;  // a detached reference set (memory bank) gets no gradient pass
  Tensor dr = need_r ? at::zeros({m, d}, q.options()) : at::empty({0, d}, q.options());
  if (n == 0 || m == 0) return {dq, dr};
  Tensor qn = sq_norms(q), rn = self ? qn : sq_norms(r);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "pair_reduce_backward_cuda", [&] {
    using T = scalar_t;
    RowGrad<T> rg{make_params<T>(dist, kind, pa, pc, na, nc, eps), gp.data_ptr<T>(), gn.data_ptr<T>(),
                  rp.data_ptr<T>(), rnn.data_ptr<T>(), th.data_ptr<T>(), th.data_ptr<T>() + n};
    pair_reduce_backward_kernel<T, false><<<blocks_for(n), kThreads, 0, stream>>>(
        q.data_ptr<T>(), qn.data_ptr<T>(), n, r.data_ptr<T>(), rn.data_ptr<T>(), m, d, h.mk, rg, dq.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_r) {
      pair_reduce_backward_kernel<T, true><<<blocks_for(m), kThreads, 0, stream>>>(
          r.data_ptr<T>(), rn.data_ptr<T>(), m, q.data_ptr<T>(), qn.data_ptr<T>(), n, d, h.mk, rg,
          dr.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dr};
}

// ------------------------------------------------------------------------------------ miners

// MODE 0: thresholds (hardest positive / negative value per row) into thr (2 × n).
// MODE 1: MultiSimilarityMiner bits: pass 1 = thresholds, pass 2 = one __ballot_sync per row and 32
//         references = 4 packed bytes (bit k%8 of byte k/8), written by lane 0.
// MODE 2: BatchHardMiner indices: per lane the best (score, index) over the columns it sees, merged with
//         shuffles; ties go to the lowest index; rows lacking a positive or a negative get −1 for both.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) miner_kernel(const T* __restrict__ q, const T* __restrict__ r,
                                                         const T* __restrict__ qn, const T* __restrict__ rn, Masks mk,
                                                         int64_t dist, T eps, int64_t n, int64_t m, int64_t d,
                                                         T* __restrict__ thr, uint8_t* __restrict__ pbits,
                                                         uint8_t* __restrict__ nbits, int64_t* __restrict__ pidx,
                                                         int64_t* __restrict__ nidx) {
  __shared__ T sA[kTile][kTile + 1];
  __shared__ T sB[kTile][kTile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool sim = dist == kSim;
  T acc[kRowsPerWarp], hp[kRowsPerWarp], hn[kRowsPerWarp];
  int64_t ip[kRowsPerWarp], in[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    hp[j] = sim ? inf<T>() : -inf<T>();
    hn[j] = -hp[j];
    ip[j] = -1;
    in[j] = -1;
  }
  // Pass 1: thresholds (MODE 0, 1) or batch-hard candidates (MODE 2). Batch-hard score = v for a
  // distance, −v for a similarity: hardest positive = largest score, hardest negative = smallest.
  for (int64_t k0 = 0; k0 < m; k0 += kTile) {
    tile_dots(q, n, i0, r, m, k0, d, sA, sB, acc);
    const int64_t k = k0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t i = i0 + warp * kRowsPerWarp + j;
      if (i >= n || k >= m) continue;
      bool pos, neg;
      mk.get(i, k, pos, neg);
      const T v = value_of(stored_of(acc[j], sim ? T(0) : qn[i], sim ? T(0) : rn[k], dist), dist);
      if (MODE == 2) {
        const T sc = sim ? -v : v;
        if (pos && (ip[j] < 0 || sc > hp[j])) { hp[j] = sc; ip[j] = k; }
        if (neg && (in[j] < 0 || sc < hn[j])) { hn[j] = sc; in[j] = k; }
      } else {
        if (pos) hp[j] = sim ? min(hp[j], v) : max(hp[j], v);
        if (neg) hn[j] = sim ? max(hn[j], v) : min(hn[j], v);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t i = i0 + warp * kRowsPerWarp + j;
    if (MODE == 2) {
      for (int o = 16; o > 0; o >>= 1) {
        const T sp = __shfl_xor_sync(0xffffffffu, hp[j], o), sn = __shfl_xor_sync(0xffffffffu, hn[j], o);
        const int64_t jp = __shfl_xor_sync(0xffffffffu, ip[j], o), jn = __shfl_xor_sync(0xffffffffu, in[j], o);
        if (jp >= 0 && (ip[j] < 0 || sp > hp[j] || (sp == hp[j] && jp < ip[j]))) { hp[j] = sp; ip[j] = jp; }
        if (jn >= 0 && (in[j] < 0 || sn < hn[j] || (sn == hn[j] && jn < in[j]))) { hn[j] = sn; in[j] = jn; }
      }
      if (lane == 0 && i < n) {
        const bool valid = ip[j] >= 0 && in[j] >= 0;
        pidx[i] = valid ? ip[j] : -1;
        nidx[i] = valid ? in[j] : -1;
      }
    } else {
      hp[j] = sim ? warp_min(hp[j]) : warp_max(hp[j]);
      hn[j] = sim ? warp_max(hn[j]) : warp_min(hn[j]);
      if (MODE == 0 && lane == 0 && i < n) {
        thr[i] = hp[j];
        thr[n + i] = hn[j];
      }
    }
  }
  if (MODE != 1) return;
  // Pass 2 (mask): the kept pairs, 32 references = 4 bytes per ballot.
  const int64_t nbytes = (m + 7) / 8;
  for (int64_t k0 = 0; k0 < m; k0 += kTile) {
    tile_dots(q, n, i0, r, m, k0, d, sA, sB, acc);
    const int64_t k = k0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t i = i0 + warp * kRowsPerWarp + j;
      bool kp = false, kn = false;
      if (i < n && k < m) {
        bool pos, neg;
        mk.get(i, k, pos, neg);
        const T v = value_of(stored_of(acc[j], sim ? T(0) : qn[i], sim ? T(0) : rn[k], dist), dist);
        kp = pos && (sim ? (v - eps < hn[j]) : (v + eps > hn[j]));
        kn = neg && (sim ? (v + eps > hp[j]) : (v - eps < hp[j]));
      }
      const unsigned bp = __ballot_sync(0xffffffffu, kp), bn = __ballot_sync(0xffffffffu, kn);
      if (lane == 0 && i < n) {
        for (int b = 0; b < 4; ++b) {
          const int64_t byte = (k0 >> 3) + b;
          if (byte < nbytes) {
            pbits[i * nbytes + byte] = static_cast<uint8_t>((bp >> (8 * b)) & 0xffu);
            nbits[i * nbytes + byte] = static_cast<uint8_t>((bn >> (8 * b)) & 0xffu);
          }
        }
      }
    }
  }
}

template <int MODE>
void launch_miner(const Tensor& q, const Tensor& r, const Tensor& qn, const Tensor& rn, const Masks& mk, int64_t dist,
                  double eps, Tensor* thr, Tensor* pb, Tensor* nb, Tensor* pi, Tensor* ni) {
  const int64_t n = q.size(0), m = r.size(0), d = q.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dml_miner_cuda", [&] {
    using T = scalar_t;
    miner_kernel<T, MODE><<<blocks_for(n), kThreads, 0, stream>>>(
        q.data_ptr<T>(), r.data_ptr<T>(), qn.data_ptr<T>(), rn.data_ptr<T>(), mk, dist, T(eps), n, m, d,
        thr ? thr->data_ptr<T>() : nullptr, pb ? pb->data_ptr<uint8_t>() : nullptr,
        nb ? nb->data_ptr<uint8_t>() : nullptr, pi ? pi->data_ptr<int64_t>() : nullptr,
        ni ? ni->data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> ms_thresholds_cuda(const Tensor& q_, const c10::optional<Tensor>& r_,
                                              const c10::optional<Tensor>& labels,
                                              const c10::optional<Tensor>& ref_labels,
                                              const c10::optional<Tensor>& pos_bits,
                                              const c10::optional<Tensor>& neg_bits, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const int64_t n = q.size(0), m = r.size(0);
  MaskHolder h = make_masks(q, n, m, !r_.has_value(), labels, ref_labels, pos_bits, neg_bits);
  Tensor thr = at::empty({2, n}, q.options());
  if (n > 0) {
    Tensor qn = sq_norms(q), rn = r_.has_value() ? sq_norms(r) : qn;
    launch_miner<0>(q, r, qn, rn, h.mk, dist, 0.0, &thr, nullptr, nullptr, nullptr, nullptr);
  }
  return {thr.select(0, 0).clone(), thr.select(0, 1).clone()};
}

std::tuple<Tensor, Tensor> ms_mask_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                        const c10::optional<Tensor>& ref_labels, int64_t dist, double eps) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const int64_t n = q.size(0), m = r.size(0);
  MaskHolder h = make_masks(q, n, m, !r_.has_value(), labels, ref_labels, c10::nullopt, c10::nullopt);
  Tensor pb = at::zeros({n, (m + 7) / 8}, q.options().dtype(at::kByte)), nb = at::zeros_like(pb);
  if (n > 0 && m > 0) {
    Tensor qn = sq_norms(q), rn = r_.has_value() ? sq_norms(r) : qn;
    launch_miner<1>(q, r, qn, rn, h.mk, dist, eps, nullptr, &pb, &nb, nullptr, nullptr);
  }
  return {pb, nb};
}

std::tuple<Tensor, Tensor> batch_hard_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                           const c10::optional<Tensor>& ref_labels, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), r = r_.has_value() ? r_->contiguous() : q;
  const int64_t n = q.size(0), m = r.size(0);
  MaskHolder h = make_masks(q, n, m, !r_.has_value(), labels, ref_labels, c10::nullopt, c10::nullopt);
  Tensor pi = at::empty({n}, q.options().dtype(at::kLong)), ni = at::empty({n}, q.options().dtype(at::kLong));
  if (n > 0) {
    Tensor qn = sq_norms(q), rn = r_.has_value() ? sq_norms(r) : qn;
    launch_miner<2>(q, r, qn, rn, h.mk, dist, 0.0, nullptr, nullptr, nullptr, &pi, &ni);
  }
  return {pi, ni};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CUDA, m) {
  m.impl("pair_values", &pair_values_cuda);
  m.impl("pair_values_backward", &pair_values_backward_cuda);
  m.impl("pair_reduce", &pair_reduce_cuda);
  m.impl("pair_reduce_backward", &pair_reduce_backward_cuda);
  m.impl("ms_thresholds", &ms_thresholds_cuda);
  m.impl("ms_mask", &ms_mask_cuda);
  m.impl("batch_hard", &batch_hard_cuda);
}

}  // namespace cuda
}  // namespace dml
