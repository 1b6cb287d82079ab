// CUDA kernels of dgl_fast::linear_bn_relu / linear_bn_relu_bwd, launched by linear_bn_relu_impl.cuh
// (host logic: the matrix products, launch shapes, dtype dispatch); compiled by nvcc through
// linear_bn_relu.cu and by the SIMT emulator in tests/simt. Schemas: csrc/dgl_fast.cpp.
//
// The matrix products go to cuBLAS through ATen (addmm / mm, on the current stream). Everything
// else of a Linear + BatchNorm + ReLU layer is done by these kernels:
//   forward:  column statistics (two passes over z, from L2 for head-sized layers), normalise,
//             affine, ReLU, written once;
//   backward: ReLU mask and BatchNorm backward (column sums of g and g * xhat, then grad_z),
//             with grad_gamma, grad_beta and the Linear bias gradient.
// A block of 256 threads owns COLS consecutive columns (one per threadIdx.x, so rows are read
// coalesced) and 256 / COLS threads (threadIdx.y) stride over its rows; partial sums meet in
// shared memory in a fixed order, so results do not depend on scheduling. COLS is 32 when there
// are enough columns to fill the GPU, else 16 or 8 (head layers have M = 256..2048 columns: with
// 32 columns a block, M = 256 would run only 8 blocks).
//
// Row chunks. Columns alone cannot fill 132 SMs for narrow layers (mlp-sr's 1x1 convolutions: M =
// C = 128 columns, 8k-32k pixel rows, 16 column blocks) nor give them more than a block each for
// head layers (M = 1024: 128 blocks). pick_row_split (linear_bn_relu_impl.cuh) then also splits
// the rows into chunks, blockIdx.y, so the grid has about kBlocksPerSm blocks per SM (chunks of at
// least kMinRowsPerThread rows per thread). With one chunk each direction is the single kernel
// above; with several:
//   forward:  bn_stats_chunk_kernel writes each chunk's sum, mean m_c, and the sums of d = z - m_c
//             and d^2 over its rows; bn_relu_fwd_chunk_kernel combines them per column, in chunk
//             order, into the mean and the biased variance (every block the same way, so the same
//             bits), then normalises its chunk. In eval only the second kernel runs.
//   backward: bn_relu_bwd_sums_kernel writes each chunk's sums of g and g * xhat;
//             bn_relu_bwd_chunk_kernel combines them (chunk order), writes grad_z of its chunk and
//             the chunk's sum of grad_z; the last chunk block of each column block (a ticket) adds
//             those sums, in chunk order, into grad_bias.
// No floating-point atomics: every sum has a fixed order, so results are bitwise reproducible.
//
// Numerics of the chunked statistics. The mean is the same N terms summed in another fixed order:
// per thread, then the block's ROWS partials, then the C chunks; the longest chain of additions,
// R / ROWS + ROWS + C for chunks of R rows, exceeds the single kernel's ceil(N / ROWS) + ROWS by
// at most 1 (N > (C - 1) R), so the recursive-summation bound (chain) u sum|z| is unchanged. The
// variance keeps the two-pass algorithm's form: for any m_c,
//   sum over chunk c of (z - mu)^2 = Q_c + (m_c - mu) (2 D_c + n_c (m_c - mu)),
//   Q_c = sum (z - m_c)^2, D_c = sum (z - m_c)   (the corrected two-pass of Chan, Golub, LeVeque),
// so the rounding of the chunk mean m_c cancels to first order (D_c carries it) and the global
// mean's error enters at second order, as in two-pass. Q_c and n_c (m_c - mu)^2 are sums of
// non-negative terms with chains no longer than above, and the cross term's error is at most the
// chain length times u times the chunk's share (|D_c error| <= chain u sum|d|, AM-GM), so the
// float32 error of the variance stays within the single kernel's bound: O((ceil(N / (C ROWS)) +
// ROWS + C) u) relative, plus the same second-order term.
#pragma once

#include <cmath>
#include <cstdint>

namespace dgl_fast {
namespace linear_bn_relu_detail {

constexpr int kThreads = 256;

template <int COLS, typename acc_t>
__device__ __forceinline__ acc_t block_column_sum(acc_t v, acc_t (*red)[COLS + 1]) {
  constexpr int ROWS = kThreads / COLS;
  red[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) total += red[r][threadIdx.x];
  __syncthreads();
  return total;
}

// Rows [*r0, *r1) of chunk c.
__device__ __forceinline__ void chunk_bounds(int64_t c, int64_t chunk_rows, int64_t N, int64_t* r0, int64_t* r1) {
  *r0 = c * chunk_rows;
  *r1 = *r0 + chunk_rows < N ? *r0 + chunk_rows : N;
}

// z [N, M] row-major; gamma, beta, mean, var [M] (acc_t); out [N, M].
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_fwd_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                       acc_t* __restrict__ mean, acc_t* __restrict__ var, scalar_t* __restrict__ out, int64_t N,
                       int64_t M, bool training, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  acc_t mu = 0, va = 0;
  if (training) {
    acc_t s = 0;
    if (active)
      for (int64_t n = threadIdx.y; n < N; n += ROWS) s += static_cast<acc_t>(z[n * M + col]);
    mu = block_column_sum<COLS>(s, red) / static_cast<acc_t>(N);
    acc_t ss = 0;
    if (active)
      for (int64_t n = threadIdx.y; n < N; n += ROWS) {
        const acc_t d = static_cast<acc_t>(z[n * M + col]) - mu;
        ss += d * d;
      }
    va = block_column_sum<COLS>(ss, red) / static_cast<acc_t>(N);
    if (active && threadIdx.y == 0) {
      mean[col] = mu;
      var[col] = va;
    }
  } else if (active) {
    mu = mean[col];
    va = var[col];
  }
  if (!active) return;
  const acc_t invstd = acc_t(1) / sqrt(va + eps);
  const acc_t g = gamma[col], b = beta[col];
  for (int64_t n = threadIdx.y; n < N; n += ROWS) {
    const acc_t y = g * ((static_cast<acc_t>(z[n * M + col]) - mu) * invstd) + b;
    out[n * M + col] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
  }
}

// grad_out, z, grad_z [N, M]; gamma, beta, mean, var, grad_gamma, grad_beta, grad_bias [M] (acc_t).
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, const acc_t* __restrict__ mean,
                       const acc_t* __restrict__ var, scalar_t* __restrict__ grad_z, acc_t* __restrict__ grad_gamma,
                       acc_t* __restrict__ grad_beta, acc_t* __restrict__ grad_bias, int64_t N, int64_t M,
                       bool training, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const acc_t mu = active ? mean[col] : acc_t(0);
  const acc_t invstd = active ? acc_t(1) / sqrt(var[col] + eps) : acc_t(0);
  const acc_t ga = active ? gamma[col] : acc_t(0), bt = active ? beta[col] : acc_t(0);
  acc_t sg = 0, sgx = 0;
  if (active)
    for (int64_t n = threadIdx.y; n < N; n += ROWS) {
      const acc_t xhat = (static_cast<acc_t>(z[n * M + col]) - mu) * invstd;
      const acc_t g = (ga * xhat + bt > acc_t(0)) ? static_cast<acc_t>(grad_out[n * M + col]) : acc_t(0);
      sg += g;
      sgx += g * xhat;
    }
  const acc_t sum_g = block_column_sum<COLS>(sg, red);
  const acc_t sum_gx = block_column_sum<COLS>(sgx, red);
  const acc_t scale = ga * invstd, inv_n = acc_t(1) / static_cast<acc_t>(N);
  acc_t sdz = 0;
  if (active)
    for (int64_t n = threadIdx.y; n < N; n += ROWS) {
      const acc_t xhat = (static_cast<acc_t>(z[n * M + col]) - mu) * invstd;
      const acc_t g = (ga * xhat + bt > acc_t(0)) ? static_cast<acc_t>(grad_out[n * M + col]) : acc_t(0);
      const acc_t dz = training ? scale * (g - sum_g * inv_n - xhat * sum_gx * inv_n) : scale * g;
      const scalar_t dzs = static_cast<scalar_t>(dz);
      grad_z[n * M + col] = dzs;
      sdz += static_cast<acc_t>(dzs);
    }
  const acc_t sum_dz = block_column_sum<COLS>(sdz, red);
  if (active && threadIdx.y == 0) {
    grad_gamma[col] = sum_gx;
    grad_beta[col] = sum_g;
    grad_bias[col] = sum_dz;
  }
}

// Forward, row chunks (grid: column blocks x chunks). part [4, C, M]: per chunk c and column, the
// sum of z, the chunk mean m_c, D_c = sum (z - m_c) and Q_c = sum (z - m_c)^2 over its rows.
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_stats_chunk_kernel(const scalar_t* __restrict__ z, acc_t* __restrict__ part, int64_t N, int64_t M,
                          int64_t chunk_rows) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const int64_t c = blockIdx.y, C = gridDim.y;
  int64_t r0, r1;
  chunk_bounds(c, chunk_rows, N, &r0, &r1);
  acc_t s = 0;
  if (active)
    for (int64_t n = r0 + threadIdx.y; n < r1; n += ROWS) s += static_cast<acc_t>(z[n * M + col]);
  const acc_t sum = block_column_sum<COLS>(s, red);
  const acc_t m = sum / static_cast<acc_t>(r1 - r0);
  acc_t d = 0, q = 0;
  if (active)
    for (int64_t n = r0 + threadIdx.y; n < r1; n += ROWS) {
      const acc_t e = static_cast<acc_t>(z[n * M + col]) - m;
      d += e;
      q += e * e;
    }
  const acc_t dsum = block_column_sum<COLS>(d, red);
  const acc_t qsum = block_column_sum<COLS>(q, red);
  if (active && threadIdx.y == 0) {
    part[(0 * C + c) * M + col] = sum;
    part[(1 * C + c) * M + col] = m;
    part[(2 * C + c) * M + col] = dsum;
    part[(3 * C + c) * M + col] = qsum;
  }
}

// Forward, row chunks: the column statistics (training: combined from part, in chunk order; eval:
// mean / var), then normalise, affine and ReLU of this block's chunk. Blocks of chunk 0 write the
// statistics.
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_fwd_chunk_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ part,
                             const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, acc_t* __restrict__ mean,
                             acc_t* __restrict__ var, scalar_t* __restrict__ out, int64_t N, int64_t M,
                             int64_t chunk_rows, bool training, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t stat[2][COLS];  // mean, 1 / sqrt(var + eps)
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const int64_t C = gridDim.y;
  if (active && threadIdx.y == 0) {
    acc_t mu, va;
    if (training) {
      acc_t total = 0;
      for (int64_t k = 0; k < C; ++k) total += part[(0 * C + k) * M + col];
      mu = total / static_cast<acc_t>(N);
      acc_t m2 = 0;
      for (int64_t k = 0; k < C; ++k) {
        int64_t k0, k1;
        chunk_bounds(k, chunk_rows, N, &k0, &k1);
        const acc_t dm = part[(1 * C + k) * M + col] - mu;
        const acc_t dsum = part[(2 * C + k) * M + col], qsum = part[(3 * C + k) * M + col];
        m2 += qsum + dm * (acc_t(2) * dsum + static_cast<acc_t>(k1 - k0) * dm);
      }
      va = m2 / static_cast<acc_t>(N);
      if (blockIdx.y == 0) {
        mean[col] = mu;
        var[col] = va;
      }
    } else {
      mu = mean[col];
      va = var[col];
    }
    stat[0][threadIdx.x] = mu;
    stat[1][threadIdx.x] = acc_t(1) / sqrt(va + eps);
  }
  __syncthreads();
  if (!active) return;
  const acc_t mu = stat[0][threadIdx.x], invstd = stat[1][threadIdx.x];
  const acc_t g = gamma[col], b = beta[col];
  int64_t r0, r1;
  chunk_bounds(blockIdx.y, chunk_rows, N, &r0, &r1);
  for (int64_t n = r0 + threadIdx.y; n < r1; n += ROWS) {
    const acc_t y = g * ((static_cast<acc_t>(z[n * M + col]) - mu) * invstd) + b;
    out[n * M + col] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
  }
}

// The BatchNorm backward of one element: xhat and the gradient through the ReLU.
template <typename scalar_t, typename acc_t>
struct BwdColumn {
  acc_t mu, invstd, ga, bt;
  __device__ __forceinline__ void at(const scalar_t* z, const scalar_t* grad_out, int64_t i, acc_t* xhat,
                                     acc_t* g) const {
    *xhat = (static_cast<acc_t>(z[i]) - mu) * invstd;
    *g = (ga * *xhat + bt > acc_t(0)) ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
  }
};

// Backward, row chunks (grid: column blocks x chunks). part [3, C, M]: per chunk the sums of g and
// g * xhat (written here) and of grad_z (by bn_relu_bwd_chunk_kernel). Resets that kernel's tickets.
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_bwd_sums_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                            const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                            const acc_t* __restrict__ mean, const acc_t* __restrict__ var, acc_t* __restrict__ part,
                            unsigned* __restrict__ tickets, int64_t N, int64_t M, int64_t chunk_rows, acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const int64_t c = blockIdx.y, C = gridDim.y;
  if (c == 0 && threadIdx.x == 0 && threadIdx.y == 0) tickets[blockIdx.x] = 0;
  BwdColumn<scalar_t, acc_t> bw{};
  if (active) bw = {mean[col], acc_t(1) / sqrt(var[col] + eps), gamma[col], beta[col]};
  int64_t r0, r1;
  chunk_bounds(c, chunk_rows, N, &r0, &r1);
  acc_t sg = 0, sgx = 0;
  if (active)
    for (int64_t n = r0 + threadIdx.y; n < r1; n += ROWS) {
      acc_t xhat, g;
      bw.at(z, grad_out, n * M + col, &xhat, &g);
      sg += g;
      sgx += g * xhat;
    }
  const acc_t sum_g = block_column_sum<COLS>(sg, red);
  const acc_t sum_gx = block_column_sum<COLS>(sgx, red);
  if (active && threadIdx.y == 0) {
    part[(0 * C + c) * M + col] = sum_g;
    part[(1 * C + c) * M + col] = sum_gx;
  }
}

// Backward, row chunks: the column sums of g and g * xhat (combined from part, in chunk order; blocks
// of chunk 0 write grad_beta, grad_gamma), grad_z of this block's chunk and its column sum into
// part. Each block then takes a ticket of its column block (tickets[blockIdx.x], zeroed by
// bn_relu_bwd_sums_kernel); the block that draws the last one sees every chunk's sum and adds them,
// in chunk order, into grad_bias.
template <int COLS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_relu_bwd_chunk_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                             const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                             const acc_t* __restrict__ mean, const acc_t* __restrict__ var, acc_t* part,
                             unsigned* __restrict__ tickets, scalar_t* __restrict__ grad_z,
                             acc_t* __restrict__ grad_gamma, acc_t* __restrict__ grad_beta,
                             acc_t* __restrict__ grad_bias, int64_t N, int64_t M, int64_t chunk_rows, bool training,
                             acc_t eps) {
  constexpr int ROWS = kThreads / COLS;
  __shared__ acc_t red[ROWS][COLS + 1];
  __shared__ acc_t sums[2][COLS];  // sum of g, of g * xhat
  __shared__ bool last;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * COLS + threadIdx.x;
  const bool active = col < M;
  const int64_t c = blockIdx.y, C = gridDim.y;
  if (active && threadIdx.y == 0) {
    acc_t sg = 0, sgx = 0;
    for (int64_t k = 0; k < C; ++k) {
      sg += part[(0 * C + k) * M + col];
      sgx += part[(1 * C + k) * M + col];
    }
    sums[0][threadIdx.x] = sg;
    sums[1][threadIdx.x] = sgx;
    if (c == 0) {
      grad_gamma[col] = sgx;
      grad_beta[col] = sg;
    }
  }
  __syncthreads();
  BwdColumn<scalar_t, acc_t> bw{};
  if (active) bw = {mean[col], acc_t(1) / sqrt(var[col] + eps), gamma[col], beta[col]};
  const acc_t sum_g = active ? sums[0][threadIdx.x] : acc_t(0), sum_gx = active ? sums[1][threadIdx.x] : acc_t(0);
  const acc_t scale = bw.ga * bw.invstd, inv_n = acc_t(1) / static_cast<acc_t>(N);
  int64_t r0, r1;
  chunk_bounds(c, chunk_rows, N, &r0, &r1);
  acc_t sdz = 0;
  if (active)
    for (int64_t n = r0 + threadIdx.y; n < r1; n += ROWS) {
      acc_t xhat, g;
      bw.at(z, grad_out, n * M + col, &xhat, &g);
      const acc_t dz = training ? scale * (g - sum_g * inv_n - xhat * sum_gx * inv_n) : scale * g;
      const scalar_t dzs = static_cast<scalar_t>(dz);
      grad_z[n * M + col] = dzs;
      sdz += static_cast<acc_t>(dzs);
    }
  const acc_t sum_dz = block_column_sum<COLS>(sdz, red);
  if (active && threadIdx.y == 0) {
    part[(2 * C + c) * M + col] = sum_dz;
    __threadfence();  // this chunk's sum is visible before the ticket below
  }
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(&tickets[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (last && active && threadIdx.y == 0) {
    __threadfence();  // ... and read after every other chunk's ticket
    acc_t total = 0;
    for (int64_t k = 0; k < C; ++k) total += __ldcg(&part[(2 * C + k) * M + col]);
    grad_bias[col] = total;
  }
}

}  // namespace linear_bn_relu_detail

}  // namespace dgl_fast
