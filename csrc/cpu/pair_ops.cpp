// CPU op entry points of the dml_kernels extension (SPEC §4.6) and their TORCH_LIBRARY_IMPL(dml_kernels,
// CPU, m) registrations (schemas in ../registration.cpp), by family: the similarity matrix (pair_values),
// the miners (ms_thresholds, ms_mask, batch_hard), the pair losses (pair_reduce, triplet_all, lifted_pos),
// with their backwards. Each op checks its inputs, allocates its outputs and runs the tile engine
// (pair_engine.h) with its epilogue (epilogues.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../dml_kernels.h"
#include "../values_backward.h"
#include "epilogues.h"
#include "pair_engine.h"

namespace dml {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------ pair_values

Tensor pair_values_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, int64_t dist) {
  const Inputs in(q_, r_, dist);
  Tensor out = at::empty({in.n, in.m}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_values_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    at::mm_out(out, g.q, g.r.t());  // the matrix is the output: one BLAS call, then the epilogue
    if (dist != kSim) {
      T* op = out.data_ptr<T>();
      const T* qn = g.qn.data();
      const T* rn = g.rn.data();
      const int64_t m = g.m;
      at::parallel_for(0, g.n, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          T* row = op + i * m;
          const T qi = qn[i];
          for (int64_t k = 0; k < m; ++k) {
            const T raw = (qi + rn[k]) - 2 * row[k];
            row[k] = dist == kSqEuclid ? (raw > 0 ? raw : T(0)) : (raw > 0 ? std::sqrt(raw > 0 ? raw : T(1)) : T(0));
          }
        }
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> pair_values_backward_cpu(const Tensor& grad, const Tensor& values, const Tensor& q,
                                                    const c10::optional<Tensor>& r, int64_t dist) {
  const Inputs in(q, r, dist);  // below autograd, inputs checked
  return values_backward(grad, values, q, r, dist);
}

// ------------------------------------------------------------------------------------ miners

std::tuple<Tensor, Tensor> ms_thresholds_cpu(const Tensor& q_, const c10::optional<Tensor>& r_,
                                             const c10::optional<Tensor>& labels,
                                             const c10::optional<Tensor>& ref_labels,
                                             const c10::optional<Tensor>& pos_bits,
                                             const c10::optional<Tensor>& neg_bits, int64_t dist) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels, pos_bits, neg_bits);
  Tensor hp = at::empty({in.n}, q_.options()), hn = at::empty({in.n}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "ms_thresholds_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    for_row_blocks(
        in.n, [&] { return std::vector<T>(kBR * tile_cols(g)); },
        [&](std::vector<T>& buf, int64_t i0, int64_t ni) {
          block_thresholds(g, mk, i0, ni, buf.data(), hp.data_ptr<T>() + i0, hn.data_ptr<T>() + i0);
        });
  });
  return {hp, hn};
}

std::tuple<Tensor, Tensor> ms_mask_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                       const c10::optional<Tensor>& ref_labels, int64_t dist, double eps) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  const int64_t nbytes = (in.m + 7) / 8;
  Tensor pbits = at::zeros({in.n, nbytes}, q_.options().dtype(at::kByte));
  Tensor nbits = at::zeros({in.n, nbytes}, q_.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "ms_mask_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    Thresholds<T> th(dist);
    const T e = static_cast<T>(eps);
    uint8_t* pb = pbits.data_ptr<uint8_t>();
    uint8_t* nb = nbits.data_ptr<uint8_t>();
    struct Scratch {
      std::vector<T> buf, hp, hn;
    };
    for_row_blocks(
        in.n, [&] { return Scratch{std::vector<T>(kBR * tile_cols(g)), std::vector<T>(kBR), std::vector<T>(kBR)}; },
        [&](Scratch& s, int64_t i0, int64_t ni) {
          T* buf = s.buf.data();
          block_thresholds(g, mk, i0, ni, buf, s.hp.data(), s.hn.data());
          // a row that fits one tile: block_thresholds left it in buf
          for_row_tiles(
              g, i0, ni, buf,
              [&](int64_t k0, int64_t nk) {
                for (int64_t i = 0; i < ni; ++i) {
                  const int64_t gi = i0 + i;
                  for (int64_t k = 0; k < nk; ++k) {
                    const int64_t gk = k0 + k;
                    bool pos, neg;
                    mk.get(gi, gk, pos, neg);
                    const T v = value_of(buf[i * nk + k], dist);
                    const uint8_t bit = static_cast<uint8_t>(1u << (gk & 7));
                    if (pos && th.keep_pos(v, s.hn[i], e)) pb[gi * nbytes + (gk >> 3)] |= bit;
                    if (neg && th.keep_neg(v, s.hp[i], e)) nb[gi * nbytes + (gk >> 3)] |= bit;
                  }
                }
              },
              /*formed=*/in.m <= kBC);
        });
  });
  return {pbits, nbits};
}

std::tuple<Tensor, Tensor> batch_hard_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                          const c10::optional<Tensor>& ref_labels, int64_t dist) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  Tensor pidx = at::empty({in.n}, q_.options().dtype(at::kLong)), nidx = at::empty({in.n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "batch_hard_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    // Hardest positive = largest score, hardest negative = smallest, score = v (distance) or −v
    // (similarity); ties go to the lowest index (strict comparisons in increasing k).
    const T sign = distance_sign<T>(dist);
    int64_t* pp = pidx.data_ptr<int64_t>();
    int64_t* np = nidx.data_ptr<int64_t>();
    struct Scratch {
      std::vector<T> buf, bp, bn;    // tile; best positive / negative scores so far
      std::vector<int64_t> kp, kn;  // their reference indices (−1: none yet)
    };
    for_row_blocks(
        in.n,
        [&] {
          return Scratch{std::vector<T>(kBR * tile_cols(g)), std::vector<T>(kBR), std::vector<T>(kBR),
                         std::vector<int64_t>(kBR), std::vector<int64_t>(kBR)};
        },
        [&](Scratch& s, int64_t i0, int64_t ni) {
          std::fill(s.kp.begin(), s.kp.end(), -1);
          std::fill(s.kn.begin(), s.kn.end(), -1);
          for_row_tiles(g, i0, ni, s.buf.data(), [&](int64_t k0, int64_t nk) {
            for (int64_t i = 0; i < ni; ++i) {
              for (int64_t k = 0; k < nk; ++k) {
                bool pos, neg;
                mk.get(i0 + i, k0 + k, pos, neg);
                const T sc = sign * value_of(s.buf[i * nk + k], dist);
                if (pos && (s.kp[i] < 0 || sc > s.bp[i])) { s.bp[i] = sc; s.kp[i] = k0 + k; }
                if (neg && (s.kn[i] < 0 || sc < s.bn[i])) { s.bn[i] = sc; s.kn[i] = k0 + k; }
              }
            }
          });
          for (int64_t i = 0; i < ni; ++i) {
            const bool valid = s.kp[i] >= 0 && s.kn[i] >= 0;
            pp[i0 + i] = valid ? s.kp[i] : -1;
            np[i0 + i] = valid ? s.kn[i] : -1;
          }
        });
  });
  return {pidx, nidx};
}

// ------------------------------------------------------------------------------------ pair_reduce

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_reduce_cpu(
    const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
    c10::optional<double> eps, const c10::optional<Tensor>& col_mask) {
  Inputs in(q_, r_, dist);
  TORCH_CHECK(kind == kLse || kind == kLse1 || kind == kHinge, "dml_kernels: bad reduce kind ", kind);
  const Masks mk = in.masks(labels, ref_labels, pos_bits, neg_bits, col_mask);
  const int64_t n = in.n;
  Tensor red_pos = at::empty({n}, q_.options()), red_neg = at::empty({n}, q_.options());
  Tensor thr = at::zeros({2, n}, q_.options());
  Tensor cnt = at::empty({4, n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_reduce_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    ReduceParams<T> p(kind, pa, pc, na, nc, eps);
    T* th = thr.data_ptr<T>();
    struct Scratch {
      std::vector<T> buf, tp, tn;
    };
    for_row_blocks(
        n,
        [&] {
          const int64_t bc = tile_cols(g);
          return Scratch{std::vector<T>(kBR * bc), std::vector<T>(bc), std::vector<T>(bc)};
        },
        [&](Scratch& s, int64_t i0, int64_t ni) {
          block_reduce(g, mk, p, i0, ni, s.buf.data(), s.tp.data(), s.tn.data(), th, th + n, red_pos.data_ptr<T>(),
                       red_neg.data_ptr<T>(), cnt.data_ptr<int64_t>(), n);
        });
  });
  return {red_pos, red_neg, thr, cnt};
}

std::tuple<Tensor, Tensor> pair_reduce_backward_cpu(
    const Tensor& grad_pos, const Tensor& grad_neg, const Tensor& q_, const c10::optional<Tensor>& r_,
    const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
    const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind,
    double pa, double pc, double na, double nc, c10::optional<double> eps, const Tensor& red_pos_,
    const Tensor& red_neg_, const Tensor& thr_, const c10::optional<Tensor>& col_mask, bool need_r) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels, pos_bits, neg_bits, col_mask);
  const int64_t n = in.n, m = in.m, d = in.d;
  const bool self = in.self;
  for (const Tensor* t : {&grad_pos, &grad_neg, &red_pos_, &red_neg_})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "dml_kernels: per-row statistics must have shape (", n, ")");
  TORCH_CHECK(thr_.dim() == 2 && thr_.size(0) == 2 && thr_.size(1) == n, "dml_kernels: thresholds must be 2×", n);
  Tensor gpos = grad_pos.to(q_.scalar_type()).contiguous(), gneg = grad_neg.to(q_.scalar_type()).contiguous();
  Tensor rpos = red_pos_.to(q_.scalar_type()).contiguous(), rneg = red_neg_.to(q_.scalar_type()).contiguous();
  Tensor thr = thr_.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  need_r = need_r && !self;  // a detached reference set (memory bank) gets no gradient pass
  Tensor dr = need_r ? at::zeros({m, d}, q_.options()) : at::empty({0, d}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_reduce_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    ReduceParams<T> p(kind, pa, pc, na, nc, eps);
    const T* th = thr.data_ptr<T>();
    RowGrad<T> rg(&p, gpos.data_ptr<T>(), gneg.data_ptr<T>(), rpos.data_ptr<T>(), rneg.data_ptr<T>(), th, th + n,
                  dist);
    const EpilogueArgs<T> ea = p.args(dist);
    // E of the tile rows [i0, i0+ni) × references [k0, k0+nk), from each row's statistics (self mode adds
    // row k's view of the pair (k, i), so a row block owns its rows of dQ).
    const auto row_view = [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
      if (mk.simple()) {  // label masks: vectorised epilogue
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          rowsum[i] += row_edges(buf + i * nk, nk, ea, mk.rlab + k0, mk.lab[gi], diag_in(mk, gi, k0, nk), self, gi,
                                 self ? k0 : 0, rg.gp, rg.gn, rg.rp, rg.rn, rg.hp, rg.hn);
        }
        return true;
      }
      bool any = false;
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T* row = buf + i * nk;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t gk = k0 + k;
          const T stored = row[k], v = value_of(stored, dist);
          bool pos, neg;
          mk.get(gi, gk, pos, neg);
          T w = rg(gi, v, pos, neg);
          if (self) {
            mk.get(gk, gi, pos, neg);
            w += rg(gk, v, pos, neg);
          }
          row[k] = edge_of(w, stored, dist);
          rowsum[i] += row[k];
          any = any || row[k] != 0;
        }
      }
      return any;
    };
    if (need_r)
      both_grads(g, dq, dr, row_view);
    else
      rows_grad(g, dq, row_view);
  });
  return {dq, dr};
}

// ------------------------------------------------------------------------------------ all triplets

std::tuple<Tensor, Tensor> triplet_all_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                           const c10::optional<Tensor>& ref_labels, int64_t dist, double margin) {
  Inputs in(q_, r_, dist);
  const Masks mk = in.masks(labels, ref_labels);
  const int64_t n = in.n, m = in.m;
  Tensor total = at::empty({n}, q_.options()), count = at::empty({n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_all_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    struct Scratch {
      std::vector<T> buf;
      TripletRow<T> tr;
    };
    for_row_blocks(
        n, [&] { return Scratch{std::vector<T>(kBR * std::max<int64_t>(m, 1)), {}}; },
        [&](Scratch& s, int64_t i0, int64_t ni) {
          g.qtile(i0, ni, 0, m, s.buf.data());  // whole rows: a row's negatives are sorted together
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            s.tr.collect(s.buf.data() + i * m, m, dist, mk, gi, T(margin));
            const auto res = s.tr.forward();
            total.data_ptr<T>()[gi] = res.first;
            count.data_ptr<int64_t>()[gi] = res.second;
          }
        });
  });
  return {total, count};
}

std::tuple<Tensor, Tensor> triplet_all_backward_cpu(const Tensor& grad_total, const Tensor& q_,
                                                    const c10::optional<Tensor>& r_, const Tensor& labels,
                                                    const c10::optional<Tensor>& ref_labels, int64_t dist,
                                                    double margin) {
  Inputs in(q_, r_, dist);
  const int64_t n = in.n, m = in.m, d = in.d;
  TORCH_CHECK(grad_total.dim() == 1 && grad_total.size(0) == n, "dml_kernels: grad_total must have shape (", n, ")");
  const Masks mk = in.masks(labels, ref_labels);
  Tensor gt = grad_total.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  Tensor dcols = at::zeros({m, d}, q_.options());  // gradient through the references (q itself in self mode)
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_all_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const T* gp = gt.data_ptr<T>();
    // Row view into dq (block-owned); column view into per-thread accumulators, summed in thread order.
    const int nthreads = at::get_num_threads();
    std::vector<Tensor> acc(nthreads);
    std::vector<std::vector<T>> accsum(nthreads);
    struct Scratch {
      int tid;
      std::vector<T> buf, rowsum, w;
      TripletRow<T> tr;
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
            s.tr.collect(row, m, dist, mk, gi, T(margin));
            s.tr.forward();  // sorted negatives
            s.tr.backward(gp[gi], dist, s.w.data(), m);
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
          dqb.addmm_(e, g.r);                                 // row view: Σ_k E_ik r_k
          acc[s.tid].addmm_(e.t(), g.q.narrow(0, i0, ni));  // column view: Σ_i E_ik q_i
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

// ------------------------------------------------------------------------------------ lifted structure

// The inputs of lifted_pos (self mode, label masks), checked: labels, has_neg, and a in q's dtype, contiguous.
struct LiftedInputs : Inputs {
  Tensor lab, hasn, a;
  LiftedInputs(const Tensor& q, const Tensor& labels, const Tensor& a_, const Tensor& has_neg, int64_t dist)
      : Inputs(q, c10::nullopt, dist) {
    TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == n,
                "dml_kernels: labels must be int64 of shape (", n, ")");
    TORCH_CHECK(a_.dim() == 1 && a_.size(0) == n, "dml_kernels: a must have shape (", n, ")");
    TORCH_CHECK(has_neg.scalar_type() == at::kBool && has_neg.dim() == 1 && has_neg.size(0) == n,
                "dml_kernels: has_neg must be bool of shape (", n, ")");
    lab = labels.contiguous();
    hasn = has_neg.contiguous();
    a = a_.detach().to(q.scalar_type()).contiguous();
  }
  template <typename T>
  LiftedPair<T> pair(int64_t dist, double pos_margin) const {
    return LiftedPair<T>(a.data_ptr<T>(), hasn.data_ptr<bool>(), lab.data_ptr<int64_t>(), dist, pos_margin);
  }
};

std::tuple<Tensor, Tensor> lifted_pos_cpu(const Tensor& q_, const Tensor& labels, const Tensor& a_,
                                          const Tensor& has_neg, int64_t dist, double pos_margin) {
  const LiftedInputs in(q_, labels, a_, has_neg, dist);
  const int64_t n = in.n;
  Tensor sum = at::empty({n}, q_.options()), count = at::empty({n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "lifted_pos_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, c10::nullopt, dist);
    const LiftedPair<T> lift = in.pair<T>(dist, pos_margin);
    for_row_blocks(
        n, [&] { return std::vector<T>(kBR * tile_cols(g)); },
        [&](std::vector<T>& buf, int64_t i0, int64_t ni) {
          std::vector<T> acc(ni, T(0));
          std::vector<int64_t> cnt(ni, 0);
          for_row_tiles(g, i0, ni, buf.data(), [&](int64_t k0, int64_t nk) {
            for (int64_t i = 0; i < ni; ++i) {
              const int64_t gi = i0 + i;
              for (int64_t k = 0; k < nk; ++k) {
                const int64_t gk = k0 + k;
                if (!lift.positive(gi, gk)) continue;
                T wi, wk;
                const T rh = lift.hinge(gi, gk, buf[i * nk + k], &wi, &wk);
                acc[i] += rh * rh / 2;
                ++cnt[i];
              }
            }
          });
          for (int64_t i = 0; i < ni; ++i) {
            sum.data_ptr<T>()[i0 + i] = acc[i];
            count.data_ptr<int64_t>()[i0 + i] = cnt[i];
          }
        });
  });
  return {sum, count};
}

std::tuple<Tensor, Tensor> lifted_pos_backward_cpu(const Tensor& grad_sum, const Tensor& q_, const Tensor& labels,
                                                   const Tensor& a_, const Tensor& has_neg, int64_t dist,
                                                   double pos_margin) {
  const LiftedInputs in(q_, labels, a_, has_neg, dist);
  const int64_t n = in.n, d = in.d;
  TORCH_CHECK(grad_sum.dim() == 1 && grad_sum.size(0) == n, "dml_kernels: grad_sum must have shape (", n, ")");
  Tensor gs = grad_sum.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options()), da = at::zeros({n}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "lifted_pos_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, c10::nullopt, dist);
    const T* gp = gs.data_ptr<T>();
    const LiftedPair<T> lift = in.pair<T>(dist, pos_margin);
    T* dap = da.data_ptr<T>();
    rows_grad(g, dq, [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T dai = 0;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t gk = k0 + k;
          T& st = buf[i * nk + k];
          if (!lift.positive(gi, gk)) {
            st = 0;
            continue;
          }
          T wi, wk;
          // the terms of (i, k) in row i and of (k, i) in row k are equal: both upstream grads
          const T c = (gp[gi] + gp[gk]) * lift.hinge(gi, gk, st, &wi, &wk);
          dai += c * wi;
          st = edge_of(c * lift.s, st, dist);
          rowsum[i] += st;
        }
        dap[gi] += dai;
      }
      return true;
    });
  });
  return {dq, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) {
  m.impl("pair_values", &pair_values_cpu);
  m.impl("pair_values_backward", &pair_values_backward_cpu);
  m.impl("ms_thresholds", &ms_thresholds_cpu);
  m.impl("ms_mask", &ms_mask_cpu);
  m.impl("batch_hard", &batch_hard_cpu);
  m.impl("pair_reduce", &pair_reduce_cpu);
  m.impl("pair_reduce_backward", &pair_reduce_backward_cpu);
  m.impl("triplet_all", &triplet_all_cpu);
  m.impl("triplet_all_backward", &triplet_all_backward_cpu);
  m.impl("lifted_pos", &lifted_pos_cpu);
  m.impl("lifted_pos_backward", &lifted_pos_backward_cpu);
}

}  // namespace cpu
}  // namespace dml
