// A SIMT emulator: runs dgl_fast's CUDA kernels (csrc/cuda/*_kernels.cuh) on the CPU, one fiber
// per CUDA thread, so their index arithmetic, reductions, warp shuffles and barriers are tested on
// machines without a GPU. Test-only; never part of the library.
//
// What it models:
//   - threadIdx / blockIdx / blockDim / gridDim; blocks run one at a time (in a shuffled order when
//     a seed is set) unless several are in flight (below), every thread on its own stack (ucontext
//     fibers);
//   - __syncthreads(): a barrier of every thread of the block, all reaching the same call site. A
//     thread that has returned never arrives, so a barrier that some threads skip is reported as a
//     deadlock (CUDA leaves it undefined), not silently passed; so are barriers met at different
//     call sites;
//   - __shfl_xor_sync(full mask, v, lane_mask): an exchange among all lanes of the warp (32
//     consecutive linear thread ids), with a barrier on each side; a partial mask, or lanes that
//     pass different lane masks, are reported;
//   - __shared__ variables: function statics (thread_local: one copy per block in flight), shared
//     by the block that runs;
//   - scheduling: each thread runs uninterrupted from one barrier to the next, in a shuffled order
//     when a seed is set. A kernel whose result depends on the order of threads across a barrier
//     (one thread writes shared memory after a barrier that another thread's read assumed) gives
//     different bits under different seeds;
//   - blocks in flight together (configure's `resident` > 1): up to that many blocks of a grid are
//     resident at once, each on its own OS thread, and they take turns: one holds a token and runs,
//     and at every schedule point (a block's start, the release of a __syncthreads, __threadfence,
//     an atomic) the token may pass, by a seeded draw, to another resident block. A kernel that
//     lets one block change state that another block has yet to read (a "last block" commit taken
//     too early) gives different results under different seeds. With resident = 1 (the default)
//     blocks run to completion one after another;
//   - atomicAdd (int, unsigned, unsigned long long, float, double): the read-modify-write,
//     indivisible (only the token holder runs), with a schedule point on each side;
//     __threadfence(): a schedule point; __ldcg(p): *p.
// What it does not model: interleavings between two schedule points (a read-modify-write race on
// shared memory without a barrier inside gives the sequential answer), shared memory's initial
// contents (zero at the first block an OS thread runs, then whatever the previous block left;
// garbage on a GPU), the memory model beyond barriers (a missing __threadfence is not caught:
// every write is visible at once), timing. Memory bounds: tests/test_simt.py runs it under ASan.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

// Device math as CUDA resolves it: float overloads for float arguments.
using std::exp;
using std::isnan;
using std::log;
using std::sqrt;

namespace simt {

constexpr int kWarpSize = 32;

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, block_barriers = 0, warp_exchanges = 0, atomics = 0,
          block_switches = 0;
};

struct Group {  // a barrier: `size` arrivals release it and bump `generation`
  int size = 0;
  int arrived = 0;
  uint64_t generation = 0;
  const char* site_file = nullptr;  // where the first thread of this round arrived
  int site_line = 0;
};

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  Group* waiting_on = nullptr;
  uint64_t waiting_generation = 0;
  const char* where = "";
};

struct Block {
  dim3 grid, block;
  uint3 bid;
  std::vector<Thread> threads;
  Group barrier;
  std::vector<Group> warp_barriers;
  std::vector<unsigned char> warp_slots;  // [warps][32][16] bytes exchanged by shuffles
  std::vector<int> warp_masks;            // [warps][32] lane masks of the shuffle in flight
  ucontext_t scheduler;
  Thread* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
};

// The blocks of one launch in flight together (resident > 1): each worker (an OS thread) runs
// blocks one after another; only the worker that holds the token runs, so every global is touched
// by one thread at a time, in an order fixed by the seed.
struct Grid {
  std::mutex mutex;
  std::condition_variable cv;
  int turn = 0;                  // worker holding the token
  std::vector<char> live;        // workers not yet finished
  std::mt19937_64 rng;           // token passing (drawn only by the token holder)
  std::vector<uint3> blocks;     // dispatch order
  size_t next = 0;               // next block to start
  std::string error;
};

inline thread_local Block* g_block = nullptr;
inline thread_local Grid* g_grid = nullptr;  // set on worker threads only
inline thread_local int g_worker = -1;
inline Stats g_stats;
inline uint64_t g_seed = 0;
inline uint64_t g_seeded_launches = 0;  // launches since the seed was set: schedules replay per test
inline int g_resident = 1;              // blocks in flight together

inline Thread& self() { return *g_block->current; }

// Records an error of the running thread and leaves it for good (the launch then throws).
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = *g_block;
  Thread& t = self();
  if (b.error.empty())
    b.error = what + " (block " + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
              std::to_string(b.bid.z) + ", thread " + std::to_string(t.tid.x) + "," + std::to_string(t.tid.y) + "," +
              std::to_string(t.tid.z) + ")";
  t.done = true;
  setcontext(&b.scheduler);
  std::abort();  // unreachable
}

inline void arrive(Group& g, const char* where, const char* file = nullptr, int line = 0) {
  Thread& t = self();
  const uint64_t gen = g.generation;
  if (file != nullptr) {
    if (g.arrived == 0) {
      g.site_file = file;
      g.site_line = line;
    } else if (line != g.site_line || std::strcmp(file, g.site_file) != 0) {
      fail(std::string(where) + " reached at " + file + ":" + std::to_string(line) + " while other threads wait at " +
           g.site_file + ":" + std::to_string(g.site_line));
    }
  }
  if (++g.arrived == g.size) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  t.waiting_on = &g;
  t.waiting_generation = gen;
  t.where = where;
  swapcontext(&t.ctx, &g_block->scheduler);
}

inline void schedule_point();

inline void syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ++g_stats.block_barriers;
  // The last thread to arrive releases the barrier: another resident block may run first.
  if (g_block->barrier.arrived + 1 == g_block->barrier.size) schedule_point();
  arrive(g_block->barrier, "__syncthreads", file, line);
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width = kWarpSize) {
  static_assert(sizeof(T) <= 16, "simt: shuffles of at most 16 bytes");
  Block& b = *g_block;
  Thread& t = self();
  Group& g = b.warp_barriers[t.warp];
  const unsigned full = g.size == kWarpSize ? 0xffffffffu : ((1u << g.size) - 1u);
  if (width != kWarpSize) fail("__shfl_xor_sync: only width 32 is emulated");
  if (mask != full) fail("__shfl_xor_sync: mask " + std::to_string(mask) + " is not the full warp");
  const int src = t.lane ^ lane_mask;
  if (src < 0 || src >= g.size) fail("__shfl_xor_sync: source lane " + std::to_string(src) + " outside the warp");
  ++g_stats.warp_exchanges;
  unsigned char* slots = b.warp_slots.data() + static_cast<size_t>(t.warp) * kWarpSize * 16;
  int* masks = b.warp_masks.data() + static_cast<size_t>(t.warp) * kWarpSize;
  std::memcpy(slots + t.lane * 16, &value, sizeof(T));
  masks[t.lane] = lane_mask;
  arrive(g, "__shfl_xor_sync (write)");
  for (int l = 0; l < g.size; ++l)
    if (masks[l] != lane_mask)
      fail("__shfl_xor_sync: lane " + std::to_string(l) + " passed lane mask " + std::to_string(masks[l]) +
           ", this lane " + std::to_string(lane_mask) + " (lanes of one exchange must agree)");
  T out;
  std::memcpy(&out, slots + src * 16, sizeof(T));
  arrive(g, "__shfl_xor_sync (read)");
  return out;
}

// Where another resident block may run: hands the token, by a seeded draw, to a live worker
// (possibly this one) and waits for it to come back. A no-op when blocks run one at a time.
inline void schedule_point() {
  Grid* g = g_grid;
  if (g == nullptr) return;
  std::unique_lock<std::mutex> lock(g->mutex);
  std::vector<int> live;
  for (int w = 0; w < static_cast<int>(g->live.size()); ++w)
    if (g->live[w]) live.push_back(w);
  const int pick = live[static_cast<size_t>(g->rng() % live.size())];
  if (pick == g_worker) return;
  ++g_stats.block_switches;
  g->turn = pick;
  g->cv.notify_all();
  g->cv.wait(lock, [&] { return g->turn == g_worker; });
}

template <typename T>
T atomic_add(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "simt: atomicAdd on arithmetic types only");
  schedule_point();
  ++g_stats.atomics;
  const T old = *address;
  *address = static_cast<T>(old + value);
  schedule_point();  // other blocks may act on the new value before this thread goes on
  return old;
}

inline void thread_entry() {
  Block& b = *g_block;
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = std::string("exception in a kernel thread: ") + e.what();
  }
  self().done = true;
}

// Runs one block to completion; throws on a kernel error or a deadlock.
inline void run_block(Block& b, std::vector<char>& stacks, size_t stack_bytes, std::mt19937_64* rng) {
  const int n = static_cast<int>(b.threads.size());
  int i = 0;
  for (unsigned z = 0; z < b.block.z; ++z)
    for (unsigned y = 0; y < b.block.y; ++y)
      for (unsigned x = 0; x < b.block.x; ++x, ++i) {
        Thread& t = b.threads[i];
        t = Thread{};
        t.tid = uint3{x, y, z};
        t.warp = i / kWarpSize;
        t.lane = i % kWarpSize;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = stacks.data() + static_cast<size_t>(i) * stack_bytes;
        t.ctx.uc_stack.ss_size = stack_bytes;
        t.ctx.uc_link = &b.scheduler;
        makecontext(&t.ctx, thread_entry, 0);
      }
  b.barrier = Group{n, 0, 0};
  const int warps = (n + kWarpSize - 1) / kWarpSize;
  b.warp_barriers.assign(warps, Group{});
  for (int w = 0; w < warps; ++w) b.warp_barriers[w].size = std::min(kWarpSize, n - w * kWarpSize);
  b.warp_slots.assign(static_cast<size_t>(warps) * kWarpSize * 16, 0);
  b.warp_masks.assign(static_cast<size_t>(warps) * kWarpSize, 0);
  b.error.clear();

  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (;;) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    bool ran = false, all_done = true;
    for (int k : order) {
      Thread& t = b.threads[k];
      if (t.done) continue;
      all_done = false;
      if (t.waiting_on && t.waiting_on->generation == t.waiting_generation) continue;
      t.waiting_on = nullptr;
      b.current = &t;
      swapcontext(&b.scheduler, &t.ctx);
      ran = true;
      if (!b.error.empty()) throw std::runtime_error("simt: " + b.error);
    }
    if (all_done) return;
    if (!ran) {
      int exited = 0, at_block = 0, at_warp = 0;
      for (const Thread& t : b.threads) {
        if (t.done) ++exited;
        else if (t.waiting_on == &b.barrier) ++at_block;
        else ++at_warp;
      }
      throw std::runtime_error("simt: deadlock in block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) +
                               "," + std::to_string(b.bid.z) + "): " + std::to_string(at_block) +
                               " threads wait at __syncthreads, " + std::to_string(at_warp) +
                               " at a warp exchange, " + std::to_string(exited) + " have returned");
    }
  }
}

// Worker `w` of a launch with blocks in flight together: waits for the token, then runs blocks
// from the shared dispatch order until none is left, with a schedule point before each.
inline void resident_worker(Grid& g, int w, dim3 grid, dim3 block, const std::function<void()>& body,
                            uint64_t launch_key, size_t stack_bytes) {
  g_grid = &g;
  g_worker = w;
  {
    std::unique_lock<std::mutex> lock(g.mutex);
    g.cv.wait(lock, [&] { return g.turn == w; });
  }
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  std::vector<char> stacks(static_cast<size_t>(nthreads) * stack_bytes);
  Block b;
  b.grid = grid;
  b.block = block;
  b.body = &body;
  b.threads.resize(nthreads);
  g_block = &b;
  for (;;) {
    schedule_point();
    if (!g.error.empty() || g.next == g.blocks.size()) break;
    b.bid = g.blocks[g.next++];
    // thread orders: a generator of this block's own, so they do not depend on the interleaving
    std::unique_ptr<std::mt19937_64> rng;
    if (g_seed != 0)
      rng = std::make_unique<std::mt19937_64>(launch_key ^ (0x9E3779B97F4A7C15ull * (1 + b.bid.x + 65536ull *
                                                                                      (b.bid.y + 65536ull * b.bid.z))));
    try {
      run_block(b, stacks, stack_bytes, rng.get());
    } catch (const std::exception& e) {
      if (g.error.empty()) g.error = e.what();
      break;
    }
    ++g_stats.blocks;
    g_stats.threads += nthreads;
  }
  g_block = nullptr;
  g_grid = nullptr;
  g_worker = -1;
  std::unique_lock<std::mutex> lock(g.mutex);
  g.live[w] = 0;
  std::vector<int> live;
  for (int v = 0; v < static_cast<int>(g.live.size()); ++v)
    if (g.live[v]) live.push_back(v);
  g.turn = live.empty() ? -1 : live[static_cast<size_t>(g.rng() % live.size())];
  g.cv.notify_all();
}

// Runs the grid's blocks with up to g_resident of them in flight together (see Grid).
inline void launch_resident(dim3 grid, dim3 block, const std::function<void()>& body, std::vector<uint3> blocks,
                            uint64_t launch_key, size_t stack_bytes) {
  Grid g;
  const int workers = static_cast<int>(std::min<size_t>(static_cast<size_t>(g_resident), blocks.size()));
  g.blocks = std::move(blocks);
  g.rng.seed(launch_key + 0x2545F4914F6CDD1Dull);
  g.live.assign(workers, 1);
  g.turn = 0;
  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (int w = 0; w < workers; ++w)
    threads.emplace_back(resident_worker, std::ref(g), w, grid, block, std::cref(body), launch_key, stack_bytes);
  for (std::thread& t : threads) t.join();
  if (!g.error.empty()) throw std::runtime_error(g.error);
}

// Runs `body` as a kernel on grid x block threads.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body, size_t stack_bytes = 64 << 10) {
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("simt: invalid block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                             std::to_string(block.z) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("simt: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ")");
  ++g_stats.launches;
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  const uint64_t launch_key = g_seed * 1000003u + (g_seed != 0 ? ++g_seeded_launches : 0);
  std::unique_ptr<std::mt19937_64> rng;
  if (g_seed != 0) {
    rng = std::make_unique<std::mt19937_64>(launch_key);
    std::shuffle(blocks.begin(), blocks.end(), *rng);
  }
  if (g_resident > 1 && blocks.size() > 1) {
    launch_resident(grid, block, body, std::move(blocks), launch_key, stack_bytes);
    return;
  }
  std::vector<char> stacks(static_cast<size_t>(nthreads) * stack_bytes);
  Block b;
  b.grid = grid;
  b.block = block;
  b.body = &body;
  b.threads.resize(nthreads);
  Block* const outer = g_block;
  g_block = &b;
  try {
    for (const uint3& bid : blocks) {
      b.bid = bid;
      run_block(b, stacks, stack_bytes, rng.get());
      ++g_stats.blocks;
      g_stats.threads += static_cast<int64_t>(nthreads);
    }
  } catch (...) {
    g_block = outer;
    throw;
  }
  g_block = outer;
}

}  // namespace simt

// CUDA's spelling, for kernels compiled on the host.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::simt::self().tid)
#define blockIdx (::simt::g_block->bid)
#define blockDim (::simt::g_block->block)
#define gridDim (::simt::g_block->grid)
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::simt::shfl_xor((mask), (value), (lane_mask))
#define __threadfence() ::simt::schedule_point()

template <typename T>
T atomicAdd(T* address, T value) {
  return ::simt::atomic_add(address, value);
}

template <typename T>
T __ldcg(const T* address) {
  return *address;
}
