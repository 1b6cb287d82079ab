// Shared pieces of dgl_fast::linear_bn_relu / linear_bn_relu_bwd (CPU and CUDA kernels): argument
// checks in the words of the Python call, the statistics dtype, and the forward's setup (the matrix
// product and the outputs), done the same way on every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <utility>

namespace dgl_fast {

// The dtype statistics and BatchNorm parameters use for inputs of dtype `t`.
inline at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_linear_bn_relu_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rm,
                                      const at::Tensor& rv, bool training) {
  TORCH_CHECK(x.dim() == 2, "linear_bn_relu: expected input rows of shape [N, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "linear_bn_relu: expected weight of shape [M, ", x.size(1),
              "], got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() == w.scalar_type(),
              "linear_bn_relu: expected input and weight of the same floating dtype, got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(x.device() == w.device(), "linear_bn_relu: expected input and weight on one device, got ", x.device(),
              " and ", w.device());
  const int64_t M = w.size(0);
  const auto sdt = stat_dtype(x.scalar_type());
  auto check_vec = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == M, "linear_bn_relu: expected ", name, " of shape [", M, "], got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), "linear_bn_relu: expected ", name, " on ", x.device(), ", got ", t.device());
  };
  if (bias.has_value()) {
    check_vec(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "linear_bn_relu: expected bias of dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{gamma, "BatchNorm weight"},
                                {beta, "BatchNorm bias"}, {rm, "running_mean"}, {rv, "running_var"}}) {
    check_vec(t, name);
    TORCH_CHECK(t.scalar_type() == sdt, "linear_bn_relu: expected ", name, " of dtype ", sdt, " for ", x.scalar_type(),
                " inputs, got ", t.scalar_type());
  }
  TORCH_CHECK(!training || x.size(0) > 1, "linear_bn_relu: expected more than 1 value per channel when training, got ",
              "input rows of shape ", x.sizes());
}

// What linear_bn_relu's kernels fill in, prepared the same way on every device: the arguments
// checked, z = x @ w.T (+ bias) by the device's BLAS, out allocated, and mean / var allocated
// (training) or copied from the running statistics (eval). Returns (out, z, mean, var).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_forward_setup(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training) {
  check_linear_bn_relu_args(x, w, bias, gamma, beta, running_mean, running_var, training);
  at::Tensor z = bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  const int64_t N = z.size(0), M = z.size(1);
  const auto sdt = stat_dtype(x.scalar_type());
  at::Tensor out = at::empty({N, M}, z.options());
  at::Tensor mean = training ? at::empty({M}, z.options().dtype(sdt)) : running_mean.clone();
  at::Tensor var = training ? at::empty({M}, z.options().dtype(sdt)) : running_var.clone();
  return {out, z, mean, var};
}

}  // namespace dgl_fast
