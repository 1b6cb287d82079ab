"""Asynchronous DGL on replay buffers: exact reduction to synchronous DGL, the authors' schedule."""

import copy
import math

import pytest
import torch

import dgl_fast
from dgl_fast import data
from helpers import assert_same_state, batches, plain_dgl, sgd, small_model


@pytest.mark.parametrize("K", [1, 2, 4])
def test_capacity_one_fifo_round_robin_is_synchronous_dgl(device, K):
    # float64 and 1e-10: the plain loop runs the heads' reference modules, and on CUDA other kernels
    model = small_model(K, seed=K, dtype=torch.float64)
    data_ = batches(5, dtype=torch.float64)
    expected = plain_dgl(model, data_)
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="async", device=device, buffer_capacity=1,
                               policy="fifo", schedule="round_robin")
    for x, y in data_:
        out = trainer.step(x, y)
    assert out.samples == (6,) * K
    assert_same_state(trainer.model.cpu(), expected, rtol=1e-10, atol=1e-10)


def test_random_schedule_warms_up_then_respects_slowdown():
    K, M = 3, 4
    trainer = dgl_fast.Trainer(small_model(K), optimizer=sgd, mode="async", buffer_capacity=M, slowdown={2: 0.8},
                               seed=0)
    # warm-up: stage 1 fills buffer 1 with M fresh batches, then stage 2 fills buffer 2 from it
    for x, y in batches(M):
        trainer.step(x, y)
    assert trainer.stage_steps == [M, M, 0]
    assert [len(b) for b in trainer.buffers] == [M, M]
    for x, y in batches(300, seed=3):
        trainer.step(x, y)
    s1, s2, s3 = (trainer.stage_steps[0] - M, trainer.stage_steps[1] - M, trainer.stage_steps[2])
    # weights 1 : 0.2 : 1 -> stage 2 runs about a fifth as often as stages 1 and 3
    assert s1 == 300
    assert 0.1 < s2 / s1 < 0.35 and 0.75 < s3 / s1 < 1.3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_max_reuse_skips_turns():
    trainer = dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", buffer_capacity=2, max_reuse=1,
                               schedule="random", slowdown={1: 0.9}, seed=1)
    for x, y in batches(40):
        trainer.step(x, y)
    # stage 2 can never train more often than stage 1 produced batches
    assert trainer.stage_steps[1] <= trainer.stage_steps[0]
    assert trainer.stage_steps[1] >= 2


def test_async_fit_learns_and_reports_per_stage():
    spec = data.load("synthetic", batch_size=32, in_size=8, num_classes=3, synthetic_size=512, seed=0)
    model = dgl_fast.models.build("aux-study", num_classes=3, depth=3, width=8, in_size=8, aux="mlp")
    trainer = dgl_fast.Trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), mode="async",
                               buffer_capacity=3, slowdown={2: 0.1})
    recs = trainer.fit(spec.train, epochs=3, eval_loader=spec.test, progress=False, lr_schedule=lambda e: 0.5 ** e)
    assert len(recs) == 3 and all(n > 0 for n in recs[-1]["stage_samples"])
    assert recs[-1]["test_acc"][-1] > 0.6
    assert not math.isnan(recs[-1]["train_loss"][2])
    # each stage's learning rate follows its own epoch count
    lrs = [trainer.optimizers[j].param_groups[0]["lr"] for j in range(3)]
    assert lrs[0] == pytest.approx(0.05 * 0.25)
    assert all(lr <= 0.05 * 0.5 + 1e-12 for lr in lrs)


def test_async_fixed_batch_size():
    trainer = dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", buffer_capacity=2)
    x, y = batches(1)[0]
    trainer.step(x, y)
    with pytest.raises(ValueError, match="async mode keeps a fixed batch size: expected batches of 6, got 4"):
        trainer.step(x[:4], y[:4])


@pytest.mark.parametrize("policy", ["priority_lifo", "fifo", "uniform"])
@pytest.mark.parametrize("K", [2, 3])
def test_async_graph_path_equals_eager_async(policy, K):
    model = small_model(K, seed=K, dtype=torch.float64)
    data_ = batches(25, dtype=torch.float64, seed=5)
    kw = dict(optimizer=sgd, mode="async", buffer_capacity=3, policy=policy, slowdown={2: 0.5}, seed=7)
    eager = dgl_fast.Trainer(copy.deepcopy(model), **kw)
    graph = dgl_fast.Trainer(copy.deepcopy(model), cuda_graphs="emulate", **kw)
    for x, y in data_:
        a, b = eager.step(x, y), graph.step(x, y)
        assert a.samples == b.samples
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-10, atol=1e-12, equal_nan=True)
        assert torch.equal(a.correct, b.correct)
    assert graph.stage_steps == eager.stage_steps and min(graph.stage_steps) > 2  # every stage replayed
    assert all(st is not None for st in graph.schedule.graphs.stages)
    # the graph path runs the eager step's ops (GraphSGD is torch's SGD): bitwise
    for pa, pb in zip(eager.model.parameters(), graph.model.parameters()):
        assert torch.equal(pa, pb)
    for ba, bb in zip(eager.model.buffers(), graph.model.buffers()):
        assert torch.equal(ba, bb)
    for ra, rb in zip(eager.buffers, graph.buffers):  # the rings: same slots, uses and contents
        assert torch.equal(ra.state, rb.state) and torch.equal(ra.uses, rb.uses) and ra.pushes == rb.pushes
        assert torch.equal(ra.storage, rb.storage)


def test_async_graph_path_follows_per_stage_lr_schedules_and_resets_on_load():
    spec = data.load("synthetic", batch_size=16, in_size=8, num_classes=3, synthetic_size=160, seed=1)

    def make(**kw):
        torch.manual_seed(0)
        model = dgl_fast.models.build("aux-study", num_classes=3, depth=3, width=8, in_size=8, aux="mlp").double()
        return dgl_fast.Trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), mode="async",
                                buffer_capacity=2, slowdown={2: 0.3}, seed=3, **kw)

    def double_batches(loader):
        return [(x.double(), y) for x, y in loader]

    train = double_batches(spec.train)
    eager, graph = make(), make(cuda_graphs="emulate")
    schedule = lambda e: 0.1 ** e  # noqa: E731
    for tr in (eager, graph):
        tr.fit(train, epochs=3, lr_schedule=schedule, progress=False)
    lrs = [[g["lr"] for o in tr.optimizers for g in o.param_groups] for tr in (eager, graph)]
    assert lrs[0] == lrs[1] and min(lrs[0]) < 0.05 * 0.1 + 1e-12
    # the graphs' device learning rates follow the host's
    assert [float(o.lr[0]) for o in graph.schedule.graphs.opts] == lrs[1]
    for pa, pb in zip(eager.model.parameters(), graph.model.parameters()):
        assert torch.equal(pa, pb)  # each learning-rate change re-captured the stage's graph
    graph.load_state_dict(eager.state_dict())  # new optimizer state and buffers: graphs re-capture
    assert all(st is None for st in graph.schedule.graphs.stages)
    # ... after eager warm-up steps in this process, whatever step counts the checkpoint restored
    assert min(graph.stage_steps) > 2 and not any(graph.schedule.graphs.ready(j) for j in range(3))
    graph.step(*train[0])
    assert graph.schedule.graphs.stages[0] is None and graph.schedule.graphs.eager_steps[0] == 1


def test_async_graph_path_bf16_channels_last():
    # autocast and channels_last through the graph path: the same ops as eager, bitwise
    model = small_model(3, seed=3, aux="mlp-sr", fused=True)
    data_ = batches(25, B=16, seed=5)
    kw = dict(optimizer=sgd, mode="async", buffer_capacity=3, slowdown={2: 0.5}, seed=7, amp="bf16",
              channels_last=True)
    eager = dgl_fast.Trainer(copy.deepcopy(model), **kw)
    graph = dgl_fast.Trainer(copy.deepcopy(model), cuda_graphs="emulate", **kw)
    for x, y in data_:
        eager.step(x, y)
        graph.step(x, y)
    assert all(st is not None for st in graph.schedule.graphs.stages) and min(graph.stage_steps) > 2
    for pa, pb in zip(eager.model.parameters(), graph.model.parameters()):
        assert torch.equal(pa, pb)
