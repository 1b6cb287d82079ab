"""Async DGL's free-running stage streams, checked on the CPU: RecordedStreams runs the streams
engine's code and records the order a GPU would enforce (a vector clock per stream)."""

import copy
import itertools
import math

import pytest
import torch

import dgl_fast
from dgl_fast.streams import RecordedStreams
from helpers import batches, sgd, small_model

hb = RecordedStreams.happens_before


def _free(model, rec, graphs, **kw):
    return dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="async", engine="streams", streams=rec,
                            cuda_graphs=graphs, **kw)


def _steps(rec, j):
    return [m for m in rec.marks if m.what == ("step", j)]


def test_recorded_streams_vector_clocks():
    rec = RecordedStreams()
    a, b = rec.new_stream(), rec.new_stream()
    ev = rec.new_event()
    with rec.use(a):
        rec.mark("a1")
        rec.record(ev)
        rec.mark("a2")
    with rec.use(b):
        rec.mark("b0")
        rec.wait_event(b, ev)
        rec.mark("b1")
    rec.wait_stream(rec.current(), b)
    rec.mark("c")
    m = {x.what: x for x in rec.marks}
    assert hb(m["a1"], m["b1"]) and not hb(m["a2"], m["b1"]) and not hb(m["a1"], m["b0"])
    assert hb(m["b1"], m["c"]) and hb(m["a1"], m["c"]) and not hb(m["a2"], m["c"])
    assert not hb(m["b1"], m["a2"])


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("schedule,K", [("round_robin", 3), ("random", 3), ("random", 4)])
def test_free_running_streams_equal_async_in_turn(graphs, schedule, K):
    # the same parameters (bitwise) and per-stage metrics as the async trainer that runs every
    # stage step in turn on one stream; with graphs=True through the emulated CUDA-graph path
    model = small_model(K, seed=K, dtype=torch.float64)
    data = batches(30, dtype=torch.float64, seed=4)
    kw = dict(buffer_capacity=3, schedule=schedule, slowdown={2: 0.5}, seed=2)
    ref = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="async", **kw)
    rec = RecordedStreams()
    free = _free(model, rec, graphs, **kw)
    assert free.cuda_graphs == graphs
    loss_sum, hits = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.long)
    for x, y in data:
        a, b = ref.step(x, y), free.step(x, y)
        assert b.losses is None and b.correct is None and a.samples == b.samples
        loss_sum += torch.nan_to_num(a.losses).double() * torch.tensor(a.samples, dtype=torch.float64)
        hits += a.correct
    assert free.stage_steps == ref.stage_steps and min(ref.stage_steps) > 3
    if graphs:
        assert all(st is not None for st in free.schedule.graphs.stages)  # every stage replayed its graph
    for pa, pb in zip(ref.model.state_dict().values(), free.model.state_dict().values()):
        assert torch.equal(pa, pb)
    means, correct, samples = free.read_metrics()
    assert samples == [6 * n for n in ref.stage_steps] and correct == hits.tolist()
    # StepOutput averages a stage's runs within a step in float32 (random schedule): rounding 2^-24
    rel = 1e-12 if schedule == "round_robin" else 4 * 2**-24
    assert means == pytest.approx((loss_sum / torch.tensor(samples)).tolist(), rel=rel)
    assert free.read_metrics()[2] == [0] * K  # reset


@pytest.mark.parametrize("graphs", [False, True])
def test_free_running_order(graphs):
    K, M = 3, 2
    rec = RecordedStreams()
    tr = _free(small_model(K, seed=1), rec, graphs, buffer_capacity=M, schedule="round_robin")
    n = 8
    for x, y in batches(n):
        tr.step(x, y)
    steps = [_steps(rec, j) for j in range(K)]
    assert [len(s) for s in steps] == [n] * K
    # each stage runs on its own stream, and its steps follow one another there
    assert len({s[0].stream for s in steps}) == K
    # free-running: stage 1's next step never waits for the previous step's later stages (the old
    # protocol joined every stage into the caller's stream at the end of each step)
    for t in range(n - 1):
        for j in range(1, K):
            assert not hb(steps[j][t], steps[0][t + 1]), (j, t)
    # ... while stage j's step t does follow stage j-1's step t, whose output it trains on
    for t, j in itertools.product(range(n), range(1, K)):
        assert hb(steps[j - 1][t], steps[j][t])

    # the replay buffers: every operation follows the buffer's previous one (a sample never reads a
    # slot being written; a push never overwrites a slot being read)
    for buf in tr.buffers:
        ops = [m for m in rec.marks if isinstance(m.what, tuple) and m.what[0] is buf]
        assert {m.what[1] for m in ops} == {"push", "sample"}
        for a, b in zip(ops, ops[1:]):
            assert hb(a, b)

    # the caller joins at flush: what it does next sees every stage's work ...
    tr.flush()
    rec.mark("caller")
    caller = rec.marks[-1]
    assert all(hb(m, caller) for m in rec.marks[:-1])
    # ... and the stages' next steps wait for it (evaluation, a new learning rate, a load)
    for x, y in batches(2, seed=5):
        tr.step(x, y)
    later = [m for m in rec.marks[rec.marks.index(caller) + 1:] if m.what[0] == "step"]
    assert len(later) == 2 * K and all(hb(caller, m) for m in later)


def test_evaluate_and_read_metrics_join_the_stages():
    K = 3
    rec = RecordedStreams()
    tr = _free(small_model(K, seed=2), rec, False, buffer_capacity=2, schedule="round_robin")
    for x, y in batches(4):
        tr.step(x, y)
    acc = tr.evaluate(batches(1, seed=9))
    assert len(acc) == K
    rec.mark("after-eval")
    assert all(hb(m, rec.marks[-1]) for m in rec.marks[:-1])
    _, _, samples = tr.read_metrics()
    assert samples == [24] * K


def test_streams_backend_is_checked():
    with pytest.raises(ValueError, match="streams= sets the stream backend of mode='async' on engine='streams'"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="dgl", streams=RecordedStreams())
    with pytest.raises(TypeError, match="streams must be a dgl_fast.streams.CudaStreams or RecordedStreams"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", engine="streams", streams="cuda")
    tr = dgl_fast.Trainer(small_model(2), optimizer=sgd)  # every schedule reads metrics (tests/test_nonfinite.py)
    m = tr.read_metrics()
    assert m[1:] == ([0, 0], [0, 0]) and m.skipped == [0, 0] and all(math.isnan(v) for v in m[0])


def test_train_modes_are_set_once_not_per_step():
    tr = dgl_fast.Trainer(small_model(2, seed=3), optimizer=sgd)
    calls = []
    train = tr.model.train
    tr.model.train = lambda mode=True: (calls.append(mode), train(mode))[1]
    data = batches(3)
    for x, y in data:
        tr.step(x, y)
    assert calls.count(True) == 1
    tr.evaluate(data)  # puts the model in eval mode, then restores the modes it found
    tr.step(*data[0])
    assert calls.count(True) == 1
    tr.model.eval()  # the user put the model in eval mode: the next step trains it again
    tr.step(*data[0])
    assert calls.count(True) == 2 and tr.model.training and tr.model.stages[0][1].training
