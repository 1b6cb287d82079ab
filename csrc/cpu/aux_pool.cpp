// CPU kernels of dgl_fast::aux_pool / aux_pool_bwd. Schemas: csrc/dgl_fast.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "aux_pool.h"

namespace dgl_fast {
namespace {

c10::MemoryFormat format_of(bool channels_last) {
  return channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
}

at::Tensor aux_pool_cpu(const at::Tensor& x, int64_t out_h, int64_t out_w, bool channels_last_out) {
  check_aux_pool_args(x, out_h, out_w);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C, out_h, out_w}, x.options().memory_format(format_of(channels_last_out)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aux_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = x.accessor<const scalar_t, 4>();
    auto o = out.accessor<scalar_t, 4>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        for (int64_t i = 0; i < out_h; ++i) {
          const int64_t h0 = pool_start(i, H, out_h), h1 = pool_end(i, H, out_h);
          for (int64_t j = 0; j < out_w; ++j) {
            const int64_t w0 = pool_start(j, W, out_w), w1 = pool_end(j, W, out_w);
            acc_t sum = 0;
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) sum += static_cast<acc_t>(in[b][c][h][w]);
            o[b][c][i][j] = static_cast<scalar_t>(sum / static_cast<acc_t>((h1 - h0) * (w1 - w0)));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor aux_pool_bwd_cpu(const at::Tensor& g, int64_t in_h, int64_t in_w, bool channels_last_in) {
  check_aux_pool_bwd_args(g, in_h, in_w);
  const int64_t B = g.size(0), C = g.size(1), oh = g.size(2), ow = g.size(3);
  // Every element is written below, so no zero-fill (and at::zeros would drop the memory format).
  at::Tensor gx = at::empty({B, C, in_h, in_w}, g.options().memory_format(format_of(channels_last_in)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aux_pool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto go = g.accessor<const scalar_t, 4>();
    auto gi = gx.accessor<scalar_t, 4>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      // Scatter each output cell's share over its window, cells in ascending order: every input
      // element receives its terms in the same order as the CUDA kernel's gather sums them.
      std::vector<acc_t> plane(in_h * in_w);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        std::fill(plane.begin(), plane.end(), acc_t(0));
        for (int64_t i = 0; i < oh; ++i) {
          const int64_t h0 = pool_start(i, in_h, oh), h1 = pool_end(i, in_h, oh);
          for (int64_t j = 0; j < ow; ++j) {
            const int64_t w0 = pool_start(j, in_w, ow), w1 = pool_end(j, in_w, ow);
            const acc_t share = static_cast<acc_t>(go[b][c][i][j]) / static_cast<acc_t>((h1 - h0) * (w1 - w0));
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) plane[h * in_w + w] += share;
          }
        }
        for (int64_t h = 0; h < in_h; ++h)
          for (int64_t w = 0; w < in_w; ++w) gi[b][c][h][w] = static_cast<scalar_t>(plane[h * in_w + w]);
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CPU, m) {
  m.impl("aux_pool", &aux_pool_cpu);
  m.impl("aux_pool_bwd", &aux_pool_bwd_cpu);
}

}  // namespace dgl_fast
