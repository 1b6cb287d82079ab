// Shared argument checks of dgl_fast::bn_update_stats (CPU and CUDA kernels), in the words of the
// Python call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

namespace dgl_fast {

inline void check_bn_update_stats_args(at::TensorList rms, at::TensorList rvs, at::TensorList nbt,
                                       at::TensorList means, at::TensorList vars, at::IntArrayRef counts,
                                       at::ArrayRef<double> momentums) {
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
