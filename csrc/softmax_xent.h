// Shared argument checks for dgl_fast::softmax_xent (CPU and CUDA kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dgl_fast {

// Checks the arguments the way a user of dgl_fast.ops.softmax_xent would
// read them: expected versus given, in shapes and dtypes.
inline void check_softmax_xent_args(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2,
              "softmax_xent: expected logits of shape [batch, classes], got a tensor of shape ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "softmax_xent: expected floating-point logits, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(0) >= 1 && logits.size(1) >= 1,
              "softmax_xent: expected at least one sample and one class, got logits of shape ",
              logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "softmax_xent: expected labels of shape [", logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong,
              "softmax_xent: expected int64 labels, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(),
              "softmax_xent: expected labels on ", logits.device(), " like the logits, got ",
              labels.device());
}

}  // namespace dgl_fast
