// CUDA registration of dgl_fast::softmax_xent: the softmax_xent_impl host implementation
// (softmax_xent_impl.cuh; kernels in softmax_xent_kernels.cuh) instantiated with CudaLauncher
// (launch.cuh) and registered for the CUDA dispatch key. This is the op's only nvcc translation
// unit.
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/softmax_xent_impl.cuh"

namespace dgl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_xent_cuda(const at::Tensor& logits, const at::Tensor& labels) {
  return softmax_xent_impl(logits, labels, CudaLauncher(logits.get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) { m.impl("softmax_xent", &softmax_xent_cuda); }

}  // namespace dgl_fast
