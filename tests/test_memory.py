"""dgl_fast.memory: per-stage bytes of a training step, against independent counts."""

import copy

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast.memory import memory_report
from helpers import sgd, small_model


def _saved_bytes(fn, exclude):
    """Plain count of the distinct storages autograd saves while fn() runs, minus `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _model(K=3, seed=0):
    return small_model(K, seed=seed, aux="mlp-sr")


def test_stage_parts_exact_for_a_small_net():
    torch.manual_seed(0)
    B, H = 5, 7
    stages = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())]
    heads = [dgl_fast.AuxHead(4, H, 5, kind="linear"), dgl_fast.AuxHead(6, H, 5, kind="last")]
    model = dgl_fast.DecoupledModel(stages, heads, input_shape=(3, H, H))
    x, y = torch.randn(B, 3, H, H), torch.randint(0, 5, (B,))
    opts = [sgd(model.stage_parameters(j)) for j in range(2)]
    r = memory_report(model, x, y, opts)
    s1, s2 = r.stages
    f = 4  # float32
    assert s1.input == B * 3 * H * H * f and s1.output == B * 4 * H * H * f and s2.output == 0
    assert s1.saved_stage == 0  # conv saves its input (the input) and weight (a parameter); ReLU its output (the output)
    # conv output (saved by BatchNorm) and the ReLU output (the last stage's: kept) + BN's per-channel statistics
    act = B * 6 * H * H * f
    assert 2 * act <= s2.saved_stage <= 2 * act + 4 * 6 * f
    for s, j in ((s1, 0), (s2, 1)):
        n = sum(p.numel() for p in model.stage_parameters(j)) * f
        assert s.params == s.grads == s.optimizer_state == n  # SGD with momentum: one buffer per parameter
        assert s.resident == 2 * n
    # gradients live only during their stage's step in the sequential engine
    assert r.dgl_sequential == s1.resident + s2.resident + max(s1.step + s1.grads, s2.step + s2.grads)
    # backprop: all activations + the last stage's and head's gradients, or stage 1's activations +
    # every gradient, whichever is larger
    g_last = sum(p.numel() for p in list(stages[1].parameters()) + list(heads[1].parameters())) * f
    g_first = sum(p.numel() for p in stages[0].parameters()) * f
    assert s2.backprop_grads == g_last and s1.backprop_grads == g_first
    peak = max(r.backprop_activations + g_last, s1.input + s1.saved_stage + g_first + g_last)
    assert r.backprop == r.backprop_resident + peak


def test_backprop_total_matches_a_plain_count():
    model = _model(K=3, seed=1)
    x, y = torch.randn(6, 3, 9, 9), torch.randint(0, 5, (6,))
    r = memory_report(model, x, y, [sgd(model.stage_parameters(j)) for j in range(3)])
    params = list(model.parameters())

    def backprop_forward():
        h = x
        for stage in model.stages:
            h = stage(h)
        return model.heads[-1].loss(h, y)[0]

    saved, _ = _saved_bytes(backprop_forward, params)
    assert r.backprop_activations == saved
    assert r.dgl_sequential < r.dgl_pipelined


def test_report_changes_nothing_and_counts_real_optimizer_state():
    model = _model(K=2, seed=2)
    trainer = dgl_fast.Trainer(model, optimizer=sgd)
    x, y = torch.randn(6, 3, 9, 9), torch.randint(0, 5, (6,))
    before = copy.deepcopy(model.state_dict())
    r0 = trainer.memory_report(x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics restored too
    assert all(p.grad is None for p in model.parameters())
    trainer.step(x, y)  # now SGD has real momentum buffers: the estimate was their size
    r1 = trainer.memory_report(x, y)
    assert [s.optimizer_state for s in r0.stages] == [s.optimizer_state for s in r1.stages]
    assert all(s.optimizer_state > 0 for s in r1.stages)


def test_bf16_autocast_shrinks_activations():
    model = _model(K=2, seed=3)
    x, y = torch.randn(8, 3, 9, 9), torch.randint(0, 5, (8,))
    fp32 = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd).memory_report(x, y)
    bf16 = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, amp="bf16").memory_report(x, y)
    # the hand-off is bf16: exactly half; saved activations shrink (autocast also saves bf16 copies
    # of its inputs and weights, so less than half)
    assert 2 * bf16.stages[0].output == fp32.stages[0].output
    assert bf16.stages[0].saved_stage < fp32.stages[0].saved_stage
    assert bf16.stages[0].saved_head < 0.75 * fp32.stages[0].saved_head
    assert bf16.stages[0].params == fp32.stages[0].params


def test_table_and_errors():
    model = _model(K=2)
    x, y = torch.randn(4, 3, 9, 9), torch.randint(0, 5, (4,))
    text = memory_report(model, x, y).table()
    assert text.count("\n| ") == 2 and "end-to-end backprop" in text  # a row per stage
    with pytest.raises(ValueError, match="expected one optimizer per stage \\(2\\), got 1"):
        memory_report(model, x, y, [sgd(model.parameters())])
    with pytest.raises(TypeError, match="expects a dgl_fast.DecoupledModel, got Sequential"):
        memory_report(nn.Sequential(), x, y)
