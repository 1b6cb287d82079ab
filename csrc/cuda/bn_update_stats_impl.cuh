// Host implementation of dgl_fast::bn_update_stats: argument checks, batching of the layers into
// launches of up to kMaxLayers, dtype dispatch, written against a launcher (cuda/launch.cuh) so
// that bn_update_stats.cu instantiates it with CUDA launches and tests/simt with the SIMT emulator.
// Kernel: bn_update_stats_kernels.cuh. Schema: csrc/dgl_fast.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "bn_update_stats.h"
#include "cuda/bn_update_stats_kernels.cuh"

namespace dgl_fast {

template <typename Launcher>
void bn_update_stats_impl(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                          at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums,
                          const Launcher& launch) {
  using namespace bn_update_stats_detail;
  check_bn_update_stats_args(rms, rvs, nbt, means, vars, counts, momentums);
  if (rms.empty()) return;
  const typename Launcher::Guard guard(rms[0].device());
  for (size_t start = 0; start < rms.size(); start += kMaxLayers) {
    const size_t L = std::min<size_t>(kMaxLayers, rms.size() - start);
    AT_DISPATCH_FLOATING_TYPES(rms[start].scalar_type(), "bn_update_stats_cuda", [&] {
      StatsBatch<scalar_t> p{};
      int64_t widest = 1;
      for (size_t k = 0; k < L; ++k) {
        const size_t i = start + k;
        TORCH_CHECK(rms[i].scalar_type() == rms[start].scalar_type(), "bn_update_stats: layers of mixed dtypes");
        p.rm[k] = rms[i].mutable_data_ptr<scalar_t>();
        p.rv[k] = rvs[i].mutable_data_ptr<scalar_t>();
        p.nbt[k] = nbt[i].mutable_data_ptr<int64_t>();
        p.mean[k] = means[i].const_data_ptr<scalar_t>();
        p.var[k] = vars[i].const_data_ptr<scalar_t>();
        p.channels[k] = rms[i].numel();
        p.momentum[k] = static_cast<scalar_t>(momentums[i]);
        p.unbias[k] = static_cast<scalar_t>(counts[i]) / static_cast<scalar_t>(counts[i] - 1);
        widest = std::max(widest, p.channels[k]);
      }
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>((widest + 255) / 256, 64)), static_cast<unsigned>(L));
      launch(bn_update_stats_kernel<scalar_t>, grid, dim3(256), p);
    });
  }
}

}  // namespace dgl_fast
