"""The reference trainer reproduces plain PyTorch DGL / backprop loops; sequential greedy freezes."""

import copy
import math

import pytest
import torch

import dgl_fast
from helpers import assert_same_state, batches, plain_backprop, plain_dgl, sgd, small_model

# The trainer and the plain loops run different ops for the same head (the loops call
# head.to_reference()), so float32 results differ with the CPU's math library: the equivalence
# is checked in float64, to 1e-10.
F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_dgl_equals_plain_loop(K):
    model = small_model(K, seed=K, dtype=torch.float64)
    data = batches(5, dtype=torch.float64)
    expected = plain_dgl(model, data)
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="dgl")
    for x, y in data:
        out = trainer.step(x, y)
    assert out.losses.shape == (K,) and out.correct.shape == (K,)
    assert torch.isfinite(out.losses).all()
    assert_same_state(trainer.model, expected, **F64)
    # and the run really trained something
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), model.parameters()))


@pytest.mark.parametrize("aux", ["mlp", "mlp-sr"])
def test_dgl_with_fused_heads_equals_plain_loop_with_reference_heads(aux):
    # The trainer runs the fused aux-head ops; the plain loop runs head.to_reference().
    model = small_model(3, seed=6, aux=aux, fused=True, dtype=torch.float64)
    assert model.heads[0].uses_fused_ops()
    data = batches(4, dtype=torch.float64)
    expected = plain_dgl(model, data)
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd)
    for x, y in data:
        trainer.step(x, y)
    assert_same_state(trainer.model, expected, **F64)


def test_dgl_equals_plain_loop_with_noncontiguous_input():
    model = small_model(2, seed=3, dtype=torch.float64)
    data = [(x.transpose(2, 3).contiguous().transpose(2, 3), y) for x, y in batches(3, dtype=torch.float64)]
    assert not data[0][0].is_contiguous()
    expected = plain_dgl(model, data)
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd)
    for x, y in data:
        trainer.step(x, y)
    assert_same_state(trainer.model, expected, **F64)


def test_step_losses_match_heads():
    model = small_model(3, seed=5, dtype=torch.float64)
    x, y = batches(1, dtype=torch.float64)[0]
    ref = copy.deepcopy(model).train()
    trainer = dgl_fast.Trainer(model, optimizer=sgd)
    out = trainer.step(x, y)
    h = x
    for j in range(3):
        h = ref.stages[j](h)
        logits = ref.heads[j](h)
        # StepOutput.losses are float32: float64 losses equal to ~1e-16, each rounded once (one ulp apart at most)
        torch.testing.assert_close(out.losses[j], torch.nn.functional.cross_entropy(logits, y).float(), rtol=2**-23, atol=0)
        assert int(out.correct[j]) == int((logits.argmax(1) == y).sum())


def test_backprop_equals_plain_loop():
    model = small_model(3, seed=7, dtype=torch.float64)
    data = batches(4, dtype=torch.float64)
    expected = plain_backprop(model, data)
    trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="backprop")
    for x, y in data:
        out = trainer.step(x, y)
    assert_same_state(trainer.model, expected, **F64)
    assert math.isnan(out.losses[0]) and not math.isnan(out.losses[-1])


def test_sequential_freezes_earlier_stages():
    model = small_model(3, seed=9)
    data = batches(3)
    trainer = dgl_fast.Trainer(model, optimizer=sgd, mode="sequential")
    for x, y in data:
        trainer.step(x, y)
    stage0 = copy.deepcopy(trainer.model.stages[0].state_dict())
    head0 = copy.deepcopy(trainer.model.heads[0].state_dict())
    stage2_before = copy.deepcopy(trainer.model.stages[2].state_dict())
    trainer.active_stage = 1
    for x, y in batches(3, seed=11):
        out = trainer.step(x, y)
    for k, v in trainer.model.stages[0].state_dict().items():  # includes BN running stats
        assert torch.equal(v, stage0[k]), k
    for k, v in trainer.model.heads[0].state_dict().items():
        assert torch.equal(v, head0[k]), k
    for k, v in trainer.model.stages[2].state_dict().items():
        assert torch.equal(v, stage2_before[k]), k
    assert math.isnan(out.losses[0]) and not math.isnan(out.losses[1]) and math.isnan(out.losses[2])


def test_sequential_fit_walks_stages_and_schedule():
    model = small_model(2, seed=2)
    loader = batches(2)
    trainer = dgl_fast.Trainer(model, optimizer=sgd, mode="sequential")
    records = trainer.fit(loader, epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
    assert [r["stage"] for r in records] == [1, 1, 2, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.025, 0.05, 0.025])
    assert records[0]["train_loss"][1] is None and records[-1]["train_loss"][0] is None


def test_fit_evaluate_learns_a_learnable_task():
    from dgl_fast import data

    spec = data.load("synthetic", batch_size=32, in_size=8, num_classes=3, synthetic_size=512, seed=0)
    model = dgl_fast.models.build("aux-study", num_classes=3, depth=2, width=8, in_size=8, aux="mlp")
    trainer = dgl_fast.Trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    before = trainer.evaluate(spec.test)
    trainer.fit(spec.train, epochs=4, eval_loader=spec.test, progress=False)
    after = trainer.evaluate(spec.test)
    assert len(after) == 2 and len(trainer.history) == 4
    assert after[-1] > max(before[-1], 1 / 3) + 0.1


def test_ensemble_of_heads_weighted_by_depth():
    model = small_model(3, seed=12)
    tr = dgl_fast.Trainer(model, optimizer=sgd)
    for x, y in batches(4):
        tr.step(x, y)
    data = batches(2, seed=20)
    got = tr.evaluate_ensemble(data)
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for x, y in data:
            probs = sum(2.0 ** (j + 1) * torch.softmax(logits, 1) for j, logits in enumerate(model.forward_all(x)))
            hits += int((probs.argmax(1) == y).sum())
            n += len(y)
    assert got == hits / n
    assert len(tr.evaluate(data)) == 3


def test_channels_last_auto_follows_the_rule_and_is_held_by_the_trainer():
    cpu = dgl_fast.cpu_features()
    fast_cpu = cpu["onednn"] and cpu["arch"].lower() in ("x86_64", "amd64")
    # float32 convolutions on the CPU: on exactly where oneDNN runs channels_last natively
    tr = dgl_fast.Trainer(small_model(2, seed=3), optimizer=sgd)
    assert tr.channels_last is fast_cpu
    w = next(p for p in tr.model.parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last) is fast_cpu or w.shape[-1] == w.shape[-2] == 1
    # float64 (oneDNN has no float64 convolutions): off
    assert dgl_fast.Trainer(small_model(2, seed=3, dtype=torch.float64), optimizer=sgd).channels_last is False
    # a model without 2-d convolutions: off
    mlp = dgl_fast.DecoupledModel([torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))],
                                  [torch.nn.Linear(7, 3)])
    assert dgl_fast.Trainer(mlp, optimizer=sgd).channels_last is False
    # explicit choices win
    assert dgl_fast.Trainer(small_model(2, seed=3), optimizer=sgd, channels_last=False).channels_last is False
    assert dgl_fast.Trainer(small_model(2, seed=3), optimizer=sgd, channels_last=True).channels_last is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="channels_last must be True, False or 'auto'"):
            dgl_fast.Trainer(small_model(2, seed=3), optimizer=sgd, channels_last=bad)


def test_channels_last_auto_trains_as_the_explicit_choice_bitwise():
    model, data = small_model(3, seed=4), batches(3)
    auto = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd)
    explicit = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, channels_last=auto.channels_last)
    for x, y in data:
        auto.step(x, y)
        explicit.step(x, y)
    assert_same_state(auto.model, explicit.model, rtol=0, atol=0)
