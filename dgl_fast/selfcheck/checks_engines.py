"""Checks of the graph, streams and async paths against the sequential engine, and the timing."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import TOL64, CheckFailed, gen, same_state, sync

__all__ = ["check_graph", "check_streams", "check_async_buffer", "check_async_trainer", "bench"]

# --- trainers ---------------------------------------------------------------------------------------


def _small_net(K: int, seed: int, dtype=torch.float32, in_ch: int = 3, size: int = 9, classes: int = 5, hidden: int = 12):
    """K conv+BN+ReLU stages on odd-sized inputs, fused ``mlp-sr`` heads (``last`` for the classifier)."""
    from ..heads import AuxHead  # noqa: PLC0415
    from ..model import DecoupledModel  # noqa: PLC0415

    torch.manual_seed(seed)
    stages, heads, c, s = [], [], in_ch, size
    for j in range(K):
        cout, stride = 4 + 2 * j, 2 if j % 2 == 1 else 1
        stages.append(nn.Sequential(nn.Conv2d(c, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()))
        s = (s + 2 - 3) // stride + 1
        heads.append(AuxHead(cout, s, classes, kind="last" if j == K - 1 else "mlp-sr", hidden=hidden, fused=True))
        c = cout
    return DecoupledModel(stages, heads, input_shape=(in_ch, size, size)).to(dtype)


def _data(n: int, device, B: int = 6, dtype=torch.float32, seed: int = 1, in_ch: int = 3, size: int = 9, classes: int = 5):
    g = gen(seed)
    return [(torch.randn(B, in_ch, size, size, generator=g).to(device=device, dtype=dtype),
             torch.randint(0, classes, (B,), generator=g).to(device)) for _ in range(n)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _train(model, data, device, **kw):
    from ..trainer import Trainer  # noqa: PLC0415

    tr = Trainer(copy.deepcopy(model), optimizer=_sgd, device=device, **kw)
    for x, y in data:
        tr.step(x, y)
    tr.flush()
    sync(device)
    return tr


def check_graph(device: torch.device) -> str:
    K, n = 3, 7
    model = _small_net(K, seed=3)
    data = _data(n, device, B=16)
    if device.type == "cuda":
        real = _train(model, data, device, engine="streams", cuda_graphs=True)
        eager = _train(model, data, device, engine="pipeline", cuda_graphs="emulate")
        if real.schedule.graph_state is None:
            raise CheckFailed("the streams engine with cuda_graphs=True replayed no graph")
        count = same_state("captured graphs vs the same stage steps eager", real.model, eager.model)
        return f"K={K}, {n} steps, float32: {count} tensors bitwise equal (captured + replayed vs eager graph path)"
    emu = _train(model, data, device, engine="pipeline", cuda_graphs="emulate")
    seq = _train(model, data, device, engine="sequential")
    if emu.schedule.graph_state is None:
        raise CheckFailed("the emulated graph path never ran its graph step")
    count = same_state("emulated graph path vs sequential engine", emu.model, seq.model)
    return f"emulated (CPU): K={K}, {n} steps, {count} tensors bitwise equal to the sequential engine"


def check_streams(device: torch.device) -> str:
    K, n = 4, 9
    model = _small_net(K, seed=4)
    data = _data(n, device, B=8, seed=2)
    engine = "streams" if device.type == "cuda" else "pipeline"
    kw = dict(cuda_graphs=False) if engine == "streams" else {}
    fast = _train(model, data, device, engine=engine, **kw)
    seq = _train(model, data, device, engine="sequential")
    if fast.stage_steps != seq.stage_steps:
        raise CheckFailed(f"stage steps {fast.stage_steps}, expected {seq.stage_steps}")
    count = same_state(f"{engine} engine vs sequential engine", fast.model, seq.model)
    where = "one CUDA stream per stage" if engine == "streams" else "pipeline engine (CPU: stages in turn)"
    return f"{where}: K={K}, {n} steps, {count} tensors bitwise equal to the sequential engine"


def check_async_buffer(device: torch.device) -> str:
    from ..buffer import ReplayBuffer  # noqa: PLC0415
    from ..streams import CudaStreams, RecordedStreams  # noqa: PLC0415

    M, shape, n = 3, (5, 4, 3, 3), 60
    B = shape[0]
    cuda = device.type == "cuda"
    st = CudaStreams(device) if cuda else RecordedStreams()
    buf = ReplayBuffer(M, shape, dtype=torch.float32, device=device, policy="priority_lifo", streams=st)
    producer, consumer = st.new_stream(), st.new_stream()
    # batch i: its number in the labels, its content a function of (i, position): a torn or stale
    # sample matches no pushed batch, or not the one its labels name
    pattern = torch.arange(1, 1 + shape[1] * shape[2] * shape[3], device=device, dtype=torch.float32).view(shape[1:])

    def batch(i: int) -> torch.Tensor:
        return (1000.0 * i + torch.arange(B, device=device, dtype=torch.float32).view(B, 1, 1, 1) * 0.125
                + pattern * 2.0**-10)

    samples = torch.empty((2 * n, *shape), device=device)
    sample_labels = torch.empty((2 * n, B), dtype=torch.long, device=device)
    pushed, taken = 0, 0

    def slow(stream_is_slow: bool) -> None:
        if cuda and stream_is_slow:
            torch.cuda._sleep(50_000)  # about 25 us of device time: this stage runs slower

    for phase in ("slow producer", "slow consumer"):
        for i in range(n):
            with st.use(producer):
                slow(phase == "slow producer")
                buf.push(batch(pushed), torch.full((B,), pushed, dtype=torch.long, device=device))
                pushed += 1
            if phase == "slow producer" or i % 3 == 0:  # the consumer samples less often when it is slow
                with st.use(consumer):
                    slow(phase == "slow consumer")
                    h, y = buf.sample()
                    samples[taken].copy_(h)
                    sample_labels[taken].copy_(y)
                    taken += 1
    st.wait_stream(st.current(), producer)
    st.wait_stream(st.current(), consumer)
    sync(device)
    samples, sample_labels = samples[:taken].cpu(), sample_labels[:taken].cpu()
    for k in range(taken):
        i = int(sample_labels[k, 0])
        if not (0 <= i < pushed) or not torch.equal(sample_labels[k], torch.full((B,), i)):
            raise CheckFailed(f"sample {k}: labels {sample_labels[k].tolist()} name no single pushed batch (torn)")
        if not torch.equal(samples[k], batch(i).cpu()):
            raise CheckFailed(f"sample {k}: its content is not pushed batch {i}, which its labels name (torn)")
    state = buf.state.cpu().tolist()
    if state[2] != pushed or state[3] != taken:
        raise CheckFailed(f"ring counted {state[2]} pushes and {state[3]} samples, {pushed} and {taken} were made (lost)")
    for i in range(pushed - M, pushed):  # the ring holds the last M pushes, each in its slot
        if not torch.equal(buf.storage[i % M].cpu(), batch(i).cpu()):
            raise CheckFailed(f"slot {i % M} does not hold push {i}, the last one written there (lost)")
    distinct = len(set(sample_labels[:, 0].tolist()))
    if not cuda:  # the recorded order: every buffer operation follows the previous one
        marks = [m for m in st.marks if isinstance(m.what, tuple) and m.what[0] is buf]
        if len(marks) != pushed + taken:
            raise CheckFailed(f"{len(marks)} buffer operations recorded, {pushed + taken} made")
        for a, b in zip(marks, marks[1:]):
            if not RecordedStreams.happens_before(a, b):
                raise CheckFailed(f"buffer {b.what[1]} on {b.stream} is not ordered after the {a.what[1]} on {a.stream}")
        return (f"recorded streams (CPU): {pushed} pushes, {taken} samples ({distinct} distinct batches) all intact, "
                f"{len(marks)} buffer operations ordered one after another")
    return (f"2 CUDA streams, each slowed in turn: {pushed} pushes, {taken} samples ({distinct} distinct batches), "
            "every sample a whole pushed batch, the ring holds the last pushes")


def check_async_trainer(device: torch.device) -> str:
    from ..streams import RecordedStreams  # noqa: PLC0415

    K, n = 2, 24
    model = _small_net(K, seed=5, dtype=torch.float64)
    data = _data(n, device, dtype=torch.float64, seed=4)
    kw = dict(mode="async", buffer_capacity=3, schedule="random", slowdown={2: 0.5}, seed=2)
    ref = _train(model, data, device, engine="sequential", **kw)
    cuda = device.type == "cuda"
    free = _train(model, data, device, engine="streams", **({} if cuda else {"streams": RecordedStreams()}), **kw)
    if free.stage_steps != ref.stage_steps:
        raise CheckFailed(f"stage steps {free.stage_steps}, expected {ref.stage_steps} (the in-turn run)")
    if min(ref.stage_steps) < 3:
        raise CheckFailed(f"too few stage steps to compare: {ref.stage_steps}")
    tol = TOL64 if cuda and free.cuda_graphs else 0.0
    count = same_state("free-running streams vs async in turn", free.model, ref.model, tol)
    graphs = (" with CUDA graphs" if cuda else " with emulated graphs") if free.cuda_graphs else ""
    how = "bitwise" if tol == 0 else "to 1e-10"
    return (f"K={K}, stage 2 slowed (noise 0.5), {n} steps{graphs}: stage steps {free.stage_steps}, {count} tensors "
            f"equal {how} (float64)")


# --- bench ------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], device: torch.device, seconds: float, per_chunk: int = 1) -> tuple[float, int]:
    """Median seconds of one ``fn()`` over chunks of ``per_chunk`` calls (device synchronised
    around each chunk) for about ``seconds``, after two warm-up calls; returns (median, calls)."""
    for _ in range(2):
        fn()
    sync(device)
    times, calls, end = [], 0, time.perf_counter() + seconds
    while not times or (time.perf_counter() < end and len(times) < 10_000):
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / per_chunk)
        calls += per_chunk
    return statistics.median(times), calls


def bench(device: torch.device, seconds: float) -> tuple[str, dict]:
    """Time the fused head against the reference head, and a DGL step against a backprop step."""
    from .. import models  # noqa: PLC0415
    from ..heads import AuxHead  # noqa: PLC0415
    from ..trainer import Trainer  # noqa: PLC0415

    cuda = device.type == "cuda"
    share = seconds / 4
    B, C, s = (128, 256, 8) if cuda else (32, 32, 8)
    torch.manual_seed(0)
    head = AuxHead(C, s, 10, kind="mlp-sr", fused=True).to(device)
    ref = copy.deepcopy(head).to_reference()
    x = torch.randn(B, C, s, s, device=device, requires_grad=True)
    y = torch.randint(0, 10, (B,), device=device)

    def fused():
        return torch.autograd.grad(head.loss(x, y)[0], [x, *head.parameters()])

    def plain():
        return torch.autograd.grad(F.cross_entropy(ref(x), y), [x, *ref.parameters()])

    chunk = 10 if cuda else 1
    t_fused, n_fused = _median_time(fused, device, share, chunk)
    t_ref, n_ref = _median_time(plain, device, share, chunk)

    width, depth, bs, size = (64, 4, 128, 32) if cuda else (16, 4, 16, 16)
    net = models.build("aux-study", num_classes=10, depth=depth, width=width, in_size=size, aux="mlp-sr")
    xb = torch.randn(bs, 3, size, size, device=device)
    yb = torch.randint(0, 10, (bs,), device=device)
    trainers = {mode: Trainer(copy.deepcopy(net), optimizer=_sgd, mode=mode, device=device) for mode in ("dgl", "backprop")}
    steps = {}
    for mode, tr in trainers.items():
        steps[mode] = _median_time(lambda tr=tr: tr.step(xb, yb), device, share, chunk)
        tr.flush()
    dgl_tr = trainers["dgl"]
    data = {"head": {"kind": "mlp-sr", "input": [B, C, s, s], "fused_us": 1e6 * t_fused, "reference_us": 1e6 * t_ref,
                     "calls": [n_fused, n_ref]},
            "step": {"model": f"aux-study depth {depth} width {width}", "input": [bs, 3, size, size],
                     "dgl_engine": dgl_tr.engine_name + (" + CUDA graphs" if dgl_tr.cuda_graphs else ""),
                     "dgl_ms": 1e3 * steps["dgl"][0], "backprop_ms": 1e3 * steps["backprop"][0],
                     "calls": [steps["dgl"][1], steps["backprop"][1]]},
            "seconds": seconds, "tf32": False}
    detail = (f"mlp-sr head {list(x.shape)} fwd+bwd: fused {1e6 * t_fused:.0f} us, reference {1e6 * t_ref:.0f} us "
              f"({t_ref / t_fused:.2f}x); aux-study K={depth} b{bs} step: DGL ({data['step']['dgl_engine']}) "
              f"{1e3 * steps['dgl'][0]:.2f} ms, backprop {1e3 * steps['backprop'][0]:.2f} ms")
    return detail, data
