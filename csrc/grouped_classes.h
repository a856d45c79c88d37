// The per-class-group math of the grouped-column class losses (SubCenterArcFace, SoftTriple), shared by the CPU
// (cpu/grouped_class_ops.cpp) and CUDA (cuda/grouped_class_ops.cu) drivers of the op pair grouped_class_rows /
// grouped_class_rows_backward (registration.cpp).
//
// The weight W is PML's D×C·K matrix (column c·K + k is centre k of class c); a tile holds whole classes, and a
// class's K centre values s_0..s_{K−1} (already x̂·ŵ: the drivers apply the per-column reciprocal norms) are
// contiguous in the tile's row. They reduce to one class value v:
//   kGroupMax     (SubCenterArcFace): v = max_k s_k; the derivative goes to the first maximal centre (torch.max);
//   kGroupSoftmax (SoftTriple):       v = Σ_k p_k s_k, p = softmax_k(s/γ); dv/ds_k = p_k (1 + (s_k − v)/γ).
// K = 1: v = s_0 in both modes.
// Per row, over the classes: t = the target class's value (0 if the label is outside [0, C)), and
// rest = log Σ_{c≠y} e^{a·v_c} (−inf if there is no other class). The margin and the cross-entropy are O(B) torch
// (dml_kernels/backends/cpp/grouped_kernels.py). Backward: dL/dv_c = g_t at the target, g_r·a·e^{a·v_c − rest}
// elsewhere, spread over the centres by group_grad.
#pragma once

#include <cmath>
#include <cstdint>

#include "dml_kernels.h"

// exp / log: std's overloads on the host, CUDA's global overloads (float and double) in device code.
#if defined(__CUDA_ARCH__)
#define DML_GROUP_MATH
#else
#define DML_GROUP_MATH \
  using std::exp;      \
  using std::log
#endif

namespace dml {

enum GroupMode : int64_t { kGroupMax = 0, kGroupSoftmax = 1 };

// params[] of the ops: [a (scale of every class value in the LSE), 1/γ (SoftTriple), w_eps (> 0: W's columns are
// normalised, ŵ = w / max(‖w‖, w_eps); ≤ 0: used as given)].
template <typename T>
struct GroupParams {
  int64_t k = 1;
  int64_t mode = kGroupMax;
  T a = T(1);
  T inv_gamma = T(1);
  T w_eps = T(0);
};

// The class value of K centre values s[0..K), and (w given: K entries) its weights: max: 1 at the first maximal
// centre, 0 elsewhere; softmax: p_k (group_grad completes the derivative). K = 2 softmax: one exponential,
// p = σ(±(s_0 − s_1)/γ).
template <typename T>
DML_HOST_DEVICE T group_value(const GroupParams<T>& p, const T* s, T* w = nullptr) {
  DML_GROUP_MATH;
  if (p.k == 1) {
    if (w != nullptr) w[0] = T(1);
    return s[0];
  }
  if (p.mode == kGroupMax) {
    int64_t best = 0;  // the first maximal centre, as torch.max's index
    for (int64_t k = 1; k < p.k; ++k)
      if (s[k] > s[best]) best = k;
    if (w != nullptr)
      for (int64_t k = 0; k < p.k; ++k) w[k] = k == best ? T(1) : T(0);
    return s[best];
  }
  if (p.k == 2) {
    const T dlt = (s[0] - s[1]) * p.inv_gamma;
    const T e = exp(dlt >= T(0) ? -dlt : dlt);  // ≤ 1
    const T hi = T(1) / (T(1) + e), lo = e * hi;  // the larger centre's weight, the smaller's
    const T p0 = dlt >= T(0) ? hi : lo, p1 = dlt >= T(0) ? lo : hi;
    if (w != nullptr) {
      w[0] = p0;
      w[1] = p1;
    }
    return p0 * s[0] + p1 * s[1];
  }
  T m = s[0];
  for (int64_t k = 1; k < p.k; ++k) m = s[k] > m ? s[k] : m;
  T num = T(0), den = T(0);
  for (int64_t k = 0; k < p.k; ++k) {
    const T e = exp((s[k] - m) * p.inv_gamma);
    if (w != nullptr) w[k] = e;
    den += e;
    num += e * s[k];
  }
  if (w != nullptr)
    for (int64_t k = 0; k < p.k; ++k) w[k] /= den;
  return num / den;
}

// ds[k] = g · dv/ds_k for the class value v = group_value(p, s, w), from its weights w (ds may alias w or s):
// max: w_k·g; softmax: p_k (1 + (s_k − v)/γ)·g.
template <typename T>
DML_HOST_DEVICE void group_grad(const GroupParams<T>& p, const T* s, T v, T g, const T* w, T* ds) {
  if (p.mode == kGroupMax || p.k == 1) {
    for (int64_t k = 0; k < p.k; ++k) ds[k] = w[k] * g;
    return;
  }
  for (int64_t k = 0; k < p.k; ++k) ds[k] = w[k] * (T(1) + (s[k] - v) * p.inv_gamma) * g;
}

// dL/dv of a class: g_t at the row's target, else g_r·a·e^{a·v − rest} (its share of the LSE's gradient).
template <typename T>
DML_HOST_DEVICE T class_grad(bool is_target, T v, T a, T rest, T g_t, T g_r) {
  DML_GROUP_MATH;
  if (is_target) return g_t;
  return g_r == T(0) ? T(0) : g_r * a * exp(a * v - rest);
}

// The online LSE of a·v over a row's non-target classes: (max of a·v, Σ e^{a·v − max}); start (−inf, 0).
template <typename T>
struct OnlineLse {
  T m, l;
  DML_HOST_DEVICE void init(T neg_inf) {
    m = neg_inf;
    l = T(0);
  }
  DML_HOST_DEVICE void add(T z) {
    DML_GROUP_MATH;
    if (z > m) {
      l = (l == T(0) ? T(0) : l * exp(m - z)) + T(1);
      m = z;
    } else {
      l += exp(z - m);
    }
  }
  DML_HOST_DEVICE void merge(T m2, T l2) {
    DML_GROUP_MATH;
    if (l2 == T(0)) return;
    if (l == T(0)) {
      m = m2;
      l = l2;
      return;
    }
    const T mm = m > m2 ? m : m2;
    l = l * exp(m - mm) + l2 * exp(m2 - mm);
    m = mm;
  }
  // log Σ e^{a·v}, −inf for an empty set.
  DML_HOST_DEVICE T finish(T neg_inf) const {
    DML_GROUP_MATH;
    return l == T(0) ? neg_inf : m + log(l);
  }
};

// The normalisation's chain for one column: dW_j = rw·g − rw³ (w·g) w where ‖w‖ > eps, rw·g where it is clamped
// (F.normalize's gradient); g = Σ_i dS_ij x_i. Returns the coefficient of w: −rw³ (w·g) or 0.
template <typename T>
DML_HOST_DEVICE T norm_chain_coef(T rw, T wg, T w_eps) {
  return rw < T(1) / w_eps ? -rw * rw * rw * wg : T(0);
}

}  // namespace dml
