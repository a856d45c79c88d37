// CPU kernels of the dml_kernels extension (SPEC §4.6).
//
// One engine: at::parallel_for over blocks of BR query rows; a block forms its similarity tiles
// (BR × up to BC references) with one BLAS call each into a thread-local buffer, and applies the
// op's epilogue while the tile is hot. Memory is O(BR × BC) per thread, never N × M.
// Backward recomputes the tiles. Self mode: dX_I = Σ_J (E_IJ + E_JIᵀ) X_J from the same tile (the
// statistics of both row blocks are O(N) vectors), so a block writes only its own rows: deterministic,
// no atomics. With references, a second pass over reference-row blocks writes dR.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../dml_kernels.h"
#include "../values_backward.h"
#include "epilogues.h"
#include "fast_exp.h"

namespace dml {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kBR = 32;      // query rows per block
constexpr int64_t kBC = 4096;    // references per tile

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

// ------------------------------------------------------------------------------------ masks

struct Masks {
  const int64_t* lab = nullptr;
  const int64_t* rlab = nullptr;
  const uint8_t* pb = nullptr;
  const uint8_t* nb = nullptr;
  int64_t nbytes = 0;
  bool self = true;
  const bool* cm = nullptr;  // optional column mask: references outside it are in neither set

  bool simple() const { return pb == nullptr && cm == nullptr; }  // label masks only: vectorised epilogues

  inline void get(int64_t i, int64_t k, bool& pos, bool& neg) const {
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

Masks make_masks(int64_t n, int64_t m, bool self, const c10::optional<Tensor>& labels,
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

void set_col_mask(Masks& mk, int64_t m, const c10::optional<Tensor>& col_mask, std::vector<Tensor>& keep) {
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

void check_embeddings(const Tensor& q, const c10::optional<Tensor>& r) {
  TORCH_CHECK(q.dim() == 2, "dml_kernels: q must be 2-D, got ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), "dml_kernels: the CPU kernels need CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dml_kernels: the CPU kernels take float32 or float64, got ", q.scalar_type());
  if (r.has_value()) {
    TORCH_CHECK(r->dim() == 2 && r->size(1) == q.size(1), "dml_kernels: r must be M×", q.size(1), ", got ", r->sizes());
    TORCH_CHECK(r->scalar_type() == q.scalar_type() && r->device() == q.device(),
                "dml_kernels: q and r must share dtype and device");
  }
}

void check_dist(int64_t dist) {
  TORCH_CHECK(dist == kSim || dist == kEuclid || dist == kSqEuclid, "dml_kernels: bad dist code ", dist);
}

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
  for (int64_t k0 = 0; k0 < g.m; k0 += kBC) {
    const int64_t nk = std::min(kBC, g.m - k0);
    g.qtile(i0, ni, k0, nk, buf);
    if (mk.simple()) {  // label masks: vectorised epilogue
      for (int64_t i = 0; i < ni; ++i)
        row_thresholds(buf + i * nk, nk, g.dist, mk.rlab + k0, mk.lab[i0 + i], diag_in(mk, i0 + i, k0, nk), hp + i,
                       hn + i);
      continue;
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
  }
}

template <typename T>
int64_t tile_cols(const Geometry<T>& g) {
  return std::min(kBC, std::max<int64_t>(g.m, 1));
}

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
constexpr int64_t kTileElems = 128 * 1024;

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
  at::parallel_for(0, (g.n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(kBR * tile_cols(g)), rowsum(kBR);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBR, ni = std::min(kBR, g.n - i0);
      std::fill(rowsum.begin(), rowsum.end(), T(0));
      Tensor block = dq.narrow(0, i0, ni);
      for (int64_t k0 = 0; k0 < g.m; k0 += kBC) {
        const int64_t nk = std::min(kBC, g.m - k0);
        g.qtile(i0, ni, k0, nk, buf.data());
        if (edges(i0, ni, k0, nk, buf.data(), rowsum.data()))
          block.addmm_(at::from_blob(buf.data(), {ni, nk}, dq.options()), g.r.narrow(0, k0, nk));
      }
      if (g.dist != kSim) subtract_norm_term(block.data_ptr<T>(), g.qp + i0 * g.d, rowsum.data(), ni, g.d);
    }
  });
}

// ------------------------------------------------------------------------------------ pair_values

Tensor pair_values_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, int64_t dist) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  Tensor out = at::empty({q_.size(0), r_.has_value() ? r_->size(0) : q_.size(0)}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_values_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    at::mm_out(out, g.q, g.r.t());  // the matrix is the output: one BLAS call, then the epilogue
    if (dist != kSim) {
      T* op = out.data_ptr<T>();
      const T* qn = g.qn.data();
      const T* rn = g.rn.data();
      const int64_t m = g.m;
      at::parallel_for(0, g.n, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          T* row = op + i * m;
          const T qi = qn[i];
          for (int64_t k = 0; k < m; ++k) {
            const T raw = (qi + rn[k]) - 2 * row[k];
            row[k] = dist == kSqEuclid ? (raw > 0 ? raw : T(0)) : (raw > 0 ? std::sqrt(raw > 0 ? raw : T(1)) : T(0));
          }
        }
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> pair_values_backward_cpu(const Tensor& grad, const Tensor& values, const Tensor& q,
                                                    const c10::optional<Tensor>& r, int64_t dist) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q, r);
  check_dist(dist);
  return values_backward(grad, values, q, r, dist);
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
  for (int64_t k0 = 0; k0 < g.m; k0 += kBC) {
    const int64_t nk = std::min(kBC, g.m - k0);
    if (!cached) g.qtile(i0, ni, k0, nk, buf);
    if (mk.simple() && p.kind != kHinge) {  // label masks: vectorised epilogue
      const EpilogueArgs<T> ea{g.dist, p.kind, p.mine, p.eps, p.pa, p.pc, p.na, p.nc};
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T maxp, maxn;
        int64_t np, nn;
        row_terms(buf + i * nk, nk, ea, mk.rlab + k0, mk.lab[gi], diag_in(mk, gi, k0, nk),
                  p.mine ? hp[gi] : T(0), p.mine ? hn[gi] : T(0), tp, tn, &maxp, &maxn, &np, &nn);
        accp[i].add_lse(tp, nk, np, maxp);
        accn[i].add_lse(tn, nk, nn, maxn);
      }
      continue;
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
  }
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

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_reduce_cpu(
    const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
    c10::optional<double> eps, const c10::optional<Tensor>& col_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  TORCH_CHECK(kind == kLse || kind == kLse1 || kind == kHinge, "dml_kernels: bad reduce kind ", kind);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n;
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, !r_.has_value(), labels, ref_labels, pos_bits, neg_bits, keep);
  set_col_mask(mk, m, col_mask, keep);
  Tensor red_pos = at::empty({n}, q_.options()), red_neg = at::empty({n}, q_.options());
  Tensor thr = at::zeros({2, n}, q_.options());
  Tensor cnt = at::empty({4, n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_reduce_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    ReduceParams<T> p(kind, pa, pc, na, nc, eps);
    T* th = thr.data_ptr<T>();
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      const int64_t bc = tile_cols(g);
      std::vector<T> buf(kBR * bc), tp(bc), tn(bc);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        block_reduce(g, mk, p, i0, ni, buf.data(), tp.data(), tn.data(), th, th + n, red_pos.data_ptr<T>(),
                     red_neg.data_ptr<T>(), cnt.data_ptr<int64_t>(), n);
      }
    });
  });
  return {red_pos, red_neg, thr, cnt};
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

std::tuple<Tensor, Tensor> pair_reduce_backward_cpu(
    const Tensor& grad_pos, const Tensor& grad_neg, const Tensor& q_, const c10::optional<Tensor>& r_,
    const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
    const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind,
    double pa, double pc, double na, double nc, c10::optional<double> eps, const Tensor& red_pos_,
    const Tensor& red_neg_, const Tensor& thr_, const c10::optional<Tensor>& col_mask, bool need_r) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n, d = q_.size(1);
  const bool self = !r_.has_value();
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, self, labels, ref_labels, pos_bits, neg_bits, keep);
  set_col_mask(mk, m, col_mask, keep);
  for (const Tensor* t : {&grad_pos, &grad_neg, &red_pos_, &red_neg_})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "dml_kernels: per-row statistics must have shape (", n, ")");
  TORCH_CHECK(thr_.dim() == 2 && thr_.size(0) == 2 && thr_.size(1) == n, "dml_kernels: thresholds must be 2×", n);
  Tensor gpos = grad_pos.to(q_.scalar_type()).contiguous(), gneg = grad_neg.to(q_.scalar_type()).contiguous();
  Tensor rpos = red_pos_.to(q_.scalar_type()).contiguous(), rneg = red_neg_.to(q_.scalar_type()).contiguous();
  Tensor thr = thr_.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  need_r = need_r && !self;  // a detached reference set (memory bank) gets no gradient pass
  Tensor dr = need_r ? at::zeros({m, d}, q_.options()) : at::empty({0, d}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "pair_reduce_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    ReduceParams<T> p(kind, pa, pc, na, nc, eps);
    const T* th = thr.data_ptr<T>();
    RowGrad<T> rg(&p, gpos.data_ptr<T>(), gneg.data_ptr<T>(), rpos.data_ptr<T>(), rneg.data_ptr<T>(), th, th + n,
                  dist);
    const EpilogueArgs<T> ea{dist, kind, p.mine, p.eps, p.pa, p.pc, p.na, p.nc};
    // E of the tile rows [i0, i0+ni) × references [k0, k0+nk), from each row's statistics (self mode adds
    // row k's view of the pair (k, i), so a row block owns its rows of dQ).
    const auto row_view = [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
      if (mk.simple()) {  // label masks: vectorised epilogue
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          rowsum[i] += row_edges(buf + i * nk, nk, ea, mk.rlab + k0, mk.lab[gi], diag_in(mk, gi, k0, nk), self, gi,
                                 self ? k0 : 0, rg.gp, rg.gn, rg.rp, rg.rn, rg.hp, rg.hn);
        }
        return true;
      }
      bool any = false;
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T* row = buf + i * nk;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t gk = k0 + k;
          const T stored = row[k], v = value_of(stored, dist);
          bool pos, neg;
          mk.get(gi, gk, pos, neg);
          T w = rg(gi, v, pos, neg);
          if (self) {
            mk.get(gk, gi, pos, neg);
            w += rg(gk, v, pos, neg);
          }
          row[k] = edge_of(w, stored, dist);
          rowsum[i] += row[k];
          any = any || row[k] != 0;
        }
      }
      return any;
    };
    if (need_r)
      both_grads(g, dq, dr, row_view);
    else
      rows_grad(g, dq, row_view);
  });
  return {dq, dr};
}

// ------------------------------------------------------------------------------------ miners

std::tuple<Tensor, Tensor> ms_thresholds_cpu(const Tensor& q_, const c10::optional<Tensor>& r_,
                                             const c10::optional<Tensor>& labels,
                                             const c10::optional<Tensor>& ref_labels,
                                             const c10::optional<Tensor>& pos_bits,
                                             const c10::optional<Tensor>& neg_bits, int64_t dist) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n;
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, !r_.has_value(), labels, ref_labels, pos_bits, neg_bits, keep);
  Tensor hp = at::empty({n}, q_.options()), hn = at::empty({n}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "ms_thresholds_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf(kBR * tile_cols(g));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        block_thresholds(g, mk, i0, ni, buf.data(), hp.data_ptr<T>() + i0, hn.data_ptr<T>() + i0);
      }
    });
  });
  return {hp, hn};
}

std::tuple<Tensor, Tensor> ms_mask_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                       const c10::optional<Tensor>& ref_labels, int64_t dist, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n, nbytes = (m + 7) / 8;
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, !r_.has_value(), labels, ref_labels, c10::nullopt, c10::nullopt, keep);
  Tensor pbits = at::zeros({n, nbytes}, q_.options().dtype(at::kByte));
  Tensor nbits = at::zeros({n, nbytes}, q_.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "ms_mask_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    Thresholds<T> th(dist);
    const T e = static_cast<T>(eps);
    uint8_t* pb = pbits.data_ptr<uint8_t>();
    uint8_t* nb = nbits.data_ptr<uint8_t>();
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      const int64_t bc = tile_cols(g);
      std::vector<T> buf(kBR * bc), hp(kBR), hn(kBR);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        block_thresholds(g, mk, i0, ni, buf.data(), hp.data(), hn.data());
        for (int64_t k0 = 0; k0 < m; k0 += kBC) {
          const int64_t nk = std::min(kBC, m - k0);
          if (m > kBC) g.qtile(i0, ni, k0, nk, buf.data());
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t gk = k0 + k;
              bool pos, neg;
              mk.get(gi, gk, pos, neg);
              const T v = value_of(buf[i * nk + k], dist);
              const uint8_t bit = static_cast<uint8_t>(1u << (gk & 7));
              if (pos && th.keep_pos(v, hn[i], e)) pb[gi * nbytes + (gk >> 3)] |= bit;
              if (neg && th.keep_neg(v, hp[i], e)) nb[gi * nbytes + (gk >> 3)] |= bit;
            }
          }
        }
      }
    });
  });
  return {pbits, nbits};
}

std::tuple<Tensor, Tensor> batch_hard_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                          const c10::optional<Tensor>& ref_labels, int64_t dist) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n;
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, !r_.has_value(), labels, ref_labels, c10::nullopt, c10::nullopt, keep);
  Tensor pidx = at::empty({n}, q_.options().dtype(at::kLong)), nidx = at::empty({n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "batch_hard_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    // Hardest positive = largest score, hardest negative = smallest, score = v (distance) or −v
    // (similarity); ties go to the lowest index (strict comparisons in increasing k).
    const T sign = dist == kSim ? T(-1) : T(1);
    int64_t* pp = pidx.data_ptr<int64_t>();
    int64_t* np = nidx.data_ptr<int64_t>();
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      const int64_t bc = tile_cols(g);
      std::vector<T> buf(kBR * bc), bp(kBR), bn(kBR);
      std::vector<int64_t> ip(kBR), in(kBR);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        std::fill(ip.begin(), ip.end(), -1);
        std::fill(in.begin(), in.end(), -1);
        for (int64_t k0 = 0; k0 < m; k0 += kBC) {
          const int64_t nk = std::min(kBC, m - k0);
          g.qtile(i0, ni, k0, nk, buf.data());
          for (int64_t i = 0; i < ni; ++i) {
            for (int64_t k = 0; k < nk; ++k) {
              bool pos, neg;
              mk.get(i0 + i, k0 + k, pos, neg);
              const T s = sign * value_of(buf[i * nk + k], dist);
              if (pos && (ip[i] < 0 || s > bp[i])) { bp[i] = s; ip[i] = k0 + k; }
              if (neg && (in[i] < 0 || s < bn[i])) { bn[i] = s; in[i] = k0 + k; }
            }
          }
        }
        for (int64_t i = 0; i < ni; ++i) {
          const bool valid = ip[i] >= 0 && in[i] >= 0;
          pp[i0 + i] = valid ? ip[i] : -1;
          np[i0 + i] = valid ? in[i] : -1;
        }
      }
    });
  });
  return {pidx, nidx};
}


// ------------------------------------------------------------------------------------ all triplets

// Per anchor a, with u_p = margin-shifted positive values and z_n the negative values on one scale
// (distance: u = D_ap + m, z = D_an; similarity: u = m − S_ap, z = −S_an), violation(p, n) = u_p − z_n.
// Σ_{p,n} relu(u_p − z_n) = Σ_p (c_p u_p − Σ_{z_n < u_p} z_n), c_p = #{n : z_n < u_p}: one sort of the
// row's negatives. Backward: ∂/∂u_p = c_p, ∂/∂z_n = −#{p : u_p > z_n}.
template <typename T>
struct TripletRow {
  std::vector<T> u, z, zs, us, prefix;
  std::vector<int64_t> pk, nk;  // reference indices of positives / negatives
  void collect(const T* row, int64_t m, int64_t dist, const int64_t* rlab, int64_t li, int64_t diag, T margin) {
    u.clear(); z.clear(); pk.clear(); nk.clear();
    const T s = dist == kSim ? T(-1) : T(1);
    for (int64_t k = 0; k < m; ++k) {
      const T v = value_of(row[k], dist);
      if (rlab[k] == li) {
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
};

std::tuple<Tensor, Tensor> triplet_all_cpu(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                           const c10::optional<Tensor>& ref_labels, int64_t dist, double margin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const int64_t n = q_.size(0), m = r_.has_value() ? r_->size(0) : n;
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, !r_.has_value(), labels, ref_labels, c10::nullopt, c10::nullopt, keep);
  Tensor total = at::empty({n}, q_.options()), count = at::empty({n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_all_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf(kBR * std::max<int64_t>(m, 1));
      TripletRow<T> tr;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        g.qtile(i0, ni, 0, m, buf.data());  // whole rows: a row's negatives are sorted together
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          tr.collect(buf.data() + i * m, m, dist, mk.rlab, mk.lab[gi], mk.self ? gi : -1, T(margin));
          const auto res = tr.forward();
          total.data_ptr<T>()[gi] = res.first;
          count.data_ptr<int64_t>()[gi] = res.second;
        }
      }
    });
  });
  return {total, count};
}

std::tuple<Tensor, Tensor> triplet_all_backward_cpu(const Tensor& grad_total, const Tensor& q_,
                                                    const c10::optional<Tensor>& r_, const Tensor& labels,
                                                    const c10::optional<Tensor>& ref_labels, int64_t dist,
                                                    double margin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, r_);
  check_dist(dist);
  const bool self = !r_.has_value();
  const int64_t n = q_.size(0), m = self ? n : r_->size(0), d = q_.size(1);
  TORCH_CHECK(grad_total.dim() == 1 && grad_total.size(0) == n, "dml_kernels: grad_total must have shape (", n, ")");
  std::vector<Tensor> keep;
  Masks mk = make_masks(n, m, self, labels, ref_labels, c10::nullopt, c10::nullopt, keep);
  Tensor gt = grad_total.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options());
  Tensor dcols = at::zeros({m, d}, q_.options());  // gradient through the references (q itself in self mode)
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "triplet_all_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, r_, dist);
    const T s = dist == kSim ? T(-1) : T(1);
    const T* gp = gt.data_ptr<T>();
    // Row view into dq (block-owned); column view into per-thread accumulators, summed in thread order.
    const int nthreads = at::get_num_threads();
    std::vector<Tensor> acc(nthreads);
    std::vector<std::vector<T>> accsum(nthreads);
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      if (!acc[tid].defined()) {
        acc[tid] = at::zeros({m, d}, q_.options());
        accsum[tid].assign(m, T(0));
      }
      std::vector<T> buf(kBR * std::max<int64_t>(m, 1)), rowsum(kBR);
      TripletRow<T> tr;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        g.qtile(i0, ni, 0, m, buf.data());
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t gi = i0 + i;
          T* row = buf.data() + i * m;
          tr.collect(row, m, dist, mk.rlab, mk.lab[gi], mk.self ? gi : -1, T(margin));
          tr.forward();  // sorted negatives
          tr.us = tr.u;
          std::sort(tr.us.begin(), tr.us.end());
          std::vector<T> w(m, T(0));
          const T ga = gp[gi];
          for (size_t t = 0; t < tr.u.size(); ++t) {
            const int64_t c = std::lower_bound(tr.zs.begin(), tr.zs.end(), tr.u[t]) - tr.zs.begin();
            w[tr.pk[t]] = ga * T(c) * s;
          }
          const int64_t np = static_cast<int64_t>(tr.us.size());
          for (size_t t = 0; t < tr.z.size(); ++t) {
            const int64_t le = std::upper_bound(tr.us.begin(), tr.us.end(), tr.z[t]) - tr.us.begin();  // #{u ≤ z}
            w[tr.nk[t]] = -ga * T(np - le) * s;
          }
          T rs = 0;
          T* cs = accsum[tid].data();
          for (int64_t k = 0; k < m; ++k) {
            const T e = edge_of(w[k], row[k], dist);
            row[k] = e;
            rs += e;
            cs[k] += e;
          }
          rowsum[i] = rs;
        }
        Tensor e = at::from_blob(buf.data(), {ni, m}, q_.options());
        Tensor dqb = dq.narrow(0, i0, ni);
        dqb.addmm_(e, g.r);                               // row view: Σ_k E_ik r_k
        acc[tid].addmm_(e.t(), g.q.narrow(0, i0, ni));   // column view: Σ_i E_ik q_i
        if (dist != kSim) subtract_norm_term(dqb.data_ptr<T>(), g.qp + i0 * d, rowsum.data(), ni, d);
      }
    });
    T* dc = dcols.data_ptr<T>();
    for (int t = 0; t < nthreads; ++t) {
      if (!acc[t].defined()) continue;
      dcols.add_(acc[t]);
      if (dist != kSim) subtract_norm_term(dc, g.rp, accsum[t].data(), m, d);
    }
  });
  if (self) return {dq + dcols, at::empty({0, d}, q_.options())};
  return {dq, dcols};
}

// ------------------------------------------------------------------------------------ lifted structure

// h_ik = pair(a_i, a_k) + s·(v_ik − pos_margin), s = +1 for a distance, −1 for a similarity;
// pair = logaddexp(a_i, a_k) over the rows that have negatives (0 if neither has).
template <typename T>
struct LiftedPair {
  const T* a;
  const bool* has;
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
};

void check_lifted(const Tensor& q, const Tensor& labels, const Tensor& a, const Tensor& has_neg) {
  const int64_t n = q.size(0);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == n,
              "dml_kernels: labels must be int64 of shape (", n, ")");
  TORCH_CHECK(a.dim() == 1 && a.size(0) == n, "dml_kernels: a must have shape (", n, ")");
  TORCH_CHECK(has_neg.scalar_type() == at::kBool && has_neg.dim() == 1 && has_neg.size(0) == n,
              "dml_kernels: has_neg must be bool of shape (", n, ")");
}

std::tuple<Tensor, Tensor> lifted_pos_cpu(const Tensor& q_, const Tensor& labels, const Tensor& a_,
                                          const Tensor& has_neg, int64_t dist, double pos_margin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, c10::nullopt);
  check_dist(dist);
  check_lifted(q_, labels, a_, has_neg);
  const int64_t n = q_.size(0);
  Tensor lab = labels.contiguous(), hasn = has_neg.contiguous(), a = a_.detach().to(q_.scalar_type()).contiguous();
  Tensor sum = at::empty({n}, q_.options()), count = at::empty({n}, q_.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "lifted_pos_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, c10::nullopt, dist);
    const int64_t* lp = lab.data_ptr<int64_t>();
    const LiftedPair<T> lift{a.data_ptr<T>(), hasn.data_ptr<bool>()};
    const T s = dist == kSim ? T(-1) : T(1), pm = T(pos_margin);
    at::parallel_for(0, (n + kBR - 1) / kBR, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf(kBR * tile_cols(g));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBR, ni = std::min(kBR, n - i0);
        std::vector<T> acc(ni, T(0));
        std::vector<int64_t> cnt(ni, 0);
        for (int64_t k0 = 0; k0 < n; k0 += kBC) {
          const int64_t nk = std::min(kBC, n - k0);
          g.qtile(i0, ni, k0, nk, buf.data());
          for (int64_t i = 0; i < ni; ++i) {
            const int64_t gi = i0 + i;
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t gk = k0 + k;
              if (lp[gk] != lp[gi] || gk == gi) continue;
              T wi, wk;
              const T h = lift.pair(gi, gk, &wi, &wk) + s * (value_of(buf[i * nk + k], dist) - pm);
              const T rh = h > 0 ? h : T(0);
              acc[i] += rh * rh / 2;
              ++cnt[i];
            }
          }
        }
        for (int64_t i = 0; i < ni; ++i) {
          sum.data_ptr<T>()[i0 + i] = acc[i];
          count.data_ptr<int64_t>()[i0 + i] = cnt[i];
        }
      }
    });
  });
  return {sum, count};
}

std::tuple<Tensor, Tensor> lifted_pos_backward_cpu(const Tensor& grad_sum, const Tensor& q_, const Tensor& labels,
                                                   const Tensor& a_, const Tensor& has_neg, int64_t dist,
                                                   double pos_margin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_embeddings(q_, c10::nullopt);
  check_dist(dist);
  check_lifted(q_, labels, a_, has_neg);
  const int64_t n = q_.size(0), d = q_.size(1);
  TORCH_CHECK(grad_sum.dim() == 1 && grad_sum.size(0) == n, "dml_kernels: grad_sum must have shape (", n, ")");
  Tensor lab = labels.contiguous(), hasn = has_neg.contiguous(), a = a_.detach().to(q_.scalar_type()).contiguous();
  Tensor gs = grad_sum.to(q_.scalar_type()).contiguous();
  Tensor dq = at::zeros({n, d}, q_.options()), da = at::zeros({n}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "lifted_pos_backward_cpu", [&] {
    using T = scalar_t;
    Geometry<T> g(q_, c10::nullopt, dist);
    const int64_t* lp = lab.data_ptr<int64_t>();
    const T* gp = gs.data_ptr<T>();
    const LiftedPair<T> lift{a.data_ptr<T>(), hasn.data_ptr<bool>()};
    const T s = dist == kSim ? T(-1) : T(1), pm = T(pos_margin);
    T* dap = da.data_ptr<T>();
    rows_grad(g, dq, [&](int64_t i0, int64_t ni, int64_t k0, int64_t nk, T* buf, T* rowsum) {
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t gi = i0 + i;
        T dai = 0;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t gk = k0 + k;
          T& st = buf[i * nk + k];
          if (lp[gk] != lp[gi] || gk == gi) {
            st = 0;
            continue;
          }
          T wi, wk;
          const T h = lift.pair(gi, gk, &wi, &wk) + s * (value_of(st, dist) - pm);
          // the terms of (i, k) in row i and of (k, i) in row k are equal: both upstream grads
          const T c = (gp[gi] + gp[gk]) * (h > 0 ? h : T(0));
          dai += c * wi;
          st = edge_of(c * s, st, dist);
          rowsum[i] += st;
        }
        dap[gi] += dai;
      }
      return true;
    });
  });
  return {dq, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) {
  m.impl("pair_values", &pair_values_cpu);
  m.impl("pair_values_backward", &pair_values_backward_cpu);
  m.impl("pair_reduce", &pair_reduce_cpu);
  m.impl("pair_reduce_backward", &pair_reduce_backward_cpu);
  m.impl("ms_thresholds", &ms_thresholds_cpu);
  m.impl("ms_mask", &ms_mask_cpu);
  m.impl("batch_hard", &batch_hard_cpu);
  m.impl("triplet_all", &triplet_all_cpu);
  m.impl("lifted_pos", &lifted_pos_cpu);
  m.impl("lifted_pos_backward", &lifted_pos_backward_cpu);
  m.impl("triplet_all_backward", &triplet_all_backward_cpu);
}

}  // namespace cpu
}  // namespace dml
