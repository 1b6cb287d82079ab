// Host implementation of dgl_fast::softmax_xent: argument checks, allocation, launch configuration
// and dtype dispatch, written against a launcher (cuda/launch.cuh) so that softmax_xent.cu
// instantiates it with CUDA launches and tests/simt with the SIMT emulator.
// Kernel: softmax_xent_kernels.cuh. Schema and semantics: csrc/dgl_fast.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "cuda/softmax_xent_kernels.cuh"
#include "softmax_xent.h"

namespace dgl_fast {
namespace softmax_xent_detail {

constexpr int kMaxBlocks = 1024;

}  // namespace softmax_xent_detail

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_xent_impl(const at::Tensor& logits_in,
                                                                 const at::Tensor& labels_in, const Launcher& launch) {
  using namespace softmax_xent_detail;
  check_softmax_xent_args(logits_in, labels_in);
  TORCH_CHECK(logits_in.size(0) <= std::numeric_limits<int>::max() &&
                  logits_in.size(1) <= std::numeric_limits<int>::max(),
              "softmax_xent: batch and class counts must fit in int32, got ", logits_in.sizes());
  const typename Launcher::Guard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int batch = static_cast<int>(logits.size(0));
  const int classes = static_cast<int>(logits.size(1));
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  at::Tensor dlogits = at::empty_like(logits);
  at::Tensor loss = at::empty({}, logits.options().dtype(loss_dtype));
  at::Tensor correct = at::empty({}, logits.options().dtype(at::kLong));
  const int rows_per_block = kWarpsPerBlock;
  const int blocks = std::min(kMaxBlocks, (batch + rows_per_block - 1) / rows_per_block);
  // Small batches (the usual DGL case) use one block so the kernel finishes the job.
  const int grid = batch <= rows_per_block * 16 ? 1 : blocks;
  at::Tensor part_loss = at::empty({grid}, logits.options().dtype(loss_dtype));
  at::Tensor part_correct = at::empty({grid}, logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_xent_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(softmax_xent_kernel<scalar_t, acc_t>, dim3(grid), dim3(kWarp * kWarpsPerBlock),
           logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), dlogits.mutable_data_ptr<scalar_t>(),
           part_loss.mutable_data_ptr<acc_t>(), part_correct.mutable_data_ptr<int64_t>(),
           loss.mutable_data_ptr<acc_t>(), correct.mutable_data_ptr<int64_t>(), batch, classes);
  });
  if (grid > 1) {
    loss = part_loss.sum().div_(static_cast<double>(batch));
    correct = part_correct.sum();
  }
  return {loss, dlogits, correct};
}

}  // namespace dgl_fast
