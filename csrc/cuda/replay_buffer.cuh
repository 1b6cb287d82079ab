// CUDA kernels of dgl_fast::replay_push / replay_sample and their host logic, written against a launcher
// (csrc/cuda/launch.cuh): compiled by nvcc in replay_buffer.cu and by the SIMT emulator in tests/simt.
// Schemas: csrc/dgl_fast.cpp.
//
// The ring state (head, count, counters, use counts, the chosen slot) stays on the device: the
// copy kernels read the slot they work on from device memory, so no op waits for the host and
// both ops can be captured in a CUDA graph. Each op is:
//   push:   one copy kernel (x -> storage[head] and y -> label_store[head]), then a one-thread kernel
//           that resets the slot's use count and advances head / count / pushes;
//   sample: a one-thread kernel that picks the slot (same code as the CPU, replay_select) and
//           writes info, then one copy kernel (storage[slot] -> out, labels too), which does nothing
//           for -1: two graph nodes per op.
// All launches go to the current stream, in this order. Cross-stream use is ordered by events
// owned by the Python ReplayBuffer (dgl_fast/buffer.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../replay_buffer.h"

namespace dgl_fast {
namespace replay_detail {

constexpr int kThreads = 256;

inline int copy_blocks(int64_t n_items) {
  n_items = std::max<int64_t>(n_items, 1);
  const int64_t want = (n_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 65535)));
}

// Copies one slot of `n` elements. `slot_ptr[0]` is the slot, read on the device; -1 means
// "nothing" (the kernel returns). gather = true: src is the slotted store (sample); false: dst is
// (push). 16-byte vectors when both sides are the same dtype and aligned.
// Same-dtype elements move as raw bits (vec_t = uint4 for 16-byte vectors); otherwise they are
// converted through float (fp32 <-> bf16 / fp16 storage).
template <typename src_t, typename dst_t>
__device__ __forceinline__ dst_t slot_convert(src_t v) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    return v;
  } else {
    return static_cast<dst_t>(static_cast<float>(v));
  }
}

// The labels of the slot, copied by the same launch as the activations (one graph node less).
struct LabelCopy {
  const int64_t* src;
  int64_t* dst;
  int64_t n;
};

template <typename src_t, typename dst_t>
__global__ void slot_copy_kernel(const src_t* __restrict__ src, dst_t* __restrict__ dst,
                                 const int64_t* __restrict__ slot_ptr, int64_t n, bool gather, LabelCopy lab) {
  const int64_t slot = *slot_ptr;
  if (slot < 0) return;
  const int64_t* lsrc = lab.src;
  int64_t* ldst = lab.dst;
  if (gather) {
    src += slot * n;
    lsrc += slot * lab.n;
  } else {
    dst += slot * n;
    ldst += slot * lab.n;
  }
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n; i += stride) dst[i] = slot_convert<src_t, dst_t>(src[i]);
  for (int64_t i = first; i < lab.n; i += stride) ldst[i] = lsrc[i];
}

template <typename Launcher>
void launch_slot_copy(const at::Tensor& src, at::Tensor& dst, const int64_t* slot_ptr, int64_t n, bool gather,
                      const Launcher& launch, LabelCopy lab) {
  if (src.scalar_type() == dst.scalar_type()) {
    // Same dtype: move raw bits, 16 bytes a thread when sizes and addresses allow.
    auto copy_bits = [&](auto word, int64_t words) {
      using word_t = decltype(word);
      launch(slot_copy_kernel<word_t, word_t>, dim3(copy_blocks(words)), dim3(kThreads),
             static_cast<const word_t*>(src.const_data_ptr()), static_cast<word_t*>(dst.mutable_data_ptr()), slot_ptr,
             words, gather, lab);
    };
    const int64_t bytes = n * src.element_size();
    const auto s = reinterpret_cast<uintptr_t>(src.const_data_ptr());
    const auto d = reinterpret_cast<uintptr_t>(dst.mutable_data_ptr());
    if (bytes % 16 == 0 && s % 16 == 0 && d % 16 == 0) copy_bits(uint4{}, bytes / 16);
    else if (src.element_size() == 8) copy_bits(uint64_t{}, n);
    else if (src.element_size() == 4) copy_bits(uint32_t{}, n);
    else if (src.element_size() == 2) copy_bits(uint16_t{}, n);
    else copy_bits(uint8_t{}, n);  // 1-byte types (float8 storage)
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "replay_copy_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "replay_copy_dst", [&] {
      launch(slot_copy_kernel<src_t, scalar_t>, dim3(copy_blocks(n)), dim3(kThreads),
             src.const_data_ptr<src_t>(), dst.mutable_data_ptr<scalar_t>(), slot_ptr, n, gather, lab);
    });
  });
}

static __global__ void push_commit_kernel(int64_t* __restrict__ state, int64_t* __restrict__ uses,
                                   int64_t* __restrict__ stamps, int64_t M) {
  const int64_t slot = state[0];
  uses[slot] = 0;
  stamps[slot] = state[2] + 1;
  state[0] = (slot + 1) % M;
  state[1] = state[1] + 1 < M ? state[1] + 1 : M;
  state[2] += 1;
}

static __global__ void sample_select_kernel(int64_t* __restrict__ state, int64_t* __restrict__ uses,
                                     const int64_t* __restrict__ stamps, int64_t* __restrict__ info, int64_t policy,
                                     int64_t max_reuse, uint64_t seed) {
  const int64_t slot = replay_select(uses, stamps, state[1], policy, max_reuse, seed, static_cast<uint64_t>(state[3]));
  state[3] += 1;
  info[0] = slot;
  info[1] = slot >= 0 ? 1 : 0;
  if (slot >= 0) uses[slot] += 1;
}

}  // namespace replay_detail

template <typename Launcher>
void replay_push_impl(at::Tensor& storage, at::Tensor& label_store, at::Tensor& state, at::Tensor& uses,
                      at::Tensor& stamps, const at::Tensor& x_in, const at::Tensor& y_in, const Launcher& launch) {
  using namespace replay_detail;
  check_replay_state(storage, label_store, state, uses, stamps);
  check_replay_batch("push", storage, label_store, x_in, y_in);
  const typename Launcher::Guard guard(storage.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t* head = state.const_data_ptr<int64_t>();
  launch_slot_copy(x, storage, head, x.numel(), /*gather=*/false, launch,
                   LabelCopy{y.const_data_ptr<int64_t>(), label_store.mutable_data_ptr<int64_t>(), y.numel()});
  launch(push_commit_kernel, dim3(1), dim3(1), state.mutable_data_ptr<int64_t>(), uses.mutable_data_ptr<int64_t>(),
         stamps.mutable_data_ptr<int64_t>(), storage.size(0));
}

template <typename Launcher>
void replay_sample_impl(at::Tensor& state, at::Tensor& uses, const at::Tensor& stamps, const at::Tensor& storage,
                        const at::Tensor& label_store, at::Tensor& out, at::Tensor& out_labels, at::Tensor& info,
                        int64_t policy, int64_t max_reuse, int64_t seed, const Launcher& launch) {
  using namespace replay_detail;
  check_replay_sample_args(state, uses, stamps, storage, label_store, out, out_labels, info, policy);
  const typename Launcher::Guard guard(storage.device());
  TORCH_CHECK(out.is_contiguous() && out_labels.is_contiguous(),
              "ReplayBuffer.sample: output tensors must be contiguous");
  launch(sample_select_kernel, dim3(1), dim3(1), state.mutable_data_ptr<int64_t>(), uses.mutable_data_ptr<int64_t>(),
         stamps.const_data_ptr<int64_t>(), info.mutable_data_ptr<int64_t>(), policy, max_reuse,
         static_cast<uint64_t>(seed));
  const int64_t* slot = info.const_data_ptr<int64_t>();
  launch_slot_copy(storage, out, slot, out.numel(), /*gather=*/true, launch,
                   LabelCopy{label_store.const_data_ptr<int64_t>(), out_labels.mutable_data_ptr<int64_t>(),
                             out_labels.numel()});
}

}  // namespace dgl_fast
