"""Small models and plain-PyTorch training loops the tests compare against."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import dgl_fast


def small_model(K: int, seed: int = 0, in_ch: int = 3, size: int = 9, classes: int = 5, aux: str = "mlp",
                fused: bool = False, dtype=torch.float32):
    """K conv+BN+ReLU stages on odd-sized inputs, AuxHeads on each (plain-PyTorch heads unless
    ``fused``: trainer tests check the schedule; tests/test_aux_head.py checks the fused ops)."""
    torch.manual_seed(seed)
    stages, heads, c = [], [], in_ch
    s = size
    for j in range(K):
        cout = 4 + 2 * j
        stride = 2 if j % 2 == 1 else 1
        stages.append(nn.Sequential(nn.Conv2d(c, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()))
        s = (s + 2 - 3) // stride + 1
        kind = "last" if j == K - 1 else aux
        heads.append(dgl_fast.AuxHead(cout, s, classes, kind=kind, hidden=12, fused=fused))
        c = cout
    return dgl_fast.DecoupledModel(stages, heads, input_shape=(in_ch, size, size)).to(dtype)


def batches(n: int, B: int = 6, in_ch: int = 3, size: int = 9, classes: int = 5, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, in_ch, size, size, generator=g).to(dtype), torch.randint(0, classes, (B,), generator=g))
            for _ in range(n)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def plain_dgl(model, data, opt_factory=sgd):
    """The DGL loop of PAPER.md section 1, written with nothing from dgl_fast but the model."""
    model = copy.deepcopy(model)
    model.train()
    opts = [opt_factory(list(s.parameters()) + list(h.parameters())) for s, h in zip(model.stages, model.heads)]
    for x, y in data:
        h = x
        for stage, head, opt in zip(model.stages, model.heads, opts):
            h = stage(h.detach())
            loss = F.cross_entropy(head.to_reference()(h), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model


def plain_backprop(model, data, opt_factory=sgd):
    model = copy.deepcopy(model)
    model.train()
    params = [p for s in model.stages for p in s.parameters()] + list(model.heads[-1].parameters())
    opt = opt_factory(params)
    for x, y in data:
        h = x
        for stage in model.stages:
            h = stage(h)
        F.cross_entropy(model.heads[-1].to_reference()(h), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def assert_same_state(a: nn.Module, b: nn.Module, *, rtol: float, atol: float):
    """Every parameter and buffer of ``a`` equals ``b``'s: bitwise (``rtol=atol=0``) where both
    ran identical ops, else in float64 to 1e-10 (no float32 tolerance that depends on the CPU)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in a memory layout: "nchw", "channels_last", or "noncontig" (a
    strided view: every other column of a wider tensor)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


def snapshot(trainer):
    """Copies of a trainer's model and optimizer states, for :func:`assert_unchanged`."""
    return copy.deepcopy(trainer.model.state_dict()), [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]


def assert_unchanged(trainer, snap):
    """Every model tensor and optimizer state tensor is bitwise what :func:`snapshot` saw."""
    model_state, opt_states = snap
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, model_state[k]), k
    for opt, saved in zip(trainer.optimizers, opt_states):
        now = opt.state_dict()["state"]
        assert now.keys() == saved["state"].keys()
        for i in now:
            for name, v in now[i].items():
                assert torch.equal(v, saved["state"][i][name]), (i, name)


def assert_within_2x(ours, theirs, exact, what="", scale=None):
    """The numerics rule: our error against a float64 result is at most twice the error of plain
    PyTorch in the same precision. Errors below 1e-5 of `scale` (default: the largest exact value)
    are ignored: quantities that are mathematically zero (e.g. the gradient of a BatchNorm shift
    that the next BatchNorm cancels) are pure rounding noise on both sides."""
    exact = exact.double()
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (theirs.double() - exact).abs().max().item()
    floor = 1e-5 * (scale if scale is not None else exact.abs().max().item())
    assert err_ours <= 2 * err_torch + floor, f"{what}: error {err_ours:.3g} vs PyTorch's {err_torch:.3g}"
