"""Bad input gives a clear error naming expected vs given, and changes nothing."""

import copy

import pytest
import torch
import torch.nn as nn

import dgl_fast
from helpers import assert_unchanged, batches, sgd, small_model, snapshot


@pytest.fixture
def trainer():
    t = dgl_fast.Trainer(small_model(3), optimizer=sgd)
    x, y = batches(1)[0]
    t.step(x, y)  # optimizers now have momentum state to protect
    return t


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, y: (x[:, :2], y), ValueError, r"expected input of shape \[B, 3, 9, 9\], got \[6, 2, 9, 9\]"),
    (lambda x, y: (x[..., :8], y), ValueError, r"expected input of shape \[B, 3, 9, 9\], got \[6, 3, 9, 8\]"),
    (lambda x, y: (x.double(), y), ValueError, "expected input of dtype torch.float32, got torch.float64"),
    (lambda x, y: (x[:0], y[:0]), ValueError, "expected a non-empty batch.*batch size 0"),
    (lambda x, y: (x[:1], y[:1]), ValueError, "batch size 1 cannot train BatchNorm"),
    (lambda x, y: (x, y[:4]), ValueError, r"expected labels of shape \[6\], got \[4\]"),
    (lambda x, y: (x, y.float()), ValueError, "expected integer class labels, got dtype torch.float32"),
    (lambda x, y: (x, torch.where(y == y[0], 5, y)), ValueError, r"expected labels in \[0, 5\), got 5"),
    (lambda x, y: (x, torch.where(y == y[0], -1, y)), ValueError, r"expected labels in \[0, 5\), got -1"),
    (lambda x, y: (x.numpy(), y), TypeError, "expected tensors x and y, got ndarray"),
])
def test_bad_batch_changes_nothing(trainer, make, exc, match):
    x, y = batches(1, seed=5)[0]
    snap = snapshot(trainer)
    step_before = trainer.global_step
    with pytest.raises(exc, match=match):
        trainer.step(*make(x, y))
    assert_unchanged(trainer, snap)
    assert trainer.global_step == step_before


def test_mismatched_stage_and_head_counts():
    stages = [nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)]
    with pytest.raises(ValueError, match="expected one head per stage: got 2 stages and 1 heads"):
        dgl_fast.DecoupledModel(stages, [dgl_fast.AuxHead(4, 7, 10)])
    with pytest.raises(ValueError, match="at least one stage, got 0"):
        dgl_fast.DecoupledModel([], [])


def test_head_channels_do_not_match_stage():
    stages = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)]
    heads = [dgl_fast.AuxHead(4, 9, 10), dgl_fast.AuxHead(6, 9, 10, kind="last")]
    with pytest.raises(ValueError, match=r"head 1 does not accept stage 1's output.*expected features of shape "
                                         r"\[B, 6, 9, 9\], got \[2, 8, 9, 9\]"):
        dgl_fast.DecoupledModel(stages, heads, input_shape=(3, 9, 9))
    # without input_shape the probe runs at the first step, before anything is updated
    model = dgl_fast.DecoupledModel(stages, heads)
    before = copy.deepcopy(model.state_dict())
    trainer = dgl_fast.Trainer(model, optimizer=sgd)
    with pytest.raises(ValueError, match=r"head 1 does not accept stage 1's output"):
        trainer.step(torch.randn(4, 3, 9, 9), torch.randint(0, 10, (4,)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("device,match", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}", "cuda"),
    ("banana:0", "unknown device 'banana:0'"),
])
def test_bad_device(device, match):
    with pytest.raises(ValueError, match=match):
        dgl_fast.Trainer(small_model(1), device=device)


def test_unknown_mode_and_bad_async_options():
    with pytest.raises(ValueError, match="unknown mode 'greedy'; expected one of dgl, sequential, backprop, async"):
        dgl_fast.Trainer(small_model(1), mode="greedy")
    with pytest.raises(ValueError, match="buffer_capacity must be an int >= 1, got 0"):
        dgl_fast.Trainer(small_model(2), mode="async", buffer_capacity=0)
    with pytest.raises(ValueError, match="unknown replay policy 'lru'"):
        dgl_fast.Trainer(small_model(2), mode="async", policy="lru")
    with pytest.raises(ValueError, match=r"slowdown keys are stage numbers 1..2, got 3"):
        dgl_fast.Trainer(small_model(2), mode="async", slowdown={3: 0.1})
    with pytest.raises(ValueError, match=r"slowdown noise must be in \[0, 1\), got 1.0 for stage 1"):
        dgl_fast.Trainer(small_model(2), mode="async", slowdown={1: 1.0})
    with pytest.raises(ValueError, match="unknown schedule 'lockstep'"):
        dgl_fast.Trainer(small_model(2), mode="async", schedule="lockstep")


def test_not_a_model_and_bad_factory():
    with pytest.raises(TypeError, match="expects a dgl_fast.DecoupledModel, got Linear"):
        dgl_fast.Trainer(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer, got list"):
        dgl_fast.Trainer(small_model(1), optimizer=lambda p: list(p))
