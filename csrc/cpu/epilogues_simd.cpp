// Vectorised CPU epilogues for label masks (the common case), one query row × one reference chunk: the
// definitions of the functions declared in epilogues_simd.h (their one translation unit: the ISA clones and
// their run-time resolvers are emitted once).
//
// Written as branch-free loops (selects, `omp simd` reductions) and compiled in several ISA versions
// (target_clones: AVX-512, AVX2+FMA, baseline; the loader picks one at run time), so the same build runs
// everywhere and uses the vector units it finds. Packed-bit masks take the generic scalar path in
// epilogues.h. Conventions as in dml_kernels.h; `diag` = index within the chunk of the row's own
// column in self mode (−1 if none).
#include <cmath>
#include <cstdint>
#include <limits>

#include "../dml_kernels.h"
#include "epilogues_simd.h"
#include "fast_exp.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define DML_MV __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DML_MV
#endif

namespace dml {
namespace cpu {

__attribute__((always_inline)) inline float exp_vec(float x) { return exp_nonpos(x); }
__attribute__((always_inline)) inline double exp_vec(double x) { return std::exp(x); }

// Backward edge weights of one row (see row_edges below); compile-time flags so the loop has no
// invariant branches and vectorises.
template <typename T, bool SELF, bool MINE, bool HINGE, int64_t DIST>
__attribute__((always_inline)) inline T edges_impl(T* __restrict st, int64_t nk, const EpilogueArgs<T>& a,
                                                   const int64_t* __restrict rlab, int64_t li, int64_t diag,
                                                   int64_t i, const T* __restrict gp, const T* __restrict gn,
                                                   const T* __restrict rp, const T* __restrict rn,
                                                   const T* __restrict hp, const T* __restrict hn) {
  constexpr bool sim = DIST == kSim;
  const T eps = a.eps, pa = a.pa, pc = a.pc, na = a.na, nc = a.nc;
  const T gpi = gp[i], gni = gn[i], rpi = rp[i], rni = rn[i], hpi = hp[i], hni = hn[i];
  const T ninf = -std::numeric_limits<T>::infinity();
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < nk; ++k) {
    const T s = st[k];
    const T v = (DIST == kSqEuclid && !(s > 0)) ? T(0) : s;
    const bool same = rlab[k] == li;
    const bool pair = !same | (k != diag);
    const T coef = same ? pa : na, cen = same ? pc : nc;
    const T t = coef * (v - cen);
    // PML's strict mining rule as one comparison lhs < rhs: similarity keeps a positive iff
    // v − ε < hardest negative, a negative iff hardest positive < v + ε; distance the mirror.
    const T vm = v - eps, vp = v + eps;
    bool keep = pair;
    if (MINE) {
      const T th = same ? hni : hpi;
      const T lhs = sim ? (same ? vm : th) : (same ? th : vm);
      const T rhs = sim ? (same ? th : vp) : (same ? vp : th);
      keep = keep & (lhs < rhs);
    }
    T w;
    if (HINGE) {
      w = (keep & (t > 0)) ? (same ? gpi : gni) * coef : T(0);
    } else {
      const T x = keep ? t - (same ? rpi : rni) : ninf;
      w = (same ? gpi : gni) * coef * exp_vec(x);
    }
    if (SELF) {  // row k's view of the pair (k, i): same value, same label relation
      bool keep2 = pair;
      if (MINE) {
        const T th = same ? hn[k] : hp[k];
        const T lhs = sim ? (same ? vm : th) : (same ? th : vm);
        const T rhs = sim ? (same ? th : vp) : (same ? vp : th);
        keep2 = keep2 & (lhs < rhs);
      }
      const T g2 = same ? gp[k] : gn[k];
      if (HINGE) {
        w += (keep2 & (t > 0)) ? g2 * coef : T(0);
      } else {
        const T x2 = keep2 ? t - (same ? rp[k] : rn[k]) : ninf;
        w += g2 * coef * exp_vec(x2);
      }
    }
    T e;
    if (DIST == kSim) e = w;
    else if (DIST == kSqEuclid) e = s >= 0 ? T(-2) * w : T(0);
    else e = s > 0 ? -w / (s > 0 ? s : T(1)) : T(0);
    st[k] = e;
    sum += e;
  }
  return sum;
}

template <typename T, bool SELF, bool MINE, bool HINGE>
__attribute__((always_inline)) inline T edges_dist(T* st, int64_t nk, const EpilogueArgs<T>& a, const int64_t* rlab,
                                                   int64_t li, int64_t diag, int64_t i, int64_t col, const T* gp,
                                                   const T* gn, const T* rp, const T* rn, const T* hp,
                                                   const T* hn) {
  // Column-indexed statistics (self mode) are passed shifted to the chunk, so hp[k] is reference k's.
  const T* cgp = gp + col; const T* cgn = gn + col; const T* crp = rp + col; const T* crn = rn + col;
  const T* chp = hp + col; const T* chn = hn + col;
  (void)cgp;
  const int64_t li_row = i - col;  // the row's own statistics through the shifted pointers
  switch (a.dist) {
    case kSim:
      return edges_impl<T, SELF, MINE, HINGE, kSim>(st, nk, a, rlab, li, diag, li_row, cgp, cgn, crp, crn, chp, chn);
    case kEuclid:
      return edges_impl<T, SELF, MINE, HINGE, kEuclid>(st, nk, a, rlab, li, diag, li_row, cgp, cgn, crp, crn, chp,
                                                       chn);
    default:
      return edges_impl<T, SELF, MINE, HINGE, kSqEuclid>(st, nk, a, rlab, li, diag, li_row, cgp, cgn, crp, crn, chp,
                                                         chn);
  }
}

template <typename T>
__attribute__((always_inline)) inline T edges_dispatch(T* st, int64_t nk, const EpilogueArgs<T>& a,
                                                       const int64_t* rlab, int64_t li, int64_t diag, bool self,
                                                       int64_t i, int64_t col, const T* gp, const T* gn, const T* rp,
                                                       const T* rn, const T* hp, const T* hn) {
  const bool hinge = a.kind == kHinge;
#define DML_EDGES_CASE(S, M, H) \
  if (self == S && a.mine == M && hinge == H) return edges_dist<T, S, M, H>(st, nk, a, rlab, li, diag, i, col, gp, gn, rp, rn, hp, hn);
  DML_EDGES_CASE(true, true, false)
  DML_EDGES_CASE(true, false, false)
  DML_EDGES_CASE(false, true, false)
  DML_EDGES_CASE(false, false, false)
  DML_EDGES_CASE(true, true, true)
  DML_EDGES_CASE(true, false, true)
  DML_EDGES_CASE(false, true, true)
  DML_EDGES_CASE(false, false, true)
#undef DML_EDGES_CASE
  return T(0);
}

// row_thresholds, row_terms, row_sum_exp, row_edges: what each computes is documented at their
// declarations in epilogues_simd.h.
#define DML_DEFINE_EPILOGUES(T)                                                                                 \
  DML_MV void row_thresholds(const T* __restrict st, int64_t nk, int64_t dist, const int64_t* __restrict rlab,  \
                             int64_t li, int64_t diag, T* hp_io, T* hn_io) {                                   \
    const T inf = std::numeric_limits<T>::infinity();                                                          \
    T hp = *hp_io, hn = *hn_io;                                                                                \
    if (dist == kSim) {                                                                                        \
      _Pragma("omp simd reduction(min : hp) reduction(max : hn)") for (int64_t k = 0; k < nk; ++k) {           \
        const T v = st[k];                                                                                     \
        const bool same = rlab[k] == li;                                                                       \
        const T vp = (same && k != diag) ? v : inf;                                                            \
        const T vn = same ? -inf : v;                                                                          \
        hp = vp < hp ? vp : hp;                                                                                \
        hn = vn > hn ? vn : hn;                                                                                \
      }                                                                                                        \
    } else {                                                                                                   \
      _Pragma("omp simd reduction(max : hp) reduction(min : hn)") for (int64_t k = 0; k < nk; ++k) {           \
        const T s = st[k];                                                                                     \
        const T v = (dist == kSqEuclid && !(s > 0)) ? T(0) : s;                                                \
        const bool same = rlab[k] == li;                                                                       \
        const T vp = (same && k != diag) ? v : -inf;                                                           \
        const T vn = same ? inf : v;                                                                           \
        hp = vp > hp ? vp : hp;                                                                                \
        hn = vn < hn ? vn : hn;                                                                                \
      }                                                                                                        \
    }                                                                                                          \
    *hp_io = hp;                                                                                               \
    *hn_io = hn;                                                                                               \
  }                                                                                                            \
                                                                                                               \
  DML_MV void row_terms(const T* __restrict st, int64_t nk, const EpilogueArgs<T>& a,                          \
                        const int64_t* __restrict rlab, int64_t li, int64_t diag, T hp, T hn, T* __restrict tp, \
                        T* __restrict tn, T* max_p, T* max_n, int64_t* np_out, int64_t* nn_out) {               \
    const T inf = std::numeric_limits<T>::infinity();                                                          \
    const bool hinge = a.kind == kHinge, sim = a.dist == kSim, sq = a.dist == kSqEuclid, mine = a.mine;        \
    const T floor = hinge ? T(0) : -inf, eps = a.eps;                                                          \
    const T pa = a.pa, pc = a.pc, na = a.na, nc = a.nc;                                                        \
    int64_t np = 0, nn = 0;                                                                                    \
    T mp = -inf, mn = -inf;                                                                                    \
    _Pragma("omp simd reduction(+ : np, nn) reduction(max : mp, mn)") for (int64_t k = 0; k < nk; ++k) {       \
      const T s = st[k];                                                                                       \
      const T v = (sq && !(s > 0)) ? T(0) : s;                                                                 \
      const bool same = rlab[k] == li;                                                                         \
      bool pos = same && k != diag, neg = !same;                                                               \
      if (mine) {                                                                                              \
        pos = pos && (sim ? (v - eps < hn) : (v + eps > hn));                                                  \
        neg = neg && (sim ? (v + eps > hp) : (v - eps < hp));                                                  \
      }                                                                                                        \
      T x = pa * (v - pc), y = na * (v - nc);                                                                  \
      if (hinge) {                                                                                             \
        x = x > 0 ? x : T(0);                                                                                  \
        y = y > 0 ? y : T(0);                                                                                  \
      }                                                                                                        \
      x = pos ? x : floor;                                                                                     \
      y = neg ? y : floor;                                                                                     \
      tp[k] = x;                                                                                               \
      tn[k] = y;                                                                                               \
      mp = x > mp ? x : mp;                                                                                    \
      mn = y > mn ? y : mn;                                                                                    \
      np += pos;                                                                                               \
      nn += neg;                                                                                               \
    }                                                                                                          \
    *max_p = mp;                                                                                               \
    *max_n = mn;                                                                                               \
    *np_out = np;                                                                                              \
    *nn_out = nn;                                                                                              \
  }                                                                                                            \
                                                                                                               \
  DML_MV T row_sum_exp(const T* __restrict t, int64_t nk, T m) {                                               \
    T s = 0;                                                                                                   \
    _Pragma("omp simd reduction(+ : s)") for (int64_t k = 0; k < nk; ++k) s += exp_vec(t[k] - m);              \
    return s;                                                                                                  \
  }                                                                                                            \
                                                                                                               \
  DML_MV T row_edges(T* __restrict st, int64_t nk, const EpilogueArgs<T>& a, const int64_t* __restrict rlab,   \
                     int64_t li, int64_t diag, bool self, int64_t i, int64_t col, const T* __restrict gp,       \
                     const T* __restrict gn, const T* __restrict rp, const T* __restrict rn,                   \
                     const T* __restrict hp, const T* __restrict hn) {                                         \
    return edges_dispatch<T>(st, nk, a, rlab, li, diag, self, i, col, gp, gn, rp, rn, hp, hn);                 \
  }

DML_DEFINE_EPILOGUES(float)
DML_DEFINE_EPILOGUES(double)

}  // namespace cpu
}  // namespace dml
