// CUDA kernel of dgl_fast::bn_update_stats, launched by bn_update_stats_impl.cuh (host logic);
// compiled by nvcc through bn_update_stats.cu and by the SIMT emulator in tests/simt.
// Schema: csrc/dgl_fast.cpp.
//
// One launch updates the running statistics of up to kMaxLayers layers (blockIdx.y = layer): a
// head's BatchNorm layers take one launch, not one each.
#pragma once

#include <cstdint>

namespace dgl_fast {
namespace bn_update_stats_detail {

constexpr int kMaxLayers = 16;

template <typename acc_t>
struct StatsBatch {
  acc_t* rm[kMaxLayers];
  acc_t* rv[kMaxLayers];
  int64_t* nbt[kMaxLayers];
  const acc_t* mean[kMaxLayers];
  const acc_t* var[kMaxLayers];
  int64_t channels[kMaxLayers];
  acc_t momentum[kMaxLayers];
  acc_t unbias[kMaxLayers];
};

// blockIdx.y = layer; threads stride over its channels.
template <typename acc_t>
__global__ void bn_update_stats_kernel(StatsBatch<acc_t> p) {
  const int l = blockIdx.y;
  const acc_t m = p.momentum[l];
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < p.channels[l];
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.rm[l][c] = m * p.mean[l][c] + (acc_t(1) - m) * p.rm[l][c];
    p.rv[l][c] = m * (p.var[l][c] * p.unbias[l]) + (acc_t(1) - m) * p.rv[l][c];
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.nbt[l] += 1;
}

}  // namespace bn_update_stats_detail

}  // namespace dgl_fast
