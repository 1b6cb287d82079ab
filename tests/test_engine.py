"""Stage engines: the pipelined schedule reproduces the sequential trainer; streams and CUDA
graphs (GPU) do too; bad settings give clear errors."""

import copy
import math

import pytest
import torch

import dgl_fast
from dgl_fast.schedules import GraphSGD
from helpers import assert_same_state, batches, sgd, small_model


def _run(model, data, **kw):
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, **kw)
    outs = [trainer.step(x, y) for x, y in data]
    trainer.flush()
    return trainer, outs


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_pipeline_equals_sequential_exactly(K, fused):
    model = small_model(K, seed=K, aux="mlp-sr", fused=fused)
    data = batches(7)  # more batches than stages, and not a multiple of K
    seq, seq_outs = _run(model, data, engine="sequential")
    pipe, pipe_outs = _run(model, data, engine="pipeline")
    assert_same_state(pipe.model, seq.model, rtol=0, atol=0)
    assert pipe.stage_steps == seq.stage_steps == [7] * K
    # tick t trains stage j on batch t - j: its loss is the sequential loss of that batch
    for t, out in enumerate(pipe_outs):
        for j in range(K):
            b = t - j
            if b >= 0:
                torch.testing.assert_close(out.losses[j], seq_outs[b].losses[j], rtol=0, atol=0)
                assert out.samples[j] == 6
            else:
                assert math.isnan(out.losses[j]) and out.samples[j] == 0


def test_pipeline_partial_batch_and_optimizer_state():
    model = small_model(3, seed=1)
    data = batches(5) + [(x[:4], y[:4]) for x, y in batches(1, seed=9)]  # a partial last batch
    seq, _ = _run(model, data, engine="sequential")
    pipe, _ = _run(model, data, engine="pipeline")
    assert_same_state(pipe.model, seq.model, rtol=0, atol=0)
    for a, b in zip(pipe.optimizers, seq.optimizers):
        for p_a, p_b in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            torch.testing.assert_close(a.state[p_a]["momentum_buffer"], b.state[p_b]["momentum_buffer"], rtol=0, atol=0)


def test_pipeline_fit_matches_sequential_fit_across_lr_changes():
    from dgl_fast import data

    spec = data.load("synthetic", batch_size=32, in_size=8, num_classes=3, synthetic_size=200, seed=0)
    model = dgl_fast.models.build("aux-study", num_classes=3, depth=3, width=8, in_size=8, aux="mlp")
    runs = {}
    for engine in ("sequential", "pipeline"):
        tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine=engine)
        recs = tr.fit(spec.train, epochs=3, lr_schedule=lambda e: 0.5 ** e, eval_loader=spec.test, progress=False)
        runs[engine] = (tr, recs)
    (seq, rs), (pipe, rp) = runs["sequential"], runs["pipeline"]
    assert_same_state(pipe.model, seq.model, rtol=0, atol=0)
    for a, b in zip(rs, rp):
        assert a["lr"] == b["lr"] and a["stage_samples"] == b["stage_samples"]
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_evaluate_and_save_flush_the_pipeline(tmp_path):
    model = small_model(3, seed=2)
    tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline")
    for x, y in batches(2):
        tr.step(x, y)
    assert not tr.schedule.idle()
    tr.save(tmp_path / "ck.pt")
    assert tr.schedule.idle() and tr.stage_steps == [2, 2, 2]
    seq, _ = _run(model, batches(2), engine="sequential")
    assert_same_state(tr.model, seq.model, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.9, 0.0, False, 5e-4), (0.9, 0.1, False, 0.0),
                                                            (0.8, 0.0, True, 1e-3), (0.0, 0.0, False, 1e-4)])
def test_graph_sgd_step_equals_torch_sgd_bitwise(momentum, dampening, nesterov, wd, foreach):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(6, 4).t())]  # a non-contiguous parameter
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    ours, ref = torch.optim.SGD(params, **kw), torch.optim.SGD(twins, foreach=foreach, **kw)
    graph_step = None
    for step in range(6):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        if step == 3:  # a schedule change: the captured step is stale and is made again
            for o in (ours, ref):
                o.param_groups[0]["lr"] = 0.02
            assert graph_step.stale()
            graph_step = GraphSGD(ours)
        ref.step()
        if step == 0:
            ours.step()  # the eager first step creates the momentum buffers
            graph_step = GraphSGD(ours)
        else:
            assert not graph_step.stale()
            graph_step.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
    assert graph_step.lr == [0.02]
    graph_step.zero_grad()
    assert all(p.grad is None for p in params)


def test_graph_sgd_rejects_other_optimizers():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="CUDA graphs capture torch.optim.SGD steps; got Adam"):
        GraphSGD(opt)


@pytest.mark.parametrize("kw,match", [
    (dict(engine="streams"), "engine='streams' needs a CUDA device, got device cpu"),
    (dict(cuda_graphs=True), "cuda_graphs=True needs a CUDA device, got device cpu"),
    (dict(amp="fp16"), "amp='fp16' needs a CUDA device, got device cpu"),
    (dict(amp="int8"), "unknown amp 'int8'"),
    (dict(engine="warp"), "unknown engine 'warp'; expected one of auto, sequential, pipeline, streams"),
    (dict(engine="pipeline", mode="backprop"), "engine='pipeline' pipelines synchronous DGL"),
])
def test_bad_engine_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, **kw)


def test_auto_is_sequential_on_cpu_and_bf16_autocast_runs():
    tr = dgl_fast.Trainer(small_model(2, fused=True), optimizer=sgd, amp="bf16", channels_last=True)
    assert tr.engine_name == "sequential" and not tr.cuda_graphs
    x, y = batches(1)[0]
    out = tr.step(x, y)
    assert torch.isfinite(out.losses).all() and out.losses.dtype == torch.float32
    assert tr.model.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


# --- CUDA (skipped without a GPU; tests/conftest.py turns TF32 off and cuDNN deterministic) -----


@pytest.mark.cuda
@pytest.mark.parametrize("graphs,dtype,B,n,tol", [
    (False, torch.float32, 6, 12, 0.0),  # same kernels, same order per stage: bitwise
    (True, torch.float64, 6, 12, 1e-10),  # float32 graphs: against emulated graphs, below
])
def test_streams_engine_equals_sequential_on_gpu(graphs, dtype, B, n, tol):
    dev = torch.device("cuda")
    model = small_model(4, seed=3, aux="mlp-sr", fused=True, dtype=dtype)
    data = [(x.to(dev), y.to(dev)) for x, y in batches(n, B=B, dtype=dtype)]
    seq, _ = _run(model, data, device="cuda", engine="sequential")
    streams, _ = _run(model, data, device="cuda", engine="streams", cuda_graphs=graphs)
    assert streams.cuda_graphs == graphs
    if graphs:
        assert streams.schedule.graph_state is not None  # it really replayed graphs
    assert_same_state(streams.model, seq.model, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_real_graphs_equal_emulated_graphs_on_gpu_bitwise():
    # float32, the same stage-step code on the same GPU: captured and replayed on K streams, or
    # run eagerly on one stream through the graph code path (parity buffers, GraphSGD)
    dev = torch.device("cuda")
    model = small_model(4, seed=3, aux="mlp-sr", fused=True)
    data = [(x.to(dev), y.to(dev)) for x, y in batches(10, B=64)]
    real, _ = _run(model, data, device="cuda", engine="streams", cuda_graphs=True)
    emu = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline", device="cuda", cuda_graphs="emulate")
    for x, y in data:
        emu.step(x, y)
    emu.flush()
    assert real.schedule.graph_state is not None and emu.schedule.graph_state is not None
    assert_same_state(real.model, emu.model, rtol=0, atol=0)


@pytest.mark.cuda
def test_graphs_across_lr_change_and_partial_batch():
    from dgl_fast import data

    spec = data.load("synthetic", batch_size=32, in_size=8, num_classes=3, synthetic_size=200, seed=0, device="cuda")
    train = [(x.double(), y) for x, y in spec.train]
    model = dgl_fast.models.build("aux-study", num_classes=3, depth=3, width=8, in_size=8, aux="mlp").double()
    out = {}
    for engine in ("sequential", "streams"):
        tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine=engine, device="cuda")
        out[engine] = (tr, tr.fit(train, epochs=3, lr_schedule=lambda e: 0.5 ** e, progress=False))
    (seq, rs), (gr, rg) = out["sequential"], out["streams"]
    assert gr.cuda_graphs and len(spec.train.x) % 32 != 0  # a partial last batch every epoch
    assert gr.schedule.captures == 3  # once per learning rate
    assert_same_state(gr.model, seq.model, rtol=1e-10, atol=1e-10)
    for a, b in zip(rs, rg):
        assert a["stage_samples"] == b["stage_samples"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)


@pytest.mark.cuda
def test_bf16_channels_last_streams_runs():
    dev = torch.device("cuda")
    model = small_model(3, seed=4, aux="mlp-sr", fused=True)
    tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, device="cuda", amp="bf16", channels_last=True)
    for x, y in batches(8):
        tr.step(x.to(dev), y.to(dev))
    tr.flush()
    means, _, samples = tr.read_metrics()
    assert all(math.isfinite(m) for m in means) and samples == [48, 48, 48]


@pytest.mark.cuda
def test_async_on_streams_progresses_every_stage():
    dev = torch.device("cuda")
    model = small_model(4, seed=5, aux="mlp-sr", fused=True)
    tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, device="cuda", mode="async", buffer_capacity=3,
                          slowdown={3: 0.5})
    assert tr.engine_name == "streams" and tr.schedule.streams is not None
    for x, y in batches(60):
        out = tr.step(x.to(dev), y.to(dev))
    assert out.losses is None  # free-running: metrics stay on the stage streams
    means, hits, samples = tr.read_metrics()
    assert all(n > 3 for n in tr.stage_steps) and samples == [6 * n for n in tr.stage_steps]
    assert tr.stage_steps[2] < tr.stage_steps[3]  # the slowed stage ran less often
    assert all(math.isfinite(m) for m in means) and all(0 <= h <= n for h, n in zip(hits, samples))
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_async_streams_equal_async_sequential_on_gpu(graphs):
    # free-running stage streams (eager or one graph per stage step) give the parameters of the
    # async trainer that runs every stage step in turn on one stream
    dev = torch.device("cuda")
    model = small_model(3, seed=6, aux="mlp-sr", fused=True, dtype=torch.float64)
    data = [(x.to(dev), y.to(dev)) for x, y in batches(30, dtype=torch.float64)]
    kw = dict(optimizer=sgd, device="cuda", mode="async", buffer_capacity=3, slowdown={2: 0.5}, seed=2)
    ref = dgl_fast.Trainer(copy.deepcopy(model), engine="sequential", **kw)
    free = dgl_fast.Trainer(copy.deepcopy(model), engine="streams", cuda_graphs=graphs, **kw)
    for x, y in data:
        ref.step(x, y)
        free.step(x, y)
    torch.cuda.synchronize()
    assert free.cuda_graphs == graphs and free.stage_steps == ref.stage_steps
    if graphs:
        assert all(st is not None for st in free.schedule.graphs.stages)  # every stage replayed its graph
    assert_same_state(free.model, ref.model, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
def test_async_graphs_need_the_streams_engine():
    with pytest.raises(ValueError, match="cuda_graphs=True runs in the streams engine; .*async with max_reuse"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", max_reuse=2, cuda_graphs=True, device="cuda")


def test_async_streams_settings_are_checked():
    with pytest.raises(ValueError, match="engine='streams' needs a CUDA device"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", engine="streams")
    with pytest.raises(ValueError, match="engine='streams' runs mode='dgl' .* or mode='async'"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="backprop", engine="streams", device="cpu")


def test_evaluate_with_batches_in_flight():
    # evaluate() runs under no_grad; the pipeline's remaining stage steps still train
    model = small_model(3, seed=8)
    pipe = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline")
    for x, y in batches(3):
        pipe.step(x, y)
    acc = pipe.evaluate([batches(1, seed=4)[0]])
    seq, _ = _run(model, batches(3), engine="sequential")
    assert acc == seq.evaluate([batches(1, seed=4)[0]])
    assert_same_state(pipe.model, seq.model, rtol=0, atol=0)


def test_load_state_dict_resets_the_engine(tmp_path):
    model = small_model(2, seed=9)
    a = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline")
    for x, y in batches(3):
        a.step(x, y)
    a.save(tmp_path / "a.pt")
    b = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline")
    b.step(*batches(1, seed=3)[0])
    b.load(tmp_path / "a.pt")  # flushes b's in-flight batch, then replaces everything
    for t in (a, b):
        for x, y in batches(2, seed=5):
            t.step(x, y)
        t.flush()
    assert_same_state(b.model, a.model, rtol=0, atol=0)


def _emulated_graph_trainer(model, **kw):
    """A pipeline trainer whose engine takes the CUDA-graph code path with emulated graphs."""
    return dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="pipeline", cuda_graphs="emulate", **kw)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_graph_code_path_equals_sequential(K):
    # Parity double-buffers, label hand-offs, GraphSGD and in-graph metrics, on the CPU: the same
    # ops as the sequential engine's stage steps (GraphSGD is torch's SGD), so bitwise equal
    model = small_model(K, seed=K + 10, aux="mlp-sr", fused=True)
    data = batches(9)
    seq, _ = _run(model, data, engine="sequential")
    tr = _emulated_graph_trainer(model)
    for x, y in data:
        out = tr.step(x, y)
    assert out.losses is None  # graph ticks keep metrics on the device
    assert tr.schedule.graph_state is not None
    tr.flush()
    assert tr.stage_steps == [9] * K
    assert_same_state(tr.model, seq.model, rtol=0, atol=0)
    for a, b in zip(tr.optimizers, seq.optimizers):
        for p_a, p_b in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            assert torch.equal(a.state[p_a]["momentum_buffer"], b.state[p_b]["momentum_buffer"])


def test_graph_code_path_fit_with_lr_changes_and_partial_batches():
    from dgl_fast import data

    spec = data.load("synthetic", batch_size=32, in_size=8, num_classes=3, synthetic_size=200, seed=0)
    model = dgl_fast.models.build("aux-study", num_classes=3, depth=3, width=8, in_size=8, aux="mlp")
    seq = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, engine="sequential")
    rs = seq.fit(spec.train, epochs=3, lr_schedule=lambda e: 0.5 ** e, progress=False)
    gr = _emulated_graph_trainer(model)
    rg = gr.fit(spec.train, epochs=3, lr_schedule=lambda e: 0.5 ** e, progress=False)
    assert gr.schedule.graph_state is not None and 200 % 32 != 0
    assert gr.schedule.captures == 3  # each learning rate is captured into the graphs once
    assert_same_state(gr.model, seq.model, rtol=0, atol=0)
    for a, b in zip(rs, rg):
        assert a["stage_samples"] == b["stage_samples"] and a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)  # same sums, divided differently
        assert a["train_acc"] == b["train_acc"]


def test_graph_code_path_bf16_channels_last():
    # the pipelined graph path under bf16 autocast with channels_last: the sequential engine's ops
    model = small_model(3, seed=12, aux="mlp-sr", fused=True)
    data = batches(8, B=16, seed=6)
    seq, _ = _run(model, data, engine="sequential", amp="bf16", channels_last=True)
    tr = _emulated_graph_trainer(model, amp="bf16", channels_last=True)
    for x, y in data:
        tr.step(x, y)
    tr.flush()
    assert tr.schedule.graph_state is not None and tr.stage_steps == [8] * 3
    assert_same_state(tr.model, seq.model, rtol=0, atol=0)
