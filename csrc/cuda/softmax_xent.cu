// CUDA registration of dgl_fast::softmax_xent; kernel and host logic: softmax_xent.cuh.
#include <torch/library.h>

#include "launch.cuh"
#include "softmax_xent.cuh"

namespace dgl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_xent_cuda(const at::Tensor& logits, const at::Tensor& labels) {
  return softmax_xent_impl(logits, labels, CudaLauncher(logits.get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) { m.impl("softmax_xent", &softmax_xent_cuda); }

}  // namespace dgl_fast
