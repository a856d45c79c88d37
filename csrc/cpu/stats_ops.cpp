// CPU ops of the per-row reduction statistics (SPEC §7 "Reductions are statistics"): for a loss whose elements
// are pairs (contrastive) or triplets (triplet margin), per anchor row the sum and count of its elements l and
// the sum and count of those inside a ThresholdReducer band low < l < high (strict; ±inf = unbounded). The
// reducer itself is applied to these O(N) values in Python (dml_kernels/reducers.py); no pair or triplet
// element is ever stored. Backward: each element's weight is g_all(row) + g_band(row)·[in band], chained
// through the hinge; the tiles are recomputed (pair_engine.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../dml_kernels.h"
#include "pair_engine.h"

namespace dml {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------ pair hinges

// One side (positive or negative pairs) of the contrastive hinge: l = relu(a·(v − c)), band (lo, hi) on l.
template <typename T>
struct HingeSide {
  T a, c, lo, hi;
  T term(T v) const { return a * (v - c); }
  bool band(T l) const { return l > lo && l < hi; }
};

struct HingeParams {
  double pa, pc, na, nc, plo, phi, nlo, nhi;
  template <typename T>
  HingeSide<T> pos() const { return {T(pa), T(pc), T(plo), T(phi)}; }
  template <typename T>
  HingeSide<T> neg() const { return {T(na), T(nc), T(nlo), T(nhi)}; }
};

std::tuple<Tensor, Tensor> hinge_stats_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                           const c10::optional<Tensor>& ref_labels, int64_t dist, double pa, double pc,
                                           double na, double nc, double plo, double phi, double nlo, double nhi) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  const int64_t n = in.n;
  const HingeParams hp{pa, pc, na, nc, plo, phi, nlo, nhi};
  Tensor sums = at::zeros({4, n}, q_.options());
  Tensor counts = at::zeros({4, n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "hinge_stats_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const HingeSide<T> sides[2] = {hp.pos<T>(), hp.neg<T>()};
    T* s = sums.data_ptr<T>();
    int64_t* c = counts.data_ptr<int64_t>();
    for_row_blocks(
        n, [&] { return std::vector<T>(kBR * tile_cols(g)); },
        [&](std::vector<T>& buf, int64_t i0, int64_t ni) {
          for_row_tiles(g, i0, ni, buf.data(), [&](int64_t k0, int64_t nk) {
            for (int64_t i = 0; i < ni; ++i) {
              const int64_t gi = i0 + i;
              const T* row = buf.data() + i * nk;
              T acc[4] = {0, 0, 0, 0};
              int64_t cnt[4] = {0, 0, 0, 0};
              for (int64_t k = 0; k < nk; ++k) {
                bool pos, neg;
                mk.get(gi, k0 + k, pos, neg);
                if (!pos && !neg) continue;
                const int side = pos ? 0 : 1;
                const T t = sides[side].term(value_of(row[k], dist));
                const T l = t > 0 ? t : T(0);
                acc[2 * side] += l;
                ++cnt[2 * side];
                if (sides[side].band(l)) {
                  acc[2 * side + 1] += l;
                  ++cnt[2 * side + 1];
                }
              }
              for (int j = 0; j < 4; ++j) {
                s[j * n + gi] += acc[j];
                c[j * n + gi] += cnt[j];
              }
            }
          });
        });
  });
  return {sums, counts};
}

std::tuple<Tensor, Tensor> hinge_stats_backward_cpu(const Tensor& grad_sums, const Tensor& q_,
                                                    const c10::optional<Tensor>& r_, const Tensor& labels,
                                                    const c10::optional<Tensor>& ref_labels, int64_t dist, double pa,
                                                    double pc, double na, double nc, double plo, double phi,
                                                    double nlo, double nhi, bool need_r) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  const int64_t n = in.n, m = in.m, d = in.d;
  const bool self = in.self;
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == 4 && grad_sums.size(1) == n,
              "dml_kernels: grad_sums must have shape (4, ", n, ")");
  const HingeParams hp{pa, pc, na, nc, plo, phi, nlo, nhi};
  Tensor gs = grad_sums.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  need_r = need_r && !self;
  Tensor dr = need_r ? at::zeros({m, d}, q_.options()) : at::empty({0, d}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "hinge_stats_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const HingeSide<T> sides[2] = {hp.pos<T>(), hp.neg<T>()};
    const T* gp = gs.data_ptr<T>();
    // dL/dv of the pair (i, k) seen from row i.
    const auto weight = [&](int64_t i, int64_t k, T v) -> T {
      bool pos, neg;
      mk.get(i, k, pos, neg);
      if (!pos && !neg) return T(0);
      const int side = pos ? 0 : 1;
      const T t = sides[side].term(v);
      if (!(t > 0)) return T(0);  // relu's gradient: 0 where the hinge is inactive
      T w = gp[(2 * side) * n + i];
      if (sides[side].band(t)) w += gp[(2 * side + 1) * n + i];
      return w * sides[side].a;
    };
    const auto edges = [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
      bool any = false;
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T* row = buf + i * nk;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t gk = k0 + k;
          const T stored = row[k], v = value_of(stored, dist);
          T w = weight(gi, gk, v);
          if (self) w += weight(gk, gi, v);  // row k's view of the pair (k, i): a block owns its rows
          row[k] = edge_of(w, stored, dist);
          rowsum[i] += row[k];
          any = any || row[k] != 0;
        }
      }
      return any;
    };
    if (need_r)
      both_grads(g, dq, dr, edges);
    else
      rows_grad(g, dq, edges);
  });
  return {dq, dr};
}

// ------------------------------------------------------------------------------------ all triplets

// Per anchor, with u_p = s·v_ap + margin and z_n = s·v_an (s = +1 distance, −1 similarity) the violation of
// (p, n) is u_p − z_n and the element l = relu(u_p − z_n). With the row's negatives sorted (prefix sums), the
// elements whose violation lies in an open interval (a, b) are the z in (u_p − b, u_p − a): counted and summed by
// two binary searches per positive. Intervals on the violation: all elements with l > 0: (0, ∞); the band
// low < l < high counts (clo, chi) with clo = low if low ≥ 0 else −∞, chi = high if high > 0 else empty, and its
// nonzero part (the sum and the gradient) is (max(clo, 0), chi).
template <typename T>
struct Interval {
  T a, b;
};

template <typename T>
struct TripletStatsRow {
  std::vector<T> u, z, zs, us, prefix;
  std::vector<int64_t> pk, nk;
  void collect(const T* row, int64_t m, int64_t dist, const Masks& mk, int64_t gi, T margin) {
    u.clear(); z.clear(); pk.clear(); nk.clear();
    const T s = distance_sign<T>(dist);
    const int64_t li = mk.lab[gi], diag = mk.self ? gi : -1;
    for (int64_t k = 0; k < m; ++k) {
      const T v = value_of(row[k], dist);
      if (mk.rlab[k] == li) {
        if (k == diag) continue;
        u.push_back(s * v + margin);
        pk.push_back(k);
      } else {
        z.push_back(s * v);
        nk.push_back(k);
      }
    }
    zs = z;
    std::sort(zs.begin(), zs.end());
    prefix.assign(zs.size() + 1, T(0));
    for (size_t t = 0; t < zs.size(); ++t) prefix[t + 1] = prefix[t] + zs[t];
  }
  // [ub, lb): the sorted negatives with violation u − z in (iv.a, iv.b).
  std::pair<int64_t, int64_t> range(T up, const Interval<T>& iv) const {
    const int64_t lb = std::lower_bound(zs.begin(), zs.end(), up - iv.a) - zs.begin();  // z < u − a
    const int64_t ub = std::upper_bound(zs.begin(), zs.end(), up - iv.b) - zs.begin();  // z ≤ u − b
    return {ub, std::max(ub, lb)};
  }
  // Σ of the violations in (iv.a, iv.b) and their number.
  std::pair<T, int64_t> sum_count(const Interval<T>& iv) const {
    T total = 0;
    int64_t count = 0;
    for (const T up : u) {
      const auto rg = range(up, iv);
      const int64_t c = rg.second - rg.first;
      total += c * up - (prefix[rg.second] - prefix[rg.first]);
      count += c;
    }
    return {total, count};
  }
  // #{p : violation(p, n) in (iv.a, iv.b)} for a negative value zn (after sort_positives()).
  int64_t positives_in(T zn, const Interval<T>& iv) const {
    const int64_t hi = std::lower_bound(us.begin(), us.end(), zn + iv.b) - us.begin();  // u < z + b
    const int64_t lo = std::upper_bound(us.begin(), us.end(), zn + iv.a) - us.begin();  // u ≤ z + a
    return std::max<int64_t>(0, hi - lo);
  }
  void sort_positives() {
    us = u;
    std::sort(us.begin(), us.end());
  }
};

template <typename T>
struct TripletBands {
  Interval<T> all, count, sum;  // (0, ∞); the band's count interval; its nonzero part
  TripletBands(double low, double high) {
    const T inf = std::numeric_limits<T>::infinity();
    all = {T(0), inf};
    const T clo = low >= 0 ? T(low) : -inf;
    const T chi = high > 0 ? T(high) : -inf;
    count = {clo, chi};
    sum = {std::max(clo, T(0)), chi};
  }
};

std::tuple<Tensor, Tensor> triplet_stats_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                             const c10::optional<Tensor>& ref_labels, int64_t dist, double margin,
                                             double low, double high) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  const int64_t n = in.n, m = in.m;
  Tensor sums = at::empty({2, n}, q_.options());
  Tensor counts = at::empty({2, n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_stats_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const TripletBands<T> bands(low, high);
    T* s = sums.data_ptr<T>();
    int64_t* c = counts.data_ptr<int64_t>();
    struct Scratch {
      std::vector<T> buf;
      TripletStatsRow<T> tr;
    };
    for_row_blocks(
        n, [&] { return Scratch{std::vector<T>(kBR * std::max<int64_t>(m, 1)), {}}; },
        [&](Scratch& sc, int64_t i0, int64_t ni) {
          g.qtile(i0, ni, 0, m, sc.buf.data());  // whole rows: a row's negatives are sorted together
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            sc.tr.collect(sc.buf.data() + i * m, m, dist, mk, gi, T(margin));
            s[gi] = sc.tr.sum_count(bands.all).first;
            c[gi] = static_cast<int64_t>(sc.tr.u.size()) * static_cast<int64_t>(sc.tr.z.size());
            s[n + gi] = sc.tr.sum_count(bands.sum).first;
            c[n + gi] = sc.tr.sum_count(bands.count).second;
          }
        });
  });
  return {sums, counts};
}

std::tuple<Tensor, Tensor> triplet_stats_backward_cpu(const Tensor& grad_sums, const Tensor& q_,
                                                      const c10::optional<Tensor>& r_, const Tensor& labels,
                                                      const c10::optional<Tensor>& ref_labels, int64_t dist,
                                                      double margin, double low, double high) {
  Inputs in(q_, r_, dist);
  const int64_t n = in.n, m = in.m, d = in.d;
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == 2 && grad_sums.size(1) == n,
              "dml_kernels: grad_sums must have shape (2, ", n, ")");
  const Masks mk = in.masks(labels, ref_labels);
  Tensor gs = grad_sums.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  Tensor dcols = at::zeros({m, d}, q_.options());  // through the references (q itself in self mode)
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_stats_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const TripletBands<T> bands(low, high);
    const T* ga = gs.data_ptr<T>();
    const T* gb = ga + n;
    const T sgn = distance_sign<T>(dist);
    const int nthreads = at::get_num_threads();
    std::vector<Tensor> acc(nthreads);
    std::vector<std::vector<T>> accsum(nthreads);
    struct Scratch {
      int tid;
      std::vector<T> buf, rowsum, w;
      TripletStatsRow<T> tr;
    };
    for_row_blocks(
        n,
        [&] {
          const int tid = at::get_thread_num();
          if (!acc[tid].defined()) {
            acc[tid] = at::zeros({m, d}, q_.options());
            accsum[tid].assign(m, T(0));
          }
          return Scratch{tid, std::vector<T>(kBR * std::max<int64_t>(m, 1)), std::vector<T>(kBR), std::vector<T>(m),
                         {}};
        },
        [&](Scratch& s, int64_t i0, int64_t ni) {
          g.qtile(i0, ni, 0, m, s.buf.data());
          T* cs = accsum[s.tid].data();
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            T* row = s.buf.data() + i * m;
            TripletStatsRow<T>& tr = s.tr;
            tr.collect(row, m, dist, mk, gi, T(margin));
            tr.sort_positives();
            std::fill(s.w.begin(), s.w.end(), T(0));
            const T g_all = ga[gi], g_band = gb[gi];
            for (size_t t = 0; t < tr.u.size(); ++t) {  // ∂/∂u_p: the negatives of p's active elements
              const auto ra = tr.range(tr.u[t], bands.all), rb = tr.range(tr.u[t], bands.sum);
              s.w[tr.pk[t]] = sgn * (g_all * T(ra.second - ra.first) + g_band * T(rb.second - rb.first));
            }
            for (size_t t = 0; t < tr.z.size(); ++t) {  // ∂/∂z_n = −(the positives of n's active elements)
              s.w[tr.nk[t]] = -sgn * (g_all * T(tr.positives_in(tr.z[t], bands.all)) +
                                      g_band * T(tr.positives_in(tr.z[t], bands.sum)));
            }
            T rs = 0;
            for (int64_t k = 0; k < m; ++k) {
              const T e = edge_of(s.w[k], row[k], dist);
              row[k] = e;
              rs += e;
              cs[k] += e;
            }
            s.rowsum[i] = rs;
          }
          Tensor e = at::from_blob(s.buf.data(), {ni, m}, q_.options());
          Tensor dqb = dq.narrow(0, i0, ni);
          dqb.addmm_(e, g.r);
          acc[s.tid].addmm_(e.t(), g.q.narrow(0, i0, ni));
          if (dist != kSim) subtract_norm_term(dqb.data_ptr<T>(), g.qp + i0 * d, s.rowsum.data(), ni, d);
        });
    T* dc = dcols.data_ptr<T>();
    for (int t = 0; t < nthreads; ++t) {
      if (!acc[t].defined()) continue;
      dcols.add_(acc[t]);
      if (dist != kSim) subtract_norm_term(dc, g.rp, accsum[t].data(), m, d);
    }
  });
  if (in.self) return {dq + dcols, at::empty({0, d}, q_.options())};
  return {dq, dcols};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) {
  m.impl("hinge_stats", &hinge_stats_cpu);
  m.impl("hinge_stats_backward", &hinge_stats_backward_cpu);
  m.impl("triplet_stats", &triplet_stats_cpu);
  m.impl("triplet_stats_backward", &triplet_stats_backward_cpu);
}

}  // namespace cpu
}  // namespace dml
