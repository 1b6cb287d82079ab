// Host implementation of dgl_fast::replay_push / replay_sample: argument checks, launch
// configuration and dtype dispatch of the slot copies, written against a launcher
// (cuda/launch.cuh) so that replay_buffer.cu instantiates it with CUDA launches and tests/simt
// with the SIMT emulator. Kernels (and the order of their launches): replay_buffer_kernels.cuh.
// Schemas: csrc/dgl_fast.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/replay_buffer_kernels.cuh"
#include "replay_buffer.h"

namespace dgl_fast {
namespace replay_buffer_detail {

// Blocks of a copy of n_items words: a word a thread, grid-stride beyond kMaxBlocks blocks.
inline int copy_blocks(int64_t n_items) {
  n_items = std::max<int64_t>(n_items, 1);
  const int64_t want = (n_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, kMaxBlocks)));
}

// Blocks of a sample of n_items words: copy_blocks, at most kSampleBlocksPerSM a multiprocessor
// (grid-stride beyond). Every block's thread 0 runs the slot selection over the ring's state and
// takes a ticket, so a 16 MB slot's 4,096 copy blocks would repeat that serial work 4,096 times
// where 4 resident blocks a multiprocessor already saturate the copy.
constexpr int kSampleBlocksPerSM = 4;
inline int sample_blocks(int64_t n_items, int multiprocessors) {
  return std::min(copy_blocks(n_items), kSampleBlocksPerSM * std::max(multiprocessors, 1));
}

// A type as a value (C++20's std::type_identity; csrc/ is C++17 code, see setup.py).
template <typename T>
struct type_tag {
  using type = T;
};

// Calls launch_copy(src_word, dst_word, words) with the element types the copy of one slot of `n`
// elements moves (type tags: type_tag) and their count. Same dtype: raw bits, 16 bytes
// a thread when sizes and addresses allow, else the element's own width; otherwise src and dst
// types converted through float (fp32 <-> bf16 / fp16 storage).
template <typename F>
void dispatch_slot_copy(const at::Tensor& src, const at::Tensor& dst, int64_t n, F&& launch_copy) {
  if (src.scalar_type() == dst.scalar_type()) {
    const int64_t bytes = n * src.element_size();
    const auto s = reinterpret_cast<uintptr_t>(src.const_data_ptr());
    const auto d = reinterpret_cast<uintptr_t>(dst.const_data_ptr());
    auto bits = [&](auto word, int64_t words) { launch_copy(word, word, words); };
    if (bytes % 16 == 0 && s % 16 == 0 && d % 16 == 0) bits(type_tag<uint4>{}, bytes / 16);
    else if (src.element_size() == 8) bits(type_tag<uint64_t>{}, n);
    else if (src.element_size() == 4) bits(type_tag<uint32_t>{}, n);
    else if (src.element_size() == 2) bits(type_tag<uint16_t>{}, n);
    else bits(type_tag<uint8_t>{}, n);  // 1-byte types (float8 storage)
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "replay_copy_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "replay_copy_dst", [&] {
      launch_copy(type_tag<src_t>{}, type_tag<scalar_t>{}, n);
    });
  });
}

}  // namespace replay_buffer_detail

template <typename Launcher>
void replay_push_impl(at::Tensor& storage, at::Tensor& label_store, at::Tensor& state, at::Tensor& uses,
                      at::Tensor& stamps, const at::Tensor& x_in, const at::Tensor& y_in, const Launcher& launch) {
  using namespace replay_buffer_detail;
  check_replay_state(storage, label_store, state, uses, stamps);
  check_replay_batch("push", storage, label_store, x_in, y_in);
  const typename Launcher::Guard guard(storage.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t* head = state.const_data_ptr<int64_t>();
  const LabelCopy lab{y.const_data_ptr<int64_t>(), label_store.mutable_data_ptr<int64_t>(), y.numel()};
  dispatch_slot_copy(x, storage, x.numel(), [&](auto src_word, auto dst_word, int64_t words) {
    using src_t = typename decltype(src_word)::type;
    using dst_t = typename decltype(dst_word)::type;
    launch(push_copy_kernel<src_t, dst_t>, dim3(copy_blocks(words)), dim3(kThreads),
           static_cast<const src_t*>(x.const_data_ptr()), static_cast<dst_t*>(storage.mutable_data_ptr()), head,
           words, lab);
  });
  launch(push_commit_kernel, dim3(1), dim3(1), state.mutable_data_ptr<int64_t>(), uses.mutable_data_ptr<int64_t>(),
         stamps.mutable_data_ptr<int64_t>(), storage.size(0));
}

template <typename Launcher>
void replay_sample_impl(at::Tensor& state, at::Tensor& uses, const at::Tensor& stamps, const at::Tensor& storage,
                        const at::Tensor& label_store, at::Tensor& out, at::Tensor& out_labels, at::Tensor& info,
                        int64_t policy, int64_t max_reuse, int64_t seed, const Launcher& launch) {
  using namespace replay_buffer_detail;
  check_replay_sample_args(state, uses, stamps, storage, label_store, out, out_labels, info, policy);
  const typename Launcher::Guard guard(storage.device());
  TORCH_CHECK(out.is_contiguous() && out_labels.is_contiguous(),
              "ReplayBuffer.sample: output tensors must be contiguous");
  const LabelCopy lab{label_store.const_data_ptr<int64_t>(), out_labels.mutable_data_ptr<int64_t>(),
                      out_labels.numel()};
  const SampleArgs args{state.mutable_data_ptr<int64_t>(), uses.mutable_data_ptr<int64_t>(),
                        stamps.const_data_ptr<int64_t>(), info.mutable_data_ptr<int64_t>(), policy, max_reuse,
                        static_cast<uint64_t>(seed)};
  dispatch_slot_copy(storage, out, out.numel(), [&](auto src_word, auto dst_word, int64_t words) {
    using src_t = typename decltype(src_word)::type;
    using dst_t = typename decltype(dst_word)::type;
    launch(sample_kernel<src_t, dst_t>, dim3(sample_blocks(words, launch.multiprocessors())), dim3(kThreads),
           static_cast<const src_t*>(storage.const_data_ptr()), static_cast<dst_t*>(out.mutable_data_ptr()), words,
           lab, args);
  });
}

}  // namespace dgl_fast
