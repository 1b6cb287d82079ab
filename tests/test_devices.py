"""One process, several devices: ``Trainer(devices=[...], placement=...)`` trains exactly as one
device does (on the CPU a repeated device runs the same hand-off code path: copies into the
receiving group's buffers, per-device metrics, evaluation through the placement); the GPU test
runs two stage groups on one GPU's streams, with and without CUDA graphs."""

import copy

import pytest
import torch

import dgl_fast
from helpers import assert_same_state, batches, sgd, small_model


def _data():
    return batches(5) + [(x[:4], y[:4]) for x, y in batches(1, seed=9)]  # a partial last batch


def _train(model, data, **kw):
    tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, **kw)
    outs = [tr.step(x, y) for x, y in data]
    tr.flush()
    return tr, outs


def _same_optimizers(a, b):
    for oa, ob in zip(a.optimizers, b.optimizers):
        for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"]):
            torch.testing.assert_close(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.parametrize("engine,cuda_graphs", [("sequential", None), ("pipeline", None), ("pipeline", "emulate")])
@pytest.mark.parametrize("K,devices,placement", [
    (3, ["cpu", "cpu"], None),  # placement chosen by balance()
    (4, ["cpu", "cpu", "cpu"], [0, 1, 1, 2]),
    (4, ["cpu", "cpu", "cpu", "cpu"], [0, 1, 2, 3]),
])
def test_devices_train_bitwise_like_one_device(engine, cuda_graphs, K, devices, placement):
    model = small_model(K, seed=K, aux="mlp-sr")
    data = _data()
    ref, ref_outs = _train(model, data, engine="sequential")
    tr, outs = _train(model, data, engine=engine, cuda_graphs=cuda_graphs, devices=devices, placement=placement)
    assert len(tr.placement) == K and tr.placement[-1] == len(devices) - 1
    if placement is None:
        assert tr.balance_report is not None and tr.predicted_throughput > 0
        assert tr.placement == tr.balance_report.placement
    else:
        assert tr.placement == placement and tr.predicted_throughput is None
    assert tr.stage_devices == [torch.device("cpu")] * K
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)
    _same_optimizers(tr, ref)
    assert tr.stage_steps == ref.stage_steps == [len(data)] * K
    if engine == "sequential":
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
            assert torch.equal(a.correct, b.correct)
    if cuda_graphs == "emulate":
        assert tr.schedule.captures > 0
        assert tr.schedule.receives == [j == 0 or tr.placement[j] != tr.placement[j - 1] for j in range(K)]
    assert tr.evaluate(batches(3, seed=5)) == ref.evaluate(batches(3, seed=5))
    assert tr.evaluate_ensemble(batches(2, seed=6)) == ref.evaluate_ensemble(batches(2, seed=6))


def test_pipeline_metrics_and_fit_with_devices():
    model = small_model(3, seed=2)
    data = batches(7)
    ref, _ = _train(model, data, engine="pipeline")
    tr, _ = _train(model, data, engine="pipeline", devices=["cpu", "cpu"], placement=[0, 0, 1])
    assert tr.read_metrics() == ref.read_metrics()
    recs = [t.fit(data, epochs=2, progress=False, lr_schedule=lambda e: 0.5 ** e) for t in (ref, tr)]
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)
    for a, b in zip(*recs):
        assert a["train_loss"] == b["train_loss"] and a["train_acc"] == b["train_acc"]


@pytest.mark.parametrize("mode", ["sequential", "backprop"])
def test_other_modes_with_devices(mode):
    model = small_model(3, seed=4)
    data = batches(4)
    ref, _ = _train(model, data, mode=mode)
    tr, _ = _train(model, data, mode=mode, devices=["cpu", "cpu"], placement=[0, 1, 1])
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)


def test_save_load_round_trip_with_devices(tmp_path):
    model = small_model(4, seed=1)
    data = _data()
    kw = dict(engine="pipeline", devices=["cpu", "cpu", "cpu"], placement=[0, 0, 1, 2])
    tr, _ = _train(model, data[:3], **kw)
    tr.save(tmp_path / "ck.pt")
    back = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, **kw)
    back.load(tmp_path / "ck.pt")
    assert_same_state(back.model, tr.model, rtol=0, atol=0)
    for t in (tr, back):
        for x, y in data[3:]:
            t.step(x, y)
        t.flush()
    ref, _ = _train(model, data, engine="sequential")
    assert_same_state(back.model, ref.model, rtol=0, atol=0)
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)
    assert back.global_step == len(data)


@pytest.mark.parametrize("kw,match", [
    (dict(device="cpu", devices=["cpu"]), "pass either device= or devices=, not both"),
    (dict(devices=[]), r"devices must list 1 to 3 devices .* got 0"),
    (dict(devices=["cpu"] * 4), r"devices must list 1 to 3 devices .* got 4"),
    (dict(devices="cpu"), "devices must be a list of devices"),
    (dict(devices=["cpu", "tpu"]), "unsupported device 'tpu'|unknown device 'tpu'"),
    (dict(devices=["cpu", "cuda:99"]), "cuda:99"),
    (dict(placement=[0, 0, 0]), "placement= places stages on the devices of devices="),
    (dict(devices=["cpu", "cpu"], placement=[0, 1]), r"placement must give each of the 3 stages .* got \[0, 1\]"),
    (dict(devices=["cpu", "cpu"], placement=[0, 0, 0]), "from 0 to 1 without gaps"),
    (dict(devices=["cpu", "cpu"], placement=[0, 2, 1]), "non-decreasing"),
    (dict(devices=["cpu", "cpu", "cpu"], placement=[0, 2, 2]), "without gaps"),
    (dict(devices=["cpu", "cpu"], placement=[1, 1, 1]), "from 0 to 1"),
    (dict(devices=["cpu", "cpu"], placement=["0", "0", "1"]), "placement must give"),
    (dict(devices=["cpu", "cpu"], balance_batch=1), "balance_batch must be an int >= 2"),
])
def test_device_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        dgl_fast.Trainer(small_model(3), optimizer=sgd, **kw)


def test_devices_without_input_shape_need_a_placement():
    model = small_model(2)
    model.input_shape = None
    with pytest.raises(ValueError, match="lacks: give placement="):
        dgl_fast.Trainer(model, optimizer=sgd, devices=["cpu", "cpu"])
    tr = dgl_fast.Trainer(model, optimizer=sgd, devices=["cpu", "cpu"], placement=[0, 1])
    x, y = batches(1)[0]
    tr.step(x, y)  # the shapes are probed through the placement at the first batch
    assert tr.input_shape == (3, 9, 9)


def test_one_distinct_device_runs_every_mode():
    tr = dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", devices=["cpu", "cpu"], placement=[0, 1],
                          buffer_capacity=2)
    for x, y in batches(3):
        tr.step(x, y)
    assert sum(tr.stage_steps) > 0


@pytest.mark.cuda
def test_async_refuses_two_distinct_devices():
    with pytest.raises(ValueError, match="mode='async' runs on one device, got devices cpu, cuda:0"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, mode="async", devices=["cpu", "cuda:0"], placement=[0, 1])
    with pytest.raises(ValueError, match="engine='streams' needs a CUDA device, got device cpu, cuda:0"):
        dgl_fast.Trainer(small_model(2), optimizer=sgd, engine="streams", devices=["cpu", "cuda:0"], placement=[0, 1])


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("engine", ["streams", "pipeline", "sequential"])
def test_two_groups_on_one_gpu_bitwise(engine, graphs):
    if graphs and engine != "streams":
        pytest.skip("CUDA graphs run in the streams engine")
    dev = torch.device("cuda")
    model = small_model(4, seed=3, aux="mlp-sr", fused=True)
    data = [(x.to(dev), y.to(dev)) for x, y in batches(12, B=6)] + [(x[:4].to(dev), y[:4].to(dev)) for x, y in batches(1)]
    # the reference runs the same engine on one device (graphs replay the same kernels as their
    # emulation, which the pipeline engine holds bitwise to the sequential one)
    ref, _ = _train(model, data, device="cuda", engine=engine, cuda_graphs=graphs if engine == "streams" else None)
    tr, _ = _train(model, data, devices=["cuda:0", "cuda:0"], placement=[0, 0, 1, 1], engine=engine,
                   cuda_graphs=graphs if engine == "streams" else None)
    if engine == "streams":
        assert tr.cuda_graphs == graphs and tr.schedule.receives == [True, False, True, False]
        assert (tr.schedule.captures > 0) == graphs
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)
    if engine != "sequential":
        assert tr.read_metrics() == ref.read_metrics()
    assert tr.evaluate(batches(2, seed=5)) == ref.evaluate(batches(2, seed=5))
    # and against the single-device sequential engine
    seq, _ = _train(model, data, device="cuda", engine="sequential")
    if not graphs:
        assert_same_state(tr.model, seq.model, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("devices", [["cpu", "cuda:0"], ["cuda:0", "cpu"], ["cuda:0", "cuda:1"]])
def test_real_hand_offs_between_devices(devices):
    # real copies between devices: the pipeline engine equals the sequential engine on the same
    # placement bitwise (the same kernels on the same devices); against one CPU in float64
    if "cuda:1" in devices and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    model = small_model(4, seed=5, dtype=torch.float64)
    data = [(x, y) for x, y in batches(7, dtype=torch.float64)] + [(x[:4], y[:4]) for x, y in batches(1, dtype=torch.float64)]
    kw = dict(devices=devices, placement=[0, 0, 1, 1])
    seq, _ = _train(model, data, engine="sequential", **kw)
    pipe, _ = _train(model, data, engine="pipeline", **kw)
    assert [p.device for p in pipe.model.stages[3].parameters()][0] == torch.device(devices[1])
    assert_same_state(pipe.model, seq.model, rtol=0, atol=0)
    assert pipe.read_metrics()[2] == [len(data) * 6 - 2] * 4
    cpu, _ = _train(model, data, engine="sequential")
    for k, v in cpu.model.state_dict().items():
        torch.testing.assert_close(seq.model.state_dict()[k].cpu(), v, rtol=1e-10, atol=1e-10, msg=k)
    assert pipe.evaluate(batches(2, seed=5, dtype=torch.float64)) == seq.evaluate(batches(2, seed=5, dtype=torch.float64))
    if all(d.startswith("cuda") for d in devices):
        streams, _ = _train(model, data, engine="streams", cuda_graphs=False, **kw)
        assert_same_state(streams.model, seq.model, rtol=0, atol=0)
