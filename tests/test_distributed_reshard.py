"""Checkpoints of synchronous runs through torch.distributed.checkpoint: saved on one grid, resumed
on another (2 x 2 -> 4 x 1, 2 x 1 and 1 process; 1 process -> 2 x 2), each continuing equal to an
uninterrupted single-process run (float64, no BatchNorm: to rounding); a damaged or missing file
is refused on every rank by name and nothing changes."""

import os
import shutil

import pytest
import torch
import torch.distributed as dist
from test_distributed import _data, _free_port, _nobn_model, _row_shares, _spawn, one_thread

import dgl_fast
from dgl_fast.checkpoint import CheckpointError
from dgl_fast.distributed import DistributedDGL
from helpers import assert_same_state, sgd

_GRIDS = {"2x2": ([0, 0, 1, 1], 2), "4x1": ([0, 1, 2, 3], 1), "2x1": ([0, 0, 1, 1], 1), "1": ([0, 0, 0, 0], 1)}


def _run(grid):
    placement, replicas = _GRIDS[grid]
    return DistributedDGL(_nobn_model(4), optimizer=sgd, placement=placement, replicas=replicas, timeout=30)


def _feed(ddgl):
    data = _data(B=10, dtype=torch.float64)
    if not ddgl.feeds:
        return None
    return data if ddgl.layout.replicas == 1 else _row_shares(data, ddgl.replica)


def _fit(ddgl, epochs, ckpt=None):
    ddgl.fit(_feed(ddgl), epochs=epochs, lr_schedule=lambda e: 0.5 ** e, checkpoint_dir=ckpt)


def _resume(grid, ckpt, out, name):
    ddgl = _run(grid)
    ddgl.load(ckpt)
    assert ddgl.epoch == 1 and len(ddgl.history) == 1
    _fit(ddgl, 2)
    state = ddgl.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(out, f"{name}.pt"))


def _four(rank, world, out):
    ck22, ck1 = os.path.join(out, "ck22"), os.path.join(out, "ck1")
    _fit(_run("2x2"), 1, ck22)  # saved on 2 stage groups x 2 replicas
    assert sorted(os.listdir(ck22)) == ["epoch-00001", "manifest.json"]
    if rank == 0:  # a damaged and a missing file, each in a copy of the set
        for name, damage in (("bad", "flip"), ("gone", "remove")):
            shutil.copytree(ck22, os.path.join(out, name))
            folder = os.path.join(out, name, "epoch-00001")
            shard = max((f for f in os.listdir(folder) if f.endswith(".distcp")),  # one of rank 0's tensors
                        key=lambda f: os.path.getsize(os.path.join(folder, f)))
            if damage == "flip":
                with open(os.path.join(folder, shard), "r+b") as f:
                    f.seek(40)
                    byte = f.read(1)
                    f.seek(40)
                    f.write(bytes([byte[0] ^ 1]))
            else:
                os.remove(os.path.join(folder, shard))
    dist.barrier()
    ddgl = _run("4x1")
    before = {k: v.clone() for k, v in ddgl.trainer.model.state_dict().items()}
    for name, why in (("bad", "does not match the manifest's SHA-256"), ("gone", "is missing")):
        with pytest.raises(CheckpointError, match=rf"resuming from .*{name} failed: rank 0 \(stage 1\): .*"
                                                  rf"epoch-00001/.*\.distcp {why}"):
            ddgl.load(os.path.join(out, name))
    assert ddgl.epoch == 0 and all(torch.equal(before[k], v) for k, v in ddgl.trainer.model.state_dict().items())
    ddgl.load(ck22)  # the same runner, after its refusals
    _fit(ddgl, 2)
    state = ddgl.full_state_dict()
    if rank == 0:
        torch.save(state, os.path.join(out, "4x1.pt"))
    _resume("2x2", ck1, out, "1-to-2x2")  # the reverse: saved by one process


def _two(rank, world, out):
    _resume("2x1", os.path.join(out, "ck22"), out, "2x1")


def test_a_checkpoint_resumes_on_any_grid(tmp_path):
    out = str(tmp_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with one_thread():
            _fit(_run("1"), 1, os.path.join(out, "ck1"))
    finally:
        dist.destroy_process_group()
    _spawn(_four, 4, out)
    _spawn(_two, 2, out)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with one_thread():
            _resume("1", os.path.join(out, "ck22"), out, "1")
    finally:
        dist.destroy_process_group()
    ref = dgl_fast.Trainer(_nobn_model(4), optimizer=sgd, engine="sequential", channels_last=False)
    with one_thread():
        ref.fit(_data(B=10, dtype=torch.float64), epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
    for name in ("4x1", "2x1", "1", "1-to-2x2"):
        got = _nobn_model(4)
        got.load_state_dict(torch.load(tmp_path / f"{name}.pt"))
        assert_same_state(got, ref.model, rtol=1e-10, atol=1e-10)
