// dgl_fast's CUDA ops, host logic and kernels alike (csrc/cuda/<op>_impl.cuh and the
// <op>_kernels.cuh it includes), instantiated with the SIMT emulator of simt.h instead of CUDA
// launches, on CPU tensors. Built on demand by tests/test_simt.py
// (torch.utils.cpp_extension.load); each function mirrors the CUDA registration of the same op.
// Registered as torch.ops.dgl_fast_simt.* (torch/library.h, not pybind11's torch/extension.h:
// with AddressSanitizer that header alone took 80 s of the build's 80).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt.h"  // after the torch headers: it defines CUDA's built-in names as macros

#include "cuda/aux_pool_impl.cuh"
#include "cuda/bn_update_stats_impl.cuh"
#include "cuda/linear_bn_relu_impl.cuh"
#include "cuda/replay_buffer_impl.cuh"
#include "cuda/softmax_xent_impl.cuh"

namespace {

int g_multiprocessors = 132;  // H100 SXM; tests vary it to take every launch-configuration branch

struct SimtLauncher {
  struct Guard {  // one device: nothing to switch
    explicit Guard(const at::Device&) {}
  };

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    // Each emulated thread gets its own copy of the arguments, as CUDA threads do.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    simt::launch(grid, block, [&] { std::apply(kernel, params); });
  }
  int multiprocessors() const { return g_multiprocessors; }
};

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "simt.", what, ": the emulator runs on CPU tensors, got ", t.device());
}

// seed: thread schedules (0: unshuffled); multiprocessors: what launch.multiprocessors() reports;
// resident: blocks of a grid in flight together (1: one after another).
void configure(int64_t seed, int64_t multiprocessors, int64_t resident) {
  TORCH_CHECK(multiprocessors >= 1, "simt.configure: multiprocessors must be >= 1");
  TORCH_CHECK(resident >= 1 && resident <= 64, "simt.configure: resident must be in [1, 64], got ", resident);
  simt::g_seed = static_cast<uint64_t>(seed);
  simt::g_seeded_launches = 0;
  simt::g_resident = static_cast<int>(resident);
  g_multiprocessors = static_cast<int>(multiprocessors);
}

// In the order of tests/test_simt.py's STATS names.
std::vector<int64_t> stats() {
  const simt::Stats& s = simt::g_stats;
  return {s.launches, s.blocks, s.threads, s.block_barriers, s.warp_exchanges, s.atomics, s.block_switches};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_xent(const at::Tensor& logits, const at::Tensor& labels) {
  check_cpu(logits, "softmax_xent");
  return dgl_fast::softmax_xent_impl(logits, labels, SimtLauncher{});
}

at::Tensor aux_pool(const at::Tensor& x, int64_t out_h, int64_t out_w, bool channels_last_out) {
  check_cpu(x, "aux_pool");
  return dgl_fast::aux_pool_impl(x, out_h, out_w, channels_last_out, SimtLauncher{});
}

at::Tensor aux_pool_bwd(const at::Tensor& g, int64_t in_h, int64_t in_w, bool channels_last_in) {
  check_cpu(g, "aux_pool_bwd");
  return dgl_fast::aux_pool_bwd_impl(g, in_h, in_w, channels_last_in, SimtLauncher{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps) {
  check_cpu(x, "linear_bn_relu");
  return dgl_fast::linear_bn_relu_impl(x, w, bias, gamma, beta, running_mean, running_var, training, eps,
                                       SimtLauncher{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, bool training, double eps) {
  check_cpu(z, "linear_bn_relu_bwd");
  return dgl_fast::linear_bn_relu_bwd_impl(grad_out, x, w, z, mean, var, gamma, beta, training, eps, SimtLauncher{});
}

void bn_update_stats(std::vector<at::Tensor> rms, std::vector<at::Tensor> rvs, std::vector<at::Tensor> nbt,
                     std::vector<at::Tensor> means, std::vector<at::Tensor> vars, std::vector<int64_t> counts,
                     std::vector<double> momentums) {
  for (const auto& t : rms) check_cpu(t, "bn_update_stats");
  dgl_fast::bn_update_stats_impl(rms, rvs, nbt, means, vars, counts, momentums, SimtLauncher{});
}

void replay_push(at::Tensor storage, at::Tensor label_store, at::Tensor state, at::Tensor uses, at::Tensor stamps,
                 const at::Tensor& x, const at::Tensor& y) {
  check_cpu(storage, "replay_push");
  dgl_fast::replay_push_impl(storage, label_store, state, uses, stamps, x, y, SimtLauncher{});
}

void replay_sample(at::Tensor state, at::Tensor uses, const at::Tensor& stamps, const at::Tensor& storage,
                   const at::Tensor& label_store, at::Tensor out, at::Tensor out_labels, at::Tensor info,
                   int64_t policy, int64_t max_reuse, int64_t seed) {
  check_cpu(storage, "replay_sample");
  dgl_fast::replay_sample_impl(state, uses, stamps, storage, label_store, out, out_labels, info, policy, max_reuse,
                               seed, SimtLauncher{});
}

// linear_bn_relu's launch shape for N rows and M columns on `sms` SMs: (columns a block, row chunks,
// rows a chunk), so tests can check the real layers' grids without emulating them.
std::tuple<int64_t, int64_t, int64_t> bn_launch_shape(int64_t N, int64_t M, int64_t sms) {
  using namespace dgl_fast::linear_bn_relu_detail;
  const int cols = pick_cols(M, sms);
  const auto split = pick_row_split(N, (M + cols - 1) / cols, kThreads / cols, sms);
  return {cols, split.chunks, split.rows};
}

// Kernels that break the emulator's rules on purpose, so tests can check it reports them.
__global__ void skipped_barrier_kernel(int* out) {
  if (threadIdx.x == 0) return;  // thread 0 never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void racy_block_sum_kernel(int64_t* out) {
  __shared__ int64_t cell[1];
  if (threadIdx.x == 0) cell[0] = 0;
  __syncthreads();
  // Read-modify-write without a barrier between threads' reads and writes: the result depends on
  // which thread runs when. A correct kernel needs a reduction here.
  const int64_t seen = cell[0];
  __syncthreads();
  cell[0] = seen + static_cast<int64_t>(threadIdx.x) + 1;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = cell[0];
}

__global__ void one_past_the_end_kernel(int64_t* out, int64_t n) {
  if (threadIdx.x == 0) out[n] = 1;  // writes the element after the tensor's last
}

__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();  // another barrier: undefined in CUDA
  }
  out[threadIdx.x] = 1;
}

__global__ void mismatched_shuffle_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_xor_sync(0xffffffffu, v, 2);
}

// Block 0 commits (state[0] += 1) without waiting for the other blocks to read state[0]: with
// blocks in flight together, whether a block sees the commit depends on the interleaving. Each
// block also checks that its shared memory is its own across a barrier (another resident block
// writes the same __shared__ variable meanwhile).
__global__ void early_commit_kernel(int64_t* state, int64_t* seen) {
  __shared__ int64_t read;
  if (threadIdx.x == 0) read = state[0] * 1000 + blockIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) seen[blockIdx.x] = read % 1000 == blockIdx.x ? read / 1000 : -1;
  if (blockIdx.x == 0 && threadIdx.x == 0) state[0] += 1;
}

void misuse(c10::string_view which, at::Tensor out) {
  check_cpu(out, "misuse");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kLong, "simt.misuse: expected a contiguous int64 tensor");
  if (which == "skipped_barrier") {
    at::Tensor ints = at::zeros({64}, out.options().dtype(at::kInt));
    SimtLauncher{}(skipped_barrier_kernel, dim3(1), dim3(64), ints.mutable_data_ptr<int>());
  } else if (which == "split_barrier" || which == "mismatched_shuffle") {
    at::Tensor ints = at::zeros({64}, out.options().dtype(at::kInt));
    SimtLauncher{}(which == "split_barrier" ? split_barrier_kernel : mismatched_shuffle_kernel, dim3(1), dim3(64),
                   ints.mutable_data_ptr<int>());
  } else if (which == "early_commit") {
    // out: [1 + blocks]: out[0] the state, out[1 + b] what block b read
    TORCH_CHECK(out.numel() >= 2, "simt.misuse: early_commit needs at least 2 elements");
    int64_t* p = out.mutable_data_ptr<int64_t>();
    SimtLauncher{}(early_commit_kernel, dim3(static_cast<unsigned>(out.numel() - 1)), dim3(32), p, p + 1);
  } else if (which == "racy_sum") {
    SimtLauncher{}(racy_block_sum_kernel, dim3(1), dim3(64), out.mutable_data_ptr<int64_t>());
  } else if (which == "out_of_bounds") {
#if defined(__SANITIZE_ADDRESS__)
    SimtLauncher{}(one_past_the_end_kernel, dim3(1), dim3(32), out.mutable_data_ptr<int64_t>(), out.numel());
#else
    TORCH_CHECK(false, "simt.misuse: the out-of-bounds case runs only in the AddressSanitizer build");
#endif
  } else {
    TORCH_CHECK(false, "simt.misuse: unknown case ", which);
  }
}

}  // namespace

TORCH_LIBRARY(dgl_fast_simt, m) {
  m.def("configure(int seed, int multiprocessors, int resident=1) -> ()", &configure);
  m.def("stats() -> int[]", &stats);
  m.def("softmax_xent(Tensor logits, Tensor labels) -> (Tensor, Tensor, Tensor)", &softmax_xent);
  m.def("aux_pool(Tensor x, int out_h, int out_w, bool channels_last_out) -> Tensor", &aux_pool);
  m.def("aux_pool_bwd(Tensor g, int in_h, int in_w, bool channels_last_in) -> Tensor", &aux_pool_bwd);
  m.def("linear_bn_relu(Tensor x, Tensor w, Tensor? bias, Tensor gamma, Tensor beta, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
        &linear_bn_relu);
  m.def("linear_bn_relu_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor z, Tensor mean, Tensor var, Tensor gamma, "
        "Tensor beta, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &linear_bn_relu_bwd);
  m.def("bn_update_stats(Tensor(a!)[] rms, Tensor(b!)[] rvs, Tensor(c!)[] nbt, Tensor[] means, Tensor[] vars, "
        "int[] counts, float[] momentums) -> ()",
        &bn_update_stats);
  m.def("replay_push(Tensor(a!) storage, Tensor(b!) label_store, Tensor(c!) state, Tensor(d!) uses, "
        "Tensor(e!) stamps, Tensor x, Tensor y) -> ()",
        &replay_push);
  m.def("replay_sample(Tensor(a!) state, Tensor(b!) uses, Tensor stamps, Tensor storage, Tensor label_store, "
        "Tensor(c!) out, Tensor(d!) out_labels, Tensor(e!) info, int policy, int max_reuse, int seed) -> ()",
        &replay_sample);
  m.def("bn_launch_shape(int N, int M, int sms) -> (int, int, int)", &bn_launch_shape);
  m.def("misuse(str which, Tensor(a!) out) -> ()", &misuse);
}
