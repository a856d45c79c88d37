// CPU op of the class engine (dml_kernels/backends/cpp/class_losses.py, _ClassCE): the elementwise work of one
// row block of class logits, in one parallel region, row by row while the row (C values) is in cache.
//
// class_rows(A, labels, scale, col_scale, qn, rn, scale_out) -> stats (4, n)
//   A (n×C, contiguous, in place): the GEMM block q_blk·Rᵀ. Per row i, with y = labels[i]:
//     value_ic = A_ic                                  (plain),
//              = A_ic · col_scale_c                    (col_scale given: a per-column normalisation),
//              = max(qn_i + rn_c − 2 A_ic, 0)          (qn, rn given: squared euclidean, the kernels' formula),
//              = max(qn_i + rn_c − 2 A_ic·col_scale_c, 0) (both: squared euclidean to normalised columns; rn_c is
//                                                       then the normalised column's squared norm);
//     logit_ic = scale · value_ic; m_i = max_{c≠y} logit_ic (0 when C = 1);
//     A_ic ← exp(logit_ic − m_i) for c ≠ y, 0 at c = y, and 0 where the squared distance was clamped
//            (raw squared distance < 0: the clamp's gradient is 0 there).
//   scale_out (with col_scale): A_ic ← exp(logit_ic − m_i) · col_scale_c instead (the caller's GEMMs then take
//   the normalised columns' scale with it).
//   stats rows: v_i (the target's value; squared euclidean: before the clamp, so the caller sees the cut),
//               m_i, S_i = Σ_{c≠y} exp(logit_ic − m_i) (clamped entries included), W_i = Σ_c A_ic (the written
//               row; = S_i without the squared euclidean clamp).
// float: the vectorised exp of fast_exp.h (≈ 2 ulp) and sums accumulated in double per 1024-column chunk;
// double: std::exp (the fp64 path is the 1e-9 oracle match). Compiled in several ISA versions (target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_exp.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define DML_CLASS_MV __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DML_CLASS_MV
#endif

namespace dml {
namespace cpu {
namespace class_rows_impl {

__attribute__((always_inline)) inline float exp_le0(float x) { return exp_nonpos(x); }
__attribute__((always_inline)) inline double exp_le0(double x) { return std::exp(x); }

constexpr int64_t kChunk = 1024;  // columns per partial sum (float: summed in float, then in double)

template <typename T, bool CS, bool SQ>
__attribute__((always_inline)) inline T logit_of(T a, int64_t k, T scale, const T* __restrict cs, T qn,
                                                 const T* __restrict rn) {
  if (SQ) {
    const T raw = qn + rn[k] - T(2) * (CS ? a * cs[k] : a);
    return scale * (raw > T(0) ? raw : T(0));
  }
  if (CS) return a * (cs[k] * scale);
  return a * scale;
}

template <typename T, bool CS, bool SQ, bool SO>
__attribute__((always_inline)) inline void row_impl(T* __restrict row, int64_t C, int64_t y, T scale,
                                                    const T* __restrict cs, T qn, const T* __restrict rn,
                                                    T* __restrict out) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T a_y = row[y];
  T v;
  if (SQ) {
    v = qn + rn[y] - T(2) * (CS ? a_y * cs[y] : a_y);
  } else if (CS) {
    v = a_y * cs[y];
  } else {
    v = a_y;
  }
  T m = ninf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < C; ++k) {
    const T t = logit_of<T, CS, SQ>(row[k], k, scale, cs, qn, rn);
    m = std::max(m, k == y ? ninf : t);
  }
  if (C == 1) m = T(0);
  double S = 0, W = 0;
  for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
    const int64_t k1 = std::min(C, k0 + kChunk);
    T s = 0, w = 0;
#pragma omp simd reduction(+ : s, w)
    for (int64_t k = k0; k < k1; ++k) {
      const T a = row[k];
      const T e = exp_le0(logit_of<T, CS, SQ>(a, k, scale, cs, qn, rn) - m);
      const bool target = k == y;
      bool keep = !target;
      if (SQ) keep = keep & !(qn + rn[k] - T(2) * (CS ? a * cs[k] : a) < T(0));
      const T e_all = target ? T(0) : e;
      const T e_kept = keep ? e : T(0);
      s += e_all;
      w += e_kept;
      row[k] = SO ? e_kept * cs[k] : e_kept;
    }
    S += s;
    W += w;
  }
  out[0] = v;
  out[1] = m;
  out[2] = static_cast<T>(S);
  out[3] = static_cast<T>(W);
}

#define DML_DEFINE_CLASS_ROW(T)                                                                                    \
  DML_CLASS_MV void class_row(T* __restrict row, int64_t C, int64_t y, T scale, const T* __restrict cs, T qn,     \
                              const T* __restrict rn, bool scale_out, T* __restrict out) {                         \
    if (rn != nullptr && cs != nullptr && scale_out) {                                                             \
      row_impl<T, true, true, true>(row, C, y, scale, cs, qn, rn, out);                                            \
    } else if (rn != nullptr && cs != nullptr) {                                                                   \
      row_impl<T, true, true, false>(row, C, y, scale, cs, qn, rn, out);                                           \
    } else if (rn != nullptr) {                                                                                    \
      row_impl<T, false, true, false>(row, C, y, scale, cs, qn, rn, out);                                          \
    } else if (cs != nullptr && scale_out) {                                                                       \
      row_impl<T, true, false, true>(row, C, y, scale, cs, qn, rn, out);                                           \
    } else if (cs != nullptr) {                                                                                    \
      row_impl<T, true, false, false>(row, C, y, scale, cs, qn, rn, out);                                          \
    } else {                                                                                                       \
      row_impl<T, false, false, false>(row, C, y, scale, cs, qn, rn, out);                                         \
    }                                                                                                              \
  }

DML_DEFINE_CLASS_ROW(float)
DML_DEFINE_CLASS_ROW(double)
#undef DML_DEFINE_CLASS_ROW

}  // namespace class_rows_impl

namespace {

using at::Tensor;

Tensor class_rows_cpu(Tensor& A, const Tensor& labels, double scale, const c10::optional<Tensor>& col_scale,
                      const c10::optional<Tensor>& qn, const c10::optional<Tensor>& rn, bool scale_out) {
  TORCH_CHECK(A.dim() == 2 && A.is_contiguous(), "class_rows: A must be a contiguous 2-D tensor");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "class_rows: A must be float32 or float64, not ", A.scalar_type());
  const int64_t n = A.size(0), C = A.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "class_rows: labels must be int64");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "class_rows: labels must have shape (", n, ",)");
  TORCH_CHECK(qn.has_value() == rn.has_value(), "class_rows: qn and rn are given together (squared euclidean)");
  TORCH_CHECK(!scale_out || col_scale.has_value(), "class_rows: scale_out needs col_scale");
  auto vec = [&](const c10::optional<Tensor>& t, int64_t len, const char* name) -> Tensor {
    if (!t.has_value()) return Tensor();
    TORCH_CHECK(t->scalar_type() == A.scalar_type(), "class_rows: ", name, " must have A's dtype");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "class_rows: ", name, " must have shape (", len, ",)");
    return t->contiguous();
  };
  const Tensor cs = vec(col_scale, C, "col_scale"), qv = vec(qn, n, "qn"), rv = vec(rn, C, "rn");
  const Tensor lab = labels.contiguous();
  Tensor stats = at::empty({4, n}, A.options());
  if (n == 0) return stats;
  TORCH_CHECK(C > 0, "class_rows: A has no columns");
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "class_rows: label ", y[i], " of row ", i, " is outside [0, ", C, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "class_rows_cpu", [&] {
    using T = scalar_t;
    T* a = A.data_ptr<T>();
    T* st = stats.data_ptr<T>();
    const T* csp = cs.defined() ? cs.data_ptr<T>() : nullptr;
    const T* qp = qv.defined() ? qv.data_ptr<T>() : nullptr;
    const T* rp = rv.defined() ? rv.data_ptr<T>() : nullptr;
    const T sc = static_cast<T>(scale);
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T out[4];
        class_rows_impl::class_row(a + i * C, C, y[i], sc, csp, qp ? qp[i] : T(0), rp, scale_out, out);
        for (int j = 0; j < 4; ++j) st[j * n + i] = out[j];
      }
    });
  });
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) { m.impl("class_rows", &class_rows_cpu); }

}  // namespace cpu
}  // namespace dml
