// CUDA implementation of pair_terms / pair_terms_backward (schemas in ../registration.cpp, per-pair math in
// ../pair_terms.h, shared with the CPU driver cpu/pair_terms_ops.cpp), on the sweep of pair_engine.cuh:
// * forward: a CTA owns 32 query rows; each lane reduces the pair terms of the columns it sees (a sum or an
//   online log-sum-exp per row and set, with pair / active-term counts), merged once per row by warp shuffles;
// * backward: one kernel, two roles (as pair_reduce_backward_kernel): TRANSPOSED = false, rows = queries
//   (dq, plus dL/d row_stats of the CTA's rows, lane-local then shuffled), TRANSPOSED = true, rows =
//   references (dr). Each CTA writes only its own rows: deterministic, no atomics, no host sync.
// fp32 / fp64 (the caller upcasts fp16 / bf16).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../dml_kernels.h"
#include "../pair_terms.h"
#include "pair_engine.cuh"

namespace dml {
namespace cuda {
namespace {

using at::Tensor;

// Lane-local reduction of one row's set: a sum, or an online log-sum-exp (m, s = Σ e^{t − m}).
template <typename T>
struct TermAcc {
  T m, s;
  int64_t pairs, active;
  __device__ __forceinline__ void init() {
    m = -inf<T>();
    s = T(0);
    pairs = 0;
    active = 0;
  }
  __device__ __forceinline__ void add(bool lse, const Term<T>& t) {
    ++pairs;
    active += t.active ? 1 : 0;
    if (!lse) {
      s += t.val;
    } else if (t.val > m) {
      s = (s == T(0) ? T(0) : s * exp(m - t.val)) + T(1);
      m = t.val;
    } else {
      s += exp(t.val - m);
    }
  }
  // Merge the 32 lanes; every lane returns the row's result (0 for an empty log-sum-exp).
  __device__ __forceinline__ T finish(bool lse) {
    pairs = warp_sum(pairs);
    active = warp_sum(active);
    if (!lse) return warp_sum(s);
    const T mm = warp_max(m);
    const T ss = warp_sum(s == T(0) ? T(0) : s * exp(m - mm));
    return ss == T(0) ? T(0) : mm + log(ss);
  }
};

template <typename T>
__device__ __forceinline__ void load_stats(const T* __restrict__ stats, int64_t n, int ns, int64_t i,
                                           T (&s)[kTermStats]) {
#pragma unroll
  for (int t = 0; t < kTermStats; ++t) s[t] = (t < ns && i < n) ? stats[t * n + i] : T(0);
}

// Per query row: sums (2 × n: the reduced positive and negative terms) and cnt (4 × n: pairs and active terms
// of each set).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_terms_kernel(const T* __restrict__ q, const T* __restrict__ qn, int64_t n, const T* __restrict__ r,
                      const T* __restrict__ rn, int64_t m, int64_t d, int64_t dist, Masks mk, TermParams<T> tp,
                      const T* __restrict__ stats, T* __restrict__ sums, int64_t* __restrict__ cnt) {
  __shared__ Stages<T> sm;
  const Sweep<T> sw{{q, qn, n}, {r, rn, m}, d, dist, static_cast<int64_t>(blockIdx.x) * kTile, &sm};
  const bool lse = term_lse(tp.loss);
  const int ns = term_stats(tp.loss);
  T s[kRowsPerWarp][kTermStats];
  TermAcc<T> ap[kRowsPerWarp], an[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    load_stats(stats, n, ns, sw.row(j), s[j]);
    ap[j].init();
    an[j].init();
  }
  sw.masked(mk, [&](int j, int64_t, int64_t, T v, bool pos, bool neg) {
    if (pos) ap[j].add(lse, pair_term(tp, true, v, s[j]));
    if (neg) an[j].add(lse, pair_term(tp, false, v, s[j]));
  });
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const T rp = ap[j].finish(lse), rq = an[j].finish(lse);
    const int64_t i = sw.row(j);
    if (threadIdx.x % 32 == 0 && i < n) {
      sums[i] = rp;
      sums[n + i] = rq;
      cnt[i] = ap[j].pairs;
      cnt[n + i] = an[j].pairs;
      cnt[2 * n + i] = ap[j].active;
      cnt[3 * n + i] = an[j].active;
    }
  }
}

// dL/dv of a pair from the query rows' statistics, upstream gradients g (2 × n) and forward sums (2 × n).
template <typename T>
struct TermGrad {
  TermParams<T> tp;
  const T *stats, *g, *sums;
  int64_t n;

  // Row i's view of its pair with value v; adds dL/ds_i to ds (when given).
  __device__ __forceinline__ T operator()(int64_t i, T v, bool pos, bool neg, T* ds) const {
    const int ns = term_stats(tp.loss);
    T s[kTermStats];
    load_stats(stats, n, ns, i, s);
    T w = T(0);
#pragma unroll
    for (int set = 0; set < 2; ++set) {
      if (!(set == 0 ? pos : neg)) continue;
      T f = g[set * n + i];
      if (f == T(0)) continue;
      const Term<T> t = pair_term(tp, set == 0, v, s);
      if (term_lse(tp.loss)) f *= exp(t.val - sums[set * n + i]);
      w += f * t.dv;
      if (ds != nullptr) {
#pragma unroll
        for (int k = 0; k < kTermStats; ++k) ds[k] += f * t.ds[k];
      }
    }
    return w;
  }
  // The pair at (row a, column b) of a backward sweep. TRANSPOSED = false: a query, b a reference (self mode:
  // b's view of the pair (b, a) added; ds gets a's own view only). TRANSPOSED = true: a reference, b a query.
  template <bool TRANSPOSED>
  __device__ __forceinline__ T weight(const Masks& mk, int64_t a, int64_t b, T v, T* ds) const {
    bool pos, neg;
    if (TRANSPOSED) {
      mk.get(b, a, pos, neg);
      return (pos || neg) ? (*this)(b, v, pos, neg, nullptr) : T(0);
    }
    mk.get(a, b, pos, neg);
    T w = (pos || neg) ? (*this)(a, v, pos, neg, ds) : T(0);
    if (mk.self) {
      mk.get(b, a, pos, neg);
      if (pos || neg) w += (*this)(b, v, pos, neg, nullptr);
    }
    return w;
  }
};

// out[a] = Σ_b E[a, b] cols[b] − [distance] (Σ_b E[a, b]) rows[a] for the CTA's 32 rows (E the edge weights);
// TRANSPOSED = false also writes dstats[:, a] (the rows' own views).
template <typename T, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads)
    pair_terms_backward_kernel(const T* __restrict__ rows_x, const T* __restrict__ rows_n, int64_t nrows,
                               const T* __restrict__ cols_x, const T* __restrict__ cols_n, int64_t ncols, int64_t d,
                               int64_t dist, Masks mk, TermGrad<T> tg, T* __restrict__ out,
                               T* __restrict__ dstats) {
  __shared__ Stages<T> sm;
  __shared__ T sE[kTile][kTile + 1];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool sim = dist == kSim;
  const Sweep<T> sw{{rows_x, rows_n, nrows}, {cols_x, cols_n, ncols}, d, dist,
                    static_cast<int64_t>(blockIdx.x) * kTile, &sm};
  T rowsum[kRowsPerWarp], ds[kRowsPerWarp][kTermStats];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    rowsum[j] = T(0);
#pragma unroll
    for (int k = 0; k < kTermStats; ++k) ds[j][k] = T(0);
  }
  sw.run(
      [&](int j, int64_t a, int64_t b, bool ok, T st) {
        T e = T(0);
        if (ok) e = edge_of(tg.template weight<TRANSPOSED>(mk, a, b, value_of(st, dist), ds[j]), st, dist);
        sE[warp * kRowsPerWarp + j][lane] = e;
        rowsum[j] += e;
      },
      [&](int64_t b0) {
        __syncthreads();
        add_edge_product(
            sE, sm.b, [&](int64_t c0, T(*sB)[kTile + 1]) { stage_rows(cols_x, ncols, b0, c0, d, sB); }, d, sw.a0,
            nrows, out);
      });
  const int ns = term_stats(tg.tp.loss);
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t a = sw.row(j);
    if (!sim) {
      const T total = warp_sum(rowsum[j]);
      if (a < nrows)
        for (int64_t c = lane; c < d; c += 32) out[a * d + c] -= total * rows_x[a * d + c];
    }
    if (!TRANSPOSED) {
#pragma unroll
      for (int k = 0; k < kTermStats; ++k) {
        const T v = warp_sum(ds[j][k]);
        if (lane == 0 && a < nrows && k < ns) dstats[k * nrows + a] = v;
      }
    }
  }
}

// ------------------------------------------------------------------------------------ host side

struct Prepared {
  Tensor q, r, qn, rn, stats;
  Tensor keep[4];
  Masks mk;
  int64_t n, m, d;
  bool self;
};

template <typename T>
TermParams<T> term_params(int64_t loss, c10::ArrayRef<double> params) {
  TermParams<T> tp;
  tp.loss = loss;
  for (int j = 0; j < kTermParams; ++j) tp.p[j] = j < static_cast<int>(params.size()) ? T(params[j]) : T(0);
  return tp;
}

// Checks and contiguous operands (r = q in self mode), squared norms for the distances, the pair masks and the
// row statistics (in q's dtype).
Prepared prepare(const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
                 const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
                 const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t loss, c10::ArrayRef<double> params,
                 const Tensor& row_stats) {
  TORCH_CHECK(q_.is_cuda() && q_.dim() == 2, "dml_kernels: pair_terms: q must be a 2-D CUDA tensor");
  TORCH_CHECK(q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kDouble,
              "dml_kernels: pair_terms: the CUDA kernels take float32 or float64, got ", q_.scalar_type());
  TORCH_CHECK(dist == kSim || dist == kEuclid || dist == kSqEuclid, "dml_kernels: bad dist code ", dist);
  TORCH_CHECK(term_valid(loss), "dml_kernels: pair_terms: bad loss code ", loss);
  TORCH_CHECK(static_cast<int64_t>(params.size()) <= kTermParams, "dml_kernels: pair_terms takes at most ",
              kTermParams, " params");
  Prepared p;
  p.self = !r_.has_value();
  p.q = q_.contiguous();
  if (!p.self)
    TORCH_CHECK(r_->device() == q_.device() && r_->scalar_type() == q_.scalar_type() && r_->dim() == 2 &&
                    r_->size(1) == q_.size(1),
                "dml_kernels: pair_terms: r must be M×", q_.size(1), " on q's device with q's dtype");
  p.r = p.self ? p.q : r_->contiguous();
  p.n = p.q.size(0);
  p.m = p.r.size(0);
  p.d = p.q.size(1);
  if (dist != kSim) {
    p.qn = (p.q * p.q).sum(1).contiguous();
    p.rn = p.self ? p.qn : (p.r * p.r).sum(1).contiguous();
  } else {
    p.qn = p.q.new_empty({0});
    p.rn = p.qn;
  }
  const int64_t ns = term_stats(loss);
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == ns && row_stats.size(1) == p.n &&
                  row_stats.device() == q_.device(),
              "dml_kernels: pair_terms: row_stats must have shape (", ns, ", ", p.n, ") on q's device");
  p.stats = row_stats.to(q_.scalar_type()).contiguous();
  p.mk = Masks{nullptr, nullptr, nullptr, nullptr, 0, p.self, nullptr};
  if (pos_bits.has_value() || neg_bits.has_value()) {
    TORCH_CHECK(pos_bits.has_value() && neg_bits.has_value(), "dml_kernels: pos_bits and neg_bits go together");
    const int64_t nbytes = (p.m + 7) / 8;
    for (const auto* t : {&*pos_bits, &*neg_bits})
      TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 2 && t->size(0) == p.n && t->size(1) == nbytes &&
                      t->device() == q_.device(),
                  "dml_kernels: packed pair bits must be uint8 of shape (", p.n, ", ", nbytes, ") on q's device");
    p.keep[0] = pos_bits->contiguous();
    p.keep[1] = neg_bits->contiguous();
    p.mk.pb = p.keep[0].data_ptr<uint8_t>();
    p.mk.nb = p.keep[1].data_ptr<uint8_t>();
    p.mk.nbytes = nbytes;
    return p;
  }
  TORCH_CHECK(labels.has_value() && labels->scalar_type() == at::kLong && labels->dim() == 1 &&
                  labels->size(0) == p.n && labels->device() == q_.device(),
              "dml_kernels: pair_terms: labels must be int64 of shape (", p.n, ") on q's device");
  p.keep[2] = labels->contiguous();
  p.mk.lab = p.keep[2].data_ptr<int64_t>();
  if (p.self) {
    p.mk.rlab = p.mk.lab;
  } else {
    TORCH_CHECK(ref_labels.has_value() && ref_labels->scalar_type() == at::kLong && ref_labels->dim() == 1 &&
                    ref_labels->size(0) == p.m && ref_labels->device() == q_.device(),
                "dml_kernels: pair_terms: ref_labels must be int64 of shape (", p.m, ") on q's device");
    p.keep[3] = ref_labels->contiguous();
    p.mk.rlab = p.keep[3].data_ptr<int64_t>();
  }
  return p;
}

unsigned int grid_for(int64_t rows) {
  const int64_t b = (rows + kTile - 1) / kTile;
  TORCH_CHECK(b < (int64_t(1) << 31), "dml_kernels: too many rows");
  return static_cast<unsigned int>(std::max<int64_t>(b, 1));
}

std::tuple<Tensor, Tensor> pair_terms_cuda(const Tensor& q_, const c10::optional<Tensor>& r_,
                                           const c10::optional<Tensor>& labels,
                                           const c10::optional<Tensor>& ref_labels,
                                           const c10::optional<Tensor>& pos_bits,
                                           const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t loss,
                                           c10::ArrayRef<double> params, const Tensor& row_stats) {
  const c10::cuda::CUDAGuard guard(q_.device());
  Prepared p = prepare(q_, r_, labels, ref_labels, pos_bits, neg_bits, dist, loss, params, row_stats);
  Tensor sums = at::empty({2, p.n}, p.q.options());
  Tensor cnt = at::empty({4, p.n}, p.q.options().dtype(at::kLong));
  if (p.n == 0) return {sums, cnt};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.q.scalar_type(), "pair_terms_cuda", [&] {
    using T = scalar_t;
    pair_terms_kernel<T><<<grid_for(p.n), kThreads, 0, stream>>>(
        p.q.data_ptr<T>(), p.qn.data_ptr<T>(), p.n, p.r.data_ptr<T>(), p.rn.data_ptr<T>(), p.m, p.d, dist, p.mk,
        term_params<T>(loss, params), p.stats.data_ptr<T>(), sums.data_ptr<T>(), cnt.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, cnt};
}

// The query rows (dq and d row_stats), then, unless self mode or a detached reference set, the reference rows.
std::tuple<Tensor, Tensor, Tensor> pair_terms_backward_cuda(
    const Tensor& grad_sums, const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t loss, c10::ArrayRef<double> params,
    const Tensor& row_stats, const Tensor& sums_, bool need_r) {
  const c10::cuda::CUDAGuard guard(q_.device());
  Prepared p = prepare(q_, r_, labels, ref_labels, pos_bits, neg_bits, dist, loss, params, row_stats);
  const int64_t n = p.n, m = p.m, d = p.d;
  for (const Tensor* t : {&grad_sums, &sums_})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 2 && t->size(1) == n && t->device() == q_.device(),
                "dml_kernels: pair_terms_backward: grad_sums and sums must have shape (2, ", n, ") on q's device");
  const auto st = p.q.scalar_type();
  const Tensor gs = grad_sums.to(st).contiguous(), sums = sums_.to(st).contiguous();
  Tensor dq = at::zeros({n, d}, p.q.options());
  need_r = need_r && !p.self;
  Tensor dr = need_r ? at::zeros({m, d}, p.q.options()) : at::empty({0, d}, p.q.options());
  Tensor dstats = at::zeros({term_stats(loss), n}, p.q.options());
  if (n == 0 || m == 0) return {dq, dr, dstats};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "pair_terms_backward_cuda", [&] {
    using T = scalar_t;
    const TermGrad<T> tg{term_params<T>(loss, params), p.stats.data_ptr<T>(), gs.data_ptr<T>(), sums.data_ptr<T>(),
                         n};
    pair_terms_backward_kernel<T, false><<<grid_for(n), kThreads, 0, stream>>>(
        p.q.data_ptr<T>(), p.qn.data_ptr<T>(), n, p.r.data_ptr<T>(), p.rn.data_ptr<T>(), m, d, dist, p.mk, tg,
        dq.data_ptr<T>(), dstats.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_r) {
      pair_terms_backward_kernel<T, true><<<grid_for(m), kThreads, 0, stream>>>(
          p.r.data_ptr<T>(), p.rn.data_ptr<T>(), m, p.q.data_ptr<T>(), p.qn.data_ptr<T>(), n, d, dist, p.mk, tg,
          dr.data_ptr<T>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dr, dstats};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CUDA, m) {
  m.impl("pair_terms", &pair_terms_cuda);
  m.impl("pair_terms_backward", &pair_terms_backward_cuda);
}

}  // namespace cuda
}  // namespace dml
