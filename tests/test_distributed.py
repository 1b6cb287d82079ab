"""DistributedDGL on gloo processes: the single-process trainer's result (bitwise for pipelines of
stage groups, to float64 rounding for replicas), async progress, evaluation, exact resume."""

import contextlib
import copy
import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import dgl_fast
from dgl_fast.checkpoint import CheckpointError
from dgl_fast.data import TensorLoader
from dgl_fast.distributed import ConfigMismatch, DistributedDGL, Layout, even_placement
from dgl_fast.distributed.sharding import shard_loader
from dgl_fast.fitting import TrainingDiverged
from helpers import assert_same_state, batches, sgd, small_model


def _data(B=6, dtype=torch.float32):
    data = batches(5, B=B, seed=2, dtype=dtype)
    x, y = batches(1, B=B, seed=7, dtype=dtype)[0]
    return data + [(x[:4], y[:4])]  # a partial last batch travels too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    port = _free_port()
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as in the ranks: several processes on a few cores would otherwise
    oversubscribe them, and bitwise comparisons need the same thread count on both sides."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _nobn_model(K, seed=3, dtype=torch.float64):
    """Conv + ReLU stages with linear heads: no BatchNorm, so replicas equal one big batch."""
    torch.manual_seed(seed)
    stages, heads, c, s = [], [], 3, 9
    for j in range(K):
        cout = 4 + 2 * j
        stages.append(nn.Sequential(nn.Conv2d(c, cout, 3, stride=1 + j % 2, padding=1), nn.ReLU()))
        s = (s - 1) // (1 + j % 2) + 1
        heads.append(dgl_fast.AuxHead(cout, s, 5, kind="linear"))
        c = cout
    return dgl_fast.DecoupledModel(stages, heads, input_shape=(3, 9, 9)).to(dtype)


# ---------------------------------------------------------------------- pipelines of stage groups

def _sync_worker(rank, world, out, K, placement):
    model = small_model(K, seed=3, aux="mlp-sr", fused=True)  # the same weights on every rank
    ddgl = DistributedDGL(model, optimizer=sgd, placement=placement, timeout=30)
    records = ddgl.fit(_data() if ddgl.feeds else None, epochs=2, lr_schedule=lambda e: 0.5 ** e)
    acc = ddgl.evaluate(_data() if ddgl.feeds else None)
    state = ddgl.full_state_dict()
    if rank == 0:
        torch.save({"state": state, "records": records, "acc": acc, "placement": ddgl.placement},
                   os.path.join(out, "result.pt"))


@pytest.mark.parametrize("world,K,placement", [(2, 3, "balance"), (3, 4, [0, 1, 1, 2])])  # 4 processes: the grid
def test_pipeline_equals_sequential(tmp_path, world, K, placement):
    _spawn(_sync_worker, world, str(tmp_path), K, placement)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    seq = dgl_fast.Trainer(copy.deepcopy(small_model(K, seed=3, aux="mlp-sr", fused=True)), optimizer=sgd,
                           engine="sequential", channels_last=False)
    with one_thread():
        recs = seq.fit(_data(), epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
        acc = seq.evaluate(_data())
    expected = seq.model.state_dict()
    assert result["state"].keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(result["state"][k], v, rtol=0, atol=0, msg=k)
    for a, b in zip(result["records"], recs):
        assert a["stage_samples"] == b["stage_samples"] == [34] * K
        assert a["train_acc"] == b["train_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)  # float32 losses summed in float64
    assert result["acc"] == acc
    assert sorted(set(result["placement"])) == list(range(world))


# ---------------------------------------------------------------------- stage groups x replicas

class _Counted(torch.utils.data.Dataset):
    """A map-style dataset that records every index read (a feeding rank's loading)."""

    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i], self.y[i]


_N, _SEED = 55, 5  # odd: DistributedSampler drops one sample an epoch so that both rows get 27


def _row_shares(data, r):
    """Replica row r's share of each whole batch (the user's own loader of its shard)."""
    return [(x.tensor_split(2)[r], y.tensor_split(2)[r]) for x, y in data]


def _grid_worker(rank, world, out, replicas):
    model = _nobn_model(4)
    ddgl = DistributedDGL(model, optimizer=sgd, placement=[0, 0, 1, 1], replicas=replicas, timeout=30,
                          ddp_options={"gradient_as_bucket_view": True})  # DDP's options pass through
    assert ddgl.layout.coords(rank) == divmod(rank, 2)
    # each stage step runs its stage and head in DDP over its stage group's replicas (the mesh's "replica" group)
    assert all(isinstance(s.forward_module, DistributedDataParallel) and s.forward_module.gradient_as_bucket_view
               for s in ddgl.trainer.steps)
    assert ddgl.mesh.mesh.tolist() == [[0, 1], [2, 3]] and dist.get_process_group_ranks(
        ddgl.mesh.get_group("replica")) == [rank % 2, rank % 2 + 2]
    # epochs 1-2: each feeding rank loads only its shard (DistributedSampler), 5 of every 10-sample step
    data = _Counted(*batches(1, B=_N, seed=11, dtype=torch.float64)[0])
    ddgl.fit(ddgl.shard(data, 10, seed=_SEED) if ddgl.feeds else None, epochs=2, lr_schedule=lambda e: 0.5 ** e)
    # epoch 3: the rows' own loaders, shares 6/5 of 11 (the weights b_r / B of the communication hook)
    ddgl.fit(_row_shares(_data(B=11, dtype=torch.float64), ddgl.replica) if ddgl.feeds else None, epochs=3,
             lr_schedule=lambda e: 0.5 ** e)
    state = ddgl.full_state_dict()
    mine = {f"{k}": v.clone() for k, v in ddgl.trainer.model.state_dict().items()}
    params = sum(1 for s in ddgl.trainer.steps for m in (s.stage, s.head) for _ in m.parameters())
    # a NaN in replica row 2's share only: DDP averages it into every replica's gradients in the
    # backward, so the step guard skips the step on both rows alike (nothing changes anywhere)
    x, y = batches(1, B=10, seed=9, dtype=torch.float64)[0]
    x[5:, 0, 1, 2] = float("nan")
    with pytest.raises(TrainingDiverged, match="training diverged in epoch 4"):
        ddgl.train_epoch(_row_shares([(x, y)], ddgl.replica) if ddgl.feeds else None)
    assert [bool(s.skipped) for s in ddgl.trainer.steps] == [True, True]
    assert all(torch.equal(mine[k], v) for k, v in ddgl.trainer.model.state_dict().items())
    parts = [None] * world
    dist.all_gather_object(parts, (mine, ddgl.replication.calls, params, data.read if ddgl.feeds else None))
    if rank == 0:
        torch.save({"state": state, "parts": parts}, os.path.join(out, "result.pt"))
    # with BatchNorm each replica row needs 2 samples of every batch (same launch); a TensorLoader
    # share loads row r's part of every batch, refused for another row
    bn = DistributedDGL(small_model(4), optimizer=sgd, placement=[0, 0, 1, 1], replicas=replicas, timeout=30)
    x, y = batches(1, B=11, seed=4)[0]
    messages = []
    for size, row in ((3, bn.replica), (4, 1 - bn.replica)):
        with pytest.raises(ValueError) as exc:  # 2/1 shares: BatchNorm failed inside torch
            bn.fit(TensorLoader(x, y, size, share=(row, 2)) if bn.feeds else None, epochs=1)
        messages.append(str(exc.value))
    rec = bn.fit(TensorLoader(x, y, 4).share_of(bn.replica, 2) if bn.feeds else None, epochs=1)[0]  # 3 (2/1): skipped
    with open(os.path.join(out, f"bn-{rank}.json"), "w") as f:
        json.dump({"messages": messages, "samples": rec["stage_samples"], "epoch": bn.epoch}, f)


class _ByEpoch:
    """The single-process reference's loader: epoch e's list of whole batches."""

    def __init__(self, epochs):
        self.epochs, self.epoch = epochs, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(self.epochs[self.epoch])


def test_grid_of_groups_and_replicas_equals_the_whole_batch(tmp_path):
    _spawn(_grid_worker, 4, str(tmp_path), 2)
    for rank in range(4):  # replicas refuse too small batches before the first step, skip a last batch that splits 2/1
        got = json.loads((tmp_path / f"bn-{rank}.json").read_text())
        assert got["messages"] == [
            "a batch size of 3 split over 2 replica rows leaves a row 1 sample; each row needs at least 2 (BatchNorm): "
            "expected a batch size >= 4; pass a larger batch size or fewer replicas",
            "rank 0 (replica 1, stages 1-2): the loader of replica row 1 of 2 must load share (0, 2), got share=(1, 2)"]
        assert got["samples"] == [8] * 4 and got["epoch"] == 1  # 2 batches of 4
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    # what each feeding rank read: exactly its DistributedSampler shard of each epoch, from the seed
    x, y = batches(1, B=_N, seed=11, dtype=torch.float64)[0]
    shards = []
    for e in range(2):
        rows = []
        for r in range(2):
            sampler = torch.utils.data.DistributedSampler(range(_N), 2, r, shuffle=True, seed=_SEED, drop_last=True)
            sampler.set_epoch(e)
            rows.append(list(sampler))
        assert len(set(rows[0]) | set(rows[1])) == 54 and len(rows[0]) == len(rows[1]) == 27  # disjoint halves
        shards.append(rows)
    assert shards[0] != shards[1]  # reshuffled each epoch
    for rank in (0, 2):
        assert result["parts"][rank][3] == shards[0][rank // 2] + shards[1][rank // 2]
    assert result["parts"][1][3] is None and result["parts"][3][3] is None
    # the reference: each step's whole batch is the rows' batches side by side
    whole = [[(torch.cat([x[rows[0][i:i + 5]], x[rows[1][i:i + 5]]]), torch.cat([y[rows[0][i:i + 5]], y[rows[1][i:i + 5]]]))
              for i in range(0, 27, 5)] for rows in shards]
    ref = dgl_fast.Trainer(_nobn_model(4), optimizer=sgd, engine="sequential", channels_last=False)
    with one_thread():
        ref.fit(_ByEpoch(whole + [_data(B=11, dtype=torch.float64)]), epochs=3, lr_schedule=lambda e: 0.5 ** e,
                progress=False)
    got = _nobn_model(4)
    got.load_state_dict(result["state"])
    assert_same_state(got, ref.model, rtol=1e-10, atol=1e-10)  # (g1 b1 + g2 b2) / B: rounding only
    for a, b in ((0, 2), (1, 3)):  # the replicas of a stage group hold the same weights, bitwise
        for k in result["parts"][a][0]:
            torch.testing.assert_close(result["parts"][a][0][k], result["parts"][b][0][k], rtol=0, atol=0)
    for _, calls, params, _ in result["parts"]:  # 19 steps of 2 stages, one bucket each: not one message a parameter
        assert calls == 19 * 2 and params == 8, (calls, params)
    untrained = _nobn_model(4).state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in result["state"].items())


# ---------------------------------------------------------------------- asynchronous DGL across ranks

_HOLD_S = 20  # a bound on each wait below, only reached when the schedule is broken (the link timeout is 30 s)


def _async_worker(rank, world, out, events):
    """Epoch 1 with the last stage held: rank 2 waits inside its first step until ranks 0 and 1
    have finished every step of the epoch (sent END and had it delivered). Only what lets each
    rank start is ordered: a rank sends its second message of the epoch once the next rank is
    inside its first step, so that no rank's first take holds the whole epoch. Epoch 2 runs free."""
    model = small_model(3, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ddgl = DistributedDGL(model, optimizer=sgd, placement=[0, 1, 2], mode="async", buffer_capacity=3, timeout=30)
    # each direction of a rank has its own process group (the receiver's thread and the sends)
    assert ddgl.inbound is None or ddgl.outbound is None or ddgl.inbound.group is not ddgl.outbound.group
    count = {"steps": 0, "sends": 0, "saw_done": None}
    step = ddgl.trainer.steps[0].step

    def counted_step(h, y):
        count["steps"] += 1
        if ddgl.epoch == 0 and count["steps"] == 1:
            events["started"][rank].set()
            if rank == 2:  # held until the others are through their epoch
                count["saw_done"] = all(events["done"][r].wait(_HOLD_S) for r in (0, 1))
        return step(h, y)

    ddgl.trainer.steps[0].step = counted_step
    if ddgl.outbound is not None:
        send, drain = ddgl.outbound.send, ddgl.outbound.drain

        def ordered_send(*args, **kwargs):
            count["sends"] += 1
            if ddgl.epoch == 0 and count["sends"] == 2:
                assert events["started"][rank + 1].wait(_HOLD_S), f"rank {rank + 1} never started its first step"
            return send(*args, **kwargs)

        def drain_then_done():
            drain()
            if ddgl.epoch == 0:
                count["epoch1"] = dict(count)
                events["done"][rank].set()

        ddgl.outbound.send, ddgl.outbound.drain = ordered_send, drain_then_done
    recs = ddgl.fit(batches(12, seed=4) if ddgl.feeds else None, epochs=2,
                    callback=lambda r: count.setdefault("epoch1", dict(count)))
    mine = ddgl.trainer.model.state_dict()
    changed = [not torch.equal(before[f"{kind}.{ddgl.stages[int(i)]}.{rest}"], v)
               for key, v in mine.items() for kind, i, rest in [key.split(".", 2)] if v.is_floating_point()]
    parts = [None] * world
    dist.all_gather_object(parts, {"changed": all(changed), "epoch1": count["epoch1"], "steps": count["steps"]})
    if rank == 0:
        torch.save({"parts": parts, "records": recs}, os.path.join(out, "result.pt"))


def test_async_ranks_finish_their_epoch_while_the_last_stage_is_held(tmp_path):
    ctx = mp.get_context("spawn")
    events = {"started": [ctx.Event() for _ in range(3)], "done": [ctx.Event() for _ in range(3)]}
    _spawn(_async_worker, 3, str(tmp_path), events)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    first, second, last = (part["epoch1"] for part in result["parts"])
    # nobody waits for the held stage 3: inside its first step, it saw ranks 0 and 1 through epoch 1
    assert last["saw_done"] is True, result["parts"]
    assert first["steps"] == 12 and first["sends"] == 12 + 1, first  # every batch, then END
    assert second["steps"] >= 1 and second["sends"] == second["steps"] + 1, second  # one message per step
    assert last["steps"] >= 1, last
    # the record counts what each rank trained on (6 samples a step)
    assert result["records"][0]["stage_samples"] == [72, 6 * second["steps"], 6 * last["steps"]], result["records"][0]
    for part in result["parts"]:
        assert part["changed"], part
        assert part["steps"] >= part["epoch1"]["steps"]  # epoch 2 ran free (rank 1 and 2 may take no step in it)
    assert all(0 <= a <= 1 for r in result["records"] for a in r["train_acc"] if a is not None)


def _roll_call_worker(rank, world, out, absent, done):
    from dgl_fast.distributed.agreement import roll_call  # noqa: PLC0415
    from dgl_fast.distributed.protocol import PeerError  # noqa: PLC0415

    layout, got, answers = Layout((0, 1, 2), 1), [], dist.new_group(backend="gloo")
    roll_call(layout, rank, None, answers, 30, f"rank {rank}: gathering the first")  # everyone present: no error
    if rank == absent:  # stalls: never checks in, until the others have answered
        done.wait(120)
        return
    try:
        roll_call(layout, rank, None, answers, 2, f"rank {rank}: gathering the second")
    except PeerError as exc:
        got.append(str(exc))
    with open(os.path.join(out, f"roll{rank}"), "w") as f:
        f.write(got[0] if got else "no error")
    if len(os.listdir(out)) == world - 1:
        done.set()


@pytest.mark.parametrize("absent", [1, 0])
def test_a_roll_call_names_the_rank_that_does_not_answer_on_every_rank(tmp_path, absent):
    """Before a collective of every rank (the epoch's metrics, the checkpoint digests), each rank
    checks in with rank 0: a stalled rank is named by every other rank (a failed collective could
    only say that it failed), rank 0 included."""
    done = mp.get_context("spawn").Event()
    _spawn(_roll_call_worker, 3, str(tmp_path), absent, done)
    name = {0: "rank 0 (stage 1)", 1: "rank 1 (stage 2)"}[absent]
    for rank in {0, 1, 2} - {absent}:
        text = (tmp_path / f"roll{rank}").read_text()
        assert text.startswith(f"rank {rank}: gathering the second failed: {name} did not answer: "), text
        assert "no answer within the timeout" in text or "did not check in with rank 0" in text, text


# ---------------------------------------------------------------------- checkpoints

def _resume_worker(rank, world, out):
    """An uninterrupted run, then a run stopped after epoch 1 and one resumed from its checkpoint
    (torch.distributed.checkpoint) on the same placement and one on another: four runners in turn
    on the same processes (each runner makes its own groups)."""
    ckpt = os.path.join(out, "ckpt")
    states = {}
    for phase, placement in (("straight", [0, 0, 1]), ("first", [0, 0, 1]), ("resume", [0, 0, 1]),
                             ("other", [0, 1, 1])):
        ddgl = DistributedDGL(small_model(3, seed=3, aux="mlp-sr", fused=True), optimizer=sgd, placement=placement,
                              timeout=30)
        data = _data() if ddgl.feeds else None
        if phase == "first":
            ddgl.fit(data, epochs=1, lr_schedule=lambda e: 0.5 ** e, checkpoint_dir=ckpt)
            continue
        if phase != "straight":
            ddgl.load(ckpt)
            assert ddgl.epoch == 1
        # the resumed run checkpoints epochs 2 and 3: epoch 2's folder goes once epoch 3's is complete
        ddgl.fit(data, epochs=3, lr_schedule=lambda e: 0.5 ** e,
                 checkpoint_dir=os.path.join(out, "ck2") if phase == "resume" else None)
        states[phase] = ddgl.full_state_dict()
    # all or nothing: one rank's file changed -> every rank refuses, naming it, nothing loaded
    dist.barrier()
    if rank == 1:
        with open(os.path.join(ckpt, "epoch-00001", "__1_0.distcp"), "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01")
    dist.barrier()
    ddgl = DistributedDGL(small_model(3, seed=3, aux="mlp-sr", fused=True), optimizer=sgd, placement=[0, 0, 1],
                          timeout=30)
    before = {k: v.clone() for k, v in ddgl.trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"rank 0 \(stages 1-2\): .*epoch-00001/__1_0.distcp does not match the "
                                              r"manifest's SHA-256"):
        ddgl.load(ckpt)
    assert all(torch.equal(before[k], v) for k, v in ddgl.trainer.model.state_dict().items()) and ddgl.epoch == 0
    if rank == 0:
        torch.save(states, os.path.join(out, "states.pt"))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    _spawn(_resume_worker, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-00001", "manifest.json"]
    assert sorted(os.listdir(tmp_path / "ck2")) == ["epoch-00003", "manifest.json"]
    states = torch.load(tmp_path / "states.pt")
    a = states["straight"]
    for phase in ("resume", "other"):  # bitwise: the same ops on either placement
        for k in a:
            torch.testing.assert_close(a[k], states[phase][k], rtol=0, atol=0, msg=(phase, k))


# ---------------------------------------------------------------------- start-up agreement

_MISMATCHES = [("width", "model structure"), ("depth", "model structure"), ("seed", "initial weights"),
               ("data", "data"), ("epochs", "epochs")]


def _mismatch_worker(rank, world, out):
    for what, _ in _MISMATCHES:  # one launch per case, in one pair of processes
        K = 4 if what == "depth" and rank == 1 else 3
        seed = 4 if what == "seed" and rank == 1 else 3
        model = _nobn_model(3, dtype=torch.float32) if what == "width" and rank == 1 else small_model(K, seed=seed)
        data = "mnist5k" if what == "data" and rank == 1 else "synthetic"
        try:
            ddgl = DistributedDGL(model, optimizer=sgd, placement="even", timeout=30, fingerprint={"data": data})
            ddgl.fit(_data() if ddgl.feeds else None, epochs=3 if what == "epochs" and rank == 1 else 2)
            message = None
        except ConfigMismatch as exc:
            message = str(exc)
        with open(os.path.join(out, f"{what}-{rank}.txt"), "w") as f:
            f.write(repr(message))


def test_ranks_launched_differently_refuse_to_start(tmp_path):
    _spawn(_mismatch_worker, 2, str(tmp_path))
    for what, field in _MISMATCHES:
        for rank in range(2):
            message = (tmp_path / f"{what}-{rank}.txt").read_text()
            assert "refuse to start" in message and f" {field} (" in message, (what, message)
            assert "on rank 0" in message and "on rank 1" in message


# ---------------------------------------------------------------------- small pieces

def test_layout_and_even_placement():
    lay = Layout((0, 0, 1, 2), replicas=2)
    assert (lay.groups, lay.world) == (3, 6)
    assert lay.coords(4) == (1, 1) and lay.rank(1, 1) == 4
    assert lay.describe(4) == "rank 4 (replica 2, stage 3)"
    assert Layout((0, 0, 1), 1).describe(0) == "rank 0 (stages 1-2)"
    assert even_placement(5, 2) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="cannot place 2 stages on 3 stage groups"):
        even_placement(2, 3)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            DistributedDGL(small_model(2), optimizer=sgd)


def test_tensor_loader_shares_concatenate_to_its_batches():
    # each row reads only its share of each batch, with the whole batch's order and augmentation draws
    g = torch.Generator().manual_seed(21)
    x, y = (torch.rand(23, 3, 7, 5, generator=g) * 255).to(torch.uint8)[:, :, :, 1:], torch.randint(0, 4, (23,), generator=g)
    whole = TensorLoader(x, y, 7, shuffle=True, augment=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), seed=3)
    rows = [whole.share_of(r, 3) for r in range(3)]
    assert all(len(r) == len(whole) == 4 for r in rows) and rows[1].share == (1, 3)
    for epoch in (0, 1):
        for loader in (whole, *rows):
            loader.set_epoch(epoch)
        shares = [list(r) for r in rows]
        assert [len(b[1]) for b in shares[0]] == [3, 3, 3, 1] and [len(b[1]) for b in shares[2]] == [2, 2, 2, 0]
        for i, (xb, yb) in enumerate(whole):  # 7, 7, 7, 2: shares 3/2/2, ..., 1/1/0
            assert torch.equal(torch.cat([s[i][0] for s in shares]), xb) and torch.equal(
                torch.cat([s[i][1] for s in shares]), yb)
    with pytest.raises(ValueError, match=r"share must be \(row, rows\) with 0 <= row < rows, got \(2, 2\)"):
        TensorLoader(x, y, 4, share=(2, 2))
    with pytest.raises(ValueError, match="batch_size is the whole step's batch and must split evenly over the 2 replica "
                                         "rows, got 9"):
        shard_loader(torch.utils.data.TensorDataset(x, y), 9, 0, 2)


def _sync_bn_worker(rank, world, out):
    """Two replicas of one stage group on CUDA (one GPU shared over gloo, or a GPU each), BatchNorm
    converted to SyncBatchNorm over the replica group: each row trains on its half of every batch."""
    device = torch.device("cuda", rank % torch.cuda.device_count())
    ddgl = DistributedDGL(small_model(2, dtype=torch.float64), optimizer=sgd, placement=[0, 0], replicas=2,
                          device=device, sync_bn=True, timeout=60)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in ddgl.trainer.model.modules()) >= 2
    x, y = batches(1, B=24, seed=5, dtype=torch.float64)[0]
    ddgl.fit(TensorLoader(x, y, 8).share_of(ddgl.replica, 2), epochs=2, lr_schedule=lambda e: 0.5 ** e)
    mine = {k: v.detach().cpu() for k, v in ddgl.trainer.model.state_dict().items()}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    if rank == 0:
        torch.save(parts, os.path.join(out, "sync_bn.pt"))


@pytest.mark.cuda
def test_sync_bn_replicas_equal_the_whole_batch_with_batchnorm(tmp_path):
    """With SyncBatchNorm the replicas' statistics are the whole batch's, so (unlike per-replica
    BatchNorm) the grid equals the single-process trainer on the whole batch, BatchNorm and running
    statistics included (float64; CUDA against CPU: rounding only)."""
    _spawn(_sync_bn_worker, 2, str(tmp_path))
    parts = torch.load(tmp_path / "sync_bn.pt")
    x, y = batches(1, B=24, seed=5, dtype=torch.float64)[0]
    ref = dgl_fast.Trainer(small_model(2, dtype=torch.float64), optimizer=sgd, engine="sequential", channels_last=False)
    with one_thread():
        ref.fit(TensorLoader(x, y, 8), epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(parts[0][k], v, rtol=1e-10, atol=1e-10, msg=k)
        torch.testing.assert_close(parts[1][k], parts[0][k], rtol=0, atol=0, msg=k)  # replicas alike, bitwise


def test_checks_in_a_one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"placement must give each of the 2 stages a stage group.*got \[0, 1\]"):
            DistributedDGL(small_model(2), optimizer=sgd, placement=[0, 1])
        with pytest.raises(ValueError, match=r"sync_bn needs CUDA devices \(PyTorch's SyncBatchNorm has no cpu "
                                             r"implementation\), got device cpu"):
            DistributedDGL(small_model(2), optimizer=sgd, sync_bn=True)
        with pytest.raises(ValueError, match="ddp_options may set bucket_cap_mb, gradient_as_bucket_view, static_graph, "
                                             "got 'broadcast_buffers'"):
            DistributedDGL(small_model(2), optimizer=sgd, ddp_options={"broadcast_buffers": True})
        with pytest.raises(ValueError, match="amp, engine and mode cannot be set"):
            DistributedDGL(small_model(2), optimizer=sgd, amp="bf16")
        with pytest.raises(ValueError, match="replicas must divide the world size 1, got 2"):
            DistributedDGL(small_model(2), optimizer=sgd, replicas=2)
        for timeout in (0, 0.001, float("inf"), float("nan")):  # inf: OverflowError, 0.001: DistStoreError before
            with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds from 1 to 1e7, got"):
                DistributedDGL(small_model(2), optimizer=sgd, timeout=timeout)
        ddgl = DistributedDGL(small_model(2), optimizer=sgd)  # one rank holds every stage
        assert ddgl.feeds and ddgl.is_last and ddgl.stages == [0, 1]
        with pytest.raises(ValueError, match=r"rank 0 \(stages 1-2\) feeds stage 1 and must pass the training loader"):
            ddgl.train_epoch(None)
        rec = ddgl.train_epoch(batches(2))
        assert rec["stage_samples"] == [12, 12]
        wild = DistributedDGL(small_model(2), optimizer=lambda p: torch.optim.SGD(p, lr=1e6))
        with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: the loss of stage \d is (nan|inf)"):
            wild.fit(batches(6), epochs=2, checkpoint_dir=str(tmp_path / "ckpt"))
        assert wild.epoch == 0 and wild.history == [] and not (tmp_path / "ckpt").exists()
        # a resumed run keeps its learning-rate plan; a batch of one cannot train BatchNorm
        planned = DistributedDGL(small_model(2), optimizer=sgd)
        planned.fit(batches(2), epochs=1, lr_schedule=lambda e: 0.5 ** e, checkpoint_dir=str(tmp_path / "plan"))
        again = DistributedDGL(small_model(2), optimizer=sgd)
        again.load(str(tmp_path / "plan"))
        with pytest.raises(ValueError, match="giving factor 1 at epoch 1, this fit's lr_schedule gives 0.1 there"):
            again.fit(batches(2), epochs=2, lr_schedule=lambda e: 0.1)
        with pytest.raises(ValueError, match="a batch size of 1 split over 1 replica rows leaves a row 1 sample; each "
                                             r"row needs at least 2 \(BatchNorm\): expected a batch size >= 2"):
            again.fit(TensorLoader(*batches(1, B=3)[0], 1), epochs=2, lr_schedule=lambda e: 0.5 ** e)
        assert again.epoch == 1
    finally:
        dist.destroy_process_group()
