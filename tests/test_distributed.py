"""DistributedDGL: stages placed on several processes (gloo on CPU) reproduce the sequential trainer."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dgl_fast
from dgl_fast.distributed import DistributedDGL, even_placement
from helpers import batches, sgd, small_model


def _data():
    data = batches(5, seed=2)
    x, y = batches(1, seed=7)[0]
    return data + [(x[:4], y[:4])]  # a partial last batch travels too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, K, placement):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = small_model(K, seed=3, aux="mlp-sr", fused=True)  # the same weights on every rank
        ddgl = DistributedDGL(model, optimizer=sgd, placement=placement)
        records = ddgl.fit(_data() if ddgl.is_first else None, epochs=2, lr_schedule=lambda e: 0.5 ** e)
        state = ddgl.full_state_dict()
        if rank == 0:
            torch.save({"state": state, "records": records, "stages": ddgl.stages}, os.path.join(out, "result.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,K,placement", [(2, 3, None), (3, 4, [0, 1, 1, 2])])
def test_distributed_equals_sequential(tmp_path, world, K, placement):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), K, placement), nprocs=world, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    seq = dgl_fast.Trainer(copy.deepcopy(small_model(K, seed=3, aux="mlp-sr", fused=True)), optimizer=sgd,
                           engine="sequential")
    recs = seq.fit(_data(), epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
    expected = seq.model.state_dict()
    assert result["state"].keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(result["state"][k], v, rtol=0, atol=0, msg=k)
    for a, b in zip(result["records"], recs):
        assert a["stage_samples"] == b["stage_samples"] == [34] * K
        assert a["train_acc"] == b["train_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_even_placement_and_errors():
    assert even_placement(5, 2) == [0, 0, 0, 1, 1]
    assert even_placement(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot place 2 stages on 3 ranks"):
        even_placement(2, 3)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            DistributedDGL(small_model(2), optimizer=sgd)


def test_placement_checks_in_a_one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"placement must give each of the 2 stages a rank.*got \[0, 1\]"):
            DistributedDGL(small_model(2), optimizer=sgd, placement=[0, 1])
        with pytest.raises(ValueError, match="amp, engine and mode cannot be set"):
            DistributedDGL(small_model(2), optimizer=sgd, amp="bf16")
        ddgl = DistributedDGL(small_model(2), optimizer=sgd)  # one rank holds every stage
        assert ddgl.is_first and ddgl.is_last and ddgl.stages == [0, 1]
        with pytest.raises(ValueError, match="the first rank must pass the training loader"):
            ddgl.train_epoch(None)
        rec = ddgl.train_epoch(batches(2))
        assert rec["stage_samples"] == [12, 12]
    finally:
        dist.destroy_process_group()


def test_cli_under_torchrun(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "dgl_fast", "train", "--distributed", "--data", "synthetic", "--in-size", "8", "--model", "aux-study",
           "--depth", "3", "--width", "8", "--aux", "mlp", "--epochs", "2", "--batch-size", "64", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out accuracy (synthetic, 2 ranks)" in res.stdout
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["placement"] == [0, 0, 1] and summary["epochs_done"] == 2
    assert all(n > 0 for n in summary["train"][-1]["stage_samples"])


def test_cli_distributed_needs_torchrun(capsys):
    from dgl_fast import cli

    if "RANK" in os.environ:
        pytest.skip("running under a launcher")
    assert cli.main(["train", "--distributed", "--data", "synthetic", "--no-progress"]) == 2
    assert "--distributed expects to be launched by torchrun" in capsys.readouterr().err
