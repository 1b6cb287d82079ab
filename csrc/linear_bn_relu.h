// Shared pieces of the auxiliary-head ops (aux_pool, linear_bn_relu, bn_update_stats): argument
// checks in the words of the Python call, and adaptive-pooling window bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace dgl_fast {

// Window of output cell i along an axis of length n pooled to m cells (PyTorch's adaptive pooling):
// [floor(i * n / m), ceil((i + 1) * n / m)).
C10_HOST_DEVICE inline int64_t pool_start(int64_t i, int64_t n, int64_t m) { return (i * n) / m; }
C10_HOST_DEVICE inline int64_t pool_end(int64_t i, int64_t n, int64_t m) { return ((i + 1) * n + m - 1) / m; }

inline void check_aux_pool_args(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(x.dim() == 4, "aux_pool: expected features of shape [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "aux_pool: expected floating-point features, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "aux_pool: expected a non-empty spatial size, got ", x.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "aux_pool: expected a positive output size, got [", out_h, ", ", out_w, "]");
}

inline void check_aux_pool_bwd_args(const at::Tensor& g, int64_t in_h, int64_t in_w) {
  TORCH_CHECK(g.dim() == 4, "aux_pool backward: expected a gradient of shape [B, C, h, w], got ", g.sizes());
  TORCH_CHECK(in_h >= 1 && in_w >= 1, "aux_pool backward: expected a positive input size, got [", in_h, ", ", in_w, "]");
}

// The dtype statistics and BatchNorm parameters use for inputs of dtype `t`.
inline at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_lbr_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rm, const at::Tensor& rv,
                           bool training) {
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
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lbr_forward_setup(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training) {
  check_lbr_args(x, w, bias, gamma, beta, running_mean, running_var, training);
  at::Tensor z = bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  const int64_t N = z.size(0), M = z.size(1);
  const auto sdt = stat_dtype(x.scalar_type());
  at::Tensor out = at::empty({N, M}, z.options());
  at::Tensor mean = training ? at::empty({M}, z.options().dtype(sdt)) : running_mean.clone();
  at::Tensor var = training ? at::empty({M}, z.options().dtype(sdt)) : running_var.clone();
  return {out, z, mean, var};
}

inline void check_bn_update_args(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                                 at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums) {
  const size_t L = rms.size();
  TORCH_CHECK(rvs.size() == L && nbt.size() == L && means.size() == L && vars.size() == L && counts.size() == L &&
                  momentums.size() == L,
              "bn_update_stats: expected ", L, " entries in every list");
  for (size_t i = 0; i < L; ++i) {
    const int64_t M = rms[i].numel();
    TORCH_CHECK(rvs[i].numel() == M && means[i].numel() == M && vars[i].numel() == M,
                "bn_update_stats: layer ", i, ": expected statistics of ", M, " channels");
    TORCH_CHECK(rms[i].scalar_type() == means[i].scalar_type() && rvs[i].scalar_type() == vars[i].scalar_type() &&
                    rms[i].scalar_type() == rvs[i].scalar_type() && at::isFloatingType(rms[i].scalar_type()),
                "bn_update_stats: layer ", i, ": expected running and batch statistics of one floating dtype");
    TORCH_CHECK(nbt[i].numel() == 1 && nbt[i].scalar_type() == at::kLong,
                "bn_update_stats: layer ", i, ": expected a one-element int64 num_batches_tracked");
    for (const at::Tensor* t : {&rms[i], &rvs[i], &means[i], &vars[i], &nbt[i]}) {
      TORCH_CHECK(t->is_contiguous() && t->device() == rms[i].device(), "bn_update_stats: layer ", i,
                  ": expected contiguous tensors on one device");
    }
    TORCH_CHECK(counts[i] > 1, "bn_update_stats: layer ", i, ": expected more than one value per channel, got ",
                counts[i]);
  }
}

}  // namespace dgl_fast
