"""A rule whose loss needs the input image (InfoPro) on every engine: CUDA graphs (emulated) of the
pipelined schedule and async DGL (in turn, free-running on recorded streams, graphs) equal the
sequential engine bitwise, and the image a stage trains on is the one of its activations
(checksummed: a tag column that every stage passes through unchanged)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dgl_fast
from dgl_fast import ReplayBuffer, models
from dgl_fast.schedules.pipeline_graphs import StageGraphs
from dgl_fast.streams import RecordedStreams

TINY = (3, 3, 4, 6)
MEAN = torch.tensor([v / 255.0 for v in (125.3, 123.0, 113.9)]).view(1, 3, 1, 1)
STD = torch.tensor([v / 255.0 for v in (63.0, 62.1, 66.7)]).view(1, 3, 1, 1)
RR = dict(mode="async", schedule="round_robin", buffer_capacity=1, policy="fifo")


def _infopro(K, seed):
    torch.manual_seed(seed)
    model = models.build("resnet32", local_modules=K, rule="infopro", widths=TINY, in_size=8,
                         interpolate_mode="nearest")
    g = torch.Generator().manual_seed(seed + 1)
    data = [((torch.rand(4, 3, 8, 8, generator=g) - MEAN) / STD, torch.randint(0, 10, (4,), generator=g))
            for _ in range(6)]
    return model, data


def _train(model, data, **kw):
    model = copy.deepcopy(model)
    tr = dgl_fast.Trainer(model, **kw)
    for x, y in data:
        tr.step(x, y)
    tr.flush()
    return model, tr


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_pipeline_graphs_carry_the_image(monkeypatch):
    """Emulated CUDA graphs of the pipelined schedule (warm-up eager ticks, capture, replays, a
    partial last batch through eager ticks; one device and two groups) equal the sequential
    engine bitwise; a stage that copies the other parity's image (another batch's) does not."""
    model, data = _infopro(4, 7)
    data.append((data[0][0][:3], data[0][1][:3]))
    ref, _ = _train(model, data, engine="sequential")
    for kw in (dict(engine="pipeline", cuda_graphs="emulate"),
               dict(engine="pipeline", cuda_graphs="emulate", devices=["cpu", "cpu"], placement=[0, 0, 1, 1])):
        got, tr = _train(model, data, **kw)
        assert tr.schedule.captures == 1 and tr.schedule.graph_state[2].images[0] is not None, kw
        assert tr.schedule.graph_state[3].images[0] is None  # the last head reads no image
        assert _same(ref, got), kw
    monkeypatch.setattr(StageGraphs, "image", lambda self, p: self.images[1 - p] if self.images[1 - p] is not None
                        else self.inputs[1 - p])
    monkeypatch.setattr(torch, "empty_like", torch.zeros_like)  # a buffer not yet written: a valid (zero) image
    wrong, _ = _train(model, data, engine="pipeline", cuda_graphs="emulate")
    assert not _same(ref, wrong)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_streams_engine_carries_the_image(graphs):
    """The streams engine (a CUDA stream per stage; real graphs) equals the sequential engine on CUDA."""
    model, data = _infopro(4, 8)
    data = [(x.cuda(), y.cuda()) for x, y in data]
    ref, _ = _train(model, data, device="cuda", engine="sequential")
    got, tr = _train(model, data, device="cuda", engine="streams", cuda_graphs=graphs)
    assert (tr.schedule.graph_state is not None) == graphs
    assert _same(ref, got)


def test_async_capacity_1_round_robin_equals_sync():
    """InfoPro through the replay buffers: in turn, emulated graphs, free-running recorded streams
    with and without graphs, all bitwise the sequential engine's (capacity 1, fifo, round robin)."""
    model, data = _infopro(4, 9)
    ref, _ = _train(model, data, engine="sequential")
    for kw in (RR, dict(RR, cuda_graphs="emulate"), dict(RR, engine="streams", streams=RecordedStreams()),
               dict(RR, engine="streams", streams=RecordedStreams(), cuda_graphs="emulate")):
        got, tr = _train(model, data, **kw)
        assert [b.image_store is not None for b in tr.buffers] == [True, True, False], kw
        assert tr.read_metrics().skipped == [0] * 4
        assert _same(ref, got), kw


def test_async_resume_restores_the_buffered_images():
    """A state saved with images in the replay buffers resumes exactly (random schedule, capacity 2)."""
    model, data = _infopro(3, 21)
    kw = dict(mode="async", buffer_capacity=2, policy="uniform", seed=3)
    whole, _ = _train(model, data, **kw)
    _, first = _train(model, data[:3], **kw)
    resumed = copy.deepcopy(model)
    tr = dgl_fast.Trainer(resumed, **kw)
    tr.load_state_dict(copy.deepcopy(first.state_dict()))
    assert [b.image_store is not None for b in tr.buffers] == [True, False]
    assert torch.equal(tr.buffers[0].image_store, first.buffers[0].image_store)
    for x, y in data[3:]:
        tr.step(x, y)
    assert _same(whole, resumed)


class _TagStage(nn.Module):
    """Passes column 0 (the sample's tag) through, transforms the rest."""

    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c - 1, c - 1)

    def forward(self, h):
        return torch.cat([h[:, :1], torch.tanh(self.lin(h[:, 1:]))], 1)


class _TagHead(nn.Module):
    """A head whose loss reads the image and records (activation tag, image tag) per sample."""

    needs_image = True

    def __init__(self, c, log):
        super().__init__()
        self.clf, self.dec, self.log = nn.Linear(c - 1, 3), nn.Linear(c - 1, c), log

    def forward(self, h):
        return self.clf(h[:, 1:])

    def loss(self, h, y, image):
        self.log.append(torch.stack([h[:, 0], image[:, 0]]).detach().clone())
        logits = self(h)
        loss = F.cross_entropy(logits, y) + 0.1 * F.mse_loss(self.dec(h[:, 1:]), image)
        return loss, (logits.argmax(1) == y).sum()


@pytest.mark.parametrize("kw", [{}, dict(cuda_graphs="emulate"), dict(engine="streams", streams=RecordedStreams())],
                         ids=["in-turn", "graphs", "free-running"])
def test_async_image_arrives_with_its_activations(kw):
    """Random schedule, a slowed stage, uniform replay: stages train on reused, out-of-order
    slots, and every time the image's tag is the activations' (the tag of the batch pushed)."""
    torch.manual_seed(11)
    C, K, logs = 7, 3, [[] for _ in range(3)]
    model = dgl_fast.DecoupledModel([_TagStage(C) for _ in range(K)], [_TagHead(C, logs[j]) for j in range(K)],
                                    input_shape=(C,)).double()
    tr = dgl_fast.Trainer(model, mode="async", buffer_capacity=3, policy="uniform", slowdown={2: 0.6}, seed=4, **kw)
    g = torch.Generator().manual_seed(12)
    for t in range(10):
        x = torch.randn(5, C, generator=g, dtype=torch.float64)
        x[:, 0] = 100 * t + torch.arange(5)  # the tag of each sample of batch t
        tr.step(x, torch.randint(0, 3, (5,), generator=g))
    tr.flush()
    for j, log in enumerate(logs):
        rec = torch.stack(log)  # [steps, 2, B]
        assert torch.equal(rec[:, 0], rec[:, 1]), j
        assert torch.equal(rec[:, 0] % 100, torch.arange(5.0).expand(len(log), 5)), j
    ids = [int(r[0, 0]) // 100 for r in logs[2]]
    assert len(ids) > 3 and (len(set(ids)) < len(ids) or ids != sorted(ids)), ids  # reuse / out of order


def test_replay_buffer_keeps_the_image_of_each_slot():
    B, g = 3, torch.Generator().manual_seed(5)
    buf = ReplayBuffer(3, (B, 4), dtype=torch.float64, policy="uniform", seed=2, image_shape=(B, 2, 5, 3))
    plain = ReplayBuffer(3, (B, 4), dtype=torch.float64)
    for _ in range(5):  # wraps around the ring
        img = torch.rand(B, 2, 3, 5, generator=g, dtype=torch.float64).transpose(2, 3)  # a non-contiguous view
        h = torch.randn(B, 4, generator=g, dtype=torch.float64)
        h[:, 0] = img.contiguous().sum((1, 2, 3))  # the checksum of the sample's image (summed as stored)
        buf.push(h, torch.randint(0, 5, (B,), generator=g), img)
    for _ in range(8):
        s = buf.sample()
        assert torch.equal(s[0][:, 0], s.image.sum((1, 2, 3)))
    again = ReplayBuffer(3, (B, 4), dtype=torch.float64, policy="uniform", seed=2, image_shape=(B, 2, 5, 3))
    again.load_state_dict(buf.state_dict())
    a, b = buf.sample(), again.sample()
    assert torch.equal(a.image, b.image) and torch.equal(a[0], b[0]) and plain.image_store is None
    with pytest.raises(ValueError, match="image_shape=None"):
        plain.push(torch.randn(B, 4, dtype=torch.float64), torch.zeros(B, dtype=torch.long), img)
    with pytest.raises(ValueError, match=r"expected an image of shape \[3, 2, 5, 3\]"):
        buf.push(h, torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="holds"):  # a ring without images is another configuration
        plain.load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="batch .3. first"):
        ReplayBuffer(3, (B, 4), image_shape=(4, 2))


# ---------------------------------------------------------------------- two gloo processes

def _tag_model(K, logs, C=7):
    torch.manual_seed(13)
    return dgl_fast.DecoupledModel([_TagStage(C) for _ in range(K)], [_TagHead(C, logs[j]) for j in range(K)],
                                   input_shape=(C,)).double()


def _tag_batches(n, B=5, C=7):
    g = torch.Generator().manual_seed(14)
    out = []
    for t in range(n):
        x = torch.randn(B, C, generator=g, dtype=torch.float64)
        x[:, 0] = 100 * t + torch.arange(B)
        out.append((x, torch.randint(0, 3, (B,), generator=g)))
    return out + [(out[0][0][:3], out[0][1][:3])]  # a partial last batch travels too


def _sgd64(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _rank_worker(rank, world, port):
    import datetime  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    from dgl_fast.distributed import DistributedDGL  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for mode in ("dgl", "async"):
            logs = [[] for _ in range(3)]
            ddgl = DistributedDGL(_tag_model(3, logs), optimizer=_sgd64, placement=[0, 1, 1], mode=mode, timeout=30,
                                  buffer_capacity=2, policy="uniform")
            assert (ddgl.inbound or ddgl.outbound).image == ((7,), torch.float64)  # the link carries the image
            data = _tag_batches(8)
            ddgl.fit(data if ddgl.feeds else None, epochs=1)
            ddgl.evaluate(data if ddgl.feeds else None)  # evaluation sends the image along too
            for j in ddgl.stages:
                rec = torch.stack([r for r in logs[j] if r.shape[1] == 5])
                assert len(rec) >= 4 and torch.equal(rec[:, 0], rec[:, 1]), (mode, rank, j)  # image tag == h's
            state = ddgl.full_state_dict()
            if rank == 0 and mode == "dgl":  # bitwise the single-process trainer's
                ref = dgl_fast.Trainer(_tag_model(3, [[] for _ in range(3)]), optimizer=_sgd64, engine="sequential")
                for x, y in data:
                    ref.step(x, y)
                for k, v in ref.model.state_dict().items():
                    assert torch.equal(state[k], v), k
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_send_the_image_with_its_activations():
    """Two gloo ranks (stage 1 | stages 2-3), synchronous then async (a replay buffer on rank 1):
    the image each stage trains on is its activations' (tags), dgl bitwise one process's."""
    import socket  # noqa: PLC0415

    import torch.multiprocessing as mp  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port), nprocs=2, join=True)
