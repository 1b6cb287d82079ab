// CUDA registration of dgl_fast::linear_bn_relu / linear_bn_relu_bwd: the linear_bn_relu_impl host
// implementation (linear_bn_relu_impl.cuh; kernels in linear_bn_relu_kernels.cuh) instantiated with
// CudaLauncher (launch.cuh) and registered for the CUDA dispatch key. This is the op's only nvcc
// translation unit.
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/linear_bn_relu_impl.cuh"

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

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) {
  m.impl("linear_bn_relu", &linear_bn_relu_cuda);
  m.impl("linear_bn_relu_bwd", &linear_bn_relu_bwd_cuda);
}

}  // namespace dgl_fast
