// CUDA kernel of dgl_fast::softmax_xent, launched by softmax_xent_impl.cuh (host logic); compiled
// by nvcc through softmax_xent.cu and by the SIMT emulator in tests/simt.
// Schema and semantics: csrc/dgl_fast.cpp.
//
// One warp per row, WARPS_PER_BLOCK rows in flight per block. Each warp finds the
// row's max and first arg-max, the sum of exponentials, writes the gradient row and
// keeps its rows' loss and hits in registers; the block then reduces its warps in a
// fixed order. With a single block (batch <= WARPS_PER_BLOCK * MAX_ROWS_PER_WARP),
// that block writes the final mean loss and count: one launch, no atomics, no host
// synchronisation. Larger batches write one partial per block, summed by ATen.
//
// Labels outside [0, classes) cannot raise from the device without a host sync: such
// a row gets a NaN loss (so the mean loss is NaN) and never counts as correct.
// dgl_fast's trainer checks labels on the host before they reach the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace dgl_fast {
namespace softmax_xent_detail {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

// (a, ia) ranks before (b, ib) in torch.argmax's order: NaN first, then larger, then
// the smaller index on ties.
template <typename acc_t>
__device__ __forceinline__ bool ranks_first(acc_t a, int ia, acc_t b, int ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Arguments (all pointers to contiguous memory):
//   logits  [batch, classes]   input rows
//   labels  [batch]            int64 targets
//   dlogits [batch, classes]   output, (softmax - onehot) / batch
//   part_loss, part_correct [gridDim.x]  per-block sums (used when gridDim.x > 1)
//   loss, correct              final scalars (written only when gridDim.x == 1)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    softmax_xent_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                        scalar_t* __restrict__ dlogits, acc_t* __restrict__ part_loss,
                        int64_t* __restrict__ part_correct, acc_t* __restrict__ loss,
                        int64_t* __restrict__ correct, int batch, int classes) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(batch);
  acc_t my_loss = 0;
  int64_t my_hits = 0;

  for (int row = blockIdx.x * kWarpsPerBlock + warp; row < batch; row += gridDim.x * kWarpsPerBlock) {
    const scalar_t* in = logits + static_cast<int64_t>(row) * classes;
    scalar_t* out = dlogits + static_cast<int64_t>(row) * classes;

    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    int arg = classes;  // sentinel larger than any index
    for (int c = lane; c < classes; c += kWarp) {
      const acc_t v = static_cast<acc_t>(in[c]);
      if (arg == classes || ranks_first(v, c, mx, arg)) {
        mx = v;
        arg = c;
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const acc_t omx = __shfl_xor_sync(0xffffffffu, mx, off);
      const int oarg = __shfl_xor_sync(0xffffffffu, arg, off);
      if (oarg != classes && (arg == classes || ranks_first(omx, oarg, mx, arg))) {
        mx = omx;
        arg = oarg;
      }
    }

    acc_t sum = 0;
    for (int c = lane; c < classes; c += kWarp) sum += exp(static_cast<acc_t>(in[c]) - mx);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);

    const int64_t y = labels[row];
    const bool valid = y >= 0 && y < classes;
    const acc_t log_sum = log(sum);
    // Same rounding order as PyTorch's log_softmax + nll_loss backward.
    for (int c = lane; c < classes; c += kWarp) {
      const acc_t p = exp((static_cast<acc_t>(in[c]) - mx) - log_sum);
      out[c] = static_cast<scalar_t>(p * inv_batch - (valid && c == y ? inv_batch : acc_t(0)));
    }
    if (lane == 0) {
      my_loss += valid ? log_sum + mx - static_cast<acc_t>(in[y]) : std::numeric_limits<acc_t>::quiet_NaN();
      my_hits += (valid && arg == y) ? 1 : 0;
    }
  }

  __shared__ acc_t s_loss[kWarpsPerBlock];
  __shared__ int64_t s_hits[kWarpsPerBlock];
  if (lane == 0) {
    s_loss[warp] = my_loss;
    s_hits[warp] = my_hits;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    int64_t hits = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      total += s_loss[w];
      hits += s_hits[w];
    }
    if (gridDim.x == 1) {
      *loss = total * inv_batch;
      *correct = hits;
    } else {
      part_loss[blockIdx.x] = total;
      part_correct[blockIdx.x] = hits;
    }
  }
}

}  // namespace softmax_xent_detail

}  // namespace dgl_fast
