"""Nothing lost, nothing silent: divergence stops loudly, checkpoints are all-or-nothing and verified,
a killed save leaves the old file and no litter, resume is exact in every mode, evaluate checks."""

import copy
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast import checkpoint, data
from dgl_fast.trainer import TrainingDiverged
from helpers import assert_unchanged, batches, sgd, small_model, snapshot


def _loader(n=30, seed=0, B=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 9, 9, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return data.TensorLoader(x, y, batch_size=B, shuffle=True, seed=seed)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("engine", ["sequential", "pipeline"])
def test_a_nan_pixel_stops_fit_and_the_checkpoint_survives(tmp_path, engine):
    tr = dgl_fast.Trainer(small_model(2, seed=1), optimizer=sgd, engine=engine)
    tr.fit(_loader(), epochs=1, progress=False)
    path = tmp_path / "ck.pt"
    tr.save(path)
    good = path.read_bytes()
    loader = _loader()
    loader.x[11, 0, 4, 4] = float("nan")  # one pixel of one image
    with pytest.raises(TrainingDiverged, match=r"stage 1's loss became nan .* between steps 6 and 8 .*ck.pt \(step 5\), "
                                               r"was written before it and is left untouched") as info:
        tr.fit(loader, epochs=2, progress=False, log_every=3, callback=lambda r: tr.save(path))
    assert info.value.stage == 1 and info.value.last_checkpoint == (str(path), 5)
    assert path.read_bytes() == good and len(tr.history) == 1  # no diverged epoch was recorded or saved
    assert "step(s) with a non-finite loss or gradients were skipped" in str(info.value)
    # the poisoned step never reached the model (tests/test_nonfinite.py); a model made non-finite otherwise
    assert all(bool(v.isfinite().all()) for v in tr.model.state_dict().values() if v.is_floating_point())
    with torch.no_grad():
        tr.model.stages[0][0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="refusing to save .* NaN or infinite values"):
        tr.save(path)
    assert path.read_bytes() == good


def test_divergence_is_found_without_a_progress_bar_and_losses_are_not_hidden():
    tr = dgl_fast.Trainer(small_model(2, seed=2), optimizer=lambda p: torch.optim.SGD(p, lr=1e6))
    with pytest.raises(TrainingDiverged, match="training diverged: stage"):
        tr.fit(_loader(), epochs=3, progress=False, log_every=1)


@pytest.mark.parametrize("make,match", [
    (lambda p: torch.optim.SGD(p, lr=float("nan")), r"expected a finite learning rate > 0, got nan"),
    (lambda p: torch.optim.SGD(p, lr=float("inf")), r"expected a finite learning rate > 0, got inf"),
    (lambda p: torch.optim.SGD(p, lr=0.0), r"expected a finite learning rate > 0, got 0.0"),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=float("nan")), r"expected a finite weight_decay, got nan"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=float("inf")), r"expected a finite dampening, got inf"),
])
def test_bad_hyperparameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        dgl_fast.Trainer(small_model(1), optimizer=make)


@pytest.mark.parametrize("mode", ["dgl", "async"])
@pytest.mark.parametrize("factor", [-0.5, float("nan"), float("inf"), "x"])
def test_bad_schedule_factors_are_refused(mode, factor):
    tr = dgl_fast.Trainer(small_model(2), optimizer=sgd, mode=mode, buffer_capacity=1)
    snap = snapshot(tr)
    with pytest.raises(ValueError, match="lr_schedule"):
        tr.fit(_loader(), epochs=2, lr_schedule=lambda e: factor, progress=False)
    assert_unchanged(tr, snap)
    with pytest.raises(ValueError, match="set_lr_factor: expected"):
        tr.set_lr_factor(factor)


# ---------------------------------------------------------------- loading is all or nothing


def _trained(model, optimizer=sgd, **kw):
    tr = dgl_fast.Trainer(model, optimizer=optimizer, **kw)
    for x, y in batches(2):
        tr.step(x, y)
    return tr


@pytest.mark.parametrize("other,match", [
    (dict(build=dict(width=6)), r"model differs at 'stages\.0\.0\.0\.weight': saved \[4, 3, 3, 3\]"),
    (dict(build=dict(hidden=32)), r"model differs at 'heads\.0\.layers\.3\.weight'"),
    (dict(build=dict(num_classes=7)), r"model differs at 'heads\.0\.layers\.\d+\.weight'"),
    (dict(build=dict(depth=3, block_size=2)), r"model does not match this trainer's: it (lacks|has extra)"),
    (dict(opt=lambda p: torch.optim.Adam(p, lr=1e-3)), r"saved with optimizers \['SGD', 'SGD'\], this trainer uses \['Adam'"),
    (dict(mode="backprop"), r"saved in mode 'dgl', this trainer runs mode 'backprop'"),
])
def test_a_refused_load_changes_nothing(tmp_path, other, match):
    def build(**kw):
        torch.manual_seed(0)
        base = dict(num_classes=5, depth=4, width=4, in_size=8, aux="mlp", block_size=2, hidden=16)
        return dgl_fast.models.build("aux-study", **{**base, **kw})

    src = dgl_fast.Trainer(build(), optimizer=sgd)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    src.step(x, y)
    src.save(tmp_path / "a.pt")
    dst = dgl_fast.Trainer(build(**other.get("build", {})), optimizer=other.get("opt", sgd), mode=other.get("mode", "dgl"))
    dst.step(x, y if other.get("build", {}).get("num_classes", 5) > 4 else y % 4)
    snap, epoch, step = snapshot(dst), dst.epoch, dst.global_step
    with pytest.raises(ValueError, match=match):
        dst.load(tmp_path / "a.pt")
    assert_unchanged(dst, snap)
    assert (dst.epoch, dst.global_step) == (epoch, step)


# ---------------------------------------------------------------- checkpoint files


def test_every_single_byte_flip_is_refused(tmp_path):
    tr = _trained(small_model(2, seed=3))
    path = tmp_path / "ck.pt"
    tr.save(path)
    good = path.read_bytes()
    rng = random.Random(0)
    for _ in range(40):
        i = rng.randrange(len(good))
        bad = bytearray(good)
        bad[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        with pytest.raises(checkpoint.CheckpointError, match="damaged|not a dgl_fast checkpoint"):
            tr.load(path)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="damaged: its SHA-256 does not match"):
        tr.load(path)
    path.write_bytes(os.urandom(1000))
    with pytest.raises(checkpoint.CheckpointError, match="not a dgl_fast checkpoint"):
        tr.load(path)
    path.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a dgl_fast checkpoint \(empty\)"):
        tr.load(path)


def test_checkpoint_permissions_and_stale_temporaries(tmp_path):
    tr = _trained(small_model(1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ck.pt.{dead.pid}.0a1b2c3d.tmp"
    live = tmp_path / f".ck.pt.{os.getppid()}.0a1b2c3d.tmp"  # a running process's save in flight: kept
    other = tmp_path / f".other.pt.{dead.pid}.0a1b2c3d.tmp"  # another checkpoint's: not ours to touch
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    tr.save(tmp_path / "ck.pt")
    assert sorted(os.listdir(tmp_path)) == sorted(["ck.pt", live.name, other.name])
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ck.pt").st_mode & 0o777 == 0o666 & ~umask


_WRITER = """
import sys, torch
from dgl_fast import checkpoint
i = 0
while True:
    checkpoint.save({"i": i, "w": torch.full((3_000_000,), float(i))}, sys.argv[1])
    i += 1
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint_and_leaves_no_litter(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"i": -1, "w": torch.full((3_000_000,), -1.0)}, path)
    rng = random.Random(1)
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
        time.sleep(rng.uniform(1.5, 3.0))  # past the import, inside the save loop
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = checkpoint.load(path)  # the last complete save, intact
        assert torch.equal(state["w"], torch.full((3_000_000,), float(state["i"])))
        checkpoint.save(state, path)  # the next save clears the dead writer's temporary file
        assert os.listdir(tmp_path) == ["ck.pt"]


# ---------------------------------------------------------------- exact resume, every mode


RESUME_CASES = {
    "dgl": dict(mode="dgl"),
    "dgl-pipeline": dict(mode="dgl", engine="pipeline"),
    "backprop": dict(mode="backprop"),
    "sequential": dict(mode="sequential"),
    "async": dict(mode="async", buffer_capacity=3, slowdown={2: 0.5}, seed=4),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_and_resumed_equals_uninterrupted_bitwise(tmp_path, case):
    kw = RESUME_CASES[case]
    model = small_model(3, seed=5)
    epochs = 2
    total = epochs * (3 if case == "sequential" else 1)
    schedule = lambda e: 0.5 ** e  # noqa: E731

    def loader():
        return _loader(n=36, seed=2, B=6)

    straight = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=schedule, **kw)
    straight.fit(loader(), epochs=epochs, progress=False)
    path = tmp_path / "ck.pt"
    first = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=schedule, **kw)

    class Killed(Exception):
        pass

    def save_then_die(record):  # a checkpoint after each epoch, then the process dies mid-run
        first.save(path)
        if record["epoch"] == total - 1:
            raise Killed

    with pytest.raises(Killed):
        first.fit(loader(), epochs=epochs, progress=False, callback=save_then_die)
    resumed = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, lr_schedule=schedule, **kw)
    resumed.load(path)
    resumed.fit(loader(), epochs=epochs, progress=False)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    if case == "async":
        for a, b in zip(straight.buffers, resumed.buffers):
            assert torch.equal(a.storage, b.storage) and torch.equal(a.state, b.state)


def test_sequential_resume_with_other_epochs_is_refused(tmp_path):
    tr = dgl_fast.Trainer(small_model(2, seed=6), optimizer=sgd, mode="sequential")
    tr.fit(_loader(), epochs=1, progress=False)  # stage 1 of a plan of 1 epoch per stage
    tr.save(tmp_path / "ck.pt")
    resumed = dgl_fast.Trainer(small_model(2, seed=6), optimizer=sgd, mode="sequential")
    resumed.load(tmp_path / "ck.pt")
    with pytest.raises(ValueError, match=r"planned with epochs=1 per stage .* resume with epochs=1"):
        resumed.fit(_loader(), epochs=3, progress=False)
    resumed.fit(_loader(), epochs=1, progress=False)
    assert [r["stage"] for r in resumed.history] == [1, 2]


# ---------------------------------------------------------------- evaluate checks its input


@pytest.mark.parametrize("make,match", [
    (lambda x, y: [(x, y[:, None])], r"expected labels of shape \[6\], got \[6, 1\]"),
    (lambda x, y: [(x, y[:1])], r"expected labels of shape \[6\], got \[1\]"),
    (lambda x, y: [(x, y + 5)], r"expected labels in \[0, 5\), got \d+"),
    (lambda x, y: [(x, y - 9)], r"expected labels in \[0, 5\), got -\d+"),
    (lambda x, y: [(x[:, :2], y)], r"expected input of shape \[B, 3, 9, 9\], got \[6, 2, 9, 9\]"),
    (lambda x, y: [(x.to("meta"), y)], r"expected input on the CPU or a CUDA device .* got a tensor on meta"),
    (lambda x, y: [x], r"expected the evaluation loader to yield \(input, labels\) pairs"),
])
def test_evaluate_checks_batches_like_step(make, match):
    tr = _trained(small_model(2, seed=7))
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=match):
        tr.evaluate(make(x, y))
    assert tr.evaluate([(x[:1], y[:1])])[0] in (0.0, 1.0)  # a batch of one is fine for inference


# ---------------------------------------------------------------- smaller holes


def test_small_constructor_holes():
    with pytest.raises(ValueError, match=r"in_size must be an int or \(height, width\) of ints, got 7.5"):
        dgl_fast.AuxHead(8, 7.5, 10)
    with pytest.raises(ValueError, match="ReplayBuffer capacity must be an int >= 1, got True"):
        dgl_fast.ReplayBuffer(True, (2, 3))
    buf = dgl_fast.ReplayBuffer(2, (2, 3))
    with pytest.raises(ValueError, match="expected class labels >= 0, got -7"):
        buf.push(torch.randn(2, 3), torch.tensor([1, -7]))
    assert buf.pushes == 0
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"split must be a list of int indices, got \[1.7\]"):
        dgl_fast.DecoupledModel.from_sequential(seq, split=[1.7])
    with pytest.raises(ValueError, match=r"stage 0 fails on input of shape \[2, 5, 8, 8\] \(input_shape=\(5, 8, 8\)\)"):
        dgl_fast.DecoupledModel.from_sequential(seq, split=[2], input_shape=(5, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape must be positive ints per sample.* got \(3, -4, 8\)"):
        dgl_fast.DecoupledModel.from_sequential(seq, split=[2], input_shape=(3, -4, 8))
