"""A step whose loss or gradients are not finite never reaches the weights (dgl_fast/finite.py),
in every mode and schedule (emulated graphs and recorded streams on the CPU), decided on the
device; skipped steps are counted per stage; read_metrics() works on every schedule."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast import data
from dgl_fast.finite import StepGuard, nonfinite
from dgl_fast.stage import StageStep
from dgl_fast.streams import RecordedStreams
from dgl_fast.trainer import TrainingDiverged
from helpers import batches, sgd, small_model

K, B = 3, 5
SYNC = dict(schedule="round_robin", buffer_capacity=1, policy="fifo")  # async that is exactly synchronous DGL
CONFIGS = {
    "dgl": lambda: dict(),
    "sequential": lambda: dict(mode="sequential"),
    "backprop": lambda: dict(mode="backprop"),
    "pipeline": lambda: dict(engine="pipeline"),
    "pipeline-graphs": lambda: dict(engine="pipeline", cuda_graphs="emulate"),
    "async": lambda: dict(mode="async", **SYNC),
    "async-graphs": lambda: dict(mode="async", cuda_graphs="emulate", **SYNC),
    "async-streams": lambda: dict(mode="async", engine="streams", streams=RecordedStreams(), **SYNC),
    "async-streams-graphs": lambda: dict(mode="async", engine="streams", streams=RecordedStreams(),
                                         cuda_graphs="emulate", **SYNC),
}
# the authors' random schedule: several runs of a stage per step, buffers holding more than one batch
RANDOM = {"async-random": lambda: dict(mode="async", buffer_capacity=2, slowdown={2: 0.5})}
# the stages each configuration trains on a batch (and so skips on a poisoned one)
TRAINED = {"sequential": [1, 0, 0], "backprop": [0, 0, 1]}
STEPWISE = ("dgl", "sequential", "backprop", "async", "async-graphs")  # a step trains only on its own batch


class Poison(nn.Module):
    """Adds its buffer (0, or NaN when armed) to its input: a stage that turns non-finite on demand."""

    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.zeros(()))

    def forward(self, h):
        return h + self.value


def _model(seed=0):
    model = small_model(K, seed=seed)
    model.stages[1].insert(0, Poison())
    return model


def _trainer(model, name, optimizer=sgd):
    return dgl_fast.Trainer(copy.deepcopy(model), optimizer=optimizer, **{**CONFIGS, **RANDOM}[name]())


def _state(tr):
    """Every model tensor and optimizer state tensor, cloned, by stage."""
    model = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opts = [{(i, k): v.clone() for i, s in o.state_dict()["state"].items() for k, v in s.items()
             if isinstance(v, torch.Tensor)} for o in tr.optimizers]
    return model, opts


def _stage_keys(j):
    return (f"stages.{j}.", f"heads.{j}.")


def _same(a, b, keys=("",)) -> bool:
    """Whether the model tensors of states ``a`` and ``b`` whose names start with ``keys`` are bitwise equal."""
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0] if k.startswith(keys))


def _assert_equal_states(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert [o.keys() for o in oa] == [o.keys() for o in ob]
    for x, y in zip(oa, ob):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _poisoned(x, value):
    x = x.clone()
    x[2, 1, 3, 4] = value
    return x


@pytest.mark.parametrize("name,value", [(n, math.nan) for n in CONFIGS]
                         + [(n, math.inf) for n in ("dgl", "backprop", "pipeline-graphs", "async-streams-graphs")])
@pytest.mark.parametrize("host_branch", [True, False], ids=["host-branch", "device-branch"])
def test_a_poisoned_batch_is_skipped_and_training_goes_on_as_without_it(name, value, host_branch, monkeypatch):
    # the CPU's host branch (the default here) and the device branch CUDA takes, each on every schedule
    monkeypatch.setattr(StepGuard, "host_branch", host_branch)
    model = _model(seed=1)
    a, b = _trainer(model, name), _trainer(model, name)
    clean = batches(9, B=B, seed=2)
    for x, y in clean[:5]:  # past every warm-up: graphs are captured by now
        a.step(x, y)
        b.step(x, y)
    before = _state(a)
    x, y = clean[5]
    out = a.step(_poisoned(x, value), y)
    trained = TRAINED.get(name, [1] * K)
    if name in STEPWISE:  # every stage that trained on it skipped: nothing of the step remains
        assert out.skipped.tolist() == trained
        assert not all(math.isfinite(v) for v, t in zip(out.losses.tolist(), trained) if t)
        _assert_equal_states(_state(a), before)
    for x, y in clean[5:]:
        a.step(x, y)
        b.step(x, y)
    a.flush()
    b.flush()
    _assert_equal_states(_state(a), _state(b))  # bitwise the run that never saw the batch
    assert a.read_metrics().skipped == trained and b.read_metrics().skipped == [0] * K


@pytest.mark.parametrize("name", ["dgl", "pipeline", "pipeline-graphs", "async", "async-graphs", "async-streams"])
def test_a_stage_turning_non_finite_skips_and_the_stages_before_it_train(name):
    tr = _trainer(_model(seed=3), name)
    poison = tr.model.stages[1][0]
    for x, y in batches(5, B=B, seed=4):
        tr.step(x, y)
    tr.read_metrics()  # reset
    before = _state(tr)
    x, y = batches(1, B=B, seed=5)[0]
    poison.value.fill_(math.nan)
    tr.step(x, y)
    poison.value.fill_(0.0)
    after = _state(tr)  # (no flush: the pipeline's drain would train stage 2 on the batches in flight)
    assert not _same(after, before, _stage_keys(0))  # stage 1's loss was finite: it trained
    assert _same(after, before, _stage_keys(1))  # stage 2's was not: bitwise as before
    assert torch.equal(after[1][1][(0, "momentum_buffer")], before[1][1][(0, "momentum_buffer")])
    if name != "pipeline" and name != "pipeline-graphs":  # in the pipeline stage 3 had another batch this tick
        assert _same(after, before, _stage_keys(2))
    for x, y in batches(2, B=B, seed=6):  # stage 2's NaN output reaches stage 3 at the next tick
        tr.step(x, y)
    tr.flush()
    assert tr.read_metrics().skipped == [0, 1, 1]
    assert all(bool(v.isfinite().all()) for v in tr.model.state_dict().values() if v.is_floating_point())


_SYNCS = ("item", "tolist", "__bool__", "__float__")


@pytest.mark.parametrize("name", [*CONFIGS, *RANDOM])
def test_the_guard_adds_no_host_sync(name, monkeypatch):
    # the device branch (CUDA's): on the CPU the guard reads its flag on the host, which syncs nothing there
    monkeypatch.setattr(StepGuard, "host_branch", False)
    tr = _trainer(_model(seed=7), name)
    clean = batches(6, B=B, seed=8)
    armed = [False]

    def refuse(op, orig):
        def f(self, *a, **k):
            if armed[0]:
                raise AssertionError(f"Tensor.{op} (a host sync) inside the step")
            return orig(self, *a, **k)
        return f
    for op in _SYNCS:
        monkeypatch.setattr(torch.Tensor, op, refuse(op, getattr(torch.Tensor, op)))
    for i, (x, y) in enumerate(clean):
        x, y = tr.prepare_batch(_poisoned(x, math.nan) if i == 4 else x, y)
        tr.set_train_modes()
        armed[0] = True
        try:
            tr.schedule.feed(x, y, [s for s, _ in tr.batches.stage_shapes[:-1]]) if tr.mode == "async" \
                else tr.schedule.feed(x, y)
        finally:
            armed[0] = False
    tr.flush()
    assert sum(tr.read_metrics().skipped) >= 1


def _loader(seed=0, n=25):
    g = torch.Generator().manual_seed(seed)
    loader = data.TensorLoader(torch.randn(n, 3, 9, 9, generator=g), torch.randint(0, 5, (n,), generator=g),
                               batch_size=B, shuffle=False, seed=seed)
    loader.x[12, 0, 4, 4] = math.nan
    return loader


@pytest.mark.parametrize("name", ["dgl", "backprop", "pipeline-graphs", "async", "async-streams"])
def test_fit_still_stops_at_its_next_read(name):
    tr = _trainer(_model(seed=9), name)
    with pytest.raises(TrainingDiverged, match=r"loss became nan .* step\(s\) with a non-finite loss or gradients "
                                               r"were skipped"):
        tr.fit(_loader(), epochs=1, progress=False, log_every=2)
    assert all(bool(v.isfinite().all()) for v in tr.model.state_dict().values() if v.is_floating_point())


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)


def _nesterov(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("optimizer", [_adam, _nesterov, sgd])
@pytest.mark.parametrize("host_branch", [True, False], ids=["host-branch", "device-branch"])
def test_any_optimizer_is_protected_even_at_its_first_step(optimizer, first, host_branch, monkeypatch):
    monkeypatch.setattr(StepGuard, "host_branch", host_branch)
    model = _model(seed=10)
    a, b = _trainer(model, "dgl", optimizer), _trainer(model, "dgl", optimizer)
    clean = batches(4, B=B, seed=11)
    if not first:
        a.step(*clean[0])
        b.step(*clean[0])
    before = _state(a)
    out = a.step(_poisoned(clean[1][0], math.inf), clean[1][1])
    assert out.skipped.tolist() == [1] * K
    after = _state(a)
    assert _same(after, before)
    if not first:  # the state tensors there were left as they were
        _assert_equal_states(after, before)
    for x, y in clean[1:]:  # a first step skipped leaves zero state: it trains as a fresh one
        a.step(x, y)
        b.step(x, y)
    _assert_equal_states(_state(a), _state(b))


def test_nonfinite_flag_and_guard_directly():
    g = [torch.randn(3, 4).t(), torch.randn(5, dtype=torch.float64)]  # a non-contiguous one, two dtypes
    loss = torch.tensor(1.5)
    assert not bool(nonfinite(loss, g)) and bool(nonfinite(torch.tensor(math.inf), g))
    g[1][3] = math.nan
    kept = g[1].clone()
    assert bool(nonfinite(loss, g)) and torch.equal(g[1][:3], kept[:3])  # gradients left as they were
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([lin])
    w = lin.weight.detach().clone()
    lin(torch.randn(2, 4)).sum().backward()
    bad = guard.step(opt, torch.tensor(math.nan), opt.step, guard.begin())
    assert bool(bad) and torch.equal(lin.weight, w)
    assert torch.count_nonzero(opt.state[lin.weight]["momentum_buffer"]) == 0  # made by the skipped step: zero


@pytest.mark.parametrize("host_branch", [True, False], ids=["host-branch", "device-branch"])
def test_the_flag_reads_the_gradients_the_step_used(host_branch, monkeypatch):
    monkeypatch.setattr(StepGuard, "host_branch", host_branch)
    # the distributed runner averages replicas' gradients in a step pre-hook: another replica's NaN
    # arriving there must skip this replica's step too, although its own loss and gradients were finite
    tr = _trainer(_model(seed=16), "dgl")
    armed = [False]

    def averaged(opt, args, kwargs):
        if armed[0]:
            next(p for g in opt.param_groups for p in g["params"] if p.grad is not None).grad[0] = math.nan
    tr.optimizers[0].register_step_pre_hook(averaged)
    (x, y), (x2, y2) = batches(2, B=B, seed=17)
    tr.step(x, y)
    before = _state(tr)
    armed[0] = True
    out = tr.step(x2, y2)
    assert out.skipped.tolist() == [1, 0, 0] and all(math.isfinite(v) for v in out.losses.tolist())
    assert _same(_state(tr), before, _stage_keys(0)) and not _same(_state(tr), before, _stage_keys(1))


def test_the_loss_scaler_path_skips_and_counts_too():
    # fp16's path (a GradScaler per stage; CUDA in the trainer) with torch's CPU scaler
    model = _model(seed=14)
    opt = sgd(model.stage_parameters(0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = StageStep(0, model.stages[0], model.heads[0], opt, torch.device("cpu"), scaler=scaler)
    (x, y), (x2, y2) = batches(2, B=B, seed=15)
    step.step(x, y)
    w, buf = model.stages[0][0].weight.detach().clone(), opt.state[model.stages[0][0].weight]["momentum_buffer"].clone()
    step.step(_poisoned(x2, math.nan), y2)
    assert bool(step.skipped) and scaler.get_scale() == 2.0 ** 9  # the scaler saw it too and backed off
    assert torch.equal(model.stages[0][0].weight, w)
    assert torch.equal(opt.state[model.stages[0][0].weight]["momentum_buffer"], buf)
    step.step(x2, y2)
    assert not bool(step.skipped) and not torch.equal(model.stages[0][0].weight, w)


# ---------------------------------------------------------------- read_metrics on every schedule

def _per_step_sums(outs):
    loss, hits, n, skipped = [0.0] * K, [0] * K, [0] * K, [0] * K
    for out in outs:
        for j in range(K):
            if out.samples[j]:
                loss[j] += out.losses[j].item() * out.samples[j]
                hits[j] += int(out.correct[j])
                n[j] += out.samples[j]
                skipped[j] += int(out.skipped[j])
    return [t / k if k else math.nan for t, k in zip(loss, n)], hits, n, skipped


# schedules without per-step metrics are held to their eager twin's per-step outputs
_TWIN = {"pipeline-graphs": "pipeline", "async-streams": "async", "async-streams-graphs": "async-graphs"}


@pytest.mark.parametrize("name", [*CONFIGS, *RANDOM])
def test_read_metrics_on_every_schedule_equals_the_per_step_outputs(name):
    model = _model(seed=12)
    tr = _trainer(model, name)
    ref = _trainer(model, _TWIN.get(name, name))
    data_ = batches(7, B=B, seed=13)
    data_[5] = (_poisoned(data_[5][0], math.nan), data_[5][1])
    outs = []
    for x, y in data_:
        tr.step(x, y)
        outs.append(ref.step(x, y))
    # no flush: the pipeline's drain ticks return no per-step outputs (pipelined read_metrics does not drain)
    got, want = tr.read_metrics(reset=False), _per_step_sums(outs)
    assert _close(got, want) and got.skipped == want[3], (got, got.skipped, want)
    assert sum(want[3]) >= 1
    tr.read_metrics()
    assert tr.read_metrics()[2] == [0] * K  # reset


def _close(got, want):
    # NaN where a stage's sum holds the poisoned step; float32 means of several runs (async random) to 1e-6
    same_nan = [math.isnan(a) == math.isnan(b) for a, b in zip(got[0], want[0])]
    close = [math.isnan(a) or math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got[0], want[0])]
    return all(same_nan) and all(close) and list(got[1]) == list(want[1]) and list(got[2]) == list(want[2])


def test_the_host_branch_copies_no_parameter_and_never_runs_a_skipped_step(monkeypatch):
    """On the CPU the guard neither copies parameters nor optimizer state (the cost that doubled a
    VGG step), and a skipped step never runs: a skipped first step creates no optimizer state; an
    optimizer whose step bypasses its pre-hooks is refused rather than left unguarded."""
    lin = nn.Linear(5, 3).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([lin])
    clones = []
    orig = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or orig(t, *a, **k))
    x = torch.randn(7, 5, dtype=torch.float64)
    lin(x).sum().backward()
    lin.weight.grad[1, 2] = math.nan
    w = lin.weight.detach().numpy().copy()
    bad = guard.step(opt, torch.tensor(1.0), opt.step, guard.begin(), host=True)
    assert bool(bad) and (lin.weight.detach().numpy() == w).all() and not opt.state  # nothing ran
    assert clones == [], clones
    lin.weight.grad[1, 2] = 0.5
    assert not bool(guard.step(opt, torch.tensor(1.0), opt.step, guard.begin(), host=True))
    assert "momentum_buffer" in opt.state[lin.weight] and not (lin.weight.detach().numpy() == w).all()

    class Bypass(torch.optim.SGD):
        pass
    bypass = Bypass(lin.parameters(), lr=0.1)
    monkeypatch.setattr(Bypass, "step", lambda self, closure=None: None)  # replaced after torch wrapped it
    with pytest.raises(RuntimeError, match="ran without its step pre-hooks"):
        guard.step(bypass, torch.tensor(1.0), bypass.step, guard.begin(), host=True)
