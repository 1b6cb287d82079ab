"""Every model builds, splits into the stated K and trains a step at its input size."""

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast import models

CASES = [
    ("aux-study", dict(), 6, 32),
    ("aux-study", dict(depth=4, width=64, block_size=2), 2, 32),
    ("vgg11", dict(block_size=2), 4, 32),
    ("vgg13", dict(block_size=1), 10, 32),
    ("vgg13", dict(block_size=3), 4, 32),
    ("vgg16", dict(stages=3), 3, 32),
    ("vgg19", dict(block_size=4), 4, 32),
    ("vgg19", dict(block_size=8), 2, 32),
    ("resnet20", dict(stages=4), 4, 32),
    ("resnet110", dict(), 2, 32),
    ("resnet18", dict(stages=2), 2, 64),
]


def _step(model, size, in_ch=3):
    x = torch.randn(2, in_ch, size, size)
    y = torch.randint(0, 10, (2,))
    trainer = dgl_fast.Trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    out = trainer.step(x, y)
    assert torch.isfinite(out.losses).all()
    model.eval()
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name,kw,K,size", CASES)
def test_build_split_and_step(name, kw, K, size):
    torch.manual_seed(0)
    model = models.build(name, num_classes=10, in_size=size, **kw)
    assert model.num_stages == K
    assert len(model.heads) == K
    _step(model, size)


def test_aux_study_layout():
    model = models.build("aux-study")
    shapes = [s for s, _ in model.check_shapes((3, 32, 32))]
    assert shapes == [(128, 32, 32), (256, 16, 16), (256, 16, 16), (512, 8, 8), (512, 8, 8), (512, 8, 8)]
    assert [h.kind for h in model.heads] == ["mlp-sr"] * 5 + ["last"]


def test_vgg13_k4_boundaries():
    model = models.build("vgg13", block_size=3)
    shapes = [s for s, _ in model.check_shapes((3, 32, 32))]
    assert shapes == [(128, 16, 16), (256, 8, 8), (512, 2, 2), (512, 2, 2)]


def test_resnet110_k2_boundary_at_32_channels_16x16():
    model = models.build("resnet110")
    shapes = [s for s, _ in model.check_shapes((3, 32, 32))]
    assert shapes == [(32, 16, 16), (64, 8, 8)]
    n_blocks = [sum(1 for m in s if isinstance(m, models._BasicBlock)) for s in model.stages]
    assert n_blocks == [27, 27]


def test_resnet152_k2_split_point():
    model = models.build("resnet152", num_classes=1000, stages=2, in_size=224)
    blocks = [sum(1 for m in s.children() if m.__class__.__name__ == "Bottleneck") for s in model.stages]
    assert blocks == [25, 25]
    assert model.heads[0].in_channels == 1024 and model.heads[0].in_size == (14, 14)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("vgg13", dict(block_size=3)), ("resnet50", dict(stages=2))])
def test_imagenet_size_step(name, kw):
    torch.manual_seed(0)
    model = models.build(name, num_classes=10, in_size=224, aux="mlp", **kw)
    _step(model, 224)


def test_from_sequential_infers_heads():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3))
    model = dgl_fast.DecoupledModel.from_sequential(seq, split=[2, 4], aux="mlp", num_classes=3, input_shape=(1, 15, 15))
    assert [(h.in_channels, h.in_size) for h in model.heads] == [(4, (13, 13)), (6, (6, 6)), (8, (4, 4))]
    assert model.stages[0][0] is seq[0]  # shared, not copied
    assert model(torch.randn(2, 1, 15, 15)).shape == (2, 3)


def test_from_sequential_bad_split():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"split must be strictly increasing indices in \(0, 2\), got \[2\]"):
        dgl_fast.DecoupledModel.from_sequential(seq, split=[2], input_shape=(1, 8, 8))


def test_unknown_model_and_bad_args():
    with pytest.raises(ValueError, match="unknown model 'vgg12'; expected one of aux-study"):
        models.build("vgg12")
    with pytest.raises(ValueError, match="give either block_size or stages, not both"):
        models.build("vgg13", block_size=2, stages=2)
    with pytest.raises(ValueError, match="cannot cut 10 layers into 11 stages"):
        models.build("vgg13", stages=11)
    with pytest.raises(ValueError, match="unknown aux head kind 'x'"):
        models.build("vgg13", aux="x")
