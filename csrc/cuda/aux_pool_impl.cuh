// Host implementation of dgl_fast::aux_pool / aux_pool_bwd: argument checks, allocation, launch
// configuration and dtype dispatch, written against a launcher (cuda/launch.cuh) so that
// aux_pool.cu instantiates it with CUDA launches and tests/simt with the SIMT emulator.
// Kernels: aux_pool_kernels.cuh. Schemas: csrc/dgl_fast.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "aux_pool.h"
#include "cuda/aux_pool_kernels.cuh"

namespace dgl_fast {
namespace aux_pool_detail {

constexpr int kThreads = 256;

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

inline int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

inline c10::MemoryFormat format_of(bool channels_last) {
  return channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
}

}  // namespace aux_pool_detail

template <typename Launcher>
at::Tensor aux_pool_impl(const at::Tensor& x, int64_t out_h, int64_t out_w, bool channels_last_out,
                         const Launcher& launch) {
  using namespace aux_pool_detail;
  check_aux_pool_args(x, out_h, out_w);
  const typename Launcher::Guard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C, out_h, out_w}, x.options().memory_format(format_of(channels_last_out)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aux_pool_cuda", [&] {
    launch(aux_pool_kernel<scalar_t>, dim3(blocks_for(total)), dim3(kThreads), x.const_data_ptr<scalar_t>(),
           strides_of(x), out.mutable_data_ptr<scalar_t>(), B, C, H, W, out_h, out_w, channels_last_out);
  });
  return out;
}

template <typename Launcher>
at::Tensor aux_pool_bwd_impl(const at::Tensor& g, int64_t in_h, int64_t in_w, bool channels_last_in,
                             const Launcher& launch) {
  using namespace aux_pool_detail;
  check_aux_pool_bwd_args(g, in_h, in_w);
  const typename Launcher::Guard guard(g.device());
  const int64_t B = g.size(0), C = g.size(1), oh = g.size(2), ow = g.size(3);
  at::Tensor gx = at::empty({B, C, in_h, in_w}, g.options().memory_format(format_of(channels_last_in)));
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aux_pool_bwd_cuda", [&] {
    launch(aux_pool_bwd_kernel<scalar_t>, dim3(blocks_for(total)), dim3(kThreads), g.const_data_ptr<scalar_t>(),
           strides_of(g), gx.mutable_data_ptr<scalar_t>(), B, C, in_h, in_w, oh, ow, channels_last_in);
  });
  return gx;
}

}  // namespace dgl_fast
