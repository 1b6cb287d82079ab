"""dgl_fast's CUDA kernels, run on the CPU by a SIMT emulator (tests/simt).

The CUDA ops' host logic (csrc/cuda/<op>_impl.cuh) and kernels (<op>_kernels.cuh) are written
against a launcher; tests/simt/simt_ops.cpp instantiates them with an emulator that runs every
CUDA thread as a fiber (barriers, warp shuffles, shared memory, grid-stride loops). So on machines
without a GPU, CI still executes the exact kernel code of every CUDA op and checks it against
plain PyTorch in float64, against the CPU kernels, and against itself under shuffled thread
schedules (a kernel whose bits depend on the order of its threads has a race) and, for kernels
whose blocks coordinate (last-block tickets), with several blocks in flight together, interleaved."""

import collections
import contextlib
import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import simt_background
import torch
import torch.nn.functional as F

import dgl_fast
from dgl_fast import reference
from helpers import assert_same_state, batches, in_layout, plain_dgl, sgd, small_model

ROOT = Path(__file__).resolve().parents[1]
H100_SMS = 132
# Set by test_kernels_under_address_sanitizer for the run of this file it starts.
ASAN = os.environ.get("DGL_FAST_SIMT_ASAN") == "1"


STATS = ("launches", "blocks", "threads", "block_barriers", "warp_exchanges", "atomics", "block_switches")


class Simt:
    """torch.ops.dgl_fast_simt (registered with torch/library.h: pybind11's header alone doubled
    the ASan build) with its counters by name."""

    def __init__(self, ops):
        self.ops = ops

    def stats(self) -> dict:
        return dict(zip(STATS, self.ops.stats(), strict=True))

    def __getattr__(self, name):
        return getattr(self.ops, name)


@pytest.fixture(scope="module")
def simt():
    simt_background.build(ASAN)  # started in the background at collection (conftest.py): found built
    mod = Simt(torch.ops.dgl_fast_simt)
    mod.configure(0, H100_SMS)
    yield mod
    mod.configure(0, H100_SMS)


# Under AddressSanitizer one (shuffled) schedule: the sanitizer checks addresses, which every
# schedule touches alike; the plain run compares the schedules' results.
SEEDS = (12345,) if ASAN else (0, 12345)


def under_seeds(simt, fn, seeds=SEEDS, sms=H100_SMS, resident=1):
    """Runs `fn` under several thread schedules (with `resident` blocks in flight together);
    asserts every result is bitwise the same."""
    results = []
    for seed in seeds:
        simt.configure(seed, sms, resident)
        results.append(fn())
    simt.configure(0, H100_SMS)
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg="kernel result depends on the thread schedule")
    return first


# --- the emulator itself --------------------------------------------------------------------------


def test_emulator_reports_a_skipped_barrier(simt):
    with pytest.raises(RuntimeError, match="deadlock.*63 threads wait at __syncthreads, 0 at a warp exchange, 1 have"):
        simt.misuse("skipped_barrier", torch.empty(1, dtype=torch.long))


@pytest.mark.parametrize("case,message", [
    ("split_barrier", r"__syncthreads reached at .*simt_ops.cpp:\d+ while other threads wait at .*simt_ops.cpp:\d+"),
    ("mismatched_shuffle", r"lanes of one exchange must agree"),
])
def test_emulator_reports_divergent_barriers_and_shuffles(simt, case, message):
    with pytest.raises(RuntimeError, match=message):
        simt.misuse(case, torch.empty(1, dtype=torch.long))


def test_emulator_schedules_expose_a_race(simt):
    values = set()
    for seed in (0, 1, 2, 3):
        simt.configure(seed, H100_SMS)
        out = torch.empty(1, dtype=torch.long)
        simt.misuse("racy_sum", out)
        values.add(int(out))
    simt.configure(0, H100_SMS)
    assert len(values) > 1  # the last thread to write wins, and that depends on the schedule
    assert values <= set(range(1, 65))


def test_emulator_resident_blocks_interleave(simt):
    """Blocks in flight together: a commit that does not wait for the other blocks' reads is seen
    by some blocks and not by others, depending on the seed, and each block keeps its own shared
    memory while another resident block writes the same __shared__ variable."""

    def run(seed, resident):
        simt.configure(seed, H100_SMS, resident)
        out = torch.zeros(1 + 8, dtype=torch.long)  # state, then what each of 8 blocks read
        simt.misuse("early_commit", out)
        return tuple(out.tolist())

    assert run(0, 1) == (1, 0) + (1,) * 7  # one after another: block 0 first, the others see its commit
    switches = simt.stats()["block_switches"]
    patterns = {run(seed, 4) for seed in range(1, 9)}
    assert simt.stats()["block_switches"] > switches
    simt.configure(0, H100_SMS)
    assert all(p[0] == 1 and -1 not in p for p in patterns)  # one commit; no block saw another's shared value
    assert len(patterns) > 1 and any(sum(p[2:]) < 7 for p in patterns)  # some block read before the commit


def test_emulator_counts_threads_and_barriers(simt):
    before = simt.stats()
    simt.softmax_xent(torch.randn(5, 40), torch.randint(0, 40, (5,)))
    after = simt.stats()
    assert after["launches"] - before["launches"] == 1
    assert after["threads"] - before["threads"] == 256  # one block of 8 warps
    assert after["block_barriers"] - before["block_barriers"] == 256  # one __syncthreads per thread
    # 5 rows x (5 steps of max and arg-max + 5 of the sum) x 32 lanes
    assert after["warp_exchanges"] - before["warp_exchanges"] == 5 * 15 * 32


# --- softmax_xent -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (7, 13), (33, 37), (128, 10), (129, 70), (300, 10)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_xent(simt, shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    B, C = shape
    logits = (3 * torch.randn(C, B, generator=g)).t().to(dtype)  # non-contiguous
    labels = torch.randint(0, C, (B,), generator=g)
    loss, dlogits, correct = under_seeds(simt, lambda: simt.softmax_xent(logits, labels))
    rloss, rgrad, rcorrect = reference.softmax_xent(logits.double(), labels)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss.double(), rloss, rtol=tol, atol=tol)
    torch.testing.assert_close(dlogits.double(), rgrad, rtol=tol, atol=tol)
    assert int(correct) == int(rcorrect)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and dlogits.dtype == dtype
    # the CPU kernel of the same op agrees
    closs, cgrad, ccorrect = torch.ops.dgl_fast.softmax_xent(logits, labels)
    torch.testing.assert_close(loss, closs, rtol=tol, atol=tol)
    torch.testing.assert_close(dlogits, cgrad, rtol=tol, atol=tol)
    assert int(correct) == int(ccorrect)


def test_softmax_xent_bf16_within_2x_of_pytorch(simt):
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(65, 100, generator=g)).bfloat16()
    labels = torch.randint(0, 100, (65,), generator=g)
    loss, grad, correct = under_seeds(simt, lambda: simt.softmax_xent(logits, labels))
    _, exact, _ = reference.softmax_xent(logits.double(), labels)
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, labels).backward()
    assert (grad.double() - exact).abs().max() <= 2 * (x.grad.double() - exact).abs().max() + 1e-6
    assert int(correct) == int((logits.argmax(1) == labels).sum())


def test_softmax_xent_ties_nan_and_bad_labels(simt):
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.5, float("nan"), 0.5], [1.0, 2.0, 0.0]])
    _, _, correct = simt.softmax_xent(logits[:2], torch.tensor([2, 0]))
    assert int(correct) == 1  # ties take the first index, as torch.argmax
    _, _, correct = simt.softmax_xent(logits[2:3], torch.tensor([1]))
    assert int(correct) == int(logits[2:3].argmax(1) == 1) == 1  # NaN ranks first, as torch.argmax
    loss, _, correct = simt.softmax_xent(logits[3:], torch.tensor([7]))
    assert loss.isnan() and int(correct) == 0  # a label out of range cannot raise on the device


# --- aux_pool -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out", [((2, 3, 8, 8), (2, 2)), ((3, 5, 7, 9), (2, 3)), ((2, 4, 13, 11), (4, 3)),
                                       ((1, 2, 1, 1), (2, 2)), ((2, 3, 16, 16), (4, 4))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("channels_last_out", [False, True])
def test_aux_pool_forward_and_backward(simt, shape, out, layout, channels_last_out):
    g = torch.Generator().manual_seed(sum(shape))
    x = in_layout(torch.randn(shape, generator=g, dtype=torch.float64), layout)
    y = under_seeds(simt, lambda: [simt.aux_pool(x, *out, channels_last_out)])[0]
    ref = x.clone().requires_grad_()
    yr = F.adaptive_avg_pool2d(ref, out)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last_out else torch.contiguous_format)
    grad = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    grad = grad.contiguous(memory_format=torch.channels_last) if channels_last_out else grad
    yr.backward(grad)
    channels_last_in = layout == "channels_last"
    gx = under_seeds(simt, lambda: [simt.aux_pool_bwd(grad, shape[2], shape[3], channels_last_in)])[0]
    torch.testing.assert_close(gx, ref.grad, rtol=1e-12, atol=1e-12)
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last_in else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aux_pool_low_precision(simt, dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 9, 7, generator=g).to(dtype)
    y = under_seeds(simt, lambda: [simt.aux_pool(x, 3, 2, False)])[0]
    exact = F.adaptive_avg_pool2d(x.double(), (3, 2))
    theirs = F.adaptive_avg_pool2d(x, (3, 2))
    assert y.dtype == dtype
    assert (y.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 1e-7
    gy = torch.randn(2, 6, 3, 2, generator=g).to(dtype)
    gx = simt.aux_pool_bwd(gy, 9, 7, False)
    torch.testing.assert_close(gx, torch.ops.dgl_fast.aux_pool_bwd(gy, 9, 7, False), rtol=0, atol=0)


# --- linear_bn_relu -------------------------------------------------------------------------------


def _lbr(N, K, M, bias, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    x, w = r(N, K).to(dtype), (r(M, K) / K**0.5).to(dtype)
    b = r(M).to(dtype) if bias else None
    gamma, beta = (1 + 0.5 * r(M)).to(sdt), r(M).to(sdt)
    rm, rv = r(M).to(sdt), (0.5 + torch.rand(M, generator=g, dtype=torch.float64)).to(sdt)
    return x, w, b, gamma, beta, rm, rv


# M = 7, 40, 300 with 1, 3, 4 and 132 SMs: every column-block width (32, 16, 8) and partial blocks
# (M = 40 takes 32 columns with 1 SM, 16 with 3, 8 with 4 or 132).
@pytest.mark.parametrize("N,K,M", [(2, 3, 7), (3, 11, 40), (17, 5, 300), (128, 9, 40)])
@pytest.mark.parametrize("sms", [1, 3, 4, H100_SMS])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_relu_forward_and_backward(simt, N, K, M, sms, training, bias):
    x, w, b, gamma, beta, rm, rv = _lbr(N, K, M, bias, seed=N * 1000 + M)
    eps = 1e-5

    def run():
        out, z, mean, var = simt.linear_bn_relu(x, w, b, gamma, beta, rm, rv, training, eps)
        grad_out = torch.randn(N, M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grads = simt.linear_bn_relu_bwd(grad_out, x, w, z, mean, var, gamma, beta, training, eps)
        return [out, z, mean, var, *grads]

    out, z, mean, var, gx, gw, gb, gg, gbeta = under_seeds(simt, run, sms=sms)
    # Without a bias, grad_bias is what a zero bias would receive (the column sums of dL/dz).
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, b if bias else torch.zeros(M, dtype=x.dtype))]
    rout, rmean, rvar = reference.linear_bn_relu(*leaves[:2], leaves[4], *leaves[2:4], rm, rv, training, eps)
    rout.backward(torch.randn(N, M, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, rout, **tol)
    torch.testing.assert_close(mean, rmean, **tol)
    torch.testing.assert_close(var, rvar, **tol)
    torch.testing.assert_close(z, F.linear(x, w, b), **tol)
    torch.testing.assert_close(gx, leaves[0].grad, **tol)
    torch.testing.assert_close(gw, leaves[1].grad, **tol)
    torch.testing.assert_close(gg, leaves[2].grad, **tol)
    torch.testing.assert_close(gbeta, leaves[3].grad, **tol)
    torch.testing.assert_close(gb, leaves[4].grad, **tol)


def test_linear_bn_relu_bf16_matches_cpu_kernel(simt):
    x, w, b, gamma, beta, rm, rv = _lbr(64, 24, 40, True, seed=4, dtype=torch.bfloat16)
    got = under_seeds(simt, lambda: simt.linear_bn_relu(x, w, b, gamma, beta, rm, rv, True, 1e-5))
    want = torch.ops.dgl_fast.linear_bn_relu(x, w, b, gamma, beta, rm, rv, True, 1e-5)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16] * 2 + [torch.float32] * 2
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2)


# Row chunks (a 2D grid: column blocks x row chunks): M = 1024 head layers on 132 SMs (128 blocks of
# 8 columns; 2 chunks of 64 rows, 3 of 96, 96 and 64), a 32-column layer in 8 chunks (7 of 192
# rows and one of 156) on a pretend 16 SMs, and exactly one chunk: M = 1024 with 64 rows, and
# 1500 rows of 64 columns on 1 SM (2 blocks of 32 columns). Blocks in flight together
# (resident=4), so the backward's last-block ticket meets interleavings.
# Under AddressSanitizer (test_kernels_under_address_sanitizer) the two H100-sized chunked grids
# are left out: the 8-chunk grid takes the same chunk-boundary paths at a tenth of the time.
@pytest.mark.parametrize("N,M,sms,chunks", ([] if ASAN else [(128, 1024, H100_SMS, 2), (256, 1024, H100_SMS, 3)])
                         + [(1500, 32, 16, 8), (64, 1024, H100_SMS, 1), (1500, 64, 1, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_linear_bn_relu_row_chunks(simt, N, M, sms, chunks, training):
    cols, got_chunks, rows = simt.bn_launch_shape(N, M, sms)
    assert got_chunks == chunks and (chunks - 1) * rows < N <= chunks * rows
    blocks = -(-M // cols) * chunks
    x, w, b, gamma, beta, rm, rv = _lbr(N, 6, M, True, seed=N + M)
    grad_out = torch.randn(N, M, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    launches = []

    def run():
        before = simt.stats()
        out, z, mean, var = simt.linear_bn_relu(x, w, b, gamma, beta, rm, rv, training, eps)
        middle = simt.stats()
        grads = simt.linear_bn_relu_bwd(grad_out, x, w, z, mean, var, gamma, beta, training, eps)
        after = simt.stats()
        launches.append([(b["launches"] - a["launches"], b["blocks"] - a["blocks"])
                         for a, b in ((before, middle), (middle, after))])
        return [out, z, mean, var, *grads]

    got = under_seeds(simt, run, sms=sms, resident=4)
    fwd_launches = 1 if chunks == 1 or not training else 2
    bwd_launches = 1 if chunks == 1 else 2
    assert launches[0] == [(fwd_launches, fwd_launches * blocks), (bwd_launches, bwd_launches * blocks)]
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, b)]
    rout, rmean, rvar = reference.linear_bn_relu(*leaves[:2], leaves[4], *leaves[2:4], rm, rv, training, eps)
    rout.backward(grad_out)
    want = [rout, F.linear(x, w, b), rmean, rvar, *(leaves[i].grad for i in (0, 1, 4, 2, 3))]
    cpu = [*torch.ops.dgl_fast.linear_bn_relu(x, w, b, gamma, beta, rm, rv, training, eps)]
    cpu += torch.ops.dgl_fast.linear_bn_relu_bwd(grad_out, x, w, cpu[1], cpu[2], cpu[3], gamma, beta, training, eps)
    for name, a, r, c in zip(["out", "z", "mean", "var", "grad_x", "grad_w", "grad_bias", "grad_gamma", "grad_beta"],
                             got, want, cpu):
        torch.testing.assert_close(a, r.detach(), rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n} vs CPU: {m}")


def test_linear_bn_relu_row_chunks_float32(simt):
    """float32, columns with a large mean (|mean| / std ~ 30): every output of the chunked kernels
    (8 row chunks) is within twice the single kernel's error (plus 4 ulp of the largest value) of
    the float64 computation from the same z."""
    N, M = 1500, 64
    x, w, b, gamma, beta, rm, rv = _lbr(N, 6, M, True, seed=8, dtype=torch.float32)
    b = b + 30
    assert simt.bn_launch_shape(N, M, 32)[1] == 8 and simt.bn_launch_shape(N, M, 1)[1] == 1
    grad_out = torch.randn(N, M, generator=torch.Generator().manual_seed(5))
    eps = 1e-5

    def run():
        out, z, mean, var = simt.linear_bn_relu(x, w, b, gamma, beta, rm, rv, True, eps)
        return [out, z, mean, var, *simt.linear_bn_relu_bwd(grad_out, x, w, z, mean, var, gamma, beta, True, eps)]

    chunked = under_seeds(simt, run, sms=32, resident=4)
    single = under_seeds(simt, run, sms=1)
    torch.testing.assert_close(chunked[1], single[1], rtol=0, atol=0)  # the same z (ATen's mm)
    z, g64, b64 = chunked[1].double(), gamma.double(), beta.double()
    mean, var = z.mean(0), z.var(0, unbiased=False)
    out = torch.relu((z - mean) / torch.sqrt(var + eps) * g64 + b64)
    grads = torch.ops.dgl_fast.linear_bn_relu_bwd(grad_out.double(), x.double(), w.double(), z, mean, var, g64, b64,
                                                  True, eps)
    u = 2.0**-24
    for name, c, s_, e in zip(["out", "z", "mean", "var", "grad_x", "grad_w", "grad_bias", "grad_gamma", "grad_beta"],
                              chunked, single, [out, z, mean, var, *grads]):
        err_chunked = (c.double() - e).abs().max().item()
        err_single = (s_.double() - e).abs().max().item()
        assert err_chunked <= 2 * err_single + 4 * u * e.abs().max().item(), (name, err_chunked, err_single)


@pytest.mark.parametrize("N,M", [(128, 1024), (256, 1024), (8192, 128), (32768, 128), (8192, 32), (32768, 32)])
def test_linear_bn_relu_launch_fills_an_h200(simt, N, M):
    """The real shapes (head layers: M = 1024 columns, 128-256 rows; mlp-sr's 1x1 convolutions:
    128 or 32 columns, 8k-32k pixel rows) get at least one block per SM of an H200, in row chunks
    of whole passes of the block's row threads, at least two rows per thread."""
    cols, chunks, rows = simt.bn_launch_shape(N, M, H100_SMS)
    row_threads = 256 // cols
    assert -(-M // cols) * chunks >= H100_SMS
    assert rows % row_threads == 0 and rows >= 2 * row_threads and (chunks - 1) * rows < N <= chunks * rows


@pytest.mark.parametrize("layers", [2, 17])  # 17: two launches of at most 16 layers
def test_bn_update_stats(simt, layers):
    rnd = random.Random(layers)
    bns = [torch.nn.BatchNorm1d(rnd.randint(1, 300), momentum=rnd.choice([0.1, 0.3])).double() for _ in range(layers)]
    for bn in bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    xs = [torch.randn(rnd.randint(2, 9), bn.num_features, dtype=torch.float64) for bn in bns]
    mine = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    for bn, x in zip(bns, xs):
        bn(x)
    simt.bn_update_stats([m[0] for m in mine], [m[1] for m in mine], [m[2] for m in mine], [x.mean(0) for x in xs],
                         [x.var(0, unbiased=False) for x in xs], [x.shape[0] for x in xs], [bn.momentum for bn in bns])
    for (rm, rv, nbt), bn in zip(mine, bns):
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-12, atol=1e-12)
        assert int(nbt) == 1


# --- replay buffer --------------------------------------------------------------------------------


def _ring(M, shape, B, storage_dtype):
    return dict(storage=torch.zeros((M, *shape), dtype=storage_dtype), label_store=torch.zeros(M, B, dtype=torch.long),
                state=torch.zeros(4, dtype=torch.long), uses=torch.zeros(M, dtype=torch.long),
                stamps=torch.zeros(M, dtype=torch.long))


# (3, 5) float32: 60 bytes, the 4-byte path; (4, 8): 16-byte vectors; bf16 storage: the converting
# path; float64, float16 and float8 storage of same-dtype data: the 8-, 2- and 1-byte paths.
@pytest.mark.parametrize("shape,dtype,storage_dtype", [((3, 5), torch.float32, torch.float32),
                                                       ((4, 8), torch.float32, torch.float32),
                                                       ((3, 7), torch.float32, torch.bfloat16),
                                                       ((5,), torch.float64, torch.float64),
                                                       ((3, 3), torch.float16, torch.float16),
                                                       ((3, 5), torch.float8_e4m3fn, torch.float8_e4m3fn)])
@pytest.mark.parametrize("policy,max_reuse", [(0, 0), (1, 2), (2, 0), (0, 1)])
def test_replay_ops_match_cpu_kernels(simt, shape, dtype, storage_dtype, policy, max_reuse):
    M, B, seed = 4, shape[0], 99
    rnd = random.Random(policy * 10 + max_reuse)
    emu, cpu = _ring(M, shape, B, storage_dtype), _ring(M, shape, B, storage_dtype)
    g = torch.Generator().manual_seed(1)
    simt.configure(policy + 3, H100_SMS)  # a shuffled schedule
    for _ in range(60):
        if int(cpu["state"][2]) == 0 or rnd.random() < 0.4:
            x, y = torch.randn(shape, generator=g).to(dtype), torch.randint(0, 1000, (B,), generator=g)
            simt.replay_push(emu["storage"], emu["label_store"], emu["state"], emu["uses"], emu["stamps"], x, y)
            torch.ops.dgl_fast.replay_push(cpu["storage"], cpu["label_store"], cpu["state"], cpu["uses"],
                                           cpu["stamps"], x, y)
        else:
            outs = []
            for ring, fn in ((emu, simt.replay_sample), (cpu, torch.ops.dgl_fast.replay_sample)):
                out = torch.full(shape, 7.0).to(dtype)
                out_labels = torch.full((B,), -5, dtype=torch.long)
                info = torch.zeros(2, dtype=torch.long)
                fn(ring["state"], ring["uses"], ring["stamps"], ring["storage"], ring["label_store"], out, out_labels,
                   info, policy, max_reuse, seed)
                outs.append((out, out_labels, info))
            for a, b in zip(*outs):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for key in emu:
            assert torch.equal(emu[key].view(torch.uint8), cpu[key].view(torch.uint8)), key
    simt.configure(0, H100_SMS)


POLICY_NAMES = {code: name for name, code in dgl_fast.ops.REPLAY_POLICIES.items()}


def _replay_sequence(push, sample, shape, dtype, storage_dtype, policy, max_reuse, launches=None, stats=None):
    """Pushes and samples on a 3-slot ring, runs of samples long enough to use every slot up
    (max_reuse); checks each sample against reference.replay_select and returns every output and
    the final ring state."""
    M, B, seed = 3, shape[0], 77
    ring = _ring(M, shape, B, storage_dtype)
    rnd = random.Random(policy * 10 + max_reuse)
    g = torch.Generator().manual_seed(2)
    results = []
    for _ in range(22):
        if int(ring["state"][2]) == 0 or rnd.random() < 0.25:
            x, y = torch.randn(shape, generator=g).to(dtype), torch.randint(0, 1000, (B,), generator=g)
            push(ring["storage"], ring["label_store"], ring["state"], ring["uses"], ring["stamps"], x, y)
            continue
        st = ring["state"].tolist()
        want = reference.replay_select(ring["uses"].tolist(), ring["stamps"].tolist(), st[1], POLICY_NAMES[policy],
                                       max_reuse, seed, st[3])
        out = torch.full(shape, 7.0).to(dtype)
        out_labels = torch.full((B,), -5, dtype=torch.long)
        info = torch.full((2,), -9, dtype=torch.long)
        uses = ring["uses"].clone()
        before = stats() if stats else None
        sample(ring["state"], ring["uses"], ring["stamps"], ring["storage"], ring["label_store"], out, out_labels, info,
               policy, max_reuse, seed)
        if stats:
            after = stats()
            launches.append((after["launches"] - before["launches"], after["blocks"] - before["blocks"]))
        assert info.tolist() == [want, int(want >= 0)]
        assert ring["state"].tolist() == st[:3] + [st[3] + 1]
        if want >= 0:
            uses[want] += 1
            assert torch.equal(out, ring["storage"][want].to(dtype)) and torch.equal(out_labels, ring["label_store"][want])
        else:  # nothing available: outputs untouched
            assert (out.float() == 7.0).all() and (out_labels == -5).all()
        assert torch.equal(ring["uses"], uses)
        results += [out.view(torch.uint8), out_labels, info]
    return results + [ring["state"], ring["uses"], ring["stamps"]]


# Grids of 1 block (10 4-byte words), 2 (512 16-byte vectors), 5 (1,200 converted elements) and
# 32 blocks (8,005 8-byte words); every policy, and max_reuse 1 and 2, which the runs of samples
# exhaust (valid False). One launch per sample, with blocks one after another and 4 in flight.
@pytest.mark.parametrize("shape,dtype,storage_dtype,blocks", [((2, 5), torch.float32, torch.float32, 1),
                                                              ((4, 512), torch.float32, torch.float32, 2),
                                                              ((4, 300), torch.float32, torch.bfloat16, 5),
                                                              ((5, 1601), torch.float64, torch.float64, 32)])
@pytest.mark.parametrize("policy,max_reuse", [(0, 0), (1, 0), (2, 0), (0, 1), (1, 2), (2, 1)])
# Under AddressSanitizer only one block in flight: every block touches the same addresses either
# way, and the interleavings of 4 in flight are checked (for results) in the plain run.
@pytest.mark.parametrize("resident", [1] if ASAN else [1, 4])
def test_replay_sample_is_one_launch_on_a_grid(simt, shape, dtype, storage_dtype, blocks, policy, max_reuse, resident):
    args = (shape, dtype, storage_dtype, policy, max_reuse)
    launches = []
    got = under_seeds(simt, lambda: _replay_sequence(simt.replay_push, simt.replay_sample, *args, launches=launches,
                                                     stats=simt.stats), resident=resident)
    cpu = _replay_sequence(torch.ops.dgl_fast.replay_push, torch.ops.dgl_fast.replay_sample, *args)
    assert launches and set(launches) == {(1, blocks)}
    for a, b in zip(got, cpu, strict=True):
        assert torch.equal(a, b)
    if max_reuse:
        assert any(int(t[1]) == 0 for t in got[2:-3:3])  # some sample found every slot used up



# The sample grid is capped at 4 blocks a multiprocessor (each block's thread 0 repeats the slot
# selection): the 32-block sample of 8,005 8-byte words on 3 SMs runs 12 blocks, on 1 SM 4, each
# grid-striding over more words, with the same outputs and ring state as the CPU kernel.
@pytest.mark.parametrize("sms,blocks", [(3, 12), (1, 4)])
def test_replay_sample_grid_is_capped_per_multiprocessor(simt, sms, blocks):
    args = ((5, 1601), torch.float64, torch.float64, 1, 2)
    launches = []
    got = under_seeds(simt, lambda: _replay_sequence(simt.replay_push, simt.replay_sample, *args, launches=launches,
                                                     stats=simt.stats), sms=sms, resident=4)
    cpu = _replay_sequence(torch.ops.dgl_fast.replay_push, torch.ops.dgl_fast.replay_sample, *args)
    assert launches and set(launches) == {(1, blocks)}
    for a, b in zip(got, cpu, strict=True):
        assert torch.equal(a, b)

# --- whole trainers through the CUDA code ------------------------------------------------------

OPS = ["softmax_xent", "aux_pool", "aux_pool_bwd", "linear_bn_relu", "linear_bn_relu_bwd", "bn_update_stats",
       "replay_push", "replay_sample"]


@contextlib.contextmanager
def cuda_code_on_cpu(simt):
    """Every dgl_fast op's CPU dispatch runs the emulated CUDA implementation instead (host logic
    and kernels of csrc/cuda/), so a whole Trainer exercises the CUDA code paths' numerics."""
    lib = torch.library.Library("dgl_fast", "IMPL")
    calls = collections.Counter()

    def routed(name):
        fn = getattr(simt, name)

        def kernel(*args):
            calls[name] += 1
            return fn(*args)

        return kernel

    try:
        for name in OPS:
            lib.impl(name, routed(name), "CPU")
        yield calls
    finally:
        lib._destroy()
        simt.configure(0, H100_SMS)


@pytest.mark.parametrize("aux", ["mlp-sr", "mlp"])
def test_dgl_training_through_the_cuda_code(simt, aux):
    model = small_model(3, seed=4, aux=aux, fused=True, dtype=torch.float64)
    data = batches(4, B=7, dtype=torch.float64, seed=2)
    expected = plain_dgl(model, data)
    simt.configure(11, H100_SMS)  # shuffled thread schedules throughout
    with cuda_code_on_cpu(simt) as calls:
        trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd)
        for x, y in data:
            out = trainer.step(x, y)
        acc = trainer.evaluate([data[0]])  # the inference path (BatchNorm in eval mode) too
    for op in ("softmax_xent", "aux_pool", "aux_pool_bwd", "linear_bn_relu", "linear_bn_relu_bwd", "bn_update_stats"):
        assert calls[op] > 0, op
    assert_same_state(trainer.model, expected, rtol=1e-9, atol=1e-11)
    assert torch.isfinite(out.losses).all() and len(acc) == 3


def test_async_training_through_the_cuda_code(simt):
    model = small_model(3, seed=5, aux="mlp-sr", fused=True, dtype=torch.float64)
    data = batches(20, dtype=torch.float64, seed=3)
    kw = dict(optimizer=sgd, mode="async", buffer_capacity=3, policy="uniform", slowdown={2: 0.5}, seed=1)
    reference_run = dgl_fast.Trainer(copy.deepcopy(model), **kw)
    for x, y in data:
        reference_run.step(x, y)
    simt.configure(13, H100_SMS)
    with cuda_code_on_cpu(simt) as calls:
        trainer = dgl_fast.Trainer(copy.deepcopy(model), **kw)
        for x, y in data:
            trainer.step(x, y)
    assert calls["replay_push"] > 0 and calls["replay_sample"] > 0
    assert trainer.stage_steps == reference_run.stage_steps
    for a, b in zip(trainer.buffers, reference_run.buffers):  # same slots drawn, same contents
        assert torch.equal(a.state, b.state) and torch.equal(a.uses, b.uses)
        torch.testing.assert_close(a.storage, b.storage, rtol=1e-9, atol=1e-11)
    assert_same_state(trainer.model, reference_run.model, rtol=1e-9, atol=1e-11)


# --- memory bounds --------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("DGL_FAST_SIMT_OOB") != "1", reason="run by test_kernels_under_address_sanitizer")
def test_out_of_bounds_probe(simt):
    simt.misuse("out_of_bounds", torch.empty(5, dtype=torch.long))  # AddressSanitizer must abort here


@pytest.mark.skipif(ASAN, reason="this is the run under AddressSanitizer")
def test_kernels_under_address_sanitizer():
    """Every op test above again, with the emulated kernels built with -fsanitize=address and the
    sanitizer's allocator preloaded (so torch's tensors get red zones): a kernel that reads or
    writes outside its tensors fails here, as it would under compute-sanitizer on a GPU."""
    cmd = simt_background.asan_command()
    if cmd is None:
        pytest.skip("gcc's AddressSanitizer runtime (libasan) is not installed")
    # started at collection beside the other test files (conftest.py); here when it was not
    done = simt_background.result("simt-asan", timeout=1500)
    if done is None:
        run = subprocess.run(cmd[0], env=cmd[1], cwd=ROOT, capture_output=True, text=True, timeout=1500)
        done = run.returncode, run.stdout + run.stderr
    rc, out = done
    assert rc == 0 and "ERROR: AddressSanitizer" not in out, out[-6000:]
    assert " passed" in out and " failed" not in out
    # ... and the sanitizer is live: a kernel writing one element past a tensor is caught.
    probe = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__, "-k",
                            "out_of_bounds_probe"], env=dict(cmd[1], DGL_FAST_SIMT_OOB="1"), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode != 0 and "heap-buffer-overflow" in probe.stderr, (probe.stdout + probe.stderr)[-3000:]
    assert "one_past_the_end_kernel" in probe.stderr
