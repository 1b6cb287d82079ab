// CUDA kernels of dgl_fast::linear_bn_relu / linear_bn_relu_bwd / bn_update_stats and their host logic,
// written against a launcher (csrc/cuda/launch.cuh): compiled by nvcc in linear_bn_relu.cu and by the
// SIMT emulator in tests/simt. Schemas: csrc/dgl_fast.cpp.
//
// The matrix products go to cuBLAS through ATen (addmm / mm, on the current stream). Everything
// else of a Linear + BatchNorm + ReLU layer is one kernel each way:
//   forward:  column statistics (two passes over z, from L2 for head-sized layers), normalise,
//             affine, ReLU, written once;
//   backward: ReLU mask and BatchNorm backward (column sums of g and g * xhat, then grad_z),
//             with grad_gamma, grad_beta and the Linear bias gradient in the same kernel.
// A block of 256 threads owns COLS consecutive columns (one per threadIdx.x, so rows are read
// coalesced) and 256 / COLS threads (threadIdx.y) stride over the N rows; partial sums meet in
// shared memory in a fixed order, so results do not depend on scheduling. COLS is 32 when there
// are enough columns to fill the GPU, else 16 or 8 (head layers have M = 256..2048 columns: with
// 32 columns a block, M = 256 would run only 8 blocks).
// bn_update_stats updates the running statistics of up to kMaxLayers layers in one launch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "../aux_head.h"

namespace dgl_fast {
namespace linear_bn_relu_detail {

constexpr int kThreads = 256;

template <int COLS, typename acc_t>
__device__ __forceinline__ acc_t block_column_sum(acc_t v, acc_t (*red)[COLS + 1]) {
  constexpr int ROWS = kThreads / COLS;
  red[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) total += red[r][threadIdx.x];
  __syncthreads();
  return total;
}

// Columns per block: the widest of 32 / 16 / 8 that still gives every SM a block.
inline int pick_cols(int64_t M, int64_t sms) {
  if ((M + 31) / 32 >= sms) return 32;
  if ((M + 15) / 16 >= sms) return 16;
  return 8;
}

// z [N, M] row-major; gamma, beta, mean, var [M] (acc_t); out [N, M].
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_fwd_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                       acc_t* __restrict__ mean, acc_t* __restrict__ var, scalar_t* __restrict__ out, int64_t N,
                       int64_t M, bool training, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  acc_t mu = 0, va = 0;
  if (training) {
    acc_t s = 0;
    if (active)
      for (int64_t n = threadIdx.y; n < N; n += ROWS) s += static_cast<acc_t>(z[n * M + col]);
    mu = block_column_sum<COLS>(s, red) / static_cast<acc_t>(N);
    acc_t ss = 0;
    if (active)
      for (int64_t n = threadIdx.y; n < N; n += ROWS) {
        const acc_t d = static_cast<acc_t>(z[n * M + col]) - mu;
        ss += d * d;
      }
    va = block_column_sum<COLS>(ss, red) / static_cast<acc_t>(N);
    if (active && threadIdx.y == 0) {
      mean[col] = mu;
      var[col] = va;
    }
  } else if (active) {
    mu = mean[col];
    va = var[col];
  }
  if (!active) return;
  const acc_t invstd = acc_t(1) / sqrt(va + eps);
  const acc_t g = gamma[col], b = beta[col];
  for (int64_t n = threadIdx.y; n < N; n += ROWS) {
    const acc_t y = g * ((static_cast<acc_t>(z[n * M + col]) - mu) * invstd) + b;
    out[n * M + col] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
  }
}

// grad_out, z, grad_z [N, M]; gamma, beta, mean, var, grad_gamma, grad_beta, grad_bias [M] (acc_t).
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, const acc_t* __restrict__ mean,
                       const acc_t* __restrict__ var, scalar_t* __restrict__ grad_z, acc_t* __restrict__ grad_gamma,
                       acc_t* __restrict__ grad_beta, acc_t* __restrict__ grad_bias, int64_t N, int64_t M,
                       bool training, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const acc_t mu = active ? mean[col] : acc_t(0);
  const acc_t invstd = active ? acc_t(1) / sqrt(var[col] + eps) : acc_t(0);
  const acc_t ga = active ? gamma[col] : acc_t(0), bt = active ? beta[col] : acc_t(0);
  acc_t sg = 0, sgx = 0;
  if (active)
    for (int64_t n = threadIdx.y; n < N; n += ROWS) {
      const acc_t xhat = (static_cast<acc_t>(z[n * M + col]) - mu) * invstd;
      const acc_t g = (ga * xhat + bt > acc_t(0)) ? static_cast<acc_t>(grad_out[n * M + col]) : acc_t(0);
      sg += g;
      sgx += g * xhat;
    }
  const acc_t sum_g = block_column_sum<COLS>(sg, red);
  const acc_t sum_gx = block_column_sum<COLS>(sgx, red);
  const acc_t scale = ga * invstd, inv_n = acc_t(1) / static_cast<acc_t>(N);
  acc_t sdz = 0;
  if (active)
    for (int64_t n = threadIdx.y; n < N; n += ROWS) {
      const acc_t xhat = (static_cast<acc_t>(z[n * M + col]) - mu) * invstd;
      const acc_t g = (ga * xhat + bt > acc_t(0)) ? static_cast<acc_t>(grad_out[n * M + col]) : acc_t(0);
      const acc_t dz = training ? scale * (g - sum_g * inv_n - xhat * sum_gx * inv_n) : scale * g;
      const scalar_t dzs = static_cast<scalar_t>(dz);
      grad_z[n * M + col] = dzs;
      sdz += static_cast<acc_t>(dzs);
    }
  const acc_t sum_dz = block_column_sum<COLS>(sdz, red);
  if (active && threadIdx.y == 0) {
    grad_gamma[col] = sum_gx;
    grad_beta[col] = sum_g;
    grad_bias[col] = sum_dz;
  }
}

constexpr int kMaxLayers = 16;

template <typename acc_t>
struct StatsBatch {
  acc_t* rm[kMaxLayers];
  acc_t* rv[kMaxLayers];
  int64_t* nbt[kMaxLayers];
  const acc_t* mean[kMaxLayers];
  const acc_t* var[kMaxLayers];
  int64_t channels[kMaxLayers];
  acc_t momentum[kMaxLayers];
  acc_t unbias[kMaxLayers];
};

// blockIdx.y = layer; threads stride over its channels.
template <typename acc_t>
__global__ void bn_update_stats_kernel(StatsBatch<acc_t> p) {
  const int l = blockIdx.y;
  const acc_t m = p.momentum[l];
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < p.channels[l];
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.rm[l][c] = m * p.mean[l][c] + (acc_t(1) - m) * p.rm[l][c];
    p.rv[l][c] = m * (p.var[l][c] * p.unbias[l]) + (acc_t(1) - m) * p.rv[l][c];
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.nbt[l] += 1;
}

}  // namespace linear_bn_relu_detail

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_impl(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps,
    const Launcher& launch) {
  using namespace linear_bn_relu_detail;
  at::Tensor out, z, mean, var;
  std::tie(out, z, mean, var) = lbr_forward_setup(x, w, bias, gamma, beta, running_mean, running_var, training);
  const typename Launcher::Guard guard(x.device());
  const int64_t N = z.size(0), M = z.size(1);
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
  if (M == 0 || N == 0) return {out, z, mean, var};
  const int cols = pick_cols(M, launch.multiprocessors());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto cols_tag) {
      constexpr int COLS = decltype(cols_tag)::value;
      const dim3 block(COLS, kThreads / COLS), grid(static_cast<unsigned>((M + COLS - 1) / COLS));
      launch(bn_relu_fwd_kernel<COLS, scalar_t, acc_t>, grid, block, z.const_data_ptr<scalar_t>(),
             g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(),
             var.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), N, M, training, static_cast<acc_t>(eps));
    };
    if (cols == 32) run(std::integral_constant<int, 32>{});
    else if (cols == 16) run(std::integral_constant<int, 16>{});
    else run(std::integral_constant<int, 8>{});
  });
  return {out, z, mean, var};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_bwd_impl(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& w, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, bool training,
    double eps, const Launcher& launch) {
  using namespace linear_bn_relu_detail;
  const typename Launcher::Guard guard(z.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "linear_bn_relu backward: expected a gradient of shape ", z.sizes(),
              ", got ", grad_out.sizes());
  const int64_t N = z.size(0), M = z.size(1);
  const auto sdt = stat_dtype(z.scalar_type());
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_gamma = at::empty({M}, z.options().dtype(sdt));
  at::Tensor grad_beta = at::empty({M}, z.options().dtype(sdt));
  at::Tensor grad_bias = at::empty({M}, z.options().dtype(sdt));
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous(), mu = mean.contiguous(), va = var.contiguous();
  if (M == 0 || N == 0) {
    grad_gamma.zero_();
    grad_beta.zero_();
    grad_bias.zero_();
    return {at::mm(grad_z, w), at::mm(grad_z.t(), x), grad_bias.to(z.scalar_type()), grad_gamma, grad_beta};
  }
  const int cols = pick_cols(M, launch.multiprocessors());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto cols_tag) {
      constexpr int COLS = decltype(cols_tag)::value;
      const dim3 block(COLS, kThreads / COLS), grid(static_cast<unsigned>((M + COLS - 1) / COLS));
      launch(bn_relu_bwd_kernel<COLS, scalar_t, acc_t>, grid, block, grad_out.const_data_ptr<scalar_t>(),
             z.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
             mu.const_data_ptr<acc_t>(), va.const_data_ptr<acc_t>(), grad_z.mutable_data_ptr<scalar_t>(),
             grad_gamma.mutable_data_ptr<acc_t>(), grad_beta.mutable_data_ptr<acc_t>(),
             grad_bias.mutable_data_ptr<acc_t>(), N, M, training, static_cast<acc_t>(eps));
    };
    if (cols == 32) run(std::integral_constant<int, 32>{});
    else if (cols == 16) run(std::integral_constant<int, 16>{});
    else run(std::integral_constant<int, 8>{});
  });
  at::Tensor grad_x = at::mm(grad_z, w);
  at::Tensor grad_w = at::mm(grad_z.t(), x);
  return {grad_x, grad_w, grad_bias.to(z.scalar_type()), grad_gamma, grad_beta};
}

template <typename Launcher>
void bn_update_stats_impl(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                          at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums,
                          const Launcher& launch) {
  using namespace linear_bn_relu_detail;
  check_bn_update_args(rms, rvs, nbt, means, vars, counts, momentums);
  if (rms.empty()) return;
  const typename Launcher::Guard guard(rms[0].device());
  for (size_t start = 0; start < rms.size(); start += kMaxLayers) {
    const size_t L = std::min<size_t>(kMaxLayers, rms.size() - start);
    AT_DISPATCH_FLOATING_TYPES(rms[start].scalar_type(), "bn_update_stats_cuda", [&] {
      StatsBatch<scalar_t> p{};
      int64_t widest = 1;
      for (size_t k = 0; k < L; ++k) {
        const size_t i = start + k;
        TORCH_CHECK(rms[i].scalar_type() == rms[start].scalar_type(), "bn_update_stats: layers of mixed dtypes");
        p.rm[k] = rms[i].mutable_data_ptr<scalar_t>();
        p.rv[k] = rvs[i].mutable_data_ptr<scalar_t>();
        p.nbt[k] = nbt[i].mutable_data_ptr<int64_t>();
        p.mean[k] = means[i].const_data_ptr<scalar_t>();
        p.var[k] = vars[i].const_data_ptr<scalar_t>();
        p.channels[k] = rms[i].numel();
        p.momentum[k] = static_cast<scalar_t>(momentums[i]);
        p.unbias[k] = static_cast<scalar_t>(counts[i]) / static_cast<scalar_t>(counts[i] - 1);
        widest = std::max(widest, p.channels[k]);
      }
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>((widest + 255) / 256, 64)), static_cast<unsigned>(L));
      launch(bn_update_stats_kernel<scalar_t>, grid, dim3(256), p);
    });
  }
}

}  // namespace dgl_fast
