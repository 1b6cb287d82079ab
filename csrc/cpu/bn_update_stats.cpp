// CPU kernel of dgl_fast::bn_update_stats. Schema: csrc/dgl_fast.cpp.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>

#include "bn_update_stats.h"

namespace dgl_fast {
namespace {

void bn_update_stats_cpu(at::TensorList rms, at::TensorList rvs, at::TensorList nbt, at::TensorList means,
                         at::TensorList vars, at::IntArrayRef counts, at::ArrayRef<double> momentums) {
  check_bn_update_stats_args(rms, rvs, nbt, means, vars, counts, momentums);
  for (size_t i = 0; i < rms.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(rms[i].scalar_type(), "bn_update_stats_cpu", [&] {
      scalar_t* rm = rms[i].mutable_data_ptr<scalar_t>();
      scalar_t* rv = rvs[i].mutable_data_ptr<scalar_t>();
      const scalar_t* mu = means[i].const_data_ptr<scalar_t>();
      const scalar_t* va = vars[i].const_data_ptr<scalar_t>();
      const scalar_t m = static_cast<scalar_t>(momentums[i]);
      const scalar_t unbias = static_cast<scalar_t>(counts[i]) / static_cast<scalar_t>(counts[i] - 1);
      for (int64_t c = 0; c < rms[i].numel(); ++c) {
        rm[c] = m * mu[c] + (scalar_t(1) - m) * rm[c];  // nn.BatchNorm's order of operations
        rv[c] = m * (va[c] * unbias) + (scalar_t(1) - m) * rv[c];
      }
    });
    nbt[i].mutable_data_ptr<int64_t>()[0] += 1;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CPU, m) { m.impl("bn_update_stats", &bn_update_stats_cpu); }

}  // namespace dgl_fast
