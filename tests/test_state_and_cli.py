"""Checkpoints (atomic save, exact resume) and the command line."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import dgl_fast
from dgl_fast import cli, data
from helpers import assert_same_state, sgd, small_model


def _loader(seed=0):
    x = torch.randn(30, 3, 9, 9, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(seed + 1))
    return data.TensorLoader(x, y, batch_size=7, shuffle=True, seed=seed)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    model = small_model(2, seed=4)
    straight = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=lambda e: 0.5 ** e)
    straight.fit(_loader(), epochs=3, progress=False)

    first = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=lambda e: 0.5 ** e)
    first.fit(_loader(), epochs=1, progress=False)
    first.save(tmp_path / "ck.pt")
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind

    resumed = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=lambda e: 0.5 ** e)
    resumed.load(tmp_path / "ck.pt")
    assert resumed.epoch == 1 and resumed.global_step == first.global_step
    resumed.fit(_loader(), epochs=3, progress=False)
    assert_same_state(resumed.model, straight.model, rtol=0, atol=0)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history]


def test_load_rejects_other_mode(tmp_path):
    t = dgl_fast.Trainer(small_model(1), optimizer=sgd)
    t.save(tmp_path / "a.pt")
    other = dgl_fast.Trainer(small_model(1), optimizer=sgd, mode="backprop")
    with pytest.raises(ValueError, match="saved in mode 'dgl', this trainer runs mode 'backprop'"):
        other.load(tmp_path / "a.pt")


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    t = dgl_fast.Trainer(small_model(1), optimizer=sgd)
    path = tmp_path / "ck.pt"
    t.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]


def test_cli_train_synthetic_writes_metrics_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--in-size", "12", "--model", "aux-study", "--depth", "3", "--width", "8",
            "--aux", "mlp", "--epochs", "2", "--batch-size", "64", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    assert rec["epoch"] == 2 and len(rec["test_acc"]) == 3 and len(rec["train_loss"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and 0 <= summary["test_acc"] <= 1 and 0 <= summary["test_acc_ensemble"] <= 1
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out accuracy" in capsys.readouterr().out
    # resume for one more epoch (with the same --batch-size: another one is refused)
    assert cli.main(args[:-3] + ["--epochs", "3", "--resume", str(out / "checkpoint.pt"), "--out", str(out),
                                 "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_errors_are_clear(capsys):
    assert cli.main(["train", "--data", "synthetic", "--device", "cuda:9", "--no-progress"]) == 2
    assert "error: device 'cuda:9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--mode", "nope"])


def test_python_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "dgl_fast", "info"], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["torch"] == torch.__version__


def test_cli_async_mode(tmp_path):
    out = tmp_path / "async"
    args = ["train", "--data", "synthetic", "--in-size", "8", "--model", "aux-study", "--depth", "3", "--width", "8",
            "--aux", "mlp", "--epochs", "1", "--batch-size", "64", "--mode", "async", "--buffer-capacity", "3",
            "--slowdown", "2:0.1", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(n > 0 for n in rec["stage_samples"])
    assert cli.main(args[:-3] + ["--slowdown", "two", "--no-progress"]) == 2


def test_cli_pipeline_engine_and_engine_errors(tmp_path, capsys):
    args = ["train", "--data", "synthetic", "--in-size", "8", "--model", "aux-study", "--depth", "3", "--width", "8",
            "--aux", "mlp", "--epochs", "1", "--batch-size", "64", "--no-progress"]
    assert cli.main(args + ["--engine", "pipeline"]) == 0
    assert "engine pipeline" in capsys.readouterr().err
    assert cli.main(args + ["--engine", "streams"]) == 2
    assert "engine='streams' needs a CUDA device" in capsys.readouterr().err
    assert cli.main(args + ["--cuda-graphs"]) == 2
    assert "cuda_graphs=True needs a CUDA device" in capsys.readouterr().err
