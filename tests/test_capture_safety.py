"""The capture-safety watch of emulated CUDA graphs: every unsafe class is refused with a one-line
message naming the op, the stage and the fix; legitimate steps pass; storage replaced after
capture is refused; the parity graphs of a pipelined stage share one memory pool."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast.schedules import CaptureUnsafeError, CaptureWatch, capture
from helpers import batches, sgd, small_model


class ArmedHead(nn.Module):
    """A head that runs ``act(self, h)`` in its forward once armed (after the eager warm-up)."""

    def __init__(self, head: nn.Module, act):
        super().__init__()
        self.head, self.act, self.armed = head, act, False
        self.register_buffer("table", torch.randn(7))
        self.loose = torch.randn(7)  # a plain attribute: not moved by .to(device), not a buffer

    def forward(self, h):
        if self.armed:
            h = self.act(self, h)
        return self.head(h)


def _model(act, K=2, armed_stage=1, seed=3, **kw):
    model = small_model(K, seed=seed, **kw)
    model.heads[armed_stage] = ArmedHead(model.heads[armed_stage], act)
    return model


def _trainer(model, engine, cuda_graphs="emulate", **kw):
    if engine == "async":
        return dgl_fast.Trainer(model, optimizer=sgd, mode="async", buffer_capacity=1, schedule="round_robin",
                                cuda_graphs=cuda_graphs, seed=1, **kw)
    return dgl_fast.Trainer(model, optimizer=sgd, engine="pipeline", cuda_graphs=cuda_graphs, **kw)


def _run_armed(tr, armed_stage=1, n=8):
    data = batches(n, seed=4)
    # armed once the graphs exist: pipeline 3 eager ticks, then the capture (after an eager drain)
    # and its first graph tick; async (round robin) 2 eager steps per stage, then each captures
    warm = 2 if tr.mode == "async" else 4
    for x, y in data[:warm]:
        tr.step(x, y)
    tr.model.heads[armed_stage].armed = True
    for x, y in data[warm:]:
        tr.step(x, y)
    tr.flush()


def _item(self, h):
    return h * (h.mean().item() > -1e9)


STAGE2 = r"^stage 2's CUDA graph step is not capture-safe: "
FIX = r", or use cuda_graphs=False$"


@pytest.mark.parametrize("engine,kw", [("pipeline", {}), ("async", {}), ("pipeline", {"devices": ["cpu", "cpu"]})])
def test_item_in_a_head_is_refused_with_op_stage_and_fix(engine, kw):
    with pytest.raises(CaptureUnsafeError) as err:
        _run_armed(_trainer(_model(_item), engine, **kw))
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, RuntimeError)
    assert msg.startswith("stage 2's CUDA graph step is not capture-safe: aten._local_scalar_dense: .item()")
    assert msg.endswith("; move .item() out of the stage step, or use cuda_graphs=False")
    # the eager pipeline runs the same head: the watch refused it, nothing else did
    _run_armed(_trainer(_model(_item), engine, cuda_graphs=False, **kw))


def _backward_item(self, h):
    class Sync(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * (g.abs().sum().item() >= 0)

    return Sync.apply(h)


def _cuda_event(self, h):
    torch.cuda.Event().record()
    return h


def _cuda_stream(self, h):
    with torch.cuda.stream(object()):
        return h * 1


def _cpu_stream(self, h):
    h.record_stream(torch.Stream("cpu"))
    return h


def _generator(self, h):
    g = torch.Generator().manual_seed(0)
    return h * torch.rand(h.shape, generator=g)


def _to_meta(self, h):
    h.to("meta")
    return h


def _copy_loose(self, h):
    buf = torch.empty_like(self.loose)
    buf.copy_(self.loose)
    return h + buf.sum() * 0


UNSAFE = {  # the action, what the message must name, the fix it must give; all run eagerly on the CPU
    "item": (_item, r"aten\._local_scalar_dense", r"move \.item\(\) out of the stage step"),
    "bool": (lambda s, h: h * bool(h.sum() > -1e9), r"aten\._local_scalar_dense|aten\.is_nonzero", ""),
    "nonzero": (lambda s, h: h + h.flatten().nonzero().sum() * 0, r"aten\.nonzero", "nonzero_static"),
    "where1": (lambda s, h: h + torch.where(h.flatten() > 0)[0].sum() * 0, r"aten\.nonzero", ""),
    "equal": (lambda s, h: h * torch.equal(h, h), r"aten\.equal", ""),
    "mask index": (lambda s, h: h + h[h > 0].sum() * 0, r"aten\.index with a boolean mask", "torch.where"),
    "unique": (lambda s, h: h + torch.unique(h.detach()).sum() * 0, r"unique", ""),
    "backward sync": (_backward_item, r"aten\._local_scalar_dense", ""),
    "cpu": (lambda s, h: h.cpu(), r"Tensor\.cpu\(\) \(a copy to the host", ""),
    "tolist": (lambda s, h: h + 0 * len(h.tolist()), r"Tensor\.tolist\(\)", ""),
    "numpy": (lambda s, h: h + 0 * float(h.detach().numpy().sum()), r"Tensor\.numpy\(\)", ""),
    "print": (lambda s, h: h + 0 * len(repr(h)), r"printing a tensor", ""),
    "torch.tensor": (lambda s, h: h * torch.tensor([1.0, 1.0])[0], r"torch\.tensor\(\.\.\.\)", "registered buffer"),
    "as_tensor": (lambda s, h: h * torch.as_tensor([1.0])[0], r"torch\.as_tensor", ""),
    "from_numpy": (lambda s, h: h * torch.from_numpy(np.ones(1, dtype=np.float32))[0], r"torch\.from_numpy", ""),
    "copy from loose": (_copy_loose, r"aten\.copy_ from a tensor the step does not own", "register it as a buffer"),
    "generator": (_generator, r"aten\.rand with an explicit generator=", r"drop generator="),
    "manual_seed": (lambda s, h: (torch.manual_seed(0), h)[1], r"torch\.manual_seed\(\)", ""),
    "cross-device": (_to_meta, r"aten\._to_copy from cpu to meta \(a copy across devices\)", ""),
    "record_stream": (_cpu_stream, r"aten\.record_stream", "capture stream"),
}
CUDA_ONLY = {  # Python calls that fail eagerly without a GPU: refused before torch.cuda is reached
    "event record": (_cuda_event, r"torch\.cuda\.Event\.record\(\)", "event records"),
    "stream switch": (_cuda_stream, r"torch\.cuda\.stream\(\.\.\.\) \(a stream switch\)", "capture stream"),
    "synchronize": (lambda s, h: (torch.cuda.synchronize(), h)[1], r"torch\.cuda\.synchronize\(\)", ""),
}


@pytest.mark.parametrize("name", sorted({**UNSAFE, **CUDA_ONLY}))
def test_each_unsafe_class_is_refused(name):
    act, what, fix = {**UNSAFE, **CUDA_ONLY}[name]
    with pytest.raises(CaptureUnsafeError, match=STAGE2 + ".*" + what + ".*" + fix + ".*" + FIX) as err:
        _run_armed(_trainer(_model(act), "pipeline"))
    assert "\n" not in str(err.value)
    if name in UNSAFE and name != "record_stream":  # the same step runs eagerly (record_stream has no CPU kernel)
        _run_armed(_trainer(_model(act), "pipeline", cuda_graphs=False))


def test_async_schedule_refuses_too():
    with pytest.raises(CaptureUnsafeError, match=STAGE2 + r"torch\.tensor"):
        _run_armed(_trainer(_model(UNSAFE["torch.tensor"][0]), "async"))


def _dropout_default_generator(self, h):
    return torch.nn.functional.dropout(h, 0.3, training=True)


def _copy_buffer(self, h):
    buf = torch.empty_like(self.table)
    buf.copy_(self.table)  # a registered buffer: the graph owns it
    h2 = torch.empty_like(h)
    h2.copy_(h * 2)  # made inside the step
    return h2 * 0.5 + buf.sum() * 0 + torch.full((), 0.0) + torch.zeros(1).sum()


@pytest.mark.parametrize("act", [_dropout_default_generator, _copy_buffer])
def test_safe_steps_pass_and_equal_the_eager_pipeline(act):
    # dropout with the default generator (a capture registers it), copies from owned or fresh
    # tensors, scalar factories: legitimate; the emulated graph path is bitwise the eager one
    runs = []
    for graphs in ("emulate", False):
        tr = _trainer(_model(act, K=3, seed=5), "pipeline", cuda_graphs=graphs)
        torch.manual_seed(11)
        _run_armed(tr, n=9)
        runs.append(tr)
    assert runs[0].schedule.graph_state is not None and runs[0].schedule.captures == 1
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def _graph_trainer(engine="pipeline", K=3):
    tr = _trainer(small_model(K, seed=7), engine)
    for x, y in batches(4, seed=2):
        tr.step(x, y)
    tr.flush()
    return tr


@pytest.mark.parametrize("engine", ["pipeline", "async"])
@pytest.mark.parametrize("what", ["parameter", "momentum", "buffer"])
def test_storage_replaced_after_capture_is_refused(engine, what):
    tr = _graph_trainer(engine)
    assert (tr.schedule.graph_state is not None) if engine == "pipeline" else tr.schedule.graphs.stages[1] is not None
    x, y = batches(1, seed=9)[0]
    stage = tr.model.stages[1]
    conv, bn = stage[0], stage[1]
    opt = tr.optimizers[1]
    # in-place updates keep the storage: fine
    with torch.no_grad():
        conv.weight.mul_(1.0)
        opt.state[conv.weight]["momentum_buffer"].mul_(1.0)
    tr.step(x, y)
    tr.flush()
    if what == "parameter":
        conv.weight.data = conv.weight.data.clone()
        expected = r"parameter stage\.0\.weight moved to other memory between capture and replay"
    elif what == "momentum":
        opt.state[conv.weight]["momentum_buffer"] = opt.state[conv.weight]["momentum_buffer"].clone()
        expected = r"optimizer state 'momentum_buffer' of stage\.0\.weight moved to other memory"
    else:
        bn.running_var = bn.running_var.double()
        expected = r"buffer stage\.1\.running_var changed from \[6\] torch\.float32 to \[6\] torch\.float64"
    with pytest.raises(CaptureUnsafeError, match=STAGE2 + expected + r".*update it in place \(\.copy_\(\)\)"):
        for _ in range(3):
            tr.step(x, y)


def test_static_tensor_replaced_is_refused():
    tr = _graph_trainer("async")
    st = tr.schedule.graphs.stages[2]
    st.x = st.x.clone()
    x, y = batches(1, seed=9)[0]
    with pytest.raises(CaptureUnsafeError, match=r"^stage 3's CUDA graph step .*static input moved to other memory"):
        for _ in range(3):
            tr.step(x, y)


def test_parity_graphs_of_a_stage_share_one_pool():
    tr = _graph_trainer("pipeline", K=3)
    st = tr.schedule.graph_state
    pools = [[g.pool for g in s.graphs] for s in st]
    for j, (p0, p1) in enumerate(pools):
        assert p0 is not None and p0 is p1, f"stage {j + 1}"
    assert len({id(p[0]) for p in pools}) == 3  # stages run concurrently: one pool each


def test_watch_is_off_outside_the_region_and_restores_torch():
    originals = (torch.Tensor.cpu, torch.tensor, torch.cuda.Event.record, torch.cuda.StreamContext.__enter__)
    assert "cpu" not in torch.Tensor.__dict__
    with pytest.raises(CaptureUnsafeError):
        _run_armed(_trainer(_model(_item), "pipeline"))
    assert (torch.Tensor.cpu, torch.tensor, torch.cuda.Event.record, torch.cuda.StreamContext.__enter__) == originals
    assert "cpu" not in torch.Tensor.__dict__
    t = torch.randn(3)
    assert t.cpu() is t and torch.tensor([1.0]).item() == 1.0 and len(repr(t)) > 0


def test_capture_watch_directly_with_statics_and_pool():
    w = torch.randn(5, 3, requires_grad=True)
    x, out = torch.randn(4, 5), torch.empty(4, 3)
    pool = object()

    def body(x, out):
        out.copy_(x @ w)

    g = capture(body, x, out, device=torch.device("cpu"), emulate=True, pool=pool,
                watch=CaptureWatch(0, torch.device("cpu"), statics={"input": x, "output": out}))
    assert g.pool is pool
    g.replay()
    torch.testing.assert_close(out, x @ w, rtol=0, atol=0)
    x.data = torch.randn(4, 5)
    with pytest.raises(CaptureUnsafeError, match=r"^stage 1's CUDA graph step .*static input moved to other memory"):
        g.replay()
    # without a watch given: the ops are still checked (no stage named)
    g2 = capture(lambda: w.sum().item(), device=torch.device("cpu"), emulate=True)
    with pytest.raises(CaptureUnsafeError, match=r"^a CUDA graph step is not capture-safe: aten\._local_scalar_dense"):
        g2.replay()
