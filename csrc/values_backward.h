// Backward of pair_values (the materialised N×M value matrix), shared by the CPU and CUDA kernels:
// plain ATen ops (the gradient is N×M by definition, so nothing is gained by fusing it).
//   E = dL/dV turned into edge weights (similarity: G; squared euclidean: −2G; euclidean: −G/V where
//   V > 0, else 0), then dq = E r − [distance] rowsum(E) q, dr = Eᵀ q − [distance] colsum(E) r;
//   self mode: dq = (E + Eᵀ) q − [distance] (rowsum + colsum) q.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "dml_kernels.h"

namespace dml {

inline std::tuple<at::Tensor, at::Tensor> values_backward(const at::Tensor& grad, const at::Tensor& values,
                                                          const at::Tensor& q, const c10::optional<at::Tensor>& r,
                                                          int64_t dist) {
  const int64_t n = q.size(0), m = r.has_value() ? r->size(0) : n;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == m && values.sizes() == grad.sizes(),
              "dml_kernels: grad and values must be ", n, "×", m);
  at::Tensor g = grad.to(q.scalar_type());
  at::Tensor e;
  if (dist == kSim) {
    e = g;
  } else if (dist == kSqEuclid) {
    e = g * -2;  // the clamp at 0 passes the gradient where raw ≥ 0; a stored 0 is taken as raw = 0
  } else {
    e = at::where(values > 0, -g / values.clamp_min(std::numeric_limits<double>::min()), at::zeros_like(g));
  }
  if (!r.has_value()) {
    at::Tensor es = e + e.t();
    at::Tensor dq = at::mm(es, q);
    if (dist != kSim) dq = dq - es.sum(1, true) * q;
    return {dq, at::empty({0, q.size(1)}, q.options())};
  }
  at::Tensor dq = at::mm(e, *r);
  at::Tensor dr = at::mm(e.t(), q);
  if (dist != kSim) {
    dq = dq - e.sum(1, true) * q;
    dr = dr - e.sum(0).unsqueeze(1) * *r;
  }
  return {dq, dr};
}

}  // namespace dml
