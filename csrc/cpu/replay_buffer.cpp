// CPU kernels of dgl_fast::replay_push / replay_sample. Schemas: csrc/dgl_fast.cpp.
// On the CPU the ring state is host memory, so reading it is free; the copies go through ATen's
// (parallel, dtype-converting) copy_.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "replay_buffer.h"

namespace dgl_fast {
namespace {

void replay_push_cpu(at::Tensor& storage, at::Tensor& label_store, at::Tensor& state, at::Tensor& uses,
                     at::Tensor& stamps, const at::Tensor& x, const at::Tensor& y) {
  check_replay_state(storage, label_store, state, uses, stamps);
  check_replay_batch("push", storage, label_store, x, y);
  int64_t* st = state.mutable_data_ptr<int64_t>();
  const int64_t M = storage.size(0);
  const int64_t slot = st[0];
  TORCH_CHECK(slot >= 0 && slot < M, "ReplayBuffer: corrupt ring state (head ", slot, ", capacity ", M, ")");
  storage.select(0, slot).copy_(x);
  label_store.select(0, slot).copy_(y);
  uses.mutable_data_ptr<int64_t>()[slot] = 0;
  stamps.mutable_data_ptr<int64_t>()[slot] = st[2] + 1;
  st[0] = (slot + 1) % M;
  st[1] = std::min<int64_t>(st[1] + 1, M);
  st[2] += 1;
}

void replay_sample_cpu(at::Tensor& state, at::Tensor& uses, const at::Tensor& stamps, const at::Tensor& storage,
                       const at::Tensor& label_store, at::Tensor& out, at::Tensor& out_labels, at::Tensor& info,
                       int64_t policy, int64_t max_reuse, int64_t seed) {
  check_replay_sample_args(state, uses, stamps, storage, label_store, out, out_labels, info, policy);
  int64_t* st = state.mutable_data_ptr<int64_t>();
  int64_t* u = uses.mutable_data_ptr<int64_t>();
  const int64_t slot = replay_select(u, stamps.const_data_ptr<int64_t>(), st[1], policy, max_reuse,
                                     static_cast<uint64_t>(seed), static_cast<uint64_t>(st[3]));
  st[3] += 1;
  int64_t* inf = info.mutable_data_ptr<int64_t>();
  inf[0] = slot;
  inf[1] = slot >= 0 ? 1 : 0;
  if (slot < 0) return;
  u[slot] += 1;
  out.copy_(storage.select(0, slot));
  out_labels.copy_(label_store.select(0, slot));
}

}  // namespace

TORCH_LIBRARY_IMPL(dgl_fast, CPU, m) {
  m.impl("replay_push", &replay_push_cpu);
  m.impl("replay_sample", &replay_sample_cpu);
}

}  // namespace dgl_fast
