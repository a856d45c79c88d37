// Interface of the vectorised CPU epilogues for label masks (the common case), one query row × one
// reference chunk: their argument struct and declarations, one overload per dtype. Defined, in several
// ISA versions, in epilogues_simd.cpp; called from the scalar epilogues and ops (epilogues.h, pair_ops.cpp).
// No ATen here, so their translation unit compiles quickly.
#pragma once

#include <cstdint>

namespace dml {
namespace cpu {

// Row statistics used by the epilogues (per row i; arrays are indexed by query row). Conventions as in
// dml_kernels.h; `diag` = index within the chunk of the row's own column in self mode (−1 if none).
template <typename T>
struct EpilogueArgs {
  int64_t dist, kind;
  bool mine;
  T eps, pa, pc, na, nc;
};

#define DML_DECLARE_EPILOGUES(T)                                                                              \
  /* Pass 1 (mining): update the row's hardest positive / negative values over this chunk. */               \
  void row_thresholds(const T* st, int64_t nk, int64_t dist, const int64_t* rlab, int64_t li, int64_t diag,  \
                      T* hp_io, T* hn_io);                                                                    \
  /* Pass 2: terms a·(v − c) of the row's (kept) positive and negative pairs into tp / tn (non-pairs: −inf, */ \
  /* or 0 for hinge sums, already clamped at 0), their maxima and counts. */                                  \
  void row_terms(const T* st, int64_t nk, const EpilogueArgs<T>& a, const int64_t* rlab, int64_t li,          \
                 int64_t diag, T hp, T hn, T* tp, T* tn, T* max_p, T* max_n, int64_t* np_out,                  \
                 int64_t* nn_out);                                                                            \
  /* Σ_k exp(t[k] − m), t[k] ≤ m or −inf. */                                                                 \
  T row_sum_exp(const T* t, int64_t nk, T m);                                                                 \
  /* Backward: st[k] (stored values) ← edge weights E_ik of row i (plus, in self mode, row k's view of the */ \
  /* pair (k, i)); returns Σ_k E_ik. Row-indexed statistics: gp, gn (upstream grads), rp, rn (reductions), */ \
  /* hp, hn (thresholds); `col` = offset of the chunk's first reference in those arrays (self mode). */     \
  T row_edges(T* st, int64_t nk, const EpilogueArgs<T>& a, const int64_t* rlab, int64_t li, int64_t diag,     \
              bool self, int64_t i, int64_t col, const T* gp, const T* gn, const T* rp, const T* rn,          \
              const T* hp, const T* hn);

DML_DECLARE_EPILOGUES(float)
DML_DECLARE_EPILOGUES(double)
#undef DML_DECLARE_EPILOGUES

}  // namespace cpu
}  // namespace dml
