// CUDA kernels of the grouped-column class ops (SubCenterArcFace, SoftTriple): grouped_class_rows and its backward
// (schemas in ../registration.cpp, per-class-group math in ../grouped_classes.h, CPU driver in
// ../cpu/grouped_class_ops.cpp). fp32 / fp64 with FMA (fp16/bf16 inputs are upcast by the caller).
//
// Geometry (pair_engine.cuh's): a CTA of 256 threads (8 warps) and tiles of 32 rows × 32 columns, warp w holding
// rows 4w..4w+3 and lane l column l. A column tile holds whole classes: ⌊32/K⌋ classes, ⌊32/K⌋·K columns (K ≤ 32).
// The tile's values (dot products × the columns' reciprocal norms) go to shared memory, row by row, so lane c
// reduces class c's K centres of each of its warp's rows (group_value); only the warp reads its rows (__syncwarp).
//   forward       grouped_rows_kernel: a CTA owns 32 rows and sweeps every class tile (online LSE per lane, merged
//                 over the warp once); writes t and rest of its rows.
//   backward, dx  grouped_rows_grad_kernel: the same sweep; E = dL/dS (group_grad) × rw, dx_rows += E·W_tileᵀ.
//   backward, dW  grouped_cols_grad_kernel: a CTA owns one class tile (its columns of dW) and sweeps every row
//                 tile: dW_tile += X_tileᵀ·E; then the normalisation's chain per column (rw·g − rw³ (w·g) w).
// Every CTA writes only what it owns: deterministic, no atomics. W is read through its strides (PML's D×C·K
// row-major, or the transpose of a row-major C·K×D matrix), coalesced along whichever index is contiguous. 64-bit
// offsets; nothing syncs with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../grouped_classes.h"
#include "pair_engine.cuh"

namespace dml {
namespace cuda {
namespace {

using at::Tensor;

// W (D × n_cols) read through strides, with optional per-column reciprocal norms.
template <typename T>
struct Cols {
  const T* w;
  const T* rw;  // nullptr: not normalised
  int64_t s0, s1, n_cols, n_classes;
  __device__ __forceinline__ T at(int64_t dd, int64_t j) const { return w[dd * s0 + j * s1]; }
};

// The per-row inputs of the backward: labels, rest, dL/dt, dL/drest.
template <typename T>
struct RowStats {
  const int64_t* y;
  const T* rest;
  const T* gt;
  const T* gr;
};

// Stage d-columns [d0, d0 + 32) of W's tile columns [j0, j0 + nj) into sB[jj][c] (0 outside), coalesced along W's
// contiguous index. Every thread calls.
template <typename T>
__device__ __forceinline__ void stage_cols(const Cols<T>& W, int64_t j0, int64_t nj, int64_t d0, int64_t d,
                                           T (*sB)[kTile + 1]) {
  const bool jfast = W.s1 == 1;
  for (int t = threadIdx.x; t < kTile * kTile; t += kThreads) {
    const int jj = jfast ? t % kTile : t / kTile, c = jfast ? t / kTile : t % kTile;
    sB[jj][c] = (jj < nj && d0 + c < d) ? W.at(d0 + c, j0 + jj) : T(0);
  }
}

// The tile S[r][jj] = x̂_{i0+r}·ŵ_{j0+jj} (× rw) into sS; 0 outside the rows / the tile's nj columns. Every thread
// calls; on return the warp's own rows of sS are visible to the warp.
template <typename T>
__device__ __forceinline__ void grouped_tile(const T* __restrict__ x, int64_t b, int64_t i0, const Cols<T>& W,
                                             int64_t j0, int64_t nj, int64_t d, Stages<T>& sm,
                                             T (*sS)[kTile + 1]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) acc[j] = T(0);
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    stage_rows(x, b, i0, d0, d, sm.a);
    stage_cols(W, j0, nj, d0, d, sm.b);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTile; ++c) {
      const T w = sm.b[lane][c];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) acc[j] = fma(sm.a[warp * kRowsPerWarp + j][c], w, acc[j]);
    }
    __syncthreads();
  }
  const T scale = (lane < nj && W.rw != nullptr) ? W.rw[j0 + lane] : T(1);
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) sS[warp * kRowsPerWarp + j][lane] = lane < nj ? acc[j] * scale : T(0);
  __syncwarp();
}

// E = dL/dS of the warp's rows in the tile of classes [c0, c0 + nc) (0 elsewhere), from sS into sE.
template <typename T>
__device__ __forceinline__ void tile_edges(const GroupParams<T>& p, const RowStats<T>& rs, int64_t b, int64_t i0,
                                           int64_t c0, int64_t nc, T (*sS)[kTile + 1], T (*sE)[kTile + 1]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) sE[warp * kRowsPerWarp + j][lane] = T(0);
  __syncwarp();
  if (lane < nc) {
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int r = warp * kRowsPerWarp + j;
      const int64_t row = i0 + r;
      if (row >= b) continue;
      const T* s = &sS[r][lane * p.k];
      T* e = &sE[r][lane * p.k];
      const T v = group_value(p, s, e);
      const T g = class_grad(c0 + lane == rs.y[row], v, p.a, rs.rest[row], rs.gt[row], rs.gr[row]);
      group_grad(p, s, v, g, e, e);
    }
  }
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_rows_kernel(const T* __restrict__ x, int64_t b, int64_t d, Cols<T> W, const int64_t* __restrict__ y,
                        GroupParams<T> p, T* __restrict__ t_out, T* __restrict__ rest_out) {
  __shared__ Stages<T> sm;
  __shared__ T sS[kTile][kTile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, cpt = kTile / p.k;
  OnlineLse<T> acc[kRowsPerWarp];
  T tv[kRowsPerWarp];
  int64_t ys[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    acc[j].init(-inf<T>());
    tv[j] = T(0);
    const int64_t row = i0 + warp * kRowsPerWarp + j;
    ys[j] = row < b ? y[row] : -1;
  }
  for (int64_t c0 = 0; c0 < W.n_classes; c0 += cpt) {
    const int64_t nc = min(cpt, W.n_classes - c0);
    grouped_tile(x, b, i0, W, c0 * p.k, nc * p.k, d, sm, sS);
    if (lane < nc) {
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const T v = group_value(p, &sS[warp * kRowsPerWarp + j][lane * p.k]);
        if (c0 + lane == ys[j])
          tv[j] = v;
        else
          acc[j].add(p.a * v);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    for (int o = 16; o > 0; o >>= 1) {
      const T m2 = __shfl_xor_sync(0xffffffffu, acc[j].m, o), l2 = __shfl_xor_sync(0xffffffffu, acc[j].l, o);
      acc[j].merge(m2, l2);
    }
    const T t = warp_sum(tv[j]);  // one lane holds the target's value, the others 0
    const int64_t row = i0 + warp * kRowsPerWarp + j;
    if (lane == 0 && row < b) {
      t_out[row] = t;
      rest_out[row] = acc[j].finish(-inf<T>());
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_rows_grad_kernel(const T* __restrict__ x, int64_t b, int64_t d, Cols<T> W, RowStats<T> rs,
                             GroupParams<T> p, T* __restrict__ dx) {
  __shared__ Stages<T> sm;
  __shared__ T sS[kTile][kTile + 1];
  __shared__ T sE[kTile][kTile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, cpt = kTile / p.k;
  for (int64_t c0 = 0; c0 < W.n_classes; c0 += cpt) {
    const int64_t nc = min(cpt, W.n_classes - c0), j0 = c0 * p.k, nj = nc * p.k;
    grouped_tile(x, b, i0, W, j0, nj, d, sm, sS);
    tile_edges(p, rs, b, i0, c0, nc, sS, sE);
    if (W.rw != nullptr && lane < nj) {
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) sE[warp * kRowsPerWarp + j][lane] *= W.rw[j0 + lane];
    }
    __syncwarp();
    // dx[i0 + r, :] += E (32 × nj) · W[:, j0 : j0 + nj]ᵀ
    add_edge_product(
        sE, sm.b, [&](int64_t d0, T(*sB)[kTile + 1]) { stage_cols(W, j0, nj, d0, d, sB); }, d, i0, b, dx);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_cols_grad_kernel(const T* __restrict__ x, int64_t b, int64_t d, Cols<T> W, RowStats<T> rs,
                             GroupParams<T> p, T* __restrict__ dw, int64_t ds0, int64_t ds1) {
  __shared__ Stages<T> sm;
  __shared__ T sS[kTile][kTile + 1];
  __shared__ T sE[kTile][kTile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t cpt = kTile / p.k, c0 = static_cast<int64_t>(blockIdx.x) * cpt;
  const int64_t nc = min(cpt, W.n_classes - c0), j0 = c0 * p.k, nj = nc * p.k;
  for (int64_t i0 = 0; i0 < b; i0 += kTile) {
    grouped_tile(x, b, i0, W, j0, nj, d, sm, sS);
    tile_edges(p, rs, b, i0, c0, nc, sS, sE);
    __syncthreads();  // sE complete over the warps
    // dW[:, j0 + lane] += Σ_r E[r][lane] x[i0 + r, :], thread (warp, lane): d-columns d0 + 4·warp + j
    for (int64_t d0 = 0; d0 < d; d0 += kTile) {
      stage_rows(x, b, i0, d0, d, sm.a);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const int c = warp * kRowsPerWarp + j;
        T s = T(0);
#pragma unroll 8
        for (int r = 0; r < kTile; ++r) s = fma(sE[r][lane], sm.a[r][c], s);
        if (lane < nj && d0 + c < d) dw[(d0 + c) * ds0 + (j0 + lane) * ds1] += s;  // this CTA owns the column
      }
      __syncthreads();
    }
  }
  if (W.rw == nullptr) return;
  // the normalisation's chain, column jj = 4·warp + q: dW_j = rw_j g_j − rw_j³ (w_j·g_j) w_j (unclamped norms)
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int jj = warp * kRowsPerWarp + q;
    if (jj >= nj) continue;  // warp-uniform
    const int64_t j = j0 + jj;
    T wg = T(0);
    for (int64_t dd = lane; dd < d; dd += 32) wg = fma(W.at(dd, j), dw[dd * ds0 + j * ds1], wg);
    wg = warp_sum(wg);
    const T rwj = W.rw[j], coef = norm_chain_coef(rwj, wg, p.w_eps);
    for (int64_t dd = lane; dd < d; dd += 32) {
      T& o = dw[dd * ds0 + j * ds1];
      o = o * rwj + coef * W.at(dd, j);
    }
  }
}

// ------------------------------------------------------------------------------------ host side

unsigned int grid_for(int64_t n, int64_t per) {
  const int64_t g = (n + per - 1) / per;
  TORCH_CHECK(g < (int64_t(1) << 31), "dml_kernels::grouped_class_rows: too many tiles");
  return static_cast<unsigned int>(std::max<int64_t>(g, 1));
}

void check_operands(const Tensor& x, const Tensor& W, const Tensor& labels, int64_t K, int64_t mode,
                    at::ArrayRef<double> params) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "dml_kernels::grouped_class_rows: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dml_kernels::grouped_class_rows: the CUDA kernels take float32 or float64 (the caller upcasts "
              "fp16/bf16), got ", x.scalar_type());
  TORCH_CHECK(W.dim() == 2 && W.size(0) == x.size(1) && W.scalar_type() == x.scalar_type() &&
                  W.device() == x.device(),
              "dml_kernels::grouped_class_rows: W must be D×C·K (D = ", x.size(1), ") on x's device with x's dtype");
  TORCH_CHECK(K >= 1 && K <= kTile, "dml_kernels::grouped_class_rows: the CUDA kernels take 1 <= K <= ", kTile,
              " centres per class, got ", K);
  TORCH_CHECK(W.size(1) % K == 0, "dml_kernels::grouped_class_rows: W has ", W.size(1),
              " columns, not a multiple of K = ", K);
  TORCH_CHECK(mode == kGroupMax || mode == kGroupSoftmax, "dml_kernels::grouped_class_rows: bad mode ", mode);
  TORCH_CHECK(params.size() == 3 || params.size() == 5,  // [3], [4]: the CPU driver's tiling, unused here
              "dml_kernels::grouped_class_rows: params must be [a, 1/gamma, w_eps] (+ 2 CPU tiling values)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == x.size(0) &&
                  labels.device() == x.device(),
              "dml_kernels::grouped_class_rows: labels must be int64 of shape (", x.size(0), ") on x's device");
}

template <typename T>
GroupParams<T> group_params(int64_t K, int64_t mode, at::ArrayRef<double> params) {
  GroupParams<T> p;
  p.k = K;
  p.mode = mode;
  p.a = T(params[0]);
  p.inv_gamma = T(params[1]);
  p.w_eps = T(params[2]);
  return p;
}

// W's reciprocal column norms 1 / max(‖w_j‖, eps) (an undefined tensor without normalisation).
Tensor recip_norms(const Tensor& W, double eps) {
  if (!(eps > 0)) return Tensor();
  return at::linalg_vector_norm(W, 2, at::IntArrayRef{0}, false, c10::nullopt).clamp_min(eps).reciprocal().contiguous();
}

template <typename T>
Cols<T> cols_of(const Tensor& W, const Tensor& rw, int64_t K) {
  return Cols<T>{W.data_ptr<T>(), rw.defined() ? rw.data_ptr<T>() : nullptr, W.stride(0), W.stride(1), W.size(1),
                 W.size(1) / K};
}

std::tuple<Tensor, Tensor> grouped_class_rows_cuda(const Tensor& x_, const Tensor& W, const Tensor& labels_,
                                                   int64_t K, int64_t mode, at::ArrayRef<double> params) {
  check_operands(x_, W, labels_, K, mode, params);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), labels = labels_.contiguous();
  const int64_t b = x.size(0), d = x.size(1);
  Tensor t = at::zeros({b}, x.options()), rest = at::empty({b}, x.options());
  if (b == 0) return {t, rest};
  const Tensor rw = recip_norms(W, params[2]);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_class_rows_cuda", [&] {
    using T = scalar_t;
    grouped_rows_kernel<T><<<grid_for(b, kTile), kThreads, 0, stream>>>(
        x.data_ptr<T>(), b, d, cols_of<T>(W, rw, K), labels.data_ptr<int64_t>(), group_params<T>(K, mode, params),
        t.data_ptr<T>(), rest.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {t, rest};
}

std::tuple<Tensor, Tensor> grouped_class_rows_backward_cuda(const Tensor& g_t, const Tensor& g_r, const Tensor& x_,
                                                            const Tensor& W, const Tensor& labels_, const Tensor& rest,
                                                            int64_t K, int64_t mode, at::ArrayRef<double> params,
                                                            bool need_x, bool need_w) {
  check_operands(x_, W, labels_, K, mode, params);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), labels = labels_.contiguous();
  const int64_t b = x.size(0), d = x.size(1), n_cols = W.size(1);
  for (const Tensor* v : {&g_t, &g_r, &rest})
    TORCH_CHECK(v->dim() == 1 && v->size(0) == b && v->device() == x.device(),
                "dml_kernels::grouped_class_rows_backward: per-row statistics must have shape (", b,
                ") on x's device");
  const auto st = x.scalar_type();
  const Tensor gt = g_t.to(st).contiguous(), gr = g_r.to(st).contiguous(), rs = rest.to(st).contiguous();
  Tensor dx = need_x ? at::zeros({b, d}, x.options()) : at::empty({0, d}, x.options());
  Tensor dW;
  if (need_w) {  // W's own layout: row-major D×C·K, or the transpose of a row-major C·K×D matrix
    const bool colmajor = W.size(0) > 1 && W.stride(0) == 1 && W.stride(1) == W.size(0);
    dW = colmajor ? at::zeros({n_cols, d}, x.options()).t() : at::zeros({d, n_cols}, x.options());
  } else {
    dW = at::empty({0, 0}, x.options());
  }
  if (b == 0 || n_cols == 0) return {dx, dW};
  const Tensor rw = recip_norms(W, params[2]);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "grouped_class_rows_backward_cuda", [&] {
    using T = scalar_t;
    const Cols<T> cols = cols_of<T>(W, rw, K);
    const RowStats<T> stats{labels.data_ptr<int64_t>(), rs.data_ptr<T>(), gt.data_ptr<T>(), gr.data_ptr<T>()};
    const GroupParams<T> p = group_params<T>(K, mode, params);
    if (need_x) {
      grouped_rows_grad_kernel<T><<<grid_for(b, kTile), kThreads, 0, stream>>>(x.data_ptr<T>(), b, d, cols, stats,
                                                                               p, dx.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_w) {
      grouped_cols_grad_kernel<T><<<grid_for(n_cols / K, kTile / K), kThreads, 0, stream>>>(
          x.data_ptr<T>(), b, d, cols, stats, p, dW.data_ptr<T>(), dW.stride(0), dW.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dx, dW};
}

}  // namespace

TORCH_LIBRARY_IMPL(dml_kernels, CUDA, m) {
  m.impl("grouped_class_rows", &grouped_class_rows_cuda);
  m.impl("grouped_class_rows_backward", &grouped_class_rows_backward_cuda);
}

}  // namespace cuda
}  // namespace dml
