// CUDA kernels of the dml_kernels extension (SPEC §4.7): pair_values and pair_reduce (forward and
// backward, fused MultiSimilarity mining) and the miners, fp32 / fp64 with FMA (fp16/bf16 inputs are
// upcast by the caller and accumulate in fp32). This file: the kernels (each a sweep of pair_engine.cuh
// fed to an epilogue of epilogues.cuh), their launches, the op entry points and TORCH_LIBRARY_IMPL.
// Every launch is checked and nothing syncs with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../dml_kernels.h"
#include "../values_backward.h"
#include "epilogues.cuh"
#include "pair_engine.cuh"

namespace dml {
namespace cuda {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------ kernels

// One 32 × 32 tile of the value matrix per CTA (grid: column tiles × row tiles).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_values_kernel(const T* __restrict__ q, const T* __restrict__ qn, int64_t n, const T* __restrict__ r,
                       const T* __restrict__ rn, int64_t m, int64_t d, int64_t dist, T* __restrict__ out) {
  __shared__ Stages<T> sm;
  const Sweep<T> sw{{q, qn, n}, {r, rn, m}, d, dist, static_cast<int64_t>(blockIdx.y) * kTile, &sm};
  sw.tile(static_cast<int64_t>(blockIdx.x) * kTile, [&](int, int64_t i, int64_t k, bool ok, T st) {
    if (ok) out[i * m + k] = value_of(st, dist);
  });
}

// Per query row: the positive and negative reductions (pass 2) over the pairs its masks select, refined
// by the row's mining thresholds (pass 1, when p.mine). Writes red_pos / red_neg (n), thr (2 × n, when
// mining) and cnt (4 × n: pairs and nonzero terms of each set).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_reduce_kernel(const T* __restrict__ q, const T* __restrict__ qn, int64_t n, const T* __restrict__ r,
                       const T* __restrict__ rn, int64_t m, int64_t d, Masks mk, Params<T> p,
                       T* __restrict__ red_pos, T* __restrict__ red_neg, T* __restrict__ thr,
                       int64_t* __restrict__ cnt) {
  __shared__ Stages<T> sm;
  const Sweep<T> sw{{q, qn, n}, {r, rn, m}, d, p.dist, static_cast<int64_t>(blockIdx.x) * kTile, &sm};
  T hp[kRowsPerWarp], hn[kRowsPerWarp];
  if (p.mine) row_thresholds(sw, mk, hp, hn, thr);
  Acc<T> ap[kRowsPerWarp], an[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    ap[j].init(p.kind);
    an[j].init(p.kind);
  }
  sw.masked(mk, [&](int j, int64_t, int64_t, T v, bool pos, bool neg) {
    if (p.mine) {
      pos = pos && keep_pos(p.dist, p.eps, v, hn[j]);
      neg = neg && keep_neg(p.dist, p.eps, v, hp[j]);
    }
    if (pos) ap[j].add_pair(p.kind, p.pa, p.pc, v);
    if (neg) an[j].add_pair(p.kind, p.na, p.nc, v);
  });
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const T rp = ap[j].finish(p.kind), rn_ = an[j].finish(p.kind);
    const int64_t i = sw.row(j);
    if (threadIdx.x % 32 == 0 && i < n) {
      red_pos[i] = rp;
      red_neg[i] = rn_;
      cnt[i] = ap[j].pairs;
      cnt[n + i] = an[j].pairs;
      cnt[2 * n + i] = ap[j].nonzero;
      cnt[3 * n + i] = an[j].nonzero;
    }
  }
}

// Gradient of pair_reduce for the CTA's 32 rows, in one of two roles (RowGrad::weight):
// TRANSPOSED = false: rows = queries, columns = references (or the queries, self mode); out = dq.
// TRANSPOSED = true: rows = references, columns = queries; out = dr. The launch swaps the two sides.
// out[a] = Σ_b E[a, b] cols[b] − [distance] (Σ_b E[a, b]) rows[a], E the edge weights of the tile.
template <typename T, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads)
    pair_reduce_backward_kernel(const T* __restrict__ rows_x, const T* __restrict__ rows_n, int64_t nrows,
                                const T* __restrict__ cols_x, const T* __restrict__ cols_n, int64_t ncols,
                                int64_t d, Masks mk, RowGrad<T> rg, T* __restrict__ out) {
  const Side<T> rows{rows_x, rows_n, nrows}, cols{cols_x, cols_n, ncols};
  __shared__ Stages<T> sm;
  __shared__ T sE[kTile][kTile + 1];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t dist = rg.p.dist;
  const bool sim = dist == kSim;
  const Sweep<T> sw{rows, cols, d, dist, static_cast<int64_t>(blockIdx.x) * kTile, &sm};
  T rowsum[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) rowsum[j] = T(0);
  sw.run(
      [&](int j, int64_t a, int64_t b, bool ok, T st) {
        T e = T(0);
        if (ok) e = edge_of(rg.template weight<TRANSPOSED>(mk, a, b, value_of(st, dist)), st, dist);
        sE[warp * kRowsPerWarp + j][lane] = e;
        rowsum[j] += e;
      },
      [&](int64_t b0) {
        __syncthreads();
        // out[a0 + row, :] += E (32 × 32) @ cols[b0 : b0 + 32, :]
        add_edge_product(
            sE, sm.b, [&](int64_t c0, T(*sB)[kTile + 1]) { stage_rows(cols_x, ncols, b0, c0, d, sB); }, d, sw.a0,
            nrows, out);
      });
  if (!sim) {
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const T total = warp_sum(rowsum[j]);
      const int64_t a = sw.row(j);
      if (a < nrows) {
        for (int64_t c = lane; c < d; c += 32) out[a * d + c] -= total * rows_x[a * d + c];
      }
    }
  }
}

// MODE 0: thresholds (hardest positive / negative value per row) into thr (2 × n).
// MODE 1: MultiSimilarityMiner bits: pass 1 = thresholds, pass 2 = the kept pairs (ms_bits).
// MODE 2: BatchHardMiner indices into pidx / nidx (BatchHard).
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    miner_kernel(const T* __restrict__ q, const T* __restrict__ qn, int64_t n, const T* __restrict__ r,
                 const T* __restrict__ rn, int64_t m, int64_t d, Masks mk, int64_t dist, T eps,
                 T* __restrict__ thr, uint8_t* __restrict__ pbits, uint8_t* __restrict__ nbits,
                 int64_t* __restrict__ pidx, int64_t* __restrict__ nidx) {
  __shared__ Stages<T> sm;
  const Sweep<T> sw{{q, qn, n}, {r, rn, m}, d, dist, static_cast<int64_t>(blockIdx.x) * kTile, &sm};
  const bool sim = dist == kSim;
  if (MODE == 2) {
    BatchHard<T> bh[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) bh[j].init(sim);
    sw.masked(mk, [&](int j, int64_t, int64_t k, T v, bool pos, bool neg) { bh[j].add(sim, k, v, pos, neg); });
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      int64_t pi, ni;
      bh[j].finish(pi, ni);
      const int64_t i = sw.row(j);
      if (threadIdx.x % 32 == 0 && i < n) {
        pidx[i] = pi;
        nidx[i] = ni;
      }
    }
    return;
  }
  T hp[kRowsPerWarp], hn[kRowsPerWarp];
  row_thresholds(sw, mk, hp, hn, MODE == 0 ? thr : nullptr);
  if (MODE == 1) ms_bits(sw, mk, eps, hp, hn, pbits, nbits);
}

// ------------------------------------------------------------------------------------ host side

void check_inputs(const Tensor& q, const c10::optional<Tensor>& r, int64_t dist) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 2, "dml_kernels: q must be a 2-D CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dml_kernels: the CUDA kernels take float32 or float64 (the caller upcasts fp16/bf16), got ",
              q.scalar_type());
  if (r.has_value()) {
    TORCH_CHECK(r->device() == q.device() && r->scalar_type() == q.scalar_type() && r->dim() == 2 &&
                    r->size(1) == q.size(1),
                "dml_kernels: r must be M×", q.size(1), " on q's device with q's dtype");
  }
  TORCH_CHECK(dist == kSim || dist == kEuclid || dist == kSqEuclid, "dml_kernels: bad dist code ", dist);
}

Tensor sq_norms(const Tensor& x) { return (x * x).sum(1).contiguous(); }

unsigned int blocks_for(int64_t rows) {
  const int64_t b = (rows + kTile - 1) / kTile;
  TORCH_CHECK(b < (int64_t(1) << 31), "dml_kernels: too many rows");
  return static_cast<unsigned int>(std::max<int64_t>(b, 1));
}

// The operands of an op, made contiguous (r = q in self mode); squared norms on demand.
struct Operands {
  Tensor q, r, qn, rn;
  bool self;
  int64_t n, m, d;
  void norms() {
    qn = sq_norms(q);
    rn = self ? qn : sq_norms(r);
  }
};

Operands operands(const Tensor& q_, const c10::optional<Tensor>& r_) {
  Operands o;
  o.q = q_.contiguous();
  o.r = r_.has_value() ? r_->contiguous() : o.q;
  o.self = !r_.has_value();
  o.n = o.q.size(0);
  o.m = o.r.size(0);
  o.d = o.q.size(1);
  return o;
}

struct MaskHolder {
  Masks mk;
  Tensor keep[3];
};

void set_col_mask(MaskHolder& h, const Tensor& q, int64_t m, const c10::optional<Tensor>& col_mask) {
  if (!col_mask.has_value()) return;
  TORCH_CHECK(col_mask->scalar_type() == at::kBool && col_mask->dim() == 1 && col_mask->size(0) == m &&
                  col_mask->device() == q.device(),
              "dml_kernels: col_mask must be a bool tensor of shape (", m, ") on q's device");
  h.keep[2] = col_mask->contiguous();
  h.mk.cm = h.keep[2].data_ptr<bool>();
}

MaskHolder make_masks(const Operands& o, const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
                      const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits) {
  const Tensor& q = o.q;
  const int64_t n = o.n, m = o.m;
  MaskHolder h;
  h.mk = Masks{nullptr, nullptr, nullptr, nullptr, 0, o.self, nullptr};
  if (pos_bits.has_value() || neg_bits.has_value()) {
    TORCH_CHECK(pos_bits.has_value() && neg_bits.has_value(), "dml_kernels: pos_bits and neg_bits go together");
    const int64_t nbytes = (m + 7) / 8;
    for (const auto* t : {&*pos_bits, &*neg_bits}) {
      TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 2 && t->size(0) == n && t->size(1) == nbytes &&
                      t->device() == q.device(),
                  "dml_kernels: packed pair bits must be uint8 of shape (", n, ", ", nbytes, ") on q's device");
    }
    h.keep[0] = pos_bits->contiguous();
    h.keep[1] = neg_bits->contiguous();
    h.mk.pb = h.keep[0].data_ptr<uint8_t>();
    h.mk.nb = h.keep[1].data_ptr<uint8_t>();
    h.mk.nbytes = nbytes;
    return h;
  }
  TORCH_CHECK(labels.has_value(), "dml_kernels: labels or packed pair bits are required");
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == n &&
                  labels->device() == q.device(),
              "dml_kernels: labels must be int64 of shape (", n, ") on q's device");
  h.keep[0] = labels->contiguous();
  h.mk.lab = h.keep[0].data_ptr<int64_t>();
  if (o.self) {
    h.mk.rlab = h.mk.lab;
  } else {
    TORCH_CHECK(ref_labels.has_value() && ref_labels->scalar_type() == at::kLong && ref_labels->dim() == 1 &&
                    ref_labels->size(0) == m && ref_labels->device() == q.device(),
                "dml_kernels: ref_labels must be int64 of shape (", m, ") on q's device");
    h.keep[1] = ref_labels->contiguous();
    h.mk.rlab = h.keep[1].data_ptr<int64_t>();
  }
  return h;
}

template <typename T>
Params<T> make_params(int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
                      c10::optional<double> eps) {
  TORCH_CHECK(kind == kLse || kind == kLse1 || kind == kHinge, "dml_kernels: bad reduce kind ", kind);
  return Params<T>{dist, kind, T(pa), T(pc), T(na), T(nc), T(eps.has_value() ? *eps : 0.0), eps.has_value()};
}

// ------------------------------------------------------------------------------------ pair_values

Tensor pair_values_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Operands o = operands(q_, r_);
  Tensor out = at::empty({o.n, o.m}, o.q.options());
  if (o.n == 0 || o.m == 0) return out;
  o.norms();
  const dim3 grid(blocks_for(o.m), blocks_for(o.n));
  TORCH_CHECK(grid.y <= 65535, "dml_kernels: pair_values supports at most ", 65535 * kTile, " query rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "pair_values_cuda", [&] {
    using T = scalar_t;
    pair_values_kernel<T><<<grid, kThreads, 0, stream>>>(o.q.data_ptr<T>(), o.qn.data_ptr<T>(), o.n,
                                                         o.r.data_ptr<T>(), o.rn.data_ptr<T>(), o.m, o.d, dist,
                                                         out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> pair_values_backward_cuda(const Tensor& grad, const Tensor& values, const Tensor& q,
                                                     const c10::optional<Tensor>& r, int64_t dist) {
  check_inputs(q, r, dist);
  const c10::cuda::CUDAGuard guard(q.device());
  return values_backward(grad, values, q, r, dist);
}

// ------------------------------------------------------------------------------------ pair_reduce

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_reduce_cuda(
    const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
    const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
    const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind, double pa, double pc, double na, double nc,
    c10::optional<double> eps, const c10::optional<Tensor>& col_mask) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Operands o = operands(q_, r_);
  const int64_t n = o.n;
  MaskHolder h = make_masks(o, labels, ref_labels, pos_bits, neg_bits);
  set_col_mask(h, o.q, o.m, col_mask);
  Tensor red_pos = at::empty({n}, o.q.options()), red_neg = at::empty({n}, o.q.options());
  Tensor thr = at::zeros({2, n}, o.q.options());
  Tensor cnt = at::empty({4, n}, o.q.options().dtype(at::kLong));
  if (n == 0) return {red_pos, red_neg, thr, cnt};
  o.norms();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "pair_reduce_cuda", [&] {
    using T = scalar_t;
    pair_reduce_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        o.q.data_ptr<T>(), o.qn.data_ptr<T>(), o.n, o.r.data_ptr<T>(), o.rn.data_ptr<T>(), o.m, o.d, h.mk,
        make_params<T>(dist, kind, pa, pc, na, nc, eps), red_pos.data_ptr<T>(), red_neg.data_ptr<T>(),
        thr.data_ptr<T>(), cnt.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {red_pos, red_neg, thr, cnt};
}

// One kernel, two launches: the query rows (dq), then, unless the reference set is q itself or detached,
// the reference rows (dr) with the sides swapped.
std::tuple<Tensor, Tensor> pair_reduce_backward_cuda(
    const Tensor& grad_pos, const Tensor& grad_neg, const Tensor& q_, const c10::optional<Tensor>& r_,
    const c10::optional<Tensor>& labels, const c10::optional<Tensor>& ref_labels,
    const c10::optional<Tensor>& pos_bits, const c10::optional<Tensor>& neg_bits, int64_t dist, int64_t kind,
    double pa, double pc, double na, double nc, c10::optional<double> eps, const Tensor& red_pos,
    const Tensor& red_neg, const Tensor& thr, const c10::optional<Tensor>& col_mask, bool need_r) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Operands o = operands(q_, r_);
  const int64_t n = o.n, m = o.m, d = o.d;
  const Tensor& q = o.q;
  MaskHolder h = make_masks(o, labels, ref_labels, pos_bits, neg_bits);
  set_col_mask(h, q, m, col_mask);
  for (const Tensor* t : {&grad_pos, &grad_neg, &red_pos, &red_neg})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == q.device(),
                "dml_kernels: per-row statistics must have shape (", n, ") on q's device");
  TORCH_CHECK(thr.dim() == 2 && thr.size(0) == 2 && thr.size(1) == n && thr.device() == q.device(),
              "dml_kernels: thresholds must be 2×", n);
  const auto st = q.scalar_type();
  Tensor gp = grad_pos.to(st).contiguous(), gn = grad_neg.to(st).contiguous();
  Tensor rp = red_pos.to(st).contiguous(), rnn = red_neg.to(st).contiguous(), th = thr.to(st).contiguous();
  Tensor dq = at::zeros({n, d}, q.options());
  need_r = need_r && !o.self;  // a detached reference set (memory bank) gets no gradient pass
  Tensor dr = need_r ? at::zeros({m, d}, q.options()) : at::empty({0, d}, q.options());
  if (n == 0 || m == 0) return {dq, dr};
  o.norms();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "pair_reduce_backward_cuda", [&] {
    using T = scalar_t;
    RowGrad<T> rg{make_params<T>(dist, kind, pa, pc, na, nc, eps), gp.data_ptr<T>(), gn.data_ptr<T>(),
                  rp.data_ptr<T>(), rnn.data_ptr<T>(), th.data_ptr<T>(), th.data_ptr<T>() + n};
    pair_reduce_backward_kernel<T, false><<<blocks_for(n), kThreads, 0, stream>>>(
        o.q.data_ptr<T>(), o.qn.data_ptr<T>(), n, o.r.data_ptr<T>(), o.rn.data_ptr<T>(), m, d, h.mk, rg,
        dq.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_r) {
      pair_reduce_backward_kernel<T, true><<<blocks_for(m), kThreads, 0, stream>>>(
          o.r.data_ptr<T>(), o.rn.data_ptr<T>(), m, o.q.data_ptr<T>(), o.qn.data_ptr<T>(), n, d, h.mk, rg,
          dr.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dr};
}

// ------------------------------------------------------------------------------------ miners

// Checks the inputs, builds the label masks and launches miner_kernel<MODE> over the query rows (nothing
// to launch without rows, or, for the bits, without references); outputs as for miner_kernel.
template <int MODE>
void run_miner(const Tensor& q_, const c10::optional<Tensor>& r_, const c10::optional<Tensor>& labels,
               const c10::optional<Tensor>& ref_labels, const c10::optional<Tensor>& pos_bits,
               const c10::optional<Tensor>& neg_bits, int64_t dist, double eps, Tensor* thr, Tensor* pb, Tensor* nb,
               Tensor* pi, Tensor* ni) {
  Operands o = operands(q_, r_);
  MaskHolder h = make_masks(o, labels, ref_labels, pos_bits, neg_bits);
  if (thr) *thr = at::empty({2, o.n}, o.q.options());
  if (pb) {
    *pb = at::zeros({o.n, (o.m + 7) / 8}, o.q.options().dtype(at::kByte));
    *nb = at::zeros_like(*pb);
  }
  if (pi) {
    *pi = at::empty({o.n}, o.q.options().dtype(at::kLong));
    *ni = at::empty({o.n}, o.q.options().dtype(at::kLong));
  }
  if (o.n == 0 || (MODE == 1 && o.m == 0)) return;
  o.norms();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "dml_miner_cuda", [&] {
    using T = scalar_t;
    miner_kernel<T, MODE><<<blocks_for(o.n), kThreads, 0, stream>>>(
        o.q.data_ptr<T>(), o.qn.data_ptr<T>(), o.n, o.r.data_ptr<T>(), o.rn.data_ptr<T>(), o.m, o.d, h.mk, dist,
        T(eps), thr ? thr->data_ptr<T>() : nullptr, pb ? pb->data_ptr<uint8_t>() : nullptr,
        nb ? nb->data_ptr<uint8_t>() : nullptr, pi ? pi->data_ptr<int64_t>() : nullptr,
        ni ? ni->data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> ms_thresholds_cuda(const Tensor& q_, const c10::optional<Tensor>& r_,
                                              const c10::optional<Tensor>& labels,
                                              const c10::optional<Tensor>& ref_labels,
                                              const c10::optional<Tensor>& pos_bits,
                                              const c10::optional<Tensor>& neg_bits, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor thr;
  run_miner<0>(q_, r_, labels, ref_labels, pos_bits, neg_bits, dist, 0.0, &thr, nullptr, nullptr, nullptr, nullptr);
  return {thr.select(0, 0).clone(), thr.select(0, 1).clone()};
}

std::tuple<Tensor, Tensor> ms_mask_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                        const c10::optional<Tensor>& ref_labels, int64_t dist, double eps) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor pb, nb;
  run_miner<1>(q_, r_, labels, ref_labels, c10::nullopt, c10::nullopt, dist, eps, nullptr, &pb, &nb, nullptr,
               nullptr);
  return {pb, nb};
}

std::tuple<Tensor, Tensor> batch_hard_cuda(const Tensor& q_, const c10::optional<Tensor>& r_, const Tensor& labels,
                                           const c10::optional<Tensor>& ref_labels, int64_t dist) {
  check_inputs(q_, r_, dist);
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor pi, ni;
  run_miner<2>(q_, r_, labels, ref_labels, c10::nullopt, c10::nullopt, dist, 0.0, nullptr, nullptr, nullptr, &pi,
               &ni);
  return {pi, ni};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CUDA, m) {
  m.impl("pair_values", &pair_values_cuda);
  m.impl("pair_values_backward", &pair_values_backward_cuda);
  m.impl("pair_reduce", &pair_reduce_cuda);
  m.impl("pair_reduce_backward", &pair_reduce_backward_cuda);
  m.impl("ms_thresholds", &ms_thresholds_cuda);
  m.impl("ms_mask", &ms_mask_cuda);
  m.impl("batch_hard", &batch_hard_cuda);
}

}  // namespace cuda
}  // namespace dml
