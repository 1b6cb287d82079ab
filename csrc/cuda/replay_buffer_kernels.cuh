// CUDA kernels of dgl_fast::replay_push / replay_sample, launched by replay_buffer_impl.cuh (host
// logic); compiled by nvcc through replay_buffer.cu and by the SIMT emulator in tests/simt.
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

#include <cstdint>
#include <type_traits>

#include "replay_buffer.h"

namespace dgl_fast {
namespace replay_buffer_detail {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;  // sample_kernel's tickets take 16 bits

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

}  // namespace replay_buffer_detail

}  // namespace dgl_fast
