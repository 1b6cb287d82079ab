// CUDA registration of dgl_fast::bn_update_stats: the bn_update_stats_impl host implementation
// (bn_update_stats_impl.cuh; kernels in bn_update_stats_kernels.cuh) instantiated with CudaLauncher
// (launch.cuh) and registered for the CUDA dispatch key. This is the op's only nvcc translation
// unit.
#include <torch/library.h>

#include "cuda/bn_update_stats_impl.cuh"
#include "cuda/launch.cuh"

namespace dgl_fast {
namespace {

void bn_update_stats_cuda(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                          at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums) {
  bn_update_stats_impl(rms, rvs, nbt, means, vars, counts, momentums,
                       CudaLauncher(rms.empty() ? -1 : rms[0].get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) { m.impl("bn_update_stats", &bn_update_stats_cuda); }

}  // namespace dgl_fast
