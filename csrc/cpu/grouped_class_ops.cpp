// CPU driver of the grouped-column class ops (SubCenterArcFace, SoftTriple; the math is ../grouped_classes.h):
//
// grouped_class_rows(x, W, labels, K, mode, params) -> (t, rest)
//   x (B×D), W (D×C·K, PML's layout, any strides: a transposed view of a C·K×D matrix is read as is), labels (B,)
//   int64. Per row: t = the target class's value (0 for a label outside [0, C)), rest = log Σ_{c≠y} e^{a·v_c}
//   (−inf without another class). Never a B×C·K buffer: tiles of a row block × a chunk of whole classes.
// grouped_class_rows_backward(g_t, g_rest, x, W, labels, rest, K, mode, params, need_x, need_w) -> (dx, dW)
//   Tiles recomputed. dW: a pass over class chunks (each owns its columns of dW, all rows' contributions, then the
//   normalisation's chain); dx: from the same tiles as per-group partials summed in group order when both gradients
//   are wanted (3 GEMMs per tile), else (or when the partials would be large) a pass over row blocks (each owns its
//   rows). dx is 0×D without need_x, dW 0×0 without need_w. Deterministic (fixed chunking and groups, independent
//   of the thread count), no atomics.
//
// The forward's work items are (chunk group, row block): a group of consecutive class chunks keeps per-row partial
// LSE statistics (at most kGroups groups: O(kGroups·B) memory), merged in group order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../grouped_classes.h"
#include "fast_exp.h"

namespace dml {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kRows = 256;            // rows per block
constexpr int64_t kTileElems = 64 * 1024;  // elements of a tile (rows × columns of a chunk)
constexpr int64_t kGroups = 64;            // forward: at most this many chunk groups of partial statistics
constexpr int64_t kGradGroups = 16;        // backward: chunk groups with a partial dx each (both gradients wanted)
constexpr int64_t kFuseElems = int64_t(1) << 24;  // ... while their partials hold at most this many elements

template <typename T>
GroupParams<T> group_params(int64_t K, int64_t mode, at::ArrayRef<double> params) {
  TORCH_CHECK(K >= 1, "dml_kernels::grouped_class_rows: K must be >= 1, got ", K);
  TORCH_CHECK(mode == kGroupMax || mode == kGroupSoftmax, "dml_kernels::grouped_class_rows: bad mode ", mode);
  TORCH_CHECK(params.size() == 3 || params.size() == 5,
              "dml_kernels::grouped_class_rows: params must be [a, 1/gamma, w_eps] (+ [tile elements, rows] on the "
              "CPU), got ", params.size(), " values");
  GroupParams<T> p;
  p.k = K;
  p.mode = mode;
  p.a = T(params[0]);
  p.inv_gamma = T(params[1]);
  p.w_eps = T(params[2]);
  return p;
}

// The checked operands of one call and its tiling; rw = the per-column reciprocal norms (empty: no normalisation).
template <typename T>
struct Problem {
  Tensor x, W, labels, rw;
  const T* xp;
  const T* wp;
  const int64_t* yp;
  const T* rwp = nullptr;
  int64_t b, d, n_cols, n_classes, s0, s1;
  int64_t cpc;  // classes per chunk
  GroupParams<T> p;

  int64_t rows;  // rows per block

  // tiling: params [3], [4] when given (> 0): tile elements and rows per block (the tests' small tiles)
  Problem(const Tensor& x_, const Tensor& W_, const Tensor& labels_, const GroupParams<T>& p_,
          at::ArrayRef<double> params)
      : p(p_) {
    x = x_.contiguous();
    W = W_;
    labels = labels_.contiguous();
    b = x.size(0);
    d = x.size(1);
    n_cols = W.size(1);
    n_classes = n_cols / p.k;
    s0 = W.stride(0);
    s1 = W.stride(1);
    xp = x.data_ptr<T>();
    wp = W.data_ptr<T>();
    yp = labels.data_ptr<int64_t>();
    if (p.w_eps > T(0)) {
      rw = at::linalg_vector_norm(W, 2, at::IntArrayRef{0}, false, c10::nullopt).clamp_min(double(p.w_eps));
      rw = at::reciprocal(rw).contiguous();
      rwp = rw.data_ptr<T>();
    }
    const bool custom = params.size() == 5 && params[3] > 0 && params[4] > 0;
    rows = custom ? static_cast<int64_t>(params[4]) : kRows;
    const int64_t elems = custom ? static_cast<int64_t>(params[3]) : kTileElems;
    cpc = std::max<int64_t>(1, elems / (std::min<int64_t>(std::max<int64_t>(b, 1), rows) * p.k));
  }

  int64_t n_chunks() const { return (n_classes + cpc - 1) / cpc; }
  int64_t n_row_blocks() const { return (b + rows - 1) / rows; }
  int64_t buf_elems() const { return std::min(b, rows) * cpc * p.k; }

  // S = x̂[i0, i0+ni) · Ŵ[:, chunk's columns] into buf (ni × nj, row-major), scaled by rw.
  void tile(int64_t i0, int64_t ni, int64_t c0, int64_t nc, T* buf) const {
    const int64_t j0 = c0 * p.k, nj = nc * p.k;
    Tensor out = at::from_blob(buf, {ni, nj}, x.options());
    at::mm_out(out, x.narrow(0, i0, ni), W.narrow(1, j0, nj));
    if (rwp == nullptr) return;
    for (int64_t i = 0; i < ni; ++i)
      for (int64_t j = 0; j < nj; ++j) buf[i * nj + j] *= rwp[j0 + j];
  }
};

template <typename T>
void check_operands(const Tensor& x, const Tensor& W, const Tensor& labels, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "dml_kernels::grouped_class_rows: x must be a 2-D CPU tensor");
  TORCH_CHECK(W.dim() == 2 && W.size(0) == x.size(1) && W.scalar_type() == x.scalar_type() && W.device().is_cpu(),
              "dml_kernels::grouped_class_rows: W must be D×C·K (D = ", x.size(1), ") with x's dtype, got ",
              W.sizes(), " ", W.scalar_type());
  TORCH_CHECK(W.size(1) % K == 0, "dml_kernels::grouped_class_rows: W has ", W.size(1),
              " columns, not a multiple of K = ", K);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == x.size(0),
              "dml_kernels::grouped_class_rows: labels must be int64 of shape (", x.size(0), ")");
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const Problem<T>& pr) {
  const int64_t b = pr.b, K = pr.p.k;
  const T ninf = -std::numeric_limits<T>::infinity();
  Tensor t = at::zeros({b}, pr.x.options()), rest = at::empty({b}, pr.x.options());
  if (b == 0) return {t, rest};
  T* tp = t.data_ptr<T>();
  const int64_t nch = pr.n_chunks(), ngr = std::min(nch, kGroups), nrb = pr.n_row_blocks();
  const int64_t per = (nch + ngr - 1) / std::max<int64_t>(ngr, 1);
  std::vector<T> pm(ngr * b, ninf), pl(ngr * b, T(0));
  at::parallel_for(0, ngr * nrb, 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> buf(pr.buf_elems()), z(pr.cpc);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / nrb, i0 = (w % nrb) * pr.rows, ni = std::min(pr.rows, b - i0);
      for (int64_t ch = g * per; ch < std::min(nch, (g + 1) * per); ++ch) {
        const int64_t c0 = ch * pr.cpc, nc = std::min(pr.cpc, pr.n_classes - c0), nj = nc * K;
        pr.tile(i0, ni, c0, nc, buf.data());
        for (int64_t i = 0; i < ni; ++i) {
          const int64_t row = i0 + i, y = pr.yp[row];
          T zmax = ninf;
          for (int64_t c = 0; c < nc; ++c) {  // the logits a·v of the chunk's classes, −inf at the target
            const T v = group_value(pr.p, buf.data() + i * nj + c * K);
            z[c] = pr.p.a * v;
            if (c0 + c == y) {
              tp[row] = v;  // the one chunk holding the target writes it
              z[c] = ninf;
            }
            zmax = z[c] > zmax ? z[c] : zmax;
          }
          if (zmax == ninf) continue;
          OnlineLse<T> acc{pm[g * b + row], pl[g * b + row]};
          acc.merge(zmax, sum_exp(z.data(), nc, zmax));  // float: the vectorised exp of fast_exp.h
          pm[g * b + row] = acc.m;
          pl[g * b + row] = acc.l;
        }
      }
    }
  });
  T* rp = rest.data_ptr<T>();
  for (int64_t i = 0; i < b; ++i) {
    OnlineLse<T> acc;
    acc.init(ninf);
    for (int64_t g = 0; g < ngr; ++g) acc.merge(pm[g * b + i], pl[g * b + i]);
    rp[i] = acc.finish(ninf);
  }
  return {t, rest};
}

std::tuple<Tensor, Tensor> grouped_class_rows_cpu(const Tensor& x, const Tensor& W, const Tensor& labels, int64_t K,
                                                  int64_t mode, at::ArrayRef<double> params) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_operands<float>(x, W, labels, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dml_kernels::grouped_class_rows: the CPU kernel takes float32 or float64, got ", x.scalar_type());
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_class_rows_cpu", [&] {
    using T = scalar_t;
    return forward_impl<T>(Problem<T>(x.detach(), W.detach(), labels, group_params<T>(K, mode, params), params));
  });
}

inline float exp_le0(float x) { return exp_nonpos(x); }  // fast_exp.h's vectorisable expf (x ≤ 0)
inline double exp_le0(double x) { return std::exp(x); }

// Per-row scratch of tile_edges: class values, their gradients, the centres' weights.
template <typename T>
struct EdgeScratch {
  std::vector<T> v, g, w;
  explicit EdgeScratch(int64_t cpc, int64_t k) : v(cpc), g(cpc), w(cpc * k) {}
};

// The tile in buf (ni × nj: S, scaled by rw) → E = dL/dS in place (per class: dL/dv spread over its centres):
// dL/dv = g_t at the target, g_r·a·e^{a·v − rest} elsewhere (class_grad's rule; its exponentials in one
// vectorisable loop per row), then group_grad.
template <typename T>
void tile_edges(const Problem<T>& pr, int64_t i0, int64_t ni, int64_t c0, int64_t nc, T* buf, const T* gt,
                const T* gr, const T* rest, EdgeScratch<T>& sc) {
  const int64_t K = pr.p.k, nj = nc * K;
  const T a = pr.p.a;
  T* __restrict v = sc.v.data();
  T* __restrict g = sc.g.data();
  for (int64_t i = 0; i < ni; ++i) {
    const int64_t row = i0 + i, y = pr.yp[row];
    T* srow = buf + i * nj;
    for (int64_t c = 0; c < nc; ++c) v[c] = group_value(pr.p, srow + c * K, sc.w.data() + c * K);
    const T ga = gr[row] * a, r = rest[row];
    if (ga != T(0)) {
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) g[c] = ga * exp_le0(a * v[c] - r);
    } else {
      std::fill(g, g + nc, T(0));
    }
    if (y >= c0 && y < c0 + nc) g[y - c0] = gt[row];
    for (int64_t c = 0; c < nc; ++c) group_grad(pr.p, srow + c * K, v[c], g[c], sc.w.data() + c * K, srow + c * K);
  }
}

template <typename T>
std::tuple<Tensor, Tensor> backward_impl(const Problem<T>& pr, const Tensor& g_t, const Tensor& g_r,
                                         const Tensor& rest, bool need_x, bool need_w, const Tensor& W_orig) {
  const int64_t b = pr.b, d = pr.d, K = pr.p.k;
  const T* gt = g_t.data_ptr<T>();
  const T* gr = g_r.data_ptr<T>();
  const T* rs = rest.data_ptr<T>();
  Tensor dx = need_x ? at::zeros({b, d}, pr.x.options()) : at::empty({0, d}, pr.x.options());
  Tensor dW;
  if (need_w) {  // W's own layout: row-major D×C·K, or the transpose of a row-major C·K×D matrix
    const bool colmajor = W_orig.stride(0) == 1 && W_orig.stride(1) == W_orig.size(0) && W_orig.size(0) > 1;
    dW = colmajor ? at::zeros({pr.n_cols, d}, pr.x.options()).t() : at::zeros({d, pr.n_cols}, pr.x.options());
  } else {
    dW = at::empty({0, 0}, pr.x.options());
  }
  if (b == 0 || pr.n_classes == 0) return {dx, dW};
  const int64_t nch = pr.n_chunks(), nrb = pr.n_row_blocks();
  const int64_t buf_elems = pr.buf_elems();
  // Class-block pass: each chunk owns its columns of dW. With both gradients (and O(kGradGroups·B·D) memory), the
  // same tiles also give dx: per group of consecutive chunks a partial dx, summed in group order.
  const int64_t ngr = std::min(nch, kGradGroups), per = (nch + ngr - 1) / ngr;
  const bool fuse = need_x && need_w && ngr * b * d <= kFuseElems;
  if (need_w) {
    T* dwp = dW.data_ptr<T>();
    const int64_t ds0 = dW.stride(0), ds1 = dW.stride(1);
    std::vector<Tensor> part(fuse ? ngr : 0);
    at::parallel_for(0, ngr, 1, [&](int64_t g0, int64_t g1) {
      std::vector<T> buf(buf_elems), wg(pr.cpc * K);
      EdgeScratch<T> ds(pr.cpc, K);
      for (int64_t g = g0; g < g1; ++g) {
        if (fuse) part[g] = at::zeros({b, d}, pr.x.options());
        for (int64_t ch = g * per; ch < std::min(nch, (g + 1) * per); ++ch) {
          const int64_t c0 = ch * pr.cpc, nc = std::min(pr.cpc, pr.n_classes - c0), j0 = c0 * K, nj = nc * K;
          Tensor block = dW.narrow(1, j0, nj);  // D × nj
          for (int64_t r = 0; r < nrb; ++r) {
            const int64_t i0 = r * pr.rows, ni = std::min(pr.rows, b - i0);
            pr.tile(i0, ni, c0, nc, buf.data());
            tile_edges(pr, i0, ni, c0, nc, buf.data(), gt, gr, rs, ds);
            const Tensor e = at::from_blob(buf.data(), {ni, nj}, pr.x.options());
            block.addmm_(pr.x.narrow(0, i0, ni).t(), e);
            if (fuse) {
              if (pr.rwp != nullptr)
                for (int64_t i = 0; i < ni; ++i)
                  for (int64_t j = 0; j < nj; ++j) buf[i * nj + j] *= pr.rwp[j0 + j];
              part[g].narrow(0, i0, ni).addmm_(e, pr.W.narrow(1, j0, nj).t());
            }
          }
          if (pr.rwp == nullptr) continue;
          // g_j (the gradient of ŵ_j) is in the block: dW_j = rw_j g_j − rw_j³ (w_j·g_j) w_j (unclamped norms)
          std::fill(wg.begin(), wg.end(), T(0));
          for (int64_t dd = 0; dd < d; ++dd)
            for (int64_t j = 0; j < nj; ++j)
              wg[j] += pr.wp[dd * pr.s0 + (j0 + j) * pr.s1] * dwp[dd * ds0 + (j0 + j) * ds1];
          for (int64_t j = 0; j < nj; ++j) wg[j] = norm_chain_coef(pr.rwp[j0 + j], wg[j], pr.p.w_eps);
          for (int64_t dd = 0; dd < d; ++dd)
            for (int64_t j = 0; j < nj; ++j) {
              T& o = dwp[dd * ds0 + (j0 + j) * ds1];
              o = o * pr.rwp[j0 + j] + wg[j] * pr.wp[dd * pr.s0 + (j0 + j) * pr.s1];
            }
        }
      }
    });
    for (int64_t g = 0; g < static_cast<int64_t>(part.size()); ++g) dx.add_(part[g]);
  }
  if (need_x && !fuse) {  // row-block pass: each block owns its rows of dx
    at::parallel_for(0, nrb, 1, [&](int64_t r0, int64_t r1) {
      std::vector<T> buf(buf_elems);
      EdgeScratch<T> ds(pr.cpc, K);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i0 = r * pr.rows, ni = std::min(pr.rows, b - i0);
        Tensor rows = dx.narrow(0, i0, ni);
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t c0 = ch * pr.cpc, nc = std::min(pr.cpc, pr.n_classes - c0), j0 = c0 * K, nj = nc * K;
          pr.tile(i0, ni, c0, nc, buf.data());
          tile_edges(pr, i0, ni, c0, nc, buf.data(), gt, gr, rs, ds);
          if (pr.rwp != nullptr)
            for (int64_t i = 0; i < ni; ++i)
              for (int64_t j = 0; j < nj; ++j) buf[i * nj + j] *= pr.rwp[j0 + j];
          rows.addmm_(at::from_blob(buf.data(), {ni, nj}, pr.x.options()), pr.W.narrow(1, j0, nj).t());
        }
      }
    });
  }
  return {dx, dW};
}

std::tuple<Tensor, Tensor> grouped_class_rows_backward_cpu(const Tensor& g_t, const Tensor& g_r, const Tensor& x,
                                                           const Tensor& W, const Tensor& labels, const Tensor& rest,
                                                           int64_t K, int64_t mode, at::ArrayRef<double> params,
                                                           bool need_x, bool need_w) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_operands<float>(x, W, labels, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dml_kernels::grouped_class_rows_backward: the CPU kernel takes float32 or float64, got ",
              x.scalar_type());
  const int64_t b = x.size(0);
  for (const Tensor* v : {&g_t, &g_r, &rest})
    TORCH_CHECK(v->dim() == 1 && v->size(0) == b && v->device().is_cpu(),
                "dml_kernels::grouped_class_rows_backward: per-row statistics must have shape (", b, ")");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_class_rows_backward_cpu", [&] {
    using T = scalar_t;
    const auto st = x.scalar_type();
    const Tensor gt = g_t.to(st).contiguous(), gr = g_r.to(st).contiguous(), rs = rest.to(st).contiguous();
    return backward_impl<T>(Problem<T>(x.detach(), W.detach(), labels, group_params<T>(K, mode, params), params), gt, gr, rs,
                            need_x, need_w, W);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CPU, m) {
  m.impl("grouped_class_rows", &grouped_class_rows_cpu);
  m.impl("grouped_class_rows_backward", &grouped_class_rows_backward_cpu);
}

}  // namespace cpu
}  // namespace dml
