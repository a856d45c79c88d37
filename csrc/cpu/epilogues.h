// Per-tile epilogues of the CPU ops: what each op does with a tile of stored pair values while it is hot
// (the tiles themselves come from the engine, pair_engine.h). Loss- and miner-specific: the mining rule
// and the row-block threshold pass, pair_reduce's accumulators and gradient weights, the all-triplets
// row sort, the lifted-structure pair term. Generic masks (packed bits, column masks) take the scalar
// loops here; label masks take the vectorised epilogues of epilogues_simd.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../dml_kernels.h"
#include "epilogues_simd.h"
#include "fast_exp.h"
#include "pair_engine.h"

namespace dml {
namespace cpu {

// ------------------------------------------------------------------------------------ mining rule

// Per-row mining thresholds. Similarity: hp = min over P (empty +inf), hn = max over N (empty −inf);
// distance: hp = max over P (−inf), hn = min over N (+inf).
template <typename T>
struct Thresholds {
  bool sim;
  explicit Thresholds(int64_t dist) : sim(dist == kSim) {}
  T init_pos() const { return sim ? std::numeric_limits<T>::infinity() : -std::numeric_limits<T>::infinity(); }
  T init_neg() const { return -init_pos(); }
  void pos(T& hp, T v) const { hp = sim ? std::min(hp, v) : std::max(hp, v); }
  void neg(T& hn, T v) const { hn = sim ? std::max(hn, v) : std::min(hn, v); }
  // PML's strict comparisons.
  bool keep_pos(T v, T hn, T eps) const { return sim ? (v - eps < hn) : (v + eps > hn); }
  bool keep_neg(T v, T hp, T eps) const { return sim ? (v + eps > hp) : (v - eps < hp); }
};

// Row-block thresholds over all references; `buf` holds a BR × BC tile. When the whole row fits one
// tile (`cached`), the tile is left in `buf` for the caller's next pass.
template <typename T>
void block_thresholds(const Geometry<T>& g, const Masks& mk, int64_t i0, int64_t ni, T* buf, T* hp, T* hn) {
  Thresholds<T> th(g.dist);
  for (int64_t i = 0; i < ni; ++i) {
    hp[i] = th.init_pos();
    hn[i] = th.init_neg();
  }
  for_row_tiles(g, i0, ni, buf, [&](int64_t k0, int64_t nk) {
    if (mk.simple()) {  // label masks: vectorised epilogue
      for (int64_t i = 0; i < ni; ++i)
        row_thresholds(buf + i * nk, nk, g.dist, mk.rlab + k0, mk.lab[i0 + i], diag_in(mk, i0 + i, k0, nk), hp + i,
                       hn + i);
      return;
    }
    for (int64_t i = 0; i < ni; ++i) {
      const T* row = buf + i * nk;
      T p = hp[i], q = hn[i];
      for (int64_t k = 0; k < nk; ++k) {
        bool pos, neg;
        mk.get(i0 + i, k0 + k, pos, neg);
        const T v = value_of(row[k], g.dist);
        if (pos) th.pos(p, v);
        if (neg) th.neg(q, v);
      }
      hp[i] = p;
      hn[i] = q;
    }
  });
}

// ------------------------------------------------------------------------------------ pair_reduce

template <typename T>
struct ReduceParams {
  int64_t kind;
  T pa, pc, na, nc, eps;
  bool mine;
  ReduceParams(int64_t kind_, double pa_, double pc_, double na_, double nc_, c10::optional<double> eps_)
      : kind(kind_), pa(pa_), pc(pc_), na(na_), nc(nc_), eps(eps_.has_value() ? *eps_ : 0.0),
        mine(eps_.has_value()) {}
  EpilogueArgs<T> args(int64_t dist) const { return {dist, kind, mine, eps, pa, pc, na, nc}; }
};

// Online accumulator of one row's reduction: LSE (m, s) or hinge sum.
template <typename T>
struct Acc {
  T m, s;
  int64_t pairs = 0, nonzero = 0;
  explicit Acc(int64_t kind) {
    if (kind == kLse1) { m = 0; s = 1; }
    else if (kind == kLse) { m = -std::numeric_limits<T>::infinity(); s = 0; }
    else { m = 0; s = 0; }
  }
  // Merge a chunk of terms (−inf = not a pair) of length len.
  void add(int64_t kind, T* terms, int64_t len, int64_t npairs) {
    pairs += npairs;
    if (npairs == 0) return;
    if (kind == kHinge) {
      T sum = 0;
      int64_t nz = 0;
      for (int64_t k = 0; k < len; ++k) {
        const T t = terms[k];
        if (t > 0) { sum += t; ++nz; }
      }
      s += sum;
      nonzero += nz;
      return;
    }
    nonzero += npairs;
    T cm = -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < len; ++k) cm = std::max(cm, terms[k]);
    const T nm = std::max(m, cm);
    if (s != 0) s *= fast_exp(m - nm);
    s += sum_exp(terms, len, nm);
    m = nm;
  }
  // Merge a chunk of LSE terms whose maximum cm is known.
  void add_lse(const T* terms, int64_t len, int64_t npairs, T cm) {
    pairs += npairs;
    nonzero += npairs;
    if (npairs == 0) return;
    const T nm = std::max(m, cm);
    if (s != 0) s *= fast_exp(m - nm);
    s += row_sum_exp(terms, len, nm);
    m = nm;
  }
  T result(int64_t kind) const {
    if (kind == kHinge) return s;
    if (s == 0) return 0;  // empty set (kind 0): PML's masked LSE gives 0
    return m + std::log(s);
  }
};

template <typename T>
void block_reduce(const Geometry<T>& g, const Masks& mk, const ReduceParams<T>& p, int64_t i0, int64_t ni,
                  T* buf, T* tp, T* tn, T* hp, T* hn, T* red_pos, T* red_neg, int64_t* cnt, int64_t n) {
  Thresholds<T> th(g.dist);
  const bool cached = p.mine && g.m <= kBC;
  if (p.mine) block_thresholds(g, mk, i0, ni, buf, hp + i0, hn + i0);
  const T ninf = -std::numeric_limits<T>::infinity();
  const T floor = p.kind == kHinge ? T(0) : ninf;  // "not a pair" term
  std::vector<Acc<T>> accp(ni, Acc<T>(p.kind)), accn(ni, Acc<T>(p.kind));
  for_row_tiles(
      g, i0, ni, buf,
      [&](int64_t k0, int64_t nk) {
        if (mk.simple() && p.kind != kHinge) {  // label masks: vectorised epilogue
          const EpilogueArgs<T> ea = p.args(g.dist);
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            T maxp, maxn;
            int64_t np, nn;
            row_terms(buf + i * nk, nk, ea, mk.rlab + k0, mk.lab[gi], diag_in(mk, gi, k0, nk),
                      p.mine ? hp[gi] : T(0), p.mine ? hn[gi] : T(0), tp, tn, &maxp, &maxn, &np, &nn);
            accp[i].add_lse(tp, nk, np, maxp);
            accn[i].add_lse(tn, nk, nn, maxn);
          }
          return;
        }
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          const T* row = buf + i * nk;
          const T rhp = p.mine ? hp[gi] : T(0), rhn = p.mine ? hn[gi] : T(0);
          int64_t np = 0, nn = 0;
          for (int64_t k = 0; k < nk; ++k) {
            bool pos, neg;
            mk.get(gi, k0 + k, pos, neg);
            const T v = value_of(row[k], g.dist);
            if (p.mine) {
              pos = pos && th.keep_pos(v, rhn, p.eps);
              neg = neg && th.keep_neg(v, rhp, p.eps);
            }
            np += pos;
            nn += neg;
            T a = p.pa * (v - p.pc), b = p.na * (v - p.nc);
            if (p.kind == kHinge) { a = a > 0 ? a : T(0); b = b > 0 ? b : T(0); }
            tp[k] = pos ? a : floor;
            tn[k] = neg ? b : floor;
          }
          accp[i].add(p.kind, tp, nk, np);
          accn[i].add(p.kind, tn, nk, nn);
        }
      },
      cached);
  for (int64_t i = 0; i < ni; ++i) {
    const int64_t gi = i0 + i;
    red_pos[gi] = accp[i].result(p.kind);
    red_neg[gi] = accn[i].result(p.kind);
    cnt[gi] = accp[i].pairs;
    cnt[n + gi] = accn[i].pairs;
    cnt[2 * n + gi] = accp[i].nonzero;
    cnt[3 * n + gi] = accn[i].nonzero;
  }
}

// dL/dv for the pair (i, k) seen from row i: gradient of row i's pos / neg reductions.
template <typename T>
struct RowGrad {
  const ReduceParams<T>* p;
  const T *gp, *gn, *rp, *rn, *hp, *hn;
  Thresholds<T> th;
  RowGrad(const ReduceParams<T>* p_, const T* gp_, const T* gn_, const T* rp_, const T* rn_, const T* hp_,
          const T* hn_, int64_t dist)
      : p(p_), gp(gp_), gn(gn_), rp(rp_), rn(rn_), hp(hp_), hn(hn_), th(dist) {}

  inline T operator()(int64_t i, T v, bool pos, bool neg) const {
    if (p->mine) {
      pos = pos && th.keep_pos(v, hn[i], p->eps);
      neg = neg && th.keep_neg(v, hp[i], p->eps);
    }
    T w = 0;
    if (pos) w += term(gp[i], p->pa, p->pc, rp[i], v);
    if (neg) w += term(gn[i], p->na, p->nc, rn[i], v);
    return w;
  }
  inline T term(T gr, T a, T c, T red, T v) const {
    if (gr == 0) return 0;
    const T t = a * (v - c);
    if (p->kind == kHinge) return t > 0 ? gr * a : T(0);
    return gr * a * std::exp(t - red);
  }
};

// ------------------------------------------------------------------------------------ all triplets

// Per anchor a, with u_p = margin-shifted positive values and z_n the negative values on one scale
// (distance: u = D_ap + m, z = D_an; similarity: u = m − S_ap, z = −S_an), violation(p, n) = u_p − z_n.
// Σ_{p,n} relu(u_p − z_n) = Σ_p (c_p u_p − Σ_{z_n < u_p} z_n), c_p = #{n : z_n < u_p}: one sort of the
// row's negatives. Backward: ∂/∂u_p = c_p, ∂/∂z_n = −#{p : u_p > z_n}.
template <typename T>
struct TripletRow {
  std::vector<T> u, z, zs, us, prefix;
  std::vector<int64_t> pk, nk;  // reference indices of positives / negatives
  // The whole row `row` (m stored values) of anchor gi: a row's negatives are sorted together.
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
  }
  // (Σ relu, number of violating triplets) of the collected row.
  std::pair<T, int64_t> forward() {
    zs = z;
    std::sort(zs.begin(), zs.end());
    prefix.assign(zs.size() + 1, T(0));
    for (size_t t = 0; t < zs.size(); ++t) prefix[t + 1] = prefix[t] + zs[t];
    T total = 0;
    int64_t count = 0;
    for (const T up : u) {
      const int64_t c = std::lower_bound(zs.begin(), zs.end(), up) - zs.begin();  // #{z < u_p}
      total += c * up - prefix[c];
      count += c;
    }
    return {total, count};
  }
  // dL/d(stored value) of every reference into w (m entries, 0 outside the row's triplets) for the
  // upstream gradient ga of the row's total; after forward() (the sorted negatives).
  void backward(T ga, int64_t dist, T* w, int64_t m) {
    const T s = distance_sign<T>(dist);
    us = u;
    std::sort(us.begin(), us.end());
    std::fill(w, w + m, T(0));
    for (size_t t = 0; t < u.size(); ++t) {
      const int64_t c = std::lower_bound(zs.begin(), zs.end(), u[t]) - zs.begin();
      w[pk[t]] = ga * T(c) * s;
    }
    const int64_t np = static_cast<int64_t>(us.size());
    for (size_t t = 0; t < z.size(); ++t) {
      const int64_t le = std::upper_bound(us.begin(), us.end(), z[t]) - us.begin();  // #{u ≤ z}
      w[nk[t]] = -ga * T(np - le) * s;
    }
  }
};

// ------------------------------------------------------------------------------------ lifted structure

// h_ik = pair(a_i, a_k) + s·(v_ik − pos_margin), s = +1 for a distance, −1 for a similarity;
// pair = logaddexp(a_i, a_k) over the rows that have negatives (0 if neither has).
template <typename T>
struct LiftedPair {
  const T* a;
  const bool* has;
  const int64_t* lab;
  int64_t dist;
  T s, pm;
  LiftedPair(const T* a_, const bool* has_, const int64_t* lab_, int64_t dist_, double pos_margin)
      : a(a_), has(has_), lab(lab_), dist(dist_), s(distance_sign<T>(dist_)), pm(T(pos_margin)) {}

  // (i, k) is a positive pair of the self-mode label masks.
  bool positive(int64_t i, int64_t k) const { return lab[k] == lab[i] && k != i; }
  T pair(int64_t i, int64_t k, T* wi, T* wk) const {
    if (has[i] && has[k]) {
      const T mx = std::max(a[i], a[k]);
      const T lse = mx + std::log(std::exp(a[i] - mx) + std::exp(a[k] - mx));
      *wi = std::exp(a[i] - lse);
      *wk = std::exp(a[k] - lse);
      return lse;
    }
    *wi = has[i] ? T(1) : T(0);
    *wk = has[k] ? T(1) : T(0);
    return has[i] ? a[i] : (has[k] ? a[k] : T(0));
  }
  // relu(h_ik) of a positive pair with stored value `stored`; wi, wk: ∂pair/∂a_i, ∂pair/∂a_k.
  T hinge(int64_t i, int64_t k, T stored, T* wi, T* wk) const {
    const T h = pair(i, k, wi, wk) + s * (value_of(stored, dist) - pm);
    return h > 0 ? h : T(0);
  }
};

}  // namespace cpu
}  // namespace dml
