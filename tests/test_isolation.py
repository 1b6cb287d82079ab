"""check_isolation: every rule and paper model passes, with the parameters each loss reaches equal
to those a plain ``torch.autograd.grad(..., allow_unused=True)`` finds; the trainer is left as it
was; models and engines built to leak (a head reading another module's parameter, a shared
parameter, a hand-off still attached to its graph) are caught; ``train --check-isolation``."""

import copy

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast import cli, models
from dgl_fast.rules import RULES
from dgl_fast.stage import StageStep, head_loss

TINY = (3, 3, 4, 6)
# InfoPro reconstructs x * std + mean, which must lie in [0, 1]: inputs from torch.rand with these
IDENTITY = {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}


def _batch(seed=0, B=5, side=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, side, side, generator=g), torch.randint(0, 10, (B,), generator=g)


def _plain_reached(model, x, y, mode):
    """Reference: module by module as the harness runs them, the parameter names whose gradient
    torch.autograd.grad(allow_unused=True) returns (on a copy, in train mode)."""
    model = copy.deepcopy(model).train()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    out, h = [], x
    stages = [nn.Sequential(*model.stages)] if mode == "backprop" else model.stages
    heads = [model.heads[-1]] if mode == "backprop" else model.heads
    for stage, head in zip(stages, heads):
        h = stage(h.detach())
        loss, _ = head_loss(head, h, y, x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append({n for (n, _), g in zip(named, grads) if g is not None})
    return out


def _momenta(trainer):
    return [v.clone() for o in trainer.optimizers for st in o.state.values() for v in st.values()
            if isinstance(v, torch.Tensor)]


def _state(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()}, _momenta(trainer), trainer.global_step,
            torch.get_rng_state())


def _assert_unchanged(trainer, before):
    model, momenta, step, rng = before
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.items())
    now = _momenta(trainer)
    assert len(now) == len(momenta) and all(torch.equal(a, b) for a, b in zip(now, momenta))
    assert trainer.global_step == step
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws were made on a forked RNG


def _check_passes(model, x, y, mode="dgl", engine="sequential", **kw):
    trainer = dgl_fast.Trainer(model, mode=mode, engine=engine, **kw)
    trainer.step(x, y)  # optimizer state exists: the check must not move it either
    before = _state(trainer)
    report = dgl_fast.check_isolation(trainer, x, y)  # strict: raises on a leak
    _assert_unchanged(trainer, before)
    assert report.ok and not report.leaks
    K = 1 if mode == "backprop" else model.num_stages
    assert len(report.modules) == K
    want = _plain_reached(model, x, y, mode)
    for j, m in enumerate(report.modules):
        assert set(m.reached) == want[j], j
        assert m.owned == len(m.reached)  # these rules' losses reach every parameter they own
        assert m.hands_on_grad is (None if j == K - 1 else False)
    text = str(report)
    assert text.count("none") == K and "isolated:" in text.splitlines()[-1]
    return report


OPTIONS = {"dgl": {"droprate": 0.3}, "infopro": IDENTITY, "auglocal": {"aux_net_depth": 2}}


@pytest.mark.parametrize("rule", [r for r in RULES if r != "backprop"])  # a new rule is checked here too
def test_every_rule_is_isolated(rule):
    assert {"dgl", "infopro", "predsim", "auglocal"} <= set(RULES)
    torch.manual_seed(1)
    model = models.build("resnet32", local_modules=6, rule=rule, widths=TINY, in_size=8, **OPTIONS.get(rule, {}))
    x, y = _batch()
    report = _check_passes(model, x, y)
    assert report.modules[0].name == f"module 1/{model.num_stages} (0, 0)..(0, 0)"


@pytest.mark.parametrize("name,kw,mode", [
    ("aux-study", dict(depth=3, width=4, in_size=8), "pipeline"),  # batches stay in flight, untouched
    ("vgg11", dict(width=4, stages=3, in_size=16, aux="cnn"), "sequential"),
    ("resnet20", dict(width=4, stages=3, in_size=8, aux="mlp"), "async"),
    ("resnet32", dict(rule="backprop", local_modules=3, widths=TINY, in_size=8), "backprop"),
])
def test_paper_models_and_modes_are_isolated(name, kw, mode):
    torch.manual_seed(2)
    extra = dict(buffer_capacity=2, schedule="round_robin") if mode == "async" else {}
    if mode == "pipeline":
        mode, extra = "dgl", {"engine": "pipeline"}
    _check_passes(models.build(name, **kw), *_batch(3, B=6, side=kw["in_size"]), mode=mode, **extra)


class _PeekingHead(nn.Module):
    """A head whose loss also reads another module's parameter, held where nn.Module does not
    register it (so the parameter stays the other module's only)."""

    def __init__(self, head, other):
        super().__init__()
        self.head, self._peek = head, [other]

    def forward(self, h):
        return self.head(h) + 0.0 * self._peek[0].sum()


def test_a_head_reading_another_modules_parameter_is_caught():
    torch.manual_seed(3)
    model = models.build("resnet32", local_modules=4, rule="dgl", widths=TINY, in_size=8)
    model.heads[2] = _PeekingHead(model.heads[2], model.stages[0][0][0].weight)  # module 3 reads the stem's conv
    trainer = dgl_fast.Trainer(model, engine="sequential")
    x, y = _batch(4)
    before = _state(trainer)
    with pytest.raises(dgl_fast.IsolationError, match=r"1 leaks\): module 3/4 \(1, 1\)\.\.\(1, 1\): reaches "
                       r"stages\.0\.0\.0\.weight \(owned by module 1\)$"):
        dgl_fast.check_isolation(trainer, x, y)
    report = dgl_fast.check_isolation(trainer, x, y, strict=False)
    _assert_unchanged(trainer, before)
    assert [m.ok for m in report.modules] == [True, True, False, True]
    assert "stages.0.0.0.weight" in report.modules[2].reached and "NOT isolated" in str(report)
    with pytest.raises(dgl_fast.IsolationError):
        report.raise_if_leaks()


def test_a_parameter_shared_by_two_modules_is_caught():
    torch.manual_seed(4)
    model = models.build("resnet32", local_modules=4, rule="dgl", widths=TINY, in_size=8)
    model.stages[2][0].conv1 = model.stages[1][0].conv1  # modules 2 and 3 share a conv (blocks (1, 0), (1, 1))
    trainer = dgl_fast.Trainer(model, engine="sequential")
    report = dgl_fast.check_isolation(trainer, *_batch(5), strict=False)
    assert report.leaks == ["module 2/4 (1, 0)..(1, 0): reaches stages.1.0.conv1.weight (shared with module 3)",
                            "module 3/4 (1, 1)..(1, 1): reaches stages.1.0.conv1.weight (shared with module 2)"]


def test_a_tensor_no_module_owns_and_a_bad_argument():
    torch.manual_seed(6)
    model = models.build("resnet32", local_modules=3, rule="dgl", widths=TINY, in_size=8)
    outside = torch.randn(5, 7, requires_grad=True)  # a leaf no module registers (and no optimizer steps)
    model.heads[0] = _PeekingHead(model.heads[0], outside)
    trainer = dgl_fast.Trainer(model, engine="sequential")
    report = dgl_fast.check_isolation(trainer, *_batch(7), strict=False)
    assert report.leaks == ["module 1/3 (0, 0)..(0, 0): reaches a tensor of shape [5, 7] that is no module's parameter"]
    assert "<tensor [5, 7]>" in report.modules[0].reached
    with pytest.raises(TypeError, match="check_isolation expects a dgl_fast.Trainer, got DecoupledModel"):
        dgl_fast.check_isolation(model, *_batch(7))


def _unbroken_hand_off(monkeypatch):
    """An engine bug: the stage step hands on its output still attached to its stage's graph."""
    step = StageStep.step

    def leaky(self, h_in, y, image=None):
        h, loss, correct = step(self, h_in, y, image)
        return h + 0.0 * next(self.stage.parameters()).sum(), loss, correct

    monkeypatch.setattr(StageStep, "step", leaky)


def test_a_hand_off_that_requires_grad_is_caught(monkeypatch):
    torch.manual_seed(5)
    model = models.build("resnet32", local_modules=3, rule="predsim", widths=TINY, in_size=8)
    trainer = dgl_fast.Trainer(model, engine="sequential")
    _unbroken_hand_off(monkeypatch)
    report = dgl_fast.check_isolation(trainer, *_batch(6), strict=False)
    assert [m.hands_on_grad for m in report.modules] == [True, True, None]
    assert report.leaks[0] == "module 1/3 (0, 0)..(0, 0): hands on an activation that requires grad (grad_fn AddBackward0)"
    assert len(report.leaks) == 2  # the next module's step detaches its input: its loss stays its own


def test_cli_check_isolation(capsys, monkeypatch):
    base = ["train", "--model", "resnet32", "--local-modules", "3", "--rule", "infopro", "--width", "2",
            "--data", "digits", "--epochs", "1", "--no-progress", "--check-isolation"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "isolation check on the first batch (128 images):" in out and "module 3/3 (1, 1)..(3, 4)" in out
    assert "isolated: every module's loss" in out and "held-out accuracy" in out
    _unbroken_hand_off(monkeypatch)
    assert cli.main(base) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("error: a gradient crosses local modules (2 leaks): module 1/3")
    assert "epoch 1:" not in captured.err  # stopped before training
    assert "held-out accuracy" not in captured.out
    assert cli.main([*base, "--distributed"]) == 2
    assert "argument --check-isolation: checks the stage steps in one process" in capsys.readouterr().err
