// Shared pieces of dgl_fast::replay_push / replay_sample (CPU and CUDA kernels): argument checks
// and the slot-selection policy, compiled for host and device so both pick the same slot.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace dgl_fast {

enum ReplayPolicy : int64_t { kPriorityLifo = 0, kFifo = 1, kUniform = 2 };

// splitmix64: a counter-based hash, identical on host and device.
C10_HOST_DEVICE inline uint64_t replay_hash(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (counter + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The slot a sample takes, or -1 when none is available. Filled slots are [0, count): the ring
// starts at slot 0 and only wraps once it is full.
C10_HOST_DEVICE inline int64_t replay_select(const int64_t* uses, const int64_t* stamps, int64_t count,
                                             int64_t policy, int64_t max_reuse, uint64_t seed,
                                             uint64_t sample_index) {
  if (policy == kUniform) {
    int64_t avail = 0;
    for (int64_t s = 0; s < count; ++s) avail += (max_reuse <= 0 || uses[s] < max_reuse);
    if (avail == 0) return -1;
    int64_t k = static_cast<int64_t>(replay_hash(seed, sample_index) % static_cast<uint64_t>(avail));
    for (int64_t s = 0; s < count; ++s) {
      if (max_reuse <= 0 || uses[s] < max_reuse) {
        if (k == 0) return s;
        --k;
      }
    }
    return -1;
  }
  int64_t best = -1;
  for (int64_t s = 0; s < count; ++s) {
    if (max_reuse > 0 && uses[s] >= max_reuse) continue;
    if (best < 0 || uses[s] < uses[best]) {
      best = s;
    } else if (uses[s] == uses[best]) {
      const bool newer = stamps[s] > stamps[best];
      if ((policy == kPriorityLifo) == newer) best = s;
    }
  }
  return best;
}

inline void check_replay_state(const at::Tensor& storage, const at::Tensor& label_store, const at::Tensor& state,
                               const at::Tensor& uses, const at::Tensor& stamps) {
  TORCH_CHECK(storage.dim() >= 1 && storage.is_contiguous(), "ReplayBuffer: storage must be a contiguous [M, ...] tensor");
  const int64_t M = storage.size(0);
  TORCH_CHECK(M >= 1, "ReplayBuffer: capacity must be >= 1, got ", M);
  TORCH_CHECK(label_store.dim() == 2 && label_store.size(0) == M && label_store.scalar_type() == at::kLong &&
                  label_store.is_contiguous(),
              "ReplayBuffer: label store must be a contiguous int64 [", M, ", B] tensor, got ", label_store.sizes());
  TORCH_CHECK(state.numel() == 4 && state.scalar_type() == at::kLong && state.is_contiguous(),
              "ReplayBuffer: state must be 4 contiguous int64 values");
  TORCH_CHECK(uses.numel() == M && uses.scalar_type() == at::kLong && uses.is_contiguous() &&
                  stamps.numel() == M && stamps.scalar_type() == at::kLong && stamps.is_contiguous(),
              "ReplayBuffer: use counts and stamps must be contiguous int64 [", M, "] tensors");
  for (const at::Tensor* t : {&label_store, &state, &uses, &stamps}) {
    TORCH_CHECK(t->device() == storage.device(), "ReplayBuffer: all ring state must live on ", storage.device(),
                ", found a tensor on ", t->device());
  }
}

// x must be one mini-batch of the stored shape, y its labels.
inline void check_replay_batch(const char* what, const at::Tensor& storage, const at::Tensor& label_store,
                               const at::Tensor& x, const at::Tensor& y) {
  const auto batch_shape = storage.sizes().slice(1);
  TORCH_CHECK(x.sizes() == batch_shape, "ReplayBuffer.", what, ": expected activations of shape ", batch_shape,
              ", got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "ReplayBuffer.", what, ": expected floating-point activations, got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == storage.device(), "ReplayBuffer.", what, ": expected activations on ", storage.device(),
              ", got ", x.device());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == label_store.size(1), "ReplayBuffer.", what, ": expected labels of shape [",
              label_store.size(1), "], got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong, "ReplayBuffer.", what, ": expected int64 labels, got ", y.scalar_type());
  TORCH_CHECK(y.device() == storage.device(), "ReplayBuffer.", what, ": expected labels on ", storage.device(),
              ", got ", y.device());
}

// All checks of replay_sample's arguments (both devices).
inline void check_replay_sample_args(const at::Tensor& state, const at::Tensor& uses, const at::Tensor& stamps,
                                     const at::Tensor& storage, const at::Tensor& label_store, const at::Tensor& out,
                                     const at::Tensor& out_labels, const at::Tensor& info, int64_t policy) {
  check_replay_state(storage, label_store, state, uses, stamps);
  check_replay_batch("sample", storage, label_store, out, out_labels);
  TORCH_CHECK(info.numel() == 2 && info.scalar_type() == at::kLong && info.is_contiguous() &&
                  info.device() == storage.device(),
              "ReplayBuffer.sample: info must be 2 contiguous int64 values on ", storage.device());
  TORCH_CHECK(policy >= kPriorityLifo && policy <= kUniform, "ReplayBuffer.sample: unknown policy code ", policy,
              "; expected 0 (priority_lifo), 1 (fifo) or 2 (uniform)");
}

}  // namespace dgl_fast
