// How dgl_fast's CUDA host code launches its kernels.
//
// Each op's host logic (argument checks, allocation, launch configuration, dispatch) lives in
// `csrc/cuda/<op>_impl.cuh`, beside its kernels in `<op>_kernels.cuh`, written against a
// *launcher* instead of `<<<...>>>`:
//
//   typename Launcher::Guard guard(device);     // after the argument checks, before any launch
//   launch(kernel<...>, grid, block, args...);   // run `kernel` on a grid of blocks
//   launch.multiprocessors();                    // SM count, for launch heuristics
//
// `<op>.cu`, the op's CUDA registration, instantiates it with CudaLauncher below (the current
// stream, a launch check after each kernel). tests/simt instantiates the same header with a CPU
// SIMT emulator, so every CUDA kernel and its launch logic also run, thread by thread, on machines
// without a GPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

namespace dgl_fast {

struct CudaLauncher {
  using Guard = c10::cuda::CUDAGuard;  // makes the tensors' device current

  cudaStream_t stream;
  int device;

  explicit CudaLauncher(int device_index)
      : stream(c10::cuda::getCurrentCUDAStream(device_index)), device(device_index) {}

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Streaming multiprocessors of this launcher's device (cached per device).
  int multiprocessors() const {
    static int cached[64] = {0};
    if (device < 0 || device >= 64) return 132;
    if (cached[device] == 0) {
      int n = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
      cached[device] = n > 0 ? n : 132;
    }
    return cached[device];
  }
};

}  // namespace dgl_fast
