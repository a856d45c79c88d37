// Exponential sums for the CPU epilogues.
//
// sum_exp(t, n, m) = Σ_k exp(t[k] − m) with every t[k] ≤ m (−inf allowed: contributes 0).
// float: a branch-free Cephes-style expf (range reduction by ln 2, degree-5 polynomial, 2^n through
// the exponent bits) written so the compiler vectorises the loop; relative error ≈ 2 ulp, far below
// fp32 loss tolerances. double: std::exp (the fp64 path is the tight-tolerance oracle match).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dml {
namespace cpu {

inline float fast_exp(float x) { return std::exp(x); }
inline double fast_exp(double x) { return std::exp(x); }

// exp(x) for x ≤ 0 (or −inf); vectorisable (no calls, no branches).
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float lo = -87.0f;                 // exp(−87) ≈ 1.6e−38: below, return 0 (underflow)
  const float hi = 88.0f;                  // callers pass x ≤ 0 (+ rounding); clamp keeps the int cast defined
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float magic = 12582912.0f;         // 1.5·2^23: adding then subtracting rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;          // ln 2 split in two parts (Cephes)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = y * scale;
  return x < lo ? 0.0f : out;
}

inline float sum_exp(const float* t, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += exp_nonpos(t[k] - m);
  return s;
}

inline double sum_exp(const double* t, int64_t n, double m) {
  double s = 0.0;
  for (int64_t k = 0; k < n; ++k) s += std::exp(t[k] - m);
  return s;
}

}  // namespace cpu
}  // namespace dml
