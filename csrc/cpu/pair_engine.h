// The CPU tile engine (SPEC §4.6): loss-agnostic geometry, pair masks, input checks, and the drivers that
// form similarity tiles and turn edge weights into gradients. Templates and inline functions only; the
// loss-specific work done on a tile lives in epilogues.h, the op entry points in pair_ops.cpp.
//
// One engine: at::parallel_for over blocks of BR query rows; a block forms its similarity tiles
// (BR × up to BC references) with one BLAS call each into a thread-local buffer, and applies the
// op's epilogue while the tile is hot. Memory is O(BR × BC) per thread, never N × M.
// Backward recomputes the tiles. Self mode: dX_I = Σ_J (E_IJ + E_JIᵀ) X_J from the same tile (the
// statistics of both row blocks are O(N) vectors), so a block writes only its own rows: deterministic,
// no atomics. With references, a second pass over reference-row blocks writes dR.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../dml_kernels.h"

namespace dml {
namespace cpu {

using at::Tensor;

inline constexpr int64_t kBR = 32;      // query rows per block
inline constexpr int64_t kBC = 4096;    // references per tile

// ------------------------------------------------------------------------------------ geometry

template <typename T>
struct Geometry {
  Tensor q, r;  // contiguous; r aliases q in self mode
  const T* qp = nullptr;
  const T* rp = nullptr;
  int64_t n = 0, m = 0, d = 0;
  int64_t dist = kSim;
  bool self = true;
  std::vector<T> qn, rn;  // squared row norms (distances only)

  Geometry(const Tensor& q_, const c10::optional<Tensor>& r_, int64_t dist_) : dist(dist_) {
    q = q_.detach().contiguous();  // inner BLAS calls run on worker threads, outside autograd
    self = !r_.has_value();
    r = self ? q : r_->detach().contiguous();
    qp = q.data_ptr<T>();
    rp = r.data_ptr<T>();
    n = q.size(0);
    m = r.size(0);
    d = q.size(1);
    if (dist != kSim) {
      qn = norms(qp, n);
      rn = self ? qn : norms(rp, m);
    }
  }

  std::vector<T> norms(const T* p, int64_t rows) const {
    std::vector<T> out(rows);
    // Same association as the reference's (x * x).sum(1) is not guaranteed bit-for-bit; the tests'
    // fp64 tolerance (1e-10) covers summation order.
    at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T s = 0;
        const T* row = p + i * d;
        for (int64_t k = 0; k < d; ++k) s += row[k] * row[k];
        out[i] = s;
      }
    });
    return out;
  }

  // Stored values of the tile rows [a0, a0+na) of `A` against rows [b0, b0+nb) of `B`, row-major
  // na × nb into `out`. A/B are q or r; an/bn their squared norms. Stored value: similarity → dot;
  // euclidean → sqrt(raw) if raw > 0 else 0; squared euclidean → raw (unclamped: its sign decides
  // the clamp's gradient; value() clamps).
  void tile(const Tensor& A, const std::vector<T>& an, int64_t a0, int64_t na, const Tensor& B,
            const std::vector<T>& bn, int64_t b0, int64_t nb, T* out) const {
    Tensor o = at::from_blob(out, {na, nb}, A.options());
    at::mm_out(o, A.narrow(0, a0, na), B.narrow(0, b0, nb).t());
    if (dist == kSim) return;
    for (int64_t i = 0; i < na; ++i) {
      T* row = out + i * nb;
      const T ai = an[a0 + i];
      const T* bp = bn.data() + b0;
      if (dist == kSqEuclid) {
        for (int64_t k = 0; k < nb; ++k) row[k] = (ai + bp[k]) - 2 * row[k];
      } else {
        for (int64_t k = 0; k < nb; ++k) {
          T raw = (ai + bp[k]) - 2 * row[k];
          row[k] = raw > 0 ? std::sqrt(raw > 0 ? raw : T(1)) : T(0);
        }
      }
    }
  }
  void qtile(int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* out) const { tile(q, qn, i0, ni, r, rn, k0, nk, out); }
};

template <typename T>
inline T value_of(T stored, int64_t dist) {
  return dist == kSqEuclid ? (stored > 0 ? stored : T(0)) : stored;
}

// dL/d(stored pair value) w → the edge weight E with dq_i = Σ_k E_ik r_k − [distance] (Σ_k E_ik) q_i.
template <typename T>
inline T edge_of(T w, T stored, int64_t dist) {
  if (dist == kSim) return w;
  if (dist == kSqEuclid) return stored >= 0 ? T(-2) * w : T(0);
  return stored > 0 ? -w / stored : T(0);
}

// Score on one "larger = farther apart" scale: the value itself for a distance, its negation for a
// similarity.
template <typename T>
inline T distance_sign(int64_t dist) {
  return dist == kSim ? T(-1) : T(1);
}

// ------------------------------------------------------------------------------------ masks

// Masks: the shared struct of ../dml_kernels.h.

inline Masks make_masks(int64_t n, int64_t m, bool self, const c10::optional<Tensor>& labels,
                        const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
                        const c10::optional<Tensor>& neg_bits, std::vector<Tensor>& keep) {
  Masks mk;
  mk.self = self;
  if (pos_bits.has_value() || neg_bits.has_value()) {
    TORCH_CHECK(pos_bits.has_value() && neg_bits.has_value(), "dml_kernels: pos_bits and neg_bits go together");
    const int64_t nbytes = (m + 7) / 8;
    for (const auto* t : {&*pos_bits, &*neg_bits}) {
      TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 2 && t->size(0) == n && t->size(1) == nbytes,
                  "dml_kernels: packed pair bits must be uint8 of shape (", n, ", ", nbytes, "), got ",
                  t->scalar_type(), " ", t->sizes());
      TORCH_CHECK(t->device().is_cpu(), "dml_kernels: packed pair bits must be on the CPU");
    }
    keep.push_back(pos_bits->contiguous());
    keep.push_back(neg_bits->contiguous());
    mk.pb = keep[keep.size() - 2].data_ptr<uint8_t>();
    mk.nb = keep.back().data_ptr<uint8_t>();
    mk.nbytes = nbytes;
    return mk;
  }
  TORCH_CHECK(labels.has_value(), "dml_kernels: labels or packed pair bits are required");
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == n,
              "dml_kernels: labels must be int64 of shape (", n, ")");
  keep.push_back(labels->contiguous());
  mk.lab = keep.back().data_ptr<int64_t>();
  if (self) {
    TORCH_CHECK(!ref_labels.has_value(), "dml_kernels: ref_labels given without r");
    mk.rlab = mk.lab;
  } else {
    TORCH_CHECK(ref_labels.has_value(), "dml_kernels: ref_labels are required with r");
    TORCH_CHECK(ref_labels->scalar_type() == at::kLong && ref_labels->dim() == 1 && ref_labels->size(0) == m,
                "dml_kernels: ref_labels must be int64 of shape (", m, ")");
    keep.push_back(ref_labels->contiguous());
    mk.rlab = keep.back().data_ptr<int64_t>();
  }
  return mk;
}

inline void set_col_mask(Masks& mk, int64_t m, const c10::optional<Tensor>& col_mask, std::vector<Tensor>& keep) {
  if (!col_mask.has_value()) return;
  TORCH_CHECK(col_mask->scalar_type() == at::kBool && col_mask->dim() == 1 && col_mask->size(0) == m &&
                  col_mask->device().is_cpu(),
              "dml_kernels: col_mask must be a bool CPU tensor of shape (", m, ")");
  keep.push_back(col_mask->contiguous());
  mk.cm = keep.back().data_ptr<bool>();
}

// Index within the chunk [k0, k0 + nk) of row i's own column in self mode, −1 if none.
inline int64_t diag_in(const Masks& mk, int64_t i, int64_t k0, int64_t nk) {
  return (mk.self && i >= k0 && i < k0 + nk) ? i - k0 : -1;
}

// ------------------------------------------------------------------------------------ op inputs

// q: N×D; r: M×D (same dtype and device) or none = self mode; dist: a DistKind code.
inline void check_inputs(const Tensor& q, const c10::optional<Tensor>& r, int64_t dist) {
  TORCH_CHECK(q.dim() == 2, "dml_kernels: q must be 2-D, got ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), "dml_kernels: the CPU kernels need CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dml_kernels: the CPU kernels take float32 or float64, got ", q.scalar_type());
  if (r.has_value()) {
    TORCH_CHECK(r->dim() == 2 && r->size(1) == q.size(1), "dml_kernels: r must be M×", q.size(1), ", got ", r->sizes());
    TORCH_CHECK(r->scalar_type() == q.scalar_type() && r->device() == q.device(),
                "dml_kernels: q and r must share dtype and device");
  }
  TORCH_CHECK(dist == kSim || dist == kEuclid || dist == kSqEuclid, "dml_kernels: bad dist code ", dist);
}

// An op's inputs, made first thing in every op entry point and held for its whole call: dispatch below
// autograd (the ops' autograd formulas are registered from Python; the ATen calls inside a kernel neither
// record nor re-enter them), the checked embeddings (check_inputs) and their sizes, and (masks()) the
// op's pair masks, with the contiguous tensors the masks point into kept alive.
struct Inputs {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  int64_t n, m, d;
  bool self;
  std::vector<Tensor> keep;

  Inputs(const Tensor& q, const c10::optional<Tensor>& r, int64_t dist) {
    check_inputs(q, r, dist);
    self = !r.has_value();
    n = q.size(0);
    m = self ? n : r->size(0);
    d = q.size(1);
  }

  Masks masks(const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
              const c10::optional<Tensor>& pos_bits = c10::nullopt,
              const c10::optional<Tensor>& neg_bits = c10::nullopt,
              const c10::optional<Tensor>& col_mask = c10::nullopt) {
    Masks mk = make_masks(n, m, self, labels, ref_labels, pos_bits, neg_bits, keep);
    set_col_mask(mk, m, col_mask, keep);
    return mk;
  }
};

// ------------------------------------------------------------------------------------ block drivers

template <typename T>
int64_t tile_cols(const Geometry<T>& g) {
  return std::min(kBC, std::max<int64_t>(g.m, 1));
}

// Blocks of kBR query rows [i0, i0 + ni) of [0, n), in parallel: body(scratch, i0, ni) for each block, with
// `scratch = make_scratch()` made once per parallel range of blocks (tile buffers, per-row accumulators).
template <typename MakeScratch, typename Body>
void for_row_blocks(int64_t n, const MakeScratch& make_scratch, const Body& body) {
  at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
    auto scratch = make_scratch();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
      body(scratch, i0, ni);
    }
  });
}

// The tiles of query rows [i0, i0 + ni) against the references in chunks of kBC: each is formed in `buf`
// (ni × nk) and handed to body(k0, nk) while hot. `formed`: the single chunk is already in `buf`.
template <typename T, typename Body>
void for_row_tiles(const Geometry<T>& g, int64_t i0, int64_t ni, T* buf, const Body& body, bool formed = false) {
  for (int64_t k0 = 0; k0 < g.m; k0 += kBC) {
    const int64_t nk = std::min(kBC, g.m - k0);
    if (!formed) g.qtile(i0, ni, k0, nk, buf);
    body(k0, nk);
  }
}

// ------------------------------------------------------------------------------------ gradient drivers

// rows_i −= rowsum_i · own_i for a block of rows: the squared-norm term of a distance's gradient.
template <typename T>
void subtract_norm_term(T* rows, const T* own, const T* rowsum, int64_t nrows, int64_t d) {
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t c = 0; c < d; ++c) rows[i * d + c] -= rowsum[i] * own[i * d + c];
}

// Both gradients of reference mode in one pass: each tile's E (from `edges`, the row view as in rows_grad)
// serves dQ += E·R and dR += Eᵀ·Q, so every tile is formed and weighted once (3 GEMMs per tile instead of
// 4 for a dQ pass and a dR pass). Blocks of the larger side run in parallel and own their rows of its gradient;
// the smaller side's gradient, and the row / column sums of E for the norm terms, go to per-thread
// accumulators summed in thread order at the end (O(threads·(min(N, M)·D + N + M)) memory; deterministic
// for a given thread count). Tiles of about kTileElems entries, at least 32 rows each, so a GEMM's packed
// operand serves many rows.
inline constexpr int64_t kTileElems = 128 * 1024;

template <typename T, typename Edges>
void both_grads(const Geometry<T>& g, Tensor& dq, Tensor& dr, const Edges& edges) {
  const bool rows_outer = g.n >= g.m;
  const int64_t outer = rows_outer ? g.n : g.m, inner = rows_outer ? g.m : g.n, d = g.d;
  const int nthreads = at::get_num_threads();
  const int64_t bo = std::clamp<int64_t>(outer / (4 * nthreads), 32, 256);
  const int64_t bi = std::clamp<int64_t>(kTileElems / bo, 64, std::max<int64_t>(inner, 64));
  std::vector<Tensor> part(nthreads);  // per thread: the inner side's gradient
  std::vector<std::vector<T>> rsum(nthreads), csum(nthreads);
  at::parallel_for(0, (outer + bo - 1) / bo, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    if (!part[tid].defined()) {
      part[tid] = at::zeros({inner, d}, dq.options());
      rsum[tid].assign(g.n, T(0));
      csum[tid].assign(g.m, T(0));
    }
    std::vector<T> buf(bo * std::min(bi, inner));
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c0 = 0; c0 < inner; c0 += bi) {
        const int64_t o0 = b * bo, no = std::min(bo, outer - o0), nc = std::min(bi, inner - c0);
        const int64_t i0 = rows_outer ? o0 : c0, ni = rows_outer ? no : nc;
        const int64_t k0 = rows_outer ? c0 : o0, nk = rows_outer ? nc : no;
        g.qtile(i0, ni, k0, nk, buf.data());
        if (!edges(i0, ni, k0, nk, buf.data(), rsum[tid].data() + i0)) continue;
        T* cs = csum[tid].data() + k0;
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t k = 0; k < nk; ++k) cs[k] += buf[i * nk + k];
        const Tensor e = at::from_blob(buf.data(), {ni, nk}, dq.options());
        (rows_outer ? dq.narrow(0, i0, ni) : part[tid].narrow(0, i0, ni)).addmm_(e, g.r.narrow(0, k0, nk));
        (rows_outer ? part[tid].narrow(0, k0, nk) : dr.narrow(0, k0, nk)).addmm_(e.t(), g.q.narrow(0, i0, ni));
      }
    }
  });
  Tensor& inner_grad = rows_outer ? dr : dq;
  std::vector<T> rows(g.n, T(0)), cols(g.m, T(0));
  for (int t = 0; t < nthreads; ++t) {
    if (!part[t].defined()) continue;
    inner_grad.add_(part[t]);
    for (int64_t i = 0; i < g.n; ++i) rows[i] += rsum[t][i];
    for (int64_t k = 0; k < g.m; ++k) cols[k] += csum[t][k];
  }
  if (g.dist != kSim) {
    subtract_norm_term(dq.data_ptr<T>(), g.qp, rows.data(), g.n, d);
    subtract_norm_term(dr.data_ptr<T>(), g.rp, cols.data(), g.m, d);
  }
}

// dQ from edge weights E (dL/d⟨q_i, r_k⟩ after the distance's chain rule, see edge_of). Blocks of BR query
// rows stream tiles of the references; `edges(i0, ni, k0, nk, buf, rowsum)` turns the tile of stored values
// in `buf` (ni × nk) into E in place, adds each row's Σ_k E_ik to rowsum, and says whether any entry is
// non-zero (else the GEMM is skipped); dq_block += E · r_tile. Distances then add −(Σ_k E_ik) q_i. A block
// writes only its own rows of dq (and whatever per-row outputs `edges` owns): deterministic, no atomics.
template <typename T, typename Edges>
void rows_grad(const Geometry<T>& g, Tensor& dq, const Edges& edges) {
  struct Scratch {
    std::vector<T> buf, rowsum;
  };
  for_row_blocks(
      g.n, [&] { return Scratch{std::vector<T>(kBR * tile_cols(g)), std::vector<T>(kBR)}; },
      [&](Scratch& s, int64_t i0, int64_t ni) {
        std::fill(s.rowsum.begin(), s.rowsum.end(), T(0));
        Tensor block = dq.narrow(0, i0, ni);
        for_row_tiles(g, i0, ni, s.buf.data(), [&](int64_t k0, int64_t nk) {
          if (edges(i0, ni, k0, nk, s.buf.data(), s.rowsum.data()))
            block.addmm_(at::from_blob(s.buf.data(), {ni, nk}, dq.options()), g.r.narrow(0, k0, nk));
        });
        if (g.dist != kSim) subtract_norm_term(block.data_ptr<T>(), g.qp + i0 * g.d, s.rowsum.data(), ni, g.d);
      });
}

}  // namespace cpu
}  // namespace dml
