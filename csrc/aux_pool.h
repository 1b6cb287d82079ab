// Shared pieces of dgl_fast::aux_pool / aux_pool_bwd (CPU and CUDA kernels): argument checks in the
// words of the Python call, and the adaptive-pooling window bounds, compiled for host and device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace dgl_fast {

// Window of output cell i along an axis of length n pooled to m cells (PyTorch's adaptive pooling):
// [floor(i * n / m), ceil((i + 1) * n / m)).
C10_HOST_DEVICE inline int64_t pool_start(int64_t i, int64_t n, int64_t m) { return (i * n) / m; }
C10_HOST_DEVICE inline int64_t pool_end(int64_t i, int64_t n, int64_t m) { return ((i + 1) * n + m - 1) / m; }

inline void check_aux_pool_args(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(x.dim() == 4, "aux_pool: expected features of shape [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "aux_pool: expected floating-point features, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "aux_pool: expected a non-empty spatial size, got ", x.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "aux_pool: expected a positive output size, got [", out_h, ", ", out_w, "]");
}

inline void check_aux_pool_bwd_args(const at::Tensor& g, int64_t in_h, int64_t in_w) {
  TORCH_CHECK(g.dim() == 4, "aux_pool backward: expected a gradient of shape [B, C, h, w], got ", g.sizes());
  TORCH_CHECK(in_h >= 1 && in_w >= 1, "aux_pool backward: expected a positive input size, got [", in_h, ", ", in_w, "]");
}

}  // namespace dgl_fast
