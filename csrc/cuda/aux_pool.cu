// CUDA registration of dgl_fast::aux_pool / aux_pool_bwd: the aux_pool_impl host implementation
// (aux_pool_impl.cuh; kernels in aux_pool_kernels.cuh) instantiated with CudaLauncher (launch.cuh)
// and registered for the CUDA dispatch key. This is the op's only nvcc translation unit.
#include <torch/library.h>

#include "cuda/aux_pool_impl.cuh"
#include "cuda/launch.cuh"

namespace dgl_fast {
namespace {

at::Tensor aux_pool_cuda(const at::Tensor& x, int64_t out_h, int64_t out_w, bool channels_last_out) {
  return aux_pool_impl(x, out_h, out_w, channels_last_out, CudaLauncher(x.get_device()));
}

at::Tensor aux_pool_bwd_cuda(const at::Tensor& g, int64_t in_h, int64_t in_w, bool channels_last_in) {
  return aux_pool_bwd_impl(g, in_h, in_w, channels_last_in, CudaLauncher(g.get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) {
  m.impl("aux_pool", &aux_pool_cuda);
  m.impl("aux_pool_bwd", &aux_pool_bwd_cuda);
}

}  // namespace dgl_fast
