// CUDA registration of dgl_fast::linear_bn_relu / linear_bn_relu_bwd / bn_update_stats; kernels and
// host logic: linear_bn_relu.cuh.
#include <torch/library.h>

#include "launch.cuh"
#include "linear_bn_relu.cuh"

namespace dgl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_cuda(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps) {
  return linear_bn_relu_impl(x, w, bias, gamma, beta, running_mean, running_var, training, eps,
                             CudaLauncher(x.get_device()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, bool training, double eps) {
  return linear_bn_relu_bwd_impl(grad_out, x, w, z, mean, var, gamma, beta, training, eps,
                                 CudaLauncher(z.get_device()));
}

void bn_update_stats_cuda(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                          at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums) {
  bn_update_stats_impl(rms, rvs, nbt, means, vars, counts, momentums,
                       CudaLauncher(rms.empty() ? -1 : rms[0].get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) {
  m.impl("linear_bn_relu", &linear_bn_relu_cuda);
  m.impl("linear_bn_relu_bwd", &linear_bn_relu_bwd_cuda);
  m.impl("bn_update_stats", &bn_update_stats_cuda);
}

}  // namespace dgl_fast
