// CPU implementation of pair_terms / pair_terms_backward (schemas in ../registration.cpp, per-pair math in
// ../pair_terms.h): the contrastive family's loss-specific pair terms reduced per query row and set, on the tile
// engine of pair_engine.h. Forward: blocks of kBR query rows in parallel, each streaming BLAS tiles of the
// references and reducing its rows' terms while the tile is hot (a sum, or an online log-sum-exp); O(N)
// outputs. Backward: the tiles recomputed, each pair's dL/dv from the saved row sums and the upstream gradient
// (rows_grad / both_grads), and dL/d row_stats per row, summed from per-thread buffers in thread order
// (deterministic for a given thread count, no atomics). The loss code is a template parameter of the inner
// loops, so the switch of pair_term folds away.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../dml_kernels.h"
#include "../pair_terms.h"
#include "pair_engine.h"

namespace dml {
namespace cpu {
namespace {

template <typename T>
TermParams<T> term_params(int64_t loss, c10::ArrayRef<double> params) {
  TORCH_CHECK(term_valid(loss), "dml_kernels: pair_terms: bad loss code ", loss);
  TORCH_CHECK(static_cast<int64_t>(params.size()) <= kTermParams, "dml_kernels: pair_terms takes at most ",
              kTermParams, " params, got ", params.size());
  TermParams<T> tp;
  tp.loss = loss;
  for (int j = 0; j < kTermParams; ++j) tp.p[j] = j < static_cast<int>(params.size()) ? T(params[j]) : T(0);
  return tp;
}

Tensor stats_of(const Tensor& row_stats, int64_t loss, int64_t n, const Tensor& q) {
  const int64_t k = term_stats(loss);
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == k && row_stats.size(1) == n,
              "dml_kernels: pair_terms: row_stats must have shape (", k, ", ", n, ") for loss ", loss, ", got ",
              row_stats.sizes());
  TORCH_CHECK(row_stats.device().is_cpu(), "dml_kernels: pair_terms: row_stats must be on the CPU");
  return row_stats.to(q.scalar_type()).contiguous();
}

// Calls f(std::integral_constant<int64_t, L>) for the runtime loss code L.
template <typename F>
void with_loss(int64_t loss, const F& f) {
  switch (loss) {
    case kValues: return f(std::integral_constant<int64_t, kValues>());
    case kNTXent: return f(std::integral_constant<int64_t, kNTXent>());
    case kCircle: return f(std::integral_constant<int64_t, kCircle>());
    case kTCM: return f(std::integral_constant<int64_t, kTCM>());
    case kIPV: return f(std::integral_constant<int64_t, kIPV>());
    case kTuplet: return f(std::integral_constant<int64_t, kTuplet>());
    case kSNR: return f(std::integral_constant<int64_t, kSNR>());
    case kMargin: return f(std::integral_constant<int64_t, kMargin>());
    default: TORCH_CHECK(false, "dml_kernels: pair_terms: bad loss code ", loss);
  }
}

// Online reduction of one row's set: a sum, or a log-sum-exp (m, s: Σ e^{t − m}).
template <typename T>
struct RowAcc {
  T m = -std::numeric_limits<T>::infinity(), s = T(0);
  int64_t pairs = 0, active = 0;
  void add(bool lse, const Term<T>& t) {
    ++pairs;
    active += t.active ? 1 : 0;
    if (!lse) {
      s += t.val;
    } else if (t.val > m) {
      s = (s == T(0) ? T(0) : s * std::exp(m - t.val)) + T(1);
      m = t.val;
    } else {
      s += std::exp(t.val - m);
    }
  }
  T result(bool lse) const { return !lse ? s : (s == T(0) ? T(0) : m + std::log(s)); }
};

std::tuple<Tensor, Tensor> pair_terms_cpu(const Tensor& q_, const c10::optional<Tensor>& r_,
                                          const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
                                          const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits,
                                          int64_t dist, int64_t loss, c10::ArrayRef<double> params,
                                          const Tensor& row_stats_) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels, pos_bits, neg_bits);
  const int64_t n = in.n;
  const Tensor row_stats = stats_of(row_stats_, loss, n, q_);
  Tensor sums = at::empty({2, n}, q_.options());
  Tensor cnt = at::empty({4, n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_terms_cpu", [&] {
    using T = scalar_t;
    const TermParams<T> tp0 = term_params<T>(loss, params);
    Geometry<T> g(q_, r_, dist);
    const T* st = row_stats.data_ptr<T>();
    T* out = sums.data_ptr<T>();
    int64_t* c = cnt.data_ptr<int64_t>();
    const bool lse = term_lse(loss);
    with_loss(loss, [&](auto lc) {
      TermParams<T> tp = tp0;
      tp.loss = decltype(lc)::value;
      for_row_blocks(
          n, [&] { return std::vector<T>(kBR * tile_cols(g)); },
          [&](std::vector<T>& buf, int64_t i0, int64_t ni) {
            RowAcc<T> acc[2 * kBR];
            for_row_tiles(g, i0, ni, buf.data(), [&](int64_t k0, int64_t nk) {
              for (int64_t i = 0; i < ni; ++i) {
                const int64_t gi = i0 + i;
                T s[kTermStats] = {T(0), T(0)};
                for (int j = 0; j < term_stats(decltype(lc)::value); ++j) s[j] = st[j * n + gi];
                const T* row = buf.data() + i * nk;
                for (int64_t k = 0; k < nk; ++k) {
                  bool pos, neg;
                  mk.get(gi, k0 + k, pos, neg);
                  if (!pos && !neg) continue;
                  const T v = value_of(row[k], dist);
                  acc[2 * i + (pos ? 0 : 1)].add(lse, pair_term(tp, pos, v, s));
                }
              }
            });
            for (int64_t i = 0; i < ni; ++i) {
              const int64_t gi = i0 + i;
              out[gi] = acc[2 * i].result(lse);
              out[n + gi] = acc[2 * i + 1].result(lse);
              c[gi] = acc[2 * i].pairs;
              c[n + gi] = acc[2 * i + 1].pairs;
              c[2 * n + gi] = acc[2 * i].active;
              c[3 * n + gi] = acc[2 * i + 1].active;
            }
          });
    });
  });
  return {sums, cnt};
}

std::tuple<Tensor, Tensor, Tensor> pair_terms_backward_cpu(
    const Tensor& grad_sums, const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t loss, c10::ArrayRef<double> params,
    const Tensor& row_stats_, const Tensor& sums_, bool need_r) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels, pos_bits, neg_bits);
  const int64_t n = in.n, m = in.m, d = in.d;
  const bool self = in.self;
  const Tensor row_stats = stats_of(row_stats_, loss, n, q_);
  for (const Tensor* t : {&grad_sums, &sums_})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 2 && t->size(1) == n,
                "dml_kernels: pair_terms_backward: grad_sums and sums must have shape (2, ", n, ")");
  const Tensor gs = grad_sums.to(q_.scalar_type()).contiguous(), sums = sums_.to(q_.scalar_type()).contiguous();
  const int64_t nst = term_stats(loss);
  Tensor dq = at::zeros({n, d}, q_.options());
  need_r = need_r && !self;
  Tensor dr = need_r ? at::zeros({m, d}, q_.options()) : at::empty({0, d}, q_.options());
  Tensor dstats = at::zeros({nst, n}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_terms_backward_cpu", [&] {
    using T = scalar_t;
    const TermParams<T> tp0 = term_params<T>(loss, params);
    Geometry<T> g(q_, r_, dist);
    const T* st = row_stats.data_ptr<T>();
    const T* gp = gs.data_ptr<T>();
    const T* sp = sums.data_ptr<T>();
    const bool lse = term_lse(loss);
    const int nthreads = at::get_num_threads();
    std::vector<std::vector<T>> part(nthreads);  // per thread: d row_stats (nst × n)
    with_loss(loss, [&](auto lc) {
      constexpr int64_t L = decltype(lc)::value;
      TermParams<T> tp = tp0;
      tp.loss = L;
      // dL/dv of the pair (i, k) seen from row i; adds dL/ds_i to ds when given.
      const auto view = [&](int64_t i, T v, bool pos, bool neg, T* ds) {
        T w = T(0);
        T s[kTermStats] = {T(0), T(0)};
        for (int j = 0; j < term_stats(L); ++j) s[j] = st[j * n + i];
        for (int set = 0; set < 2; ++set) {
          if (!(set == 0 ? pos : neg)) continue;
          T f = gp[set * n + i];
          if (f == T(0)) continue;
          const Term<T> t = pair_term(tp, set == 0, v, s);
          if (lse) f *= std::exp(t.val - sp[set * n + i]);
          w += f * t.dv;
          if (ds != nullptr)
            for (int j = 0; j < term_stats(L); ++j) ds[j * n + i] += f * t.ds[j];
        }
        return w;
      };
      const auto edges = [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
        const int tid = at::get_thread_num();
        TORCH_CHECK(tid < nthreads, "dml_kernels: pair_terms_backward: unexpected thread id");
        std::vector<T>& ds = part[tid];
        if (nst > 0 && ds.empty()) ds.assign(nst * n, T(0));
        bool any = false;
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          T* row = buf + i * nk;
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t gk = k0 + k;
            const T stored = row[k], v = value_of(stored, dist);
            bool pos, neg;
            mk.get(gi, gk, pos, neg);
            T w = (pos || neg) ? view(gi, v, pos, neg, nst > 0 ? ds.data() : nullptr) : T(0);
            if (self) {
              mk.get(gk, gi, pos, neg);
              if (pos || neg) w += view(gk, v, pos, neg, nullptr);
            }
            row[k] = edge_of(w, stored, dist);
            rowsum[i] += row[k];
            any = any || row[k] != T(0);
          }
        }
        return any;
      };
      if (need_r)
        both_grads(g, dq, dr, edges);
      else
        rows_grad(g, dq, edges);
    });
    T* out = dstats.data_ptr<T>();
    for (int t = 0; t < nthreads; ++t) {
      if (part[t].empty()) continue;
      for (int64_t j = 0; j < nst * n; ++j) out[j] += part[t][j];
    }
  });
  return {dq, dr, dstats};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) {
  m.impl("pair_terms", &pair_terms_cpu);
  m.impl("pair_terms_backward", &pair_terms_backward_cpu);
}

}  // namespace cpu
}  // namespace dml
