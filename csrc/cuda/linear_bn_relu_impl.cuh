// Host implementation of dgl_fast::linear_bn_relu / linear_bn_relu_bwd: argument checks, the
// matrix products (cuBLAS through ATen), allocation, launch shapes (columns a block, row chunks)
// and dtype dispatch, written against a launcher (cuda/launch.cuh) so that linear_bn_relu.cu
// instantiates it with CUDA launches and tests/simt with the SIMT emulator.
// Kernels and the numerics of their sums: linear_bn_relu_kernels.cuh. Schemas: csrc/dgl_fast.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cuda/linear_bn_relu_kernels.cuh"
#include "linear_bn_relu.h"

namespace dgl_fast {
namespace linear_bn_relu_detail {

// Columns per block: the widest of 32 / 16 / 8 that still gives every SM a block.
inline int pick_cols(int64_t M, int64_t sms) {
  if ((M + 31) / 32 >= sms) return 32;
  if ((M + 15) / 16 >= sms) return 16;
  return 8;
}

constexpr int kBlocksPerSm = 2;       // target grid: two 256-thread blocks (16 warps) per SM
constexpr int kMinRowsPerThread = 2;  // a chunk gives each threadIdx.y at least this many rows

// Rows [0, N) split into `chunks` chunks of `rows` rows (a multiple of the block's row threads;
// the last chunk may be shorter, never empty).
struct RowSplit {
  int64_t chunks, rows;
};

inline RowSplit pick_row_split(int64_t N, int64_t col_blocks, int row_threads, int64_t sms) {
  const int64_t target = kBlocksPerSm * std::max<int64_t>(sms, 1);
  if (col_blocks >= target) return {1, N};
  const int64_t want = (target + col_blocks - 1) / col_blocks;
  const int64_t most = std::max<int64_t>(1, N / (static_cast<int64_t>(kMinRowsPerThread) * row_threads));
  const int64_t chunks = std::min(want, most);
  if (chunks <= 1) return {1, N};
  const int64_t per = (N + chunks - 1) / chunks;
  const int64_t rows = (per + row_threads - 1) / row_threads * row_threads;
  return {(N + rows - 1) / rows, rows};
}

}  // namespace linear_bn_relu_detail

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_impl(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps,
    const Launcher& launch) {
  using namespace linear_bn_relu_detail;
  at::Tensor out, z, mean, var;
  std::tie(out, z, mean, var) =
      linear_bn_relu_forward_setup(x, w, bias, gamma, beta, running_mean, running_var, training);
  const typename Launcher::Guard guard(x.device());
  const int64_t N = z.size(0), M = z.size(1);
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
  if (M == 0 || N == 0) return {out, z, mean, var};
  const int64_t sms = launch.multiprocessors();
  const int cols = pick_cols(M, sms);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto cols_tag) {
      constexpr int COLS = decltype(cols_tag)::value;
      const int64_t col_blocks = (M + COLS - 1) / COLS;
      const RowSplit split = pick_row_split(N, col_blocks, kThreads / COLS, sms);
      const dim3 block(COLS, kThreads / COLS);
      if (split.chunks == 1) {
        launch(bn_relu_fwd_kernel<COLS, scalar_t, acc_t>, dim3(static_cast<unsigned>(col_blocks)), block,
               z.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
               mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), N, M,
               training, static_cast<acc_t>(eps));
        return;
      }
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(split.chunks));
      at::Tensor part;
      if (training) {
        part = at::empty({4, split.chunks, M}, mean.options());
        launch(bn_stats_chunk_kernel<COLS, scalar_t, acc_t>, grid, block, z.const_data_ptr<scalar_t>(),
               part.mutable_data_ptr<acc_t>(), N, M, split.rows);
      }
      launch(bn_relu_fwd_chunk_kernel<COLS, scalar_t, acc_t>, grid, block, z.const_data_ptr<scalar_t>(),
             training ? part.const_data_ptr<acc_t>() : nullptr, g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
             mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), N, M,
             split.rows, training, static_cast<acc_t>(eps));
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
  const int64_t sms = launch.multiprocessors();
  const int cols = pick_cols(M, sms);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto cols_tag) {
      constexpr int COLS = decltype(cols_tag)::value;
      const int64_t col_blocks = (M + COLS - 1) / COLS;
      const RowSplit split = pick_row_split(N, col_blocks, kThreads / COLS, sms);
      const dim3 block(COLS, kThreads / COLS);
      if (split.chunks == 1) {
        launch(bn_relu_bwd_kernel<COLS, scalar_t, acc_t>, dim3(static_cast<unsigned>(col_blocks)), block,
               grad_out.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
               b.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(), va.const_data_ptr<acc_t>(),
               grad_z.mutable_data_ptr<scalar_t>(), grad_gamma.mutable_data_ptr<acc_t>(),
               grad_beta.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(), N, M, training,
               static_cast<acc_t>(eps));
        return;
      }
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(split.chunks));
      at::Tensor part = at::empty({3, split.chunks, M}, grad_gamma.options());
      at::Tensor tickets = at::empty({col_blocks}, grad_gamma.options().dtype(at::kInt));
      unsigned* tk = reinterpret_cast<unsigned*>(tickets.mutable_data_ptr<int32_t>());
      launch(bn_relu_bwd_sums_kernel<COLS, scalar_t, acc_t>, grid, block, grad_out.const_data_ptr<scalar_t>(),
             z.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
             mu.const_data_ptr<acc_t>(), va.const_data_ptr<acc_t>(), part.mutable_data_ptr<acc_t>(), tk, N, M,
             split.rows, static_cast<acc_t>(eps));
      launch(bn_relu_bwd_chunk_kernel<COLS, scalar_t, acc_t>, grid, block, grad_out.const_data_ptr<scalar_t>(),
             z.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
             mu.const_data_ptr<acc_t>(), va.const_data_ptr<acc_t>(), part.mutable_data_ptr<acc_t>(), tk,
             grad_z.mutable_data_ptr<scalar_t>(), grad_gamma.mutable_data_ptr<acc_t>(),
             grad_beta.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(), N, M, split.rows, training,
             static_cast<acc_t>(eps));
    };
    if (cols == 32) run(std::integral_constant<int, 32>{});
    else if (cols == 16) run(std::integral_constant<int, 16>{});
    else run(std::integral_constant<int, 8>{});
  });
  at::Tensor grad_x = at::mm(grad_z, w);
  at::Tensor grad_w = at::mm(grad_z.t(), x);
  return {grad_x, grad_w, grad_bias.to(z.scalar_type()), grad_gamma, grad_beta};
}

}  // namespace dgl_fast
