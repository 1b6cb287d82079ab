"""ReplayBuffer and the replay_push / replay_sample ops against a plain-Python reference."""

import random

import pytest
import torch

import dgl_fast
from dgl_fast import ReplayBuffer, reference

POLICIES = ["priority_lifo", "fifo", "uniform"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("max_reuse", [None, 1, 3])
@pytest.mark.parametrize("M", [1, 4, 7])
def test_policy_matches_python_reference(device, policy, max_reuse, M):
    rnd = random.Random(M * 31 + (max_reuse or 0))
    B, shape = 3, (3, 2, 5)
    buf = ReplayBuffer(M, shape, device=device, policy=policy, max_reuse=max_reuse, seed=11)
    ring = reference.ReplayRing(M, policy, max_reuse, 11)
    pushed = {}
    for t in range(120):  # random interleaving with wrap-around
        if buf.pushes == 0 or rnd.random() < 0.4:
            x = torch.randn(shape, device=device)
            y = torch.randint(0, 100, (B,), device=device)
            buf.push(x, y)
            ring.push(t)
            pushed[t] = (x.clone(), y.clone())
        else:
            h, yy = s = buf.sample()
            slot = ring.sample()
            assert int(s.slot) == slot
            assert bool(s.valid) == (slot >= 0)
            if slot >= 0:
                x, y = pushed[ring.data[slot]]
                assert torch.equal(h, x) and torch.equal(yy, y)
    assert buf.uses.tolist() == ring.uses and buf.state.tolist() == [ring.head, ring.count, ring.pushes, ring.samples]


def test_priority_lifo_prefers_fresh_then_least_used():
    buf = ReplayBuffer(3, (2, 1), policy="priority_lifo")
    for i in range(3):
        buf.push(torch.full((2, 1), float(i)), torch.tensor([i, i]))
    got = [int(buf.sample()[1][0]) for _ in range(6)]
    assert got == [2, 1, 0, 2, 1, 0]
    buf.push(torch.full((2, 1), 3.0), torch.tensor([3, 3]))  # overwrites slot 0 (the oldest)
    assert int(buf.sample()[1][0]) == 3


def test_fifo_with_max_reuse_one_is_a_queue():
    buf = ReplayBuffer(4, (2,), policy="fifo", max_reuse=1)
    for i in range(3):
        buf.push(torch.full((2,), float(i)), torch.tensor([i, i]))
    got = [buf.sample() for _ in range(4)]
    assert [int(s[1][0]) for s in got[:3]] == [0, 1, 2]
    assert [bool(s.valid) for s in got] == [True, True, True, False]


@pytest.mark.parametrize("storage_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage(device, storage_dtype):
    x = torch.randn(5, 3, 3, device=device)
    buf = ReplayBuffer(2, (5, 3, 3), device=device, storage_dtype=storage_dtype)
    assert buf.nbytes < ReplayBuffer(2, (5, 3, 3), device=device).nbytes
    buf.push(x, torch.arange(5, device=device))
    h, _ = buf.sample()
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, x.to(storage_dtype).float(), rtol=0, atol=0)


def test_push_converts_dtype(device):
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    buf = ReplayBuffer(2, (3, 4), device=device)
    buf.push(x, torch.arange(3, device=device))
    h, _ = buf.sample()
    assert h.dtype == torch.float32 and torch.equal(h, x.float())


def test_non_contiguous_push(device):
    x = torch.randn(4, 6, 5, device=device).transpose(1, 2)
    buf = ReplayBuffer(2, (4, 5, 6), device=device)
    buf.push(x, torch.arange(4, device=device))
    assert torch.equal(buf.sample()[0], x)


def test_opcheck(device):
    buf = ReplayBuffer(3, (2, 4), device=device, policy="uniform")
    x, y = torch.randn(2, 4, device=device), torch.tensor([1, 0], device=device)
    torch.library.opcheck(torch.ops.dgl_fast.replay_push.default,
                          (buf.storage, buf.label_store, buf.state, buf.uses, buf.stamps, x, y))
    out, out_y = torch.empty(2, 4, device=device), torch.empty(2, dtype=torch.long, device=device)
    info = torch.empty(2, dtype=torch.long, device=device)
    torch.library.opcheck(torch.ops.dgl_fast.replay_sample.default,
                          (buf.state, buf.uses, buf.stamps, buf.storage, buf.label_store, out, out_y, info, 2, 0, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_and_cuda_choose_the_same_slots(policy):
    rnd = random.Random(0)
    bufs = [ReplayBuffer(5, (3, 4), device=d, policy=policy, max_reuse=2, seed=3) for d in ("cpu", "cuda")]
    for _ in range(200):
        if rnd.random() < 0.3:
            x, y = torch.randn(3, 4), torch.randint(0, 9, (3,))
            for b in bufs:
                b.push(x.to(b.device), y.to(b.device))
        elif bufs[0].pushes:
            a, c = (b.sample() for b in bufs)
            assert int(a.slot) == int(c.slot)
            if bool(a.valid):
                assert torch.equal(a[0], c[0].cpu()) and torch.equal(a[1], c[1].cpu())


@pytest.mark.cuda
def test_two_streams_stress_never_torn():
    dev = torch.device("cuda")
    B, shape = 8, (8, 64, 16, 16)
    buf = ReplayBuffer(4, shape, device=dev)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    rnd = random.Random(1)
    seen = []
    for i in range(2000):
        with torch.cuda.stream(producer):
            if rnd.random() < 0.5:
                torch.cuda._sleep(rnd.randint(0, 20000))  # random delays on the device
            x = torch.full(shape, float(i), device=dev) + torch.arange(B, device=dev).view(B, 1, 1, 1)
            buf.push(x, torch.full((B,), i, device=dev))
        with torch.cuda.stream(consumer):
            if rnd.random() < 0.5:
                torch.cuda._sleep(rnd.randint(0, 20000))
            h, y = buf.sample()
            seen.append((h, y))
    torch.cuda.synchronize()
    for h, y in seen:
        i = int(y[0])
        expect = torch.full(shape, float(i), device=dev) + torch.arange(B, device=dev).view(B, 1, 1, 1)
        assert torch.equal(h, expect) and torch.equal(y, torch.full((B,), i, device=dev))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(capacity=0), ValueError, "capacity must be an int >= 1, got 0"),
    (dict(policy="lru"), ValueError, "unknown replay policy 'lru'"),
    (dict(max_reuse=0), ValueError, "max_reuse must be None or an int >= 1, got 0"),
    (dict(dtype=torch.long), ValueError, "dtype must be a floating-point torch.dtype"),
    (dict(batch_shape=(0, 3)), ValueError, "batch_shape must be positive ints"),
    (dict(batch_shape=(2**20, 2**20, 2**10)), MemoryError, r"needs .* MiB but only .* MiB is free"),
])
def test_bad_construction(kwargs, exc, match):
    args = dict(capacity=2, batch_shape=(4, 3))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ReplayBuffer(**args)


@pytest.mark.parametrize("h,y,match", [
    (torch.randn(4, 2), torch.arange(4), r"expected activations of shape \[4, 3\], got \[4, 2\]"),
    (torch.randint(0, 3, (4, 3)), torch.arange(4), "expected floating-point activations .* got torch.int64"),
    (torch.randn(4, 3), torch.arange(5), r"expected labels of shape \[4\], got \[5\]"),
    (torch.randn(4, 3), torch.arange(4).int(), "expected int64 labels, got torch.int32"),
])
def test_bad_push_changes_nothing(h, y, match):
    buf = ReplayBuffer(2, (4, 3))
    buf.push(torch.randn(4, 3), torch.arange(4))
    state = buf.state.clone()
    with pytest.raises(ValueError, match=match):
        buf.push(h, y)
    assert torch.equal(buf.state, state) and buf.pushes == 1


def test_sample_empty_is_clear():
    with pytest.raises(ValueError, match="the buffer is empty; push a mini-batch first"):
        ReplayBuffer(2, (4, 3)).sample()


def test_native_op_checks_shapes():
    buf = ReplayBuffer(2, (4, 3))
    with pytest.raises(RuntimeError, match=r"expected activations of shape \[4, 3\], got \[4, 4\]"):
        dgl_fast.ops.replay_push(buf.storage, buf.label_store, buf.state, buf.uses, buf.stamps, torch.randn(4, 4),
                                 torch.arange(4))


def test_sample_into_caller_tensors(device):
    buf = ReplayBuffer(3, (4, 5), device=device, policy="fifo")
    xs = [torch.randn(4, 5, device=device) for _ in range(2)]
    for i, x in enumerate(xs):
        buf.push(x, torch.full((4,), i, device=device))
    out, labels = torch.empty(4, 5, device=device), torch.empty(4, dtype=torch.long, device=device)
    info = torch.empty(2, dtype=torch.long, device=device)
    s = buf.sample_into(out, labels, info)
    assert s[0] is out and s[1] is labels and int(s.slot) == 0 and bool(s.valid)
    assert torch.equal(out, xs[0]) and labels.tolist() == [0] * 4
    with pytest.raises(ValueError, match=r"expected out of shape \[4, 5\] and dtype torch.float32, got \[4, 6\]"):
        buf.sample_into(torch.empty(4, 6, device=device), labels, info)
    with pytest.raises(ValueError, match=r"expected an int64 info tensor of shape \[2\], got \[3\]"):
        buf.sample_into(out, labels, torch.empty(3, dtype=torch.long, device=device))
