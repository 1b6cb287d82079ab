// CPU kernel of dgl_fast::softmax_xent. Schema and semantics: csrc/dgl_fast.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "softmax_xent.h"

namespace dgl_fast {
namespace {

template <typename scalar_t>
void softmax_xent_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                       scalar_t* __restrict__ dlogits, at::opmath_type<scalar_t>* __restrict__ row_loss,
                       int64_t* __restrict__ row_correct, int64_t begin, int64_t end, int64_t batch,
                       int64_t classes) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(batch);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = logits + i * classes;
    scalar_t* grow = dlogits + i * classes;
    const int64_t y = labels[i];
    TORCH_CHECK(y >= 0 && y < classes, "softmax_xent: expected labels in [0, ", classes,
                "), got ", y, " at position ", i);
    // Max and first arg-max (torch.argmax's tie rule).
    acc_t mx = static_cast<acc_t>(row[0]);
    int64_t arg = 0;
    for (int64_t c = 1; c < classes; ++c) {
      const acc_t v = static_cast<acc_t>(row[c]);
      if (v > mx || (std::isnan(v) && !std::isnan(mx))) {
        mx = v;
        arg = c;
      }
    }
    acc_t sum = 0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(static_cast<acc_t>(row[c]) - mx);
    const acc_t log_sum = std::log(sum);
    // Same rounding order as PyTorch's log_softmax + nll_loss backward:
    // p = exp((x - max) - log(sum)), grad = p / B - [c == y] / B.
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t p = std::exp((static_cast<acc_t>(row[c]) - mx) - log_sum);
      grow[c] = static_cast<scalar_t>(p * inv_batch - (c == y ? inv_batch : acc_t(0)));
    }
    row_loss[i] = log_sum + mx - static_cast<acc_t>(row[y]);
    row_correct[i] = (arg == y) ? 1 : 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_xent_cpu(const at::Tensor& logits_in,
                                                                const at::Tensor& labels_in) {
  check_softmax_xent_args(logits_in, labels_in);
  TORCH_INTERNAL_ASSERT(logits_in.device().is_cpu());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  at::Tensor dlogits = at::empty_like(logits);
  at::Tensor loss = at::empty({}, logits.options().dtype(loss_dtype));
  at::Tensor correct = at::empty({}, logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_xent_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_loss(batch);
    std::vector<int64_t> row_correct(batch);
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      softmax_xent_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                  dlogits.mutable_data_ptr<scalar_t>(), row_loss.data(), row_correct.data(),
                                  begin, end, batch, classes);
    });
    // Summed in row order so the result does not depend on the thread count.
    acc_t total = 0;
    int64_t hits = 0;
    for (int64_t i = 0; i < batch; ++i) {
      total += row_loss[i];
      hits += row_correct[i];
    }
    if (loss_dtype == at::kDouble) {
      *loss.mutable_data_ptr<double>() = static_cast<double>(total) / static_cast<double>(batch);
    } else {
      *loss.mutable_data_ptr<float>() = static_cast<float>(total / static_cast<acc_t>(batch));
    }
    *correct.mutable_data_ptr<int64_t>() = hits;
  });
  return {loss, dlogits, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CPU, m) { m.impl("softmax_xent", &softmax_xent_cpu); }

}  // namespace dgl_fast
