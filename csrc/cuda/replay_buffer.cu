// CUDA registration of dgl_fast::replay_push / replay_sample: the replay_buffer_impl host
// implementation (replay_buffer_impl.cuh; kernels in replay_buffer_kernels.cuh) instantiated with
// CudaLauncher (launch.cuh) and registered for the CUDA dispatch key. This is the op's only nvcc
// translation unit.
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/replay_buffer_impl.cuh"

namespace dgl_fast {
namespace {

void replay_push_cuda(at::Tensor& storage, at::Tensor& label_store, at::Tensor& state, at::Tensor& uses,
                      at::Tensor& stamps, const at::Tensor& x, const at::Tensor& y) {
  replay_push_impl(storage, label_store, state, uses, stamps, x, y, CudaLauncher(storage.get_device()));
}

void replay_sample_cuda(at::Tensor& state, at::Tensor& uses, const at::Tensor& stamps, const at::Tensor& storage,
                        const at::Tensor& label_store, at::Tensor& out, at::Tensor& out_labels, at::Tensor& info,
                        int64_t policy, int64_t max_reuse, int64_t seed) {
  replay_sample_impl(state, uses, stamps, storage, label_store, out, out_labels, info, policy, max_reuse, seed,
                     CudaLauncher(storage.get_device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CUDA, m) {
  m.impl("replay_push", &replay_push_cuda);
  m.impl("replay_sample", &replay_sample_cuda);
}

}  // namespace dgl_fast
