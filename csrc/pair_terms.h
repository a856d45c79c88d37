// The per-pair terms of the pair_terms op (registration.cpp), shared by the CPU (cpu/pair_terms_ops.cpp) and
// CUDA (cuda/pair_terms_ops.cu) drivers: one switch over a loss code gives, for the pair (i, k) of query row i in
// its set (positive or negative), the term's value, its derivative in the pair value v and in the row's
// statistics s = row_stats[:, i], and whether it is "active" (counted: AvgNonZero divisors, TCM's means).
//
// Per row and set the terms are reduced by a sum, or by a log-sum-exp (Circle: LSE over an empty set = 0, as
// PML's masked logsumexp), so that
//   sums[set, i] = Σ_k term   or   log Σ_k e^term,
//   d sums / d term = 1       or   e^{term − sums[set, i]}.
// Losses (params p, row statistics s):
//   kValues  v (both sets; pass 1 of IntraPairVariance's global means)
//   kNTXent  positives: softplus(s0 − p0·v), s0 = LSE over the row's negatives of p0·v (−inf: none); p0 = ±1/τ
//   kCircle  LSE_P −γ[1+m−v]₊(v−1+m), LSE_N γ[v+m]₊(v−m) (the [·]₊ weights constant, PML detaches them);
//            p = (m, γ)
//   kTCM     positives [v ≤ m⁺](m⁺ − v), negatives [v ≥ m⁻](v − m⁻) (active = the indicator); p = (m⁺, m⁻)
//   kIPV     h² with h_P = [p0·v + p1·s0]₊, h_N = [p2·v + p3·s1]₊; s = (μ_P, μ_N) the global means
//   kTuplet  positives: softplus(s0 − p0·(v·p1 + √(1−v²)·p2)) (cos(acos v − margin)), s0 = LSE_N p0·v (−inf:
//            none); p = (scale, cos margin, sin margin)
//   kSNR     d = v / s0 (v = ‖c_q − c_r‖², s0 = ‖c_q‖²): positives [d − m⁺]₊, negatives [m⁻ − d]₊; p = (m⁺, m⁻)
//   kMargin  positives [g(v − s0) + m]₊, negatives [g(s0 − v) + m]₊; s0 = β of the anchor; p = (g, m), g = +1
//            for a distance, −1 for a similarity
#pragma once

#include <cmath>
#include <cstdint>

#include "dml_kernels.h"

namespace dml {

enum TermLoss : int64_t { kValues = 0, kNTXent = 1, kCircle = 2, kTCM = 3, kIPV = 4, kTuplet = 5, kSNR = 6,
                          kMargin = 7 };
constexpr int kTermParams = 4;  // at most
constexpr int kTermStats = 2;   // row statistics per row, at most

// Row statistics a loss reads (row_stats must have exactly this many rows).
DML_HOST_DEVICE int term_stats(int64_t loss) {
  switch (loss) {
    case kNTXent: case kTuplet: case kSNR: case kMargin: return 1;
    case kIPV: return 2;
    default: return 0;
  }
}
DML_HOST_DEVICE bool term_valid(int64_t loss) { return loss >= kValues && loss <= kMargin; }
// Reduction of a loss's sets: log-sum-exp (true) or sum.
DML_HOST_DEVICE bool term_lse(int64_t loss) { return loss == kCircle; }

template <typename T>
struct TermParams {
  int64_t loss;
  T p[kTermParams];
};

template <typename T>
struct Term {
  T val;              // the term (0 for a pair outside the loss's sets)
  T dv;               // d term / d v
  T ds[kTermStats];   // d term / d s_j
  bool active;        // counted as a nonzero term
};

template <typename T>
DML_HOST_DEVICE T term_exp(T x) {
  using std::exp;
  return exp(x);
}
// softplus(x) = log(1 + e^x), exact for every x (−inf → 0).
template <typename T>
DML_HOST_DEVICE T term_softplus(T x) {
  using std::exp;
  using std::log1p;
  return (x > T(0) ? x : T(0)) + log1p(exp(-(x > T(0) ? x : -x)));
}
template <typename T>
DML_HOST_DEVICE T term_sigmoid(T x) {
  using std::exp;
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

// The term of a pair of query row i with value v, in the positive set (positive = true) or the negative set;
// s: the row's statistics (s[j] = row_stats[j, i]).
template <typename T>
DML_HOST_DEVICE Term<T> pair_term(const TermParams<T>& tp, bool positive, T v, const T* s) {
  using std::sqrt;
  Term<T> t;
  t.val = T(0);
  t.dv = T(0);
  t.ds[0] = T(0);
  t.ds[1] = T(0);
  t.active = false;
  const T* p = tp.p;
  switch (tp.loss) {
    case kValues:
      t.val = v;
      t.dv = T(1);
      t.active = true;
      break;
    case kNTXent:
      if (positive) {
        const T u = s[0] - p[0] * v;
        t.val = term_softplus(u);
        const T sg = term_sigmoid(u);
        t.dv = -p[0] * sg;
        t.ds[0] = sg;
        t.active = t.val > T(0);
      }
      break;
    case kCircle:
      if (positive) {
        const T w = T(1) + p[0] - v;
        const T wp = w > T(0) ? w : T(0);
        t.val = -p[1] * wp * (v - (T(1) - p[0]));
        t.dv = -p[1] * wp;
      } else {
        const T w = v + p[0];
        const T wn = w > T(0) ? w : T(0);
        t.val = p[1] * wn * (v - p[0]);
        t.dv = p[1] * wn;
      }
      t.active = true;
      break;
    case kTCM:
      if (positive) {
        t.active = v <= p[0];
        t.val = t.active ? p[0] - v : T(0);
        t.dv = t.active ? T(-1) : T(0);
      } else {
        t.active = v >= p[1];
        t.val = t.active ? v - p[1] : T(0);
        t.dv = t.active ? T(1) : T(0);
      }
      break;
    case kIPV: {
      const T a = positive ? p[0] : p[2], c = positive ? p[1] : p[3];
      const T pre = a * v + c * s[positive ? 0 : 1];
      const T h = pre > T(0) ? pre : T(0);
      t.val = h * h;
      t.dv = T(2) * h * a;
      t.ds[positive ? 0 : 1] = T(2) * h * c;
      t.active = h > T(0);
      break;
    }
    case kTuplet:
      if (positive) {
        const T sn = sqrt(T(1) - v * v);
        const T u = s[0] - p[0] * (v * p[1] + sn * p[2]);
        t.val = term_softplus(u);
        const T sg = term_sigmoid(u);
        t.dv = -p[0] * sg * (p[1] - v * p[2] / sn);
        t.ds[0] = sg;
        t.active = t.val > T(0);
      }
      break;
    case kSNR: {
      const T d = v / s[0];
      const T h = positive ? d - p[0] : p[1] - d;
      t.active = h > T(0);
      if (t.active) {
        t.val = h;
        t.dv = (positive ? T(1) : T(-1)) / s[0];
        t.ds[0] = (positive ? T(-1) : T(1)) * d / s[0];
      }
      break;
    }
    case kMargin: {
      const T g = positive ? p[0] : -p[0];
      const T h = g * (v - s[0]) + p[1];
      t.active = h > T(0);
      if (t.active) {
        t.val = h;
        t.dv = g;
        t.ds[0] = -g;
      }
      break;
    }
    default:
      break;
  }
  return t;
}

}  // namespace dml
