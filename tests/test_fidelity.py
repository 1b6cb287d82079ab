"""Fidelity to the authors' network: dgl_fast's aux-study net and heads against a hand-built copy of
the paper's layers (the authors' ``block_conv`` and ``auxillary_classifier2``, re-typed here with
nothing from dgl_fast), trained side by side in float64 from the same weights and batches."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dgl_fast


class PaperBlock(nn.Module):
    """The authors' block_conv: [2x2 max-pool], 3x3 conv with PyTorch's default bias, BN, ReLU."""

    def __init__(self, cin, cout, pool):
        super().__init__()
        self.pool = pool
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)

    def forward(self, x):
        if self.pool:
            x = F.max_pool2d(x, 2)
        return F.relu(self.bn1(self.conv1(x)))


class PaperAux(nn.Module):
    """The authors' auxillary_classifier2: pool to ceil(s/4), n_lin x [1x1 conv, BN, ReLU], pool to
    2x2, mlp_layers x [Linear 4C -> 4C, BN1d, ReLU], Linear."""

    def __init__(self, C, s, classes, n_lin, mlp_layers):
        super().__init__()
        self.in_size = s
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)) for _ in range(n_lin))
        layers = []
        for _ in range(mlp_layers):
            layers += [nn.Linear(4 * C, 4 * C), nn.BatchNorm1d(4 * C), nn.ReLU(True)]
        self.classifier = nn.Sequential(*layers, nn.Linear(4 * C, classes))

    def forward(self, x):
        out = F.adaptive_avg_pool2d(x, (math.ceil(self.in_size / 4), math.ceil(self.in_size / 4)))
        for block in self.blocks:
            out = F.relu(block(out))
        out = F.adaptive_avg_pool2d(out, (2, 2))
        return self.classifier(out.view(out.size(0), -1))


def paper_net(depth, width, in_ch, size, classes, aux):
    blocks, heads, c, s = [], [], in_ch, size
    n_lin = {"mlp-sr": 3, "mlp": 0}[aux]
    for i in range(1, depth + 1):
        pool = i in (2, 4)
        cout = width if i == 1 else (2 * c if pool else c)
        s = s // 2 if pool else s
        blocks.append(PaperBlock(c, cout, pool))
        last = i == depth
        heads.append(PaperAux(cout, s, classes, 0 if last else n_lin, 2 if last else 3))
        c = cout
    return nn.ModuleList(blocks), nn.ModuleList(heads)


def _copy_into(dst: nn.Module, src: nn.Module):
    """Copy src's parameters and buffers into dst, in registration order (shapes must agree)."""
    for kind in ("parameters", "buffers"):
        a, b = list(getattr(dst, kind)()), list(getattr(src, kind)())
        assert len(a) == len(b), kind
        for p, q in zip(a, b):
            assert p.shape == q.shape
            with torch.no_grad():
                p.copy_(q)


def _pairs(ours: nn.Module, theirs: nn.Module):
    for kind in ("parameters", "buffers"):
        yield from zip(getattr(ours, kind)(), getattr(theirs, kind)())


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("aux", ["mlp-sr", "mlp"])
@pytest.mark.parametrize("size,in_ch", [(28, 1), (32, 3), (13, 3)])
def test_aux_study_trains_like_the_papers_layers(aux, size, in_ch):
    torch.manual_seed(0)
    depth, width, classes = 4, 6, 5
    net = dgl_fast.models.build("aux-study", num_classes=classes, depth=depth, width=width, in_size=size,
                                in_channels=in_ch, aux=aux).double()
    blocks, heads = paper_net(depth, width, in_ch, size, classes, aux)
    blocks, heads = blocks.double(), heads.double()
    for j in range(depth):
        _copy_into(blocks[j], net.stages[j])
        _copy_into(heads[j], net.heads[j])
    # the convolutions have a bias, trained and weight-decayed like every other parameter
    convs = [m for s in net.stages for m in s.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and all(c.bias is not None for c in convs)
    bias0 = convs[0].bias.detach().clone()
    trainer = dgl_fast.Trainer(net, optimizer=_sgd, mode="dgl")
    opts = [_sgd(list(b.parameters()) + list(h.parameters())) for b, h in zip(blocks, heads)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(7, in_ch, size, size, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (7,), generator=g)
        out = trainer.step(x, y)
        h = x
        for j, (block, head, opt) in enumerate(zip(blocks, heads, opts)):
            h = block(h.detach())
            loss = F.cross_entropy(head(h), y)
            torch.testing.assert_close(out.losses[j].double(), loss.detach().float().double(), rtol=1e-6, atol=0)
            loss.backward()
            opt.step()
            opt.zero_grad()
    for j in range(depth):
        for p, q in _pairs(net.stages[j], blocks[j]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for p, q in _pairs(net.heads[j], heads[j]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(convs[0].bias, bias0)  # the bias trained
    # eval mode (BatchNorm running statistics) gives the same logits at every head
    net.eval(), blocks.eval(), heads.eval()
    x = torch.randn(5, in_ch, size, size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = net.forward_all(x)
        h = x
        for j in range(depth):
            h = blocks[j](h)
            torch.testing.assert_close(ours[j], heads[j](h), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,mlp_layers", [("mlp", 3), ("last", 2)])
@pytest.mark.parametrize("s", [28, 14, 7, 12, 16])
def test_mlp_and_last_heads_pool_twice_like_the_authors(kind, mlp_layers, s):
    torch.manual_seed(2)
    C = 5
    for fused in (False, True):
        head = dgl_fast.AuxHead(C, s, 4, kind=kind, fused=fused).double()
        paper = PaperAux(C, s, 4, 0, mlp_layers).double()
        _copy_into(paper, head)
        x = torch.randn(6, C, s, s, dtype=torch.float64).transpose(2, 3)  # a non-contiguous view
        torch.testing.assert_close(head(x), paper(x), rtol=1e-10, atol=1e-12)
    if s in (28, 14, 12):  # where the two pools are not one 2x2 pool (7 -> 2 -> 2 and 16 are), the difference is real
        one_pool = F.adaptive_avg_pool2d(x, (2, 2))
        two_pools = F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(x, (math.ceil(s / 4),) * 2), (2, 2))
        assert (one_pool - two_pools).abs().max() > 1e-3
