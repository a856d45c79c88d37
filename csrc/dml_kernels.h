// Shared declarations of the dml_kernels C++/CUDA extension.
//
// Every op is declared once (registration.cpp, TORCH_LIBRARY(dml_kernels, m)) and implemented per
// device (cpu/pair_ops.cpp with TORCH_LIBRARY_IMPL(dml_kernels, CPU, m); cuda/pair_ops.cu with CUDA).
// The Python side (dml_kernels/backends/cpp/) adds fake (meta) kernels and autograd.
//
// Conventions shared by all kernels
//   q (N×D), r (M×D) or none = self mode (r := q, the (i, i) pair is never a label pair).
//   Normalisation is applied by the caller (F.normalize is O(N·D) and differentiable), so the
//   kernels see the vectors the distance is taken between.
//   dist: 0 = similarity (dot product; cosine after normalisation), 1 = euclidean ‖q−r‖₂,
//         2 = squared euclidean ‖q−r‖₂², both from (|q|² + |r|²) − 2 q·r clamped at 0, as the reference.
//   Pair masks: labels (pos = same label, minus the diagonal in self mode; neg = different label) or
//   bit-packed rows (pair (i, k) = bit k%8 of byte k/8 of row i) when pos_bits/neg_bits are given.
//   pair_reduce kinds: 0 = log Σ e^{a(v−c)} over the pairs (0 for an empty set), 1 = log(1 + Σ ...)
//   (implicit zero term), 2 = Σ relu(a(v−c)) (hinge sum; the nonzero terms are counted).
//   Mining (eps given): PML's MultiSimilarityMiner rule refines the masks with the row's hardest
//   positive / hardest negative values (similarity: min over P / max over N; distance: max / min).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DML_HOST_DEVICE inline
#endif

namespace dml {

enum DistKind : int64_t { kSim = 0, kEuclid = 1, kSqEuclid = 2 };
enum ReduceKind : int64_t { kLse = 0, kLse1 = 1, kHinge = 2 };

// Which set the pair (query i, reference k) is in, for the CPU and CUDA engines alike: label masks, or
// bit-packed rows when pb/nb are given, and an optional column mask.
struct Masks {
  const int64_t* lab = nullptr;
  const int64_t* rlab = nullptr;
  const uint8_t* pb = nullptr;
  const uint8_t* nb = nullptr;
  int64_t nbytes = 0;
  bool self = true;
  const bool* cm = nullptr;  // optional column mask: references outside it are in neither set

  // Label masks only (the CPU engine's vectorised epilogues handle this case).
  DML_HOST_DEVICE bool simple() const { return pb == nullptr && cm == nullptr; }

  DML_HOST_DEVICE void get(int64_t i, int64_t k, bool& pos, bool& neg) const {
    if (cm != nullptr && !cm[k]) {
      pos = neg = false;
      return;
    }
    if (pb != nullptr) {
      const int64_t byte = i * nbytes + (k >> 3);
      const int bit = static_cast<int>(k & 7);
      pos = (pb[byte] >> bit) & 1;
      neg = (nb[byte] >> bit) & 1;
    } else {
      const bool same = lab[i] == rlab[k];
      pos = same && !(self && i == k);
      neg = !same;
    }
  }
};

}  // namespace dml
