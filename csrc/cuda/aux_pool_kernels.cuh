// CUDA kernels of dgl_fast::aux_pool / aux_pool_bwd, launched by aux_pool_impl.cuh (host logic);
// compiled by nvcc through aux_pool.cu and by the SIMT emulator in tests/simt.
// Schemas: csrc/dgl_fast.cpp.
//
// Forward: one thread per output element reads its window through the input's strides (NCHW,
// channels_last or any view) and writes the output in the requested layout; the input is read
// once. Backward: one thread per input-gradient element, in the memory order of the layout it
// writes (coalesced stores), sums the few output cells whose window holds it; every element is
// written exactly once, no atomics, no zero-fill pass.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "aux_pool.h"

namespace dgl_fast {
namespace aux_pool_detail {

struct Strides4 {
  int64_t b, c, h, w;
};

// Decodes linear index `idx` (memory order of an NCHW- or channels_last-contiguous [B, C, H, W]).
__device__ __forceinline__ void decode(int64_t idx, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t& b,
                                       int64_t& c, int64_t& h, int64_t& w) {
  if (channels_last) {
    c = idx % C;
    idx /= C;
    w = idx % W;
    idx /= W;
    h = idx % H;
    b = idx / H;
  } else {
    w = idx % W;
    idx /= W;
    h = idx % H;
    idx /= H;
    c = idx % C;
    b = idx / C;
  }
}

__device__ __forceinline__ int64_t clamp_to(int64_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// x: input with strides `xs`, sizes [B, C, H, W]; out: contiguous in `channels_last` order, [B, C, oh, ow].
template <typename scalar_t>
__global__ void aux_pool_kernel(const scalar_t* __restrict__ x, Strides4 xs, scalar_t* __restrict__ out, int64_t B,
                                int64_t C, int64_t H, int64_t W, int64_t oh, int64_t ow, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * C * oh * ow;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, i, j;
    decode(idx, C, oh, ow, channels_last, b, c, i, j);
    const int64_t h0 = pool_start(i, H, oh), h1 = pool_end(i, H, oh);
    const int64_t w0 = pool_start(j, W, ow), w1 = pool_end(j, W, ow);
    const scalar_t* base = x + b * xs.b + c * xs.c;
    acc_t sum = 0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) sum += static_cast<acc_t>(base[h * xs.h + w * xs.w]);
    out[idx] = static_cast<scalar_t>(sum / static_cast<acc_t>((h1 - h0) * (w1 - w0)));
  }
}

// g: output gradient with strides `gs`, sizes [B, C, oh, ow]; gx: contiguous in `channels_last` order, [B, C, H, W].
template <typename scalar_t>
__global__ void aux_pool_bwd_kernel(const scalar_t* __restrict__ g, Strides4 gs, scalar_t* __restrict__ gx, int64_t B,
                                    int64_t C, int64_t H, int64_t W, int64_t oh, int64_t ow, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * C * H * W;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, h, w;
    decode(idx, C, H, W, channels_last, b, c, h, w);
    // Cells holding row h: i with start(i) <= h < end(i); they lie around floor(h * oh / H).
    const int64_t i_lo = clamp_to((h * oh) / H - 1, oh), i_hi = clamp_to(((h + 1) * oh + H - 1) / H + 1, oh);
    const int64_t j_lo = clamp_to((w * ow) / W - 1, ow), j_hi = clamp_to(((w + 1) * ow + W - 1) / W + 1, ow);
    const scalar_t* base = g + b * gs.b + c * gs.c;
    acc_t sum = 0;
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t h0 = pool_start(i, H, oh), h1 = pool_end(i, H, oh);
      if (h < h0 || h >= h1) continue;
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const int64_t w0 = pool_start(j, W, ow), w1 = pool_end(j, W, ow);
        if (w < w0 || w >= w1) continue;
        sum += static_cast<acc_t>(base[i * gs.h + j * gs.w]) / static_cast<acc_t>((h1 - h0) * (w1 - w0));
      }
    }
    gx[idx] = static_cast<scalar_t>(sum);
  }
}

}  // namespace aux_pool_detail

}  // namespace dgl_fast
