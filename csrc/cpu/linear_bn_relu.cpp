// CPU kernels of dgl_fast::linear_bn_relu / linear_bn_relu_bwd.
// Schemas: csrc/dgl_fast.cpp. The matrix products go through ATen (BLAS); bias, BatchNorm
// statistics, normalisation and ReLU (and their backward) are one pass over each column here.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "linear_bn_relu.h"

namespace dgl_fast {
namespace {

constexpr int64_t kBlock = 64;  // columns a CPU task owns

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_cpu(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps) {
  at::Tensor out, z, mean, var;
  std::tie(out, z, mean, var) =
      linear_bn_relu_forward_setup(x, w, bias, gamma, beta, running_mean, running_var, training);
  const int64_t N = z.size(0), M = z.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* g = gamma.const_data_ptr<acc_t>();
    const acc_t* bt = beta.const_data_ptr<acc_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    // Blocks of columns, rows walked in memory order (the inner loop runs along a row); each
    // column is still summed over n in ascending order.
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      sum_t s1[kBlock], s2[kBlock], mus[kBlock];
      acc_t inv[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * kBlock, W = std::min(M - m0, kBlock);
        if (training) {  // two passes: mean, then the biased variance around it (sums in double, as ATen's CPU BN)
          std::fill(s1, s1 + W, sum_t(0));
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = zp + n * M + m0;
            for (int64_t k = 0; k < W; ++k) s1[k] += static_cast<sum_t>(row[k]);
          }
          for (int64_t k = 0; k < W; ++k) mus[k] = s1[k] / static_cast<sum_t>(N);
          std::fill(s2, s2 + W, sum_t(0));
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = zp + n * M + m0;
            for (int64_t k = 0; k < W; ++k) {
              const sum_t d = static_cast<sum_t>(row[k]) - mus[k];
              s2[k] += d * d;
            }
          }
          for (int64_t k = 0; k < W; ++k) {
            mp[m0 + k] = static_cast<acc_t>(mus[k]);
            vp[m0 + k] = static_cast<acc_t>(s2[k] / static_cast<sum_t>(N));
          }
        }
        for (int64_t k = 0; k < W; ++k) inv[k] = acc_t(1) / std::sqrt(vp[m0 + k] + static_cast<acc_t>(eps));
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* row = zp + n * M + m0;
          scalar_t* orow = op + n * M + m0;
          for (int64_t k = 0; k < W; ++k) {
            const int64_t m = m0 + k;
            const acc_t y = g[m] * ((static_cast<acc_t>(row[k]) - mp[m]) * inv[k]) + bt[m];
            orow[k] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
          }
        }
      }
    });
  });
  return {out, z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& w, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, bool training, double eps) {
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "linear_bn_relu backward: expected a gradient of shape ", z.sizes(),
              ", got ", grad_out.sizes());
  const int64_t N = z.size(0), M = z.size(1);
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_gamma = at::empty_like(gamma);
  at::Tensor grad_beta = at::empty_like(beta);
  at::Tensor grad_bias = at::empty({M}, z.options().dtype(stat_dtype(z.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_bn_relu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
    const acc_t* ga = gamma.const_data_ptr<acc_t>();
    const acc_t* bt = beta.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* vp = var.const_data_ptr<acc_t>();
    acc_t* dg = grad_gamma.mutable_data_ptr<acc_t>();
    acc_t* db = grad_beta.mutable_data_ptr<acc_t>();
    acc_t* dbias = grad_bias.mutable_data_ptr<acc_t>();
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      sum_t sg[kBlock], sgx[kBlock], sdz[kBlock];
      acc_t inv[kBlock], sum_g[kBlock], sum_gx[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * kBlock, W = std::min(M - m0, kBlock);
        for (int64_t k = 0; k < W; ++k) inv[k] = acc_t(1) / std::sqrt(vp[m0 + k] + static_cast<acc_t>(eps));
        std::fill(sg, sg + W, sum_t(0));
        std::fill(sgx, sgx + W, sum_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* zrow = zp + n * M + m0;
          const scalar_t* grow = gp + n * M + m0;
          for (int64_t k = 0; k < W; ++k) {
            const int64_t m = m0 + k;
            const acc_t xhat = (static_cast<acc_t>(zrow[k]) - mp[m]) * inv[k];
            const acc_t gv = (ga[m] * xhat + bt[m] > acc_t(0)) ? static_cast<acc_t>(grow[k]) : acc_t(0);
            sg[k] += gv;
            sgx[k] += static_cast<sum_t>(gv) * xhat;
          }
        }
        for (int64_t k = 0; k < W; ++k) {
          sum_g[k] = static_cast<acc_t>(sg[k]);
          sum_gx[k] = static_cast<acc_t>(sgx[k]);
          dg[m0 + k] = sum_gx[k];
          db[m0 + k] = sum_g[k];
        }
        const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
        std::fill(sdz, sdz + W, sum_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* zrow = zp + n * M + m0;
          const scalar_t* grow = gp + n * M + m0;
          scalar_t* dzrow = gz + n * M + m0;
          for (int64_t k = 0; k < W; ++k) {
            const int64_t m = m0 + k;
            const acc_t xhat = (static_cast<acc_t>(zrow[k]) - mp[m]) * inv[k];
            const acc_t gv = (ga[m] * xhat + bt[m] > acc_t(0)) ? static_cast<acc_t>(grow[k]) : acc_t(0);
            const acc_t scale = ga[m] * inv[k];
            const acc_t dz = training ? scale * (gv - sum_g[k] * inv_n - xhat * sum_gx[k] * inv_n) : scale * gv;
            dzrow[k] = static_cast<scalar_t>(dz);
            sdz[k] += static_cast<sum_t>(static_cast<scalar_t>(dz));
          }
        }
        for (int64_t k = 0; k < W; ++k) dbias[m0 + k] = static_cast<acc_t>(sdz[k]);
      }
    });
  });
  at::Tensor grad_x = at::mm(grad_z, w);
  at::Tensor grad_w = at::mm(grad_z.t(), x);
  return {grad_x, grad_w, grad_bias.to(z.scalar_type()), grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CPU, m) {
  m.impl("linear_bn_relu", &linear_bn_relu_cpu);
  m.impl("linear_bn_relu_bwd", &linear_bn_relu_bwd_cpu);
}

}  // namespace dgl_fast
