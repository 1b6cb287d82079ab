"""``python -m dgl_fast check``: does this build work on this device? One command, about a minute.

Each check runs on the chosen device and compares against a plain-PyTorch reference computed in
the same process:

- ``env``: ``dgl_fast.build_config()``, torch, CUDA, the device; the device's kernels are compiled.
- ``op:<name>``: every op of :mod:`dgl_fast.ops` against :mod:`dgl_fast.reference`
  (``bn_update_stats``: against ``nn.BatchNorm1d``'s own update) in float64, odd sizes, random
  inputs, non-contiguous views; forward and backward to 1e-10; the replay ops bitwise, their slot
  choices against ``reference.ReplayRing``.
- ``graph``: a DGL trainer whose stage steps replay CUDA graphs against the same stage steps run
  eagerly through the graph code path (bitwise, float32, TF32 off); on the CPU the emulated graph
  path (``cuda_graphs="emulate"``) against the sequential engine.
- ``streams``: the streams engine (one CUDA stream per stage) against the sequential engine,
  bitwise; on the CPU the pipeline engine.
- ``async_buffer``: a replay buffer between two stages on two streams, each slowed in turn: every
  pushed batch's content encodes its number, every sample must equal one pushed batch exactly
  (nothing torn) and the ring must hold the last pushes (nothing lost); on the CPU on
  :class:`~dgl_fast.streams.RecordedStreams`, whose recorded order must chain every buffer operation.
- ``async_trainer``: async DGL on free-running streams (two stages, one slowed) against async DGL
  in turn, float64 (bitwise on the CPU; 1e-10 on a GPU, where the stage steps replay CUDA graphs).
- ``bench``: timings, not a pass/fail criterion: the fused auxiliary head's forward + backward
  against the reference head, one DGL step against one backprop step (``--bench-seconds``,
  ``--no-bench``).

A check that raises reports FAIL with a one-line reason and the others still run. The process
exits 0 when nothing failed, 1 otherwise (2: a bad option). ``--json PATH`` writes the report
(environment, each check's status, seconds, reason and figures); nothing is written otherwise.

From Python: ``results = run_checks(device)`` returns :class:`CheckResult` objects;
``main(argv)`` is the command. The checks call the ops through :mod:`dgl_fast.ops` at call time,
so a test can replace one there and see the check fail.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference

__all__ = ["CheckResult", "CheckFailed", "CHECKS", "run_checks", "format_table", "report", "main", "add_arguments"]

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
TOL64 = 1e-10  # float64 equivalence


class CheckFailed(AssertionError):
    """A comparison that did not hold; its message is the one-line reason shown in the table."""


@dataclass
class CheckResult:
    """One row of the report: ``status`` is ``"ok"``, ``"FAIL"`` or ``"skipped"``; ``detail`` says
    what was compared (ok), why it failed (FAIL) or why it did not run (skipped)."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


# --- comparison helpers -------------------------------------------------------------------------


def _close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL64) -> float:
    """Max abs difference of ``got`` and ``want`` (compared on the CPU in float64); CheckFailed above ``tol``."""
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.dtype.is_floating_point or w.dtype.is_floating_point:
        g, w = g.double(), w.double()
        if not torch.isfinite(g).all():
            raise CheckFailed(f"{what}: non-finite values")
    err = (g - w).abs().max().item() if g.numel() else 0.0
    scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
    if err > tol * scale:
        raise CheckFailed(f"{what}: max |difference| {err:.3g}, allowed {tol * scale:.3g}")
    return err


def _equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise CheckFailed(f"{what}: {list(got.shape)} {got.dtype}, expected {list(want.shape)} {want.dtype}")
    if not torch.equal(got.detach().cpu(), want.detach().cpu()):
        diff = (got.detach().cpu().double() - want.detach().cpu().double()).abs().max().item()
        raise CheckFailed(f"{what}: not bitwise equal (max |difference| {diff:.3g})")


def _same_state(what: str, a: nn.Module, b: nn.Module, tol: float = 0.0) -> int:
    """Every parameter and buffer of ``a`` equals ``b``'s (bitwise for ``tol=0``); returns the count."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise CheckFailed(f"{what}: different state keys")
    for k in sa:
        if tol == 0:
            _equal(f"{what}: {k}", sa[k], sb[k])
        else:
            _close(f"{what}: {k}", sa[k], sb[k], tol)
    return len(sa)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _exact_math():
    """TF32 off and deterministic cuDNN while the checks run (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


# --- env ------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Build and runtime facts: what the report's header holds."""
    from . import __version__  # noqa: PLC0415
    from ._native import build_config  # noqa: PLC0415

    env = {"dgl_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device), "build": build_config(),
           "tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": True}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def check_env(device: torch.device) -> tuple[str, dict]:
    env = environment(device)
    cfg = env["build"]
    if device.type == "cuda":
        if not cfg["cuda"]:
            raise CheckFailed("dgl_fast was built without its CUDA kernels (build_config()['cuda'] is False): "
                              "rebuild with nvcc visible (DGL_FAST_CUDA=1)")
        arch = env["capability"][3:]
        archs = (cfg.get("arch_list") or "").replace(";", " ").replace(",", " ").split()
        built = {a.split("+")[0].replace(".", "") for a in archs}
        if built and arch not in built and not any("PTX" in a for a in archs):
            raise CheckFailed(f"kernels compiled for {cfg.get('arch_list')}, the device is {env['capability']}: "
                              "rebuild with TORCH_CUDA_ARCH_LIST naming it")
        where = f"{env['gpu']} ({env['capability']}), CUDA kernels for {cfg.get('arch_list')}"
    else:
        where = f"CPU ({env['cpu']}, {env['threads']} threads), CUDA kernels {'compiled' if cfg['cuda'] else 'not compiled'}"
    built_with = cfg.get("built_with_torch")
    mismatch = f"; built with torch {built_with}" if built_with and built_with != torch.__version__ else ""
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), {where}{mismatch}", env


# --- ops ------------------------------------------------------------------------------------------


def check_softmax_xent(device: torch.device) -> str:
    g = _gen(1)
    for B, C, view in ((7, 13, False), (129, 37, True), (1, 5, False)):
        logits = 3 * torch.randn(C, B, generator=g, dtype=torch.float64).t()
        labels = torch.randint(0, C, (B,), generator=g)
        if view:  # a transposed, non-contiguous view made on the device
            leaf = logits.t().to(device, copy=True).requires_grad_()
            x = leaf.t()
        else:
            leaf = x = logits.to(device, copy=True).contiguous().requires_grad_()
        loss, correct = ops.softmax_xent(x, labels.to(device))
        gout = 1.0 + torch.rand((), generator=g, dtype=torch.float64).item()
        (gout * loss).backward()
        rloss, rgrad, rcorrect = reference.softmax_xent(logits, labels)
        what = f"[{B}, {C}]{' view' if view else ''}"
        if view and x.is_contiguous():
            raise CheckFailed(f"{what}: the test view is contiguous")
        _close(f"loss {what}", loss, rloss)
        _close(f"gradient {what}", leaf.grad.t() if view else leaf.grad, gout * rgrad)
        if int(correct) != int(rcorrect):
            raise CheckFailed(f"correct count {what}: {int(correct)}, expected {int(rcorrect)}")
    return "loss, gradient, correct count; [7, 13], [129, 37] transposed view, [1, 5]; float64"


def check_aux_pool(device: torch.device) -> str:
    g = _gen(2)
    cases = ((5, 7, 9, 11, (3, 2), False), (3, 6, 8, 8, (2, 2), True), (2, 3, 13, 7, (4, 3), False))
    for B, C, H, W, out, cl in cases:
        base = torch.randn(B, C, H + 2, 2 * W, generator=g, dtype=torch.float64)
        leaf, leaf_ref = base.to(device, copy=True).requires_grad_(), base.clone().requires_grad_()
        x, xref = leaf[:, :, 1:-1, ::2], leaf_ref[:, :, 1:-1, ::2]  # strided views, made on the device
        y = ops.aux_pool(x, out, channels_last_out=cl)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(gy.to(device))
        yref = reference.aux_pool(xref, out, cl)
        yref.backward(gy)
        what = f"[{B}, {C}, {H}, {W}] view -> {out}"
        _close(f"output {what}", y, yref)
        _close(f"input gradient {what}", leaf.grad, leaf_ref.grad)
        if cl and not y.is_contiguous(memory_format=torch.channels_last):
            raise CheckFailed(f"output {what}: channels_last_out=True gave a tensor that is not channels_last")
    # the device's own non-contiguous input (a view made on the device)
    xd = torch.randn(4, 5, 12, 10, generator=g, dtype=torch.float64).to(device)
    v = xd.permute(0, 1, 3, 2)[:, :, 1:, :]
    _close("output of a device-side permuted view", ops.aux_pool(v, (3, 3)), reference.aux_pool(v.cpu(), (3, 3)))
    return "forward and input gradient, strided and permuted views, NCHW and channels_last out; float64"


def check_linear_bn_relu(device: torch.device) -> str:
    g = _gen(3)
    N, K, M = 37, 19, 23
    for training in (True, False):
        xt = torch.randn(K, N, generator=g, dtype=torch.float64)  # rows x = xt.t(): a non-contiguous view
        w, b = torch.randn(M, K, generator=g, dtype=torch.float64) / K**0.5, torch.randn(M, generator=g, dtype=torch.float64)
        gamma = 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
        beta = torch.randn(M, generator=g, dtype=torch.float64)
        rm, rv = torch.randn(M, generator=g, dtype=torch.float64), 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
        leaves_ref = [t.clone().requires_grad_() for t in (xt, w, b, gamma, beta)]
        leaves = [t.to(device, copy=True).requires_grad_() for t in (xt, w, b, gamma, beta)]
        rm_d, rv_d = rm.to(device), rv.to(device)
        out, mean, var = ops.linear_bn_relu(leaves[0].t(), *leaves[1:], rm_d, rv_d, training, 1e-5)
        rout, rmean, rvar = reference.linear_bn_relu(leaves_ref[0].t(), *leaves_ref[1:], rm, rv, training, 1e-5)
        gout = torch.randn(N, M, generator=g, dtype=torch.float64)
        out.backward(gout.to(device))
        rout.backward(gout)
        mode = "training" if training else "eval"
        _close(f"output ({mode})", out, rout)
        _close(f"batch mean ({mode})", mean, rmean)
        _close(f"batch variance ({mode})", var, rvar)
        for name, a, r in zip(("x", "weight", "bias", "gamma", "beta"), leaves, leaves_ref):
            _close(f"gradient of {name} ({mode})", a.grad, r.grad)
        _equal(f"running mean untouched ({mode})", rm_d.cpu(), rm)
        _equal(f"running variance untouched ({mode})", rv_d.cpu(), rv)
    return f"[{N}, {K}] transposed view x [{M}, {K}], training and eval: output, statistics, 5 gradients; float64"


def check_bn_update_stats(device: torch.device) -> str:
    g = _gen(4)
    sizes, counts, moms = (5, 7, 3), (11, 4, 2), (0.1, 0.3, 0.9)
    bns = [nn.BatchNorm1d(m, momentum=mom).double() for m, mom in zip(sizes, moms)]
    for bn in bns:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g, dtype=torch.float64))
    mine = [copy.deepcopy(bn).to(device) for bn in bns]
    xs = [torch.randn(n, m, generator=g, dtype=torch.float64) for n, m in zip(counts, sizes)]
    for bn, x in zip(bns, xs):
        bn.train()(x)  # the reference: nn.BatchNorm1d's own running-statistics update
    means = [x.mean(0).to(device) for x in xs]
    vars_ = [x.var(0, unbiased=False).to(device) for x in xs]
    ops.bn_update_stats([b.running_mean for b in mine], [b.running_var for b in mine],
                        [b.num_batches_tracked for b in mine], means, vars_, list(counts), list(moms))
    for j, (a, r) in enumerate(zip(mine, bns)):
        _close(f"layer {j} running mean", a.running_mean, r.running_mean)
        _close(f"layer {j} running variance", a.running_var, r.running_var)
        _equal(f"layer {j} num_batches_tracked", a.num_batches_tracked.cpu(), r.num_batches_tracked)
    return "3 layers (5, 7, 3 features; batches 11, 4, 2) against nn.BatchNorm1d's update; float64"


def _ring_tensors(M: int, shape: tuple, device, dtype=torch.float64):
    kw = dict(device=device)
    return (torch.empty((M, *shape), dtype=dtype, **kw), torch.empty((M, shape[0]), dtype=torch.long, **kw),
            torch.zeros(4, dtype=torch.long, **kw), torch.zeros(M, dtype=torch.long, **kw),
            torch.zeros(M, dtype=torch.long, **kw))


def _batch(g: torch.Generator, shape: tuple, device, view: bool) -> torch.Tensor:
    if view:  # a non-contiguous view of that shape, made on the device
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64).to(device)[..., ::2]
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device)


def check_replay_push(device: torch.device) -> str:
    g = _gen(5)
    M, shape = 5, (3, 7, 5)
    storage, labels, state, uses, stamps = _ring_tensors(M, shape, device)
    ring = reference.ReplayRing(M, "fifo")
    for t in range(8):  # wraps around the ring
        x = _batch(g, shape, device, view=t % 2 == 1)
        y = torch.randint(0, 50, (shape[0],), generator=g).to(device)
        ops.replay_push(storage, labels, state, uses, stamps, x, y)
        slot = ring.push(t)
        _equal(f"push {t}: stored batch", storage[slot], x.contiguous())
        _equal(f"push {t}: stored labels", labels[slot], y)
        want = torch.tensor([ring.head, ring.count, ring.pushes, ring.samples])
        _equal(f"push {t}: ring state [head, count, pushes, samples]", state.cpu(), want)
        _equal(f"push {t}: stamps", stamps.cpu(), torch.tensor(ring.stamps))
        _equal(f"push {t}: uses", uses.cpu(), torch.tensor(ring.uses))
    # float32 batches into float64 storage: converted on the way in
    x32 = torch.randn(shape, generator=g).to(device)
    ops.replay_push(storage, labels, state, uses, stamps, x32, torch.zeros(shape[0], dtype=torch.long, device=device))
    _equal("float32 batch stored as float64", storage[ring.push(8)], x32.double())
    return f"{ring.pushes} pushes into a ring of {M} x {list(shape)} (wrap-around, strided views, float32 -> float64)"


def check_replay_sample(device: torch.device) -> str:
    g = _gen(6)
    M, shape = 4, (3, 5, 3)
    n = 0
    for policy, max_reuse in (("priority_lifo", None), ("fifo", 2), ("uniform", None)):
        storage, labels, state, uses, stamps = _ring_tensors(M, shape, device)
        ring = reference.ReplayRing(M, policy, max_reuse, seed=7)
        pushed = {}
        out = torch.empty(shape, dtype=torch.float64, device=device)
        out_labels = torch.empty(shape[0], dtype=torch.long, device=device)
        info = torch.empty(2, dtype=torch.long, device=device)
        for t in range(7):
            x = _batch(g, shape, device, view=False)
            y = torch.randint(0, 50, (shape[0],), generator=g).to(device)
            ops.replay_push(storage, labels, state, uses, stamps, x, y)
            pushed[t] = (x, y)
            ring.push(t)
            for k in range(3 if t < 6 else 8):  # the last round exhausts max_reuse
                before = out.clone()
                ops.replay_sample(state, uses, stamps, storage, labels, out, out_labels, info, policy, max_reuse, 7)
                slot = ring.sample()
                n += 1
                what = f"{policy}{f' max_reuse={max_reuse}' if max_reuse else ''}: sample {k} after push {t}"
                got_slot, valid = info.tolist()
                if got_slot != slot or valid != int(slot >= 0):
                    raise CheckFailed(f"{what}: picked slot {got_slot} (valid {valid}), expected {slot}")
                if slot >= 0:
                    x, y = pushed[ring.data[slot]]
                    _equal(f"{what}: sampled batch", out, x)
                    _equal(f"{what}: sampled labels", out_labels, y)
                else:
                    _equal(f"{what}: output left unchanged when nothing is available", out, before)
        _equal(f"{policy}: uses", uses.cpu(), torch.tensor(ring.uses))
        _equal(f"{policy}: ring state", state.cpu(), torch.tensor([ring.head, ring.count, ring.pushes, ring.samples]))
    return f"{n} samples, priority_lifo / fifo with max_reuse 2 / uniform, slot choices against reference.ReplayRing"


# --- trainers ---------------------------------------------------------------------------------------


def _small_net(K: int, seed: int, dtype=torch.float32, in_ch: int = 3, size: int = 9, classes: int = 5, hidden: int = 12):
    """K conv+BN+ReLU stages on odd-sized inputs, fused ``mlp-sr`` heads (``last`` for the classifier)."""
    from .heads import AuxHead  # noqa: PLC0415
    from .model import DecoupledModel  # noqa: PLC0415

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
    g = _gen(seed)
    return [(torch.randn(B, in_ch, size, size, generator=g).to(device=device, dtype=dtype),
             torch.randint(0, classes, (B,), generator=g).to(device)) for _ in range(n)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _train(model, data, device, **kw):
    from .trainer import Trainer  # noqa: PLC0415

    tr = Trainer(copy.deepcopy(model), optimizer=_sgd, device=device, **kw)
    for x, y in data:
        tr.step(x, y)
    tr.flush()
    _sync(device)
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
        count = _same_state("captured graphs vs the same stage steps eager", real.model, eager.model)
        return f"K={K}, {n} steps, float32: {count} tensors bitwise equal (captured + replayed vs eager graph path)"
    emu = _train(model, data, device, engine="pipeline", cuda_graphs="emulate")
    seq = _train(model, data, device, engine="sequential")
    if emu.schedule.graph_state is None:
        raise CheckFailed("the emulated graph path never ran its graph step")
    count = _same_state("emulated graph path vs sequential engine", emu.model, seq.model)
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
    count = _same_state(f"{engine} engine vs sequential engine", fast.model, seq.model)
    where = "one CUDA stream per stage" if engine == "streams" else "pipeline engine (CPU: stages in turn)"
    return f"{where}: K={K}, {n} steps, {count} tensors bitwise equal to the sequential engine"


def check_async_buffer(device: torch.device) -> str:
    from .buffer import ReplayBuffer  # noqa: PLC0415
    from .streams import CudaStreams, RecordedStreams  # noqa: PLC0415

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
    _sync(device)
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
    from .streams import RecordedStreams  # noqa: PLC0415

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
    count = _same_state("free-running streams vs async in turn", free.model, ref.model, tol)
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
    _sync(device)
    times, calls, end = [], 0, time.perf_counter() + seconds
    while not times or (time.perf_counter() < end and len(times) < 10_000):
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / per_chunk)
        calls += per_chunk
    return statistics.median(times), calls


def bench(device: torch.device, seconds: float) -> tuple[str, dict]:
    """Time the fused head against the reference head, and a DGL step against a backprop step."""
    from . import models  # noqa: PLC0415
    from .heads import AuxHead  # noqa: PLC0415
    from .trainer import Trainer  # noqa: PLC0415

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


# --- running ----------------------------------------------------------------------------------------

#: name -> function(device) returning the detail line (or (detail, data)); the order of the table
CHECKS: dict[str, Callable] = {
    "env": check_env,
    "op:softmax_xent": check_softmax_xent,
    "op:replay_push": check_replay_push,
    "op:replay_sample": check_replay_sample,
    "op:aux_pool": check_aux_pool,
    "op:linear_bn_relu": check_linear_bn_relu,
    "op:bn_update_stats": check_bn_update_stats,
    "graph": check_graph,
    "streams": check_streams,
    "async_buffer": check_async_buffer,
    "async_trainer": check_async_trainer,
}


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    if not isinstance(exc, CheckFailed):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        msg = f"{type(exc).__name__}{where}: {msg}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _run_one(name: str, fn: Callable, device: torch.device, on_result) -> CheckResult:
    t0 = time.perf_counter()
    try:
        with _exact_math():
            out = fn(device)
            _sync(device)  # a kernel's asynchronous error belongs to this check
        detail, data = out if isinstance(out, tuple) else (out, {})
        res = CheckResult(name, OK, time.perf_counter() - t0, detail, data)
    except Exception as exc:  # every check reports; none stops the others
        res = CheckResult(name, FAIL, time.perf_counter() - t0, _one_line(exc))
    if on_result is not None:
        on_result(res)
    return res


def _check_only(only: Sequence[str] | None) -> None:
    names = [*CHECKS, "bench"]
    unknown = [o for o in only or () if not any(n == o or n.split(":")[0] == o for n in names)]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; expected names or prefixes of {', '.join(names)}")


def run_checks(device, only: Sequence[str] | None = None, bench_seconds: float | None = 10.0,
               on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run every check (or those named in ``only``: full names or prefixes such as ``op``) on
    ``device``; ``bench_seconds=None`` skips the benchmark. ``on_result`` sees each result as it
    comes. Returns one :class:`CheckResult` per check, in table order."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    names = [*CHECKS, "bench"]
    _check_only(only)
    results = []
    no_device = device.type == "cuda" and not torch.cuda.is_available()
    for name in names:
        if only and not any(name == o or name.split(":")[0] == o for o in only):
            res = CheckResult(name, SKIPPED, detail="not selected (--only)")
        elif no_device and name != "env":
            res = CheckResult(name, SKIPPED, detail=f"no CUDA device visible (torch {torch.__version__})")
        elif no_device:
            res = CheckResult(name, FAIL, detail=f"--device {device}: torch.cuda.is_available() is False "
                              f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        elif name == "bench" and bench_seconds is None:
            res = CheckResult(name, SKIPPED, detail="--no-bench")
        elif name == "bench":
            res = _run_one(name, lambda d: bench(d, bench_seconds), device, None)
        else:
            res = _run_one(name, CHECKS[name], device, None)
        if on_result is not None:
            on_result(res)
        results.append(res)
    return results


def _row(r: CheckResult, width: int) -> str:
    secs = f"{r.seconds:6.2f}s" if r.status != SKIPPED else "      -"
    return f"{r.name:<{width}}  {r.status:<7}  {secs}  {r.detail}"


def format_table(results: Sequence[CheckResult]) -> str:
    """The report as a fixed-width table, one line per check, and a last line of counts."""
    width = max(len("check"), *(len(r.name) for r in results))
    lines = [f"{'check':<{width}}  {'status':<7}  {'time':>7}  detail", "-" * (width + 28)]
    lines += [_row(r, width) for r in results]
    n = {s: sum(r.status == s for r in results) for s in (OK, FAIL, SKIPPED)}
    lines.append(f"{n[OK]} ok, {n[FAIL]} FAIL, {n[SKIPPED]} skipped")
    return "\n".join(lines)


def report(results: Sequence[CheckResult], device, argv: Sequence[str] | None = None) -> dict:
    """The JSON report: environment, command, each check, the counts and the exit status."""
    device = torch.device(device)
    try:
        env = environment(device) if device.type != "cuda" or torch.cuda.is_available() else {"device": str(device)}
    except Exception as exc:  # the report is still written
        env = {"device": str(device), "error": _one_line(exc)}
    failed = sum(r.status == FAIL for r in results)
    return {"command": " ".join(["python -m dgl_fast check", *(argv or [])]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": env,
            "checks": [asdict(r) for r in results],
            "counts": {s: sum(r.status == s for r in results) for s in (OK, FAIL, SKIPPED)},
            "exit_status": 1 if failed else 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m dgl_fast check``."""
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to PATH (nothing is "
                   "written without it)")
    p.add_argument("--bench-seconds", type=float, default=10.0, help="seconds of the benchmark (head and step timings)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated checks (or prefixes, e.g. op) to "
                   f"run; the others are reported skipped. Checks: {', '.join([*CHECKS, 'bench'])}")


def run_cli(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the checks of parsed ``args``, print the table (rows as they finish), write ``--json``;
    returns 0 when nothing failed, 1 otherwise, 2 for a bad option."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        print(f"error: argument --device: expected cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: argument --device: expected cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if not args.no_bench and not (args.bench_seconds > 0):
        print(f"error: argument --bench-seconds: expected a number > 0 (or --no-bench), got {args.bench_seconds}",
              file=sys.stderr)
        return 2
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    try:
        _check_only(only)
    except ValueError as exc:
        print(f"error: argument --only: {exc}", file=sys.stderr)
        return 2
    width = max(len(n) for n in [*CHECKS, "bench"])
    print(f"dgl_fast self-check on {device} (torch {torch.__version__}); TF32 off, deterministic cuDNN", flush=True)
    print(f"{'check':<{width}}  {'status':<7}  {'time':>7}  detail", flush=True)
    results = run_checks(device, only, None if args.no_bench else args.bench_seconds,
                         on_result=lambda r: print(_row(r, width), flush=True))
    counts = format_table(results).splitlines()[-1]
    print("-" * (width + 28))
    print(counts)
    rep = report(results, device, argv)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1)
        except OSError as exc:
            print(f"error: argument --json: cannot write {args.json} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    failed = [r.name for r in results if r.status == FAIL]
    print(f"self-check {'FAILED: ' + ', '.join(failed) if failed else 'passed'}")
    return rep["exit_status"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dgl_fast check [options]`` as a function (also ``python -m dgl_fast.selfcheck``)."""
    p = argparse.ArgumentParser(prog="python -m dgl_fast check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(p.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
