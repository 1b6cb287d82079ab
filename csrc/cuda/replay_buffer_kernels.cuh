// CUDA kernels of dgl_fast::replay_push / replay_sample and their host logic, written against a launcher
// (csrc/cuda/launch.cuh): compiled by nvcc in replay_buffer.cu and by the SIMT emulator in tests/simt.
// Schemas: csrc/dgl_fast.cpp.
//
// The ring state (head, count, counters, use counts) stays on the device: the kernels read the
// slot they work on from device memory, so no op waits for the host and both ops can be captured
// in a CUDA graph. Each op is:
//   push:   one copy kernel (x -> storage[head] and y -> label_store[head]), then a one-thread kernel
//           that resets the slot's use count and advances head / count / pushes;
//   sample: one kernel (one graph node). Every block picks the slot itself (thread 0 runs
//           replay_select, the CPU kernel's code, on the ring state), copies its grid-stride share
//           of storage[slot] -> out and label_store[slot] -> out_labels (nothing for -1), and the
//           last block to finish reading the state commits: uses[slot] += 1, samples += 1,
//           info = [slot, valid]. See sample_kernel for the ticket that finds that block.
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
constexpr int kMaxBlocks = 65535;  // sample_kernel's tickets take 16 bits

// Blocks of a copy of n_items words: a word a thread, grid-stride beyond kMaxBlocks blocks.
inline int copy_blocks(int64_t n_items) {
  n_items = std::max<int64_t>(n_items, 1);
  const int64_t want = (n_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, kMaxBlocks)));
}

// One element of a slot copy: same-dtype words move as raw bits (uint4 for 16-byte vectors);
// otherwise they are converted through float (fp32 <-> bf16 / fp16 storage).
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

// push: x (n words) -> storage[head] and y -> label_store[head]; head = head_ptr[0], read on the
// device.
template <typename src_t, typename dst_t>
__global__ void push_copy_kernel(const src_t* __restrict__ src, dst_t* __restrict__ dst,
                                 const int64_t* __restrict__ head_ptr, int64_t n, LabelCopy lab) {
  const int64_t slot = *head_ptr;
  dst += slot * n;
  int64_t* ldst = lab.dst + slot * lab.n;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n; i += stride) dst[i] = slot_convert<src_t, dst_t>(src[i]);
  for (int64_t i = first; i < lab.n; i += stride) ldst[i] = lab.src[i];
}

// Calls launch_copy(src_word, dst_word, words) with the element types the copy of one slot of `n`
// elements moves (type tags: std::type_identity) and their count. Same dtype: raw bits, 16 bytes
// a thread when sizes and addresses allow, else the element's own width; otherwise src and dst
// types converted through float (fp32 <-> bf16 / fp16 storage).
template <typename F>
void dispatch_slot_copy(const at::Tensor& src, const at::Tensor& dst, int64_t n, F&& launch_copy) {
  if (src.scalar_type() == dst.scalar_type()) {
    const int64_t bytes = n * src.element_size();
    const auto s = reinterpret_cast<uintptr_t>(src.const_data_ptr());
    const auto d = reinterpret_cast<uintptr_t>(dst.const_data_ptr());
    auto bits = [&](auto word, int64_t words) { launch_copy(word, word, words); };
    if (bytes % 16 == 0 && s % 16 == 0 && d % 16 == 0) bits(std::type_identity<uint4>{}, bytes / 16);
    else if (src.element_size() == 8) bits(std::type_identity<uint64_t>{}, n);
    else if (src.element_size() == 4) bits(std::type_identity<uint32_t>{}, n);
    else if (src.element_size() == 2) bits(std::type_identity<uint16_t>{}, n);
    else bits(std::type_identity<uint8_t>{}, n);  // 1-byte types (float8 storage)
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "replay_copy_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "replay_copy_dst", [&] {
      launch_copy(std::type_identity<src_t>{}, std::type_identity<scalar_t>{}, n);
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

// What replay_sample's kernel reads and commits. The grid's blocks take tickets in the high bits of
// the samples counter, state[3] (bits kTicketShift.. hold tickets, the bits below the count), for
// the span of one launch: between ops state[3] is the plain count. So the op needs no counter of
// its own and keeps its schema; a launch has at most kMaxBlocks = 65535 blocks (16 bits) and the
// count stays below 2^48 samples.
struct SampleArgs {
  int64_t* state;  // [head, count, pushes, samples]
  int64_t* uses;
  const int64_t* stamps;
  int64_t* info;  // [slot, valid], written by the committing block
  int64_t policy, max_reuse;
  uint64_t seed;
};

constexpr int kTicketShift = 48;
constexpr unsigned long long kCountMask = (1ull << kTicketShift) - 1;
static_assert(kMaxBlocks < (1 << (64 - kTicketShift)), "every block's ticket must fit above the count");

// replay_sample in one launch. Every block computes the same choice (thread 0: replay_select on
// the ring state as it was when the op started) and copies its share of that slot. The state is
// committed once every block has read it, or blocks still reading would see the new use count and
// choose differently: thread 0 of each block, after its reads, fences and takes a ticket (an
// atomic add on state[3]'s high bits); the block that draws the last ticket (gridDim.x - 1) is the
// last reader, and it alone writes uses[slot], state[3] (count + 1, tickets cleared) and info.
// Blocks need not be resident together: nothing waits for another block.
template <typename src_t, typename dst_t>
__global__ void sample_kernel(const src_t* __restrict__ src, dst_t* __restrict__ dst, int64_t n, LabelCopy lab,
                              SampleArgs a) {
  __shared__ int64_t chosen;
  if (threadIdx.x == 0) {
    const uint64_t samples = static_cast<uint64_t>(a.state[3]) & kCountMask;
    chosen = replay_select(a.uses, a.stamps, a.state[1], a.policy, a.max_reuse, a.seed, samples);
  }
  __syncthreads();
  const int64_t slot = chosen;
  if (slot >= 0) {
    src += slot * n;
    const int64_t* lsrc = lab.src + slot * lab.n;
    const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = first; i < n; i += stride) dst[i] = slot_convert<src_t, dst_t>(src[i]);
    for (int64_t i = first; i < lab.n; i += stride) lab.dst[i] = lsrc[i];
  }
  if (threadIdx.x == 0) {
    __threadfence();  // this block's reads of the state come before its ticket
    auto* word = reinterpret_cast<unsigned long long*>(a.state + 3);
    const unsigned long long before = atomicAdd(word, 1ull << kTicketShift);
    if ((before >> kTicketShift) == gridDim.x - 1) {
      __threadfence();  // every other block's ticket, so its reads, come before these writes
      if (slot >= 0) a.uses[slot] += 1;
      a.state[3] = static_cast<int64_t>((before & kCountMask) + 1);
      a.info[0] = slot;
      a.info[1] = slot >= 0 ? 1 : 0;
    }
  }
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
  using namespace replay_detail;
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
    launch(sample_kernel<src_t, dst_t>, dim3(copy_blocks(words)), dim3(kThreads),
           static_cast<const src_t*>(storage.const_data_ptr()), static_cast<dst_t*>(out.mutable_data_ptr()), words,
           lab, args);
  });
}

}  // namespace dgl_fast
