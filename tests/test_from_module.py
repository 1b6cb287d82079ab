"""DecoupledModel.from_module / from_sequential on a user's own network: the cut model computes what
the original computes (eval bitwise, train mode with BatchNorm batch statistics and dropout under
the same RNG), DGL training on it equals a plain per-stage loop, the trained weights load back into
the original (strict), it trains on every CPU engine, and what cannot be cut is refused by name."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_distributed import _spawn, one_thread

import dgl_fast
from dgl_fast import DecoupledModel, LogitsHead, Trainer
from dgl_fast.distributed import DistributedDGL
from dgl_fast.streams import RecordedStreams
from helpers import assert_same_state, plain_dgl, sgd


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Custom(nn.Module):
    """A custom forward: residual blocks, functional pooling, dropout, its own classifier."""

    def __init__(self, classes=5, c=6, p=0.3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = Block(c)
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.block2 = Block(2 * c)
        self.drop = nn.Dropout(p) if p else nn.Identity()
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        h = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)))


def _resnet18(classes):
    import torchvision  # noqa: PLC0415 (here, not at the top: the distributed test's ranks import this file)

    return torchvision.models.resnet18(num_classes=classes)


def _vgg11_bn(classes):
    import torchvision  # noqa: PLC0415

    with torch.device("meta"):  # its 4096-wide classifier (120M parameters) is never allocated
        m = torchvision.models.vgg11_bn(num_classes=classes)
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Sequential(nn.Linear(512, 24), nn.ReLU(True), nn.Dropout(0.4), nn.Linear(24, classes))
    m.to_empty(device="cpu")
    for layer in m.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return m


MODELS = {  # name -> (constructor, split, input size)
    "resnet18": (lambda: _resnet18(5), ["layer3", "layer4"], 19),  # cut at 2, 4 and 3 points
    "vgg11_bn": (lambda: _vgg11_bn(5), ["features.4", "features.8", "features.15", "features.22"], 32),
    "custom": (Custom, ["block1", "down", "block2"], 9),
    "custom-no-dropout": (lambda: Custom(p=0), ["block1", "down", "block2"], 9),  # engines order RNG draws apart
}


def _cut(name, seed=0, dtype=torch.float32, B=3):
    make, split, s = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(dtype)
    x = torch.randn(B, 3, s, s, dtype=dtype)
    original = copy.deepcopy(model)
    return DecoupledModel.from_module(model, split=split, example_input=x, aux="mlp-sr", hidden=8), model, original, x


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "custom"])
def test_cut_model_equals_original_in_both_modes(name):
    net, model, original, x = _cut(name)
    K = len(MODELS[name][1]) + 1
    assert net.num_stages == K and isinstance(net.heads[-1], LogitsHead) and net.num_classes == 5
    assert not list(net.heads[-1].parameters())  # the model's own classifier: nothing added
    assert all(isinstance(h, dgl_fast.AuxHead) for h in net.heads[:-1])
    s = x.shape[-1]
    xs = torch.randn(4, 3, s, s + 2)[..., 1:-1]  # a non-contiguous view
    with torch.no_grad():
        assert torch.equal(net.eval()(xs), original.eval()(xs))
        assert torch.equal(net.forward_all(xs)[-1], original(xs))
        for seed in (1, 2):  # train mode: batch statistics, dropout masks from the same RNG
            torch.manual_seed(seed)
            got = net.train()(xs)
            torch.manual_seed(seed)
            want = original.train()(xs)
            assert torch.equal(got, want)
    original.load_state_dict(net.export_state_dict(), strict=True)  # running statistics moved alike
    for (k, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # the stages share the user's layers: a train()/eval() switch reaches them, as in the original
    net.eval()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.Dropout))


def test_dgl_training_equals_plain_per_stage_loop_float64():
    net, model, _, x = _cut("custom", seed=3, dtype=torch.float64, B=5)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g))
            for _ in range(3)]
    torch.manual_seed(11)  # the dropout masks: the same draws in both loops
    ref = plain_dgl(net, data)
    tr = Trainer(copy.deepcopy(net), optimizer=sgd, engine="sequential", channels_last=False)
    torch.manual_seed(11)
    for xb, yb in data:
        tr.step(xb, yb)
    assert_same_state(tr.model, ref, rtol=0, atol=1e-10)
    fresh = Custom().double()
    fresh.load_state_dict(tr.model.export_state_dict(), strict=True)
    xs = data[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(xs), tr.model.eval()(xs))


def _engine_data(n=4, B=4, s=9):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(B, 3, s, s, generator=g), torch.randint(0, 5, (B,), generator=g)) for _ in range(n)]


def _train(net, data, **kw):
    tr = Trainer(copy.deepcopy(net), optimizer=sgd, channels_last=kw.pop("channels_last", False), **kw)
    outs = [tr.step(x, y) for x, y in data]
    tr.flush()
    return tr, outs


ENGINES = {
    "pipeline": dict(engine="pipeline"),
    "pipeline-graphs": dict(engine="pipeline", cuda_graphs="emulate"),
    "devices": dict(engine="sequential", devices=["cpu", "cpu"], placement=[0, 0, 1, 1]),
    "async-as-dgl": dict(mode="async", buffer_capacity=1, policy="fifo", schedule="round_robin"),
}


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_trains_like_the_sequential_one(engine):
    net = _cut("custom-no-dropout", seed=5)[0]
    data = _engine_data()
    ref, _ = _train(net, data, engine="sequential")
    tr, _ = _train(net, data, **ENGINES[engine])
    assert_same_state(tr.model, ref.model, rtol=0, atol=0)
    assert tr.evaluate(data) == ref.evaluate(data)


@pytest.mark.parametrize("kw", [dict(mode="async", buffer_capacity=2, seed=3),
                                dict(mode="async", engine="streams", streams=RecordedStreams(), cuda_graphs="emulate",
                                     buffer_capacity=2),
                                dict(mode="sequential"), dict(mode="backprop")], ids=["async", "async-streams-graphs",
                                                                                     "sequential-greedy", "backprop"])
def test_other_modes_train_the_cut_model(kw):
    net = _cut("custom", seed=6)[0]
    data = _engine_data()
    tr, _ = _train(net, data, **kw)
    before, after = net.export_state_dict(), tr.model.export_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the user's layers trained
    assert all(torch.isfinite(v).all() for v in after.values())
    assert len(tr.evaluate(data)) == net.num_stages


def test_channels_last_bf16():
    net = _cut("custom-no-dropout", seed=8)[0]
    data = _engine_data(n=3)
    ref, ref_outs = _train(net, data, engine="sequential")
    bf, outs = _train(net, data, engine="sequential", amp="bf16", channels_last=True)
    conv = bf.model.stages[0].get_submodule("stem.0")
    assert bf.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(bf.model.parameters()).dtype == torch.float32  # autocast: parameters stay float32
    # the first bf16 step against the fp32 one: the same losses up to bf16 rounding (8 bits, ~7 layers)
    torch.testing.assert_close(outs[0].losses, ref_outs[0].losses, rtol=0.03, atol=0.03)
    assert all(torch.isfinite(v).all() for v in bf.model.export_state_dict().values())
    pipe, _ = _train(net, data, engine="pipeline", cuda_graphs="emulate", amp="bf16", channels_last=True)
    assert_same_state(pipe.model, bf.model, rtol=0, atol=0)  # the same ops in another order: bitwise


def _seq_with_classifier(classes=10):
    torch.manual_seed(9)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).double()


def test_from_sequential_keeps_its_classifier_and_trains():
    seq = _seq_with_classifier()
    original = copy.deepcopy(seq)
    net = DecoupledModel.from_sequential(seq, split=[3, 6], aux="mlp-sr", num_classes=10, input_shape=(3, 11, 11),
                                         hidden=8)
    assert isinstance(net.heads[-1], LogitsHead) and not list(net.heads[-1].parameters())
    assert [type(h).__name__ for h in net.heads] == ["AuxHead", "AuxHead", "LogitsHead"]
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), original.eval()(x))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 11, 11, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
            for _ in range(3)]
    ref = plain_dgl(net, data)
    tr = Trainer(copy.deepcopy(net), optimizer=sgd, engine="sequential", channels_last=False)
    outs = [tr.step(*b) for b in data]
    assert all(torch.isfinite(o.losses).all() for o in outs)
    assert_same_state(tr.model, ref, rtol=0, atol=1e-10)
    original.load_state_dict(tr.model.export_state_dict(), strict=True)  # seq's own names: 0.weight .. 11.bias
    assert set(tr.model.export_state_dict()) == set(seq.state_dict())
    with pytest.raises(ValueError, match=r"the last stage outputs shape \[2, 10\], not logits \[B, num_classes=7\]"):
        DecoupledModel.from_sequential(seq, split=[3, 6], num_classes=7, input_shape=(3, 11, 11))


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.post = nn.ReLU()
        self.stem, self.mid = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        a = self.stem(x)
        return self.head(self.post(self.mid(a)) + a)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.mid = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.conv(self.mid(self.conv(x)))


class DataDependent(Custom):
    def forward(self, x):
        return super().forward(x if x.sum() > 0 else -x)


class ModeInForward(Custom):
    def forward(self, x):
        h = super().forward(x)
        return h * 2 if self.training else h


def test_refusals_name_the_split():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"split 'post': 2 values cross it \(stem, mid\): a skip connection"):
        DecoupledModel.from_module(Skip(), split=["mid", "post"], example_input=x)
    net = DecoupledModel.from_module(Skip(), split=["mid", "head"], example_input=x)  # one tensor crosses each
    assert net.num_stages == 3
    with pytest.raises(ValueError, match=r"split 'block1.conv2': 2 values cross it .*skip connection"):
        DecoupledModel.from_module(Custom(), split=["block1.conv2"], example_input=x)
    with pytest.raises(ValueError, match=r"split 'mid': 'conv.weight' is used on both sides of it"):
        DecoupledModel.from_module(Twice(), split=["mid"], example_input=x)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"split '1': '0.weight' is used on both sides of it"):
        DecoupledModel.from_module(tied, split=["1"], example_input=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"split names 'layer9', not a submodule of Custom \(its children: stem, "):
        DecoupledModel.from_module(Custom(), split=["layer9"], example_input=x)
    with pytest.raises(ValueError, match=r"in the order forward calls them: 'block1' runs before 'down'"):
        DecoupledModel.from_module(Custom(), split=["down", "block1"], example_input=x)
    with pytest.raises(ValueError, match=r"split 'stem': it is the first thing forward calls"):
        DecoupledModel.from_module(Custom(), split=["stem"], example_input=x)
    with pytest.raises(ValueError, match=r"ModeInForward.forward computes differently in train and eval mode"):
        DecoupledModel.from_module(ModeInForward(), split=["down"], example_input=x)
    with pytest.raises(ValueError, match=r"torch.fx.symbolic_trace, which fails on DataDependent: symbolically traced"):
        DecoupledModel.from_module(DataDependent(), split=["down"], example_input=x)
    with pytest.raises(ValueError, match=r"split must be a non-empty list of submodule names"):
        DecoupledModel.from_module(Custom(), split="down", example_input=x)
    with pytest.raises(ValueError, match=r"example_input must be a batch tensor \[B, \.\.\.\]"):
        DecoupledModel.from_module(Custom(), split=["down"], example_input=(3, 8, 8))
    with pytest.raises(ValueError, match=r"export_state_dict needs a model made by DecoupledModel.from_module"):
        DecoupledModel([nn.Identity()], [nn.Identity()]).export_state_dict()
    with pytest.raises(ValueError, match=r"LogitsHead expected logits of shape \[B, 5\], got \[2, 4\]"):
        LogitsHead(5)(torch.randn(2, 4))


def _distributed_worker(rank, world, out):
    net = _cut("custom-no-dropout", seed=5)[0]  # the same weights on every rank
    ddgl = DistributedDGL(net, optimizer=sgd, placement=[0, 0, 1, 1], timeout=30)
    ddgl.fit(_engine_data() if ddgl.feeds else None, epochs=1)
    state = ddgl.full_state_dict()
    if rank == 0:
        torch.save(state, os.path.join(out, "state.pt"))


def test_two_ranks_train_the_cut_model_like_one_process(tmp_path):
    _spawn(_distributed_worker, 2, str(tmp_path))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    net = _cut("custom-no-dropout", seed=5)[0]
    tr = Trainer(net, optimizer=sgd, engine="sequential", channels_last=False)
    with one_thread():
        tr.fit(_engine_data(), epochs=1, progress=False)
    expected = tr.model.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
