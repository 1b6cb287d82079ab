"""AuxHead: the paper's head layouts, to_reference() sharing parameters, clear shape errors."""

import math

import pytest
import torch
import torch.nn as nn

from dgl_fast import HEAD_KINDS, AuxHead


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("C,s", [(16, 8), (7, 5), (3, 1)])
def test_forward_shape_and_reference(kind, C, s):
    torch.manual_seed(0)
    head = AuxHead(C, s, 11, kind=kind)
    x = torch.randn(5, C, s, s)
    out = head(x)
    assert out.shape == (5, 11)
    ref = head.to_reference()
    assert isinstance(ref, nn.Sequential)
    torch.testing.assert_close(ref(x), head(x))  # BN in training mode on both: same function
    # parameters are shared, not copied
    ours = {id(p) for p in head.parameters()}
    assert {id(p) for p in ref.parameters()} == ours and len(ours) > 0


def test_mlp_sr_layout_matches_paper():
    head = AuxHead(256, 8, 10, kind="mlp-sr")
    layers = list(head.layers)
    assert isinstance(layers[0], nn.AdaptiveAvgPool2d) and layers[0].output_size == (2, 2)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.kernel_size == (1, 1) and c.bias is None and c.in_channels == 256 for c in convs)
    lins = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(1024, 1024)] * 3 + [(1024, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in layers) == 3
    # ceil(s/4) for odd sizes
    assert AuxHead(8, 13, 10, kind="mlp-sr").layers[0].output_size == (math.ceil(13 / 4),) * 2


def test_hidden_override_and_last_layout():
    head = AuxHead(32, 4, 10, kind="last", hidden=256)
    lins = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(128, 256), (256, 256), (256, 10)]
    cnn = AuxHead(6, 9, 10, kind="cnn")
    convs = [m for m in cnn.layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.kernel_size == (3, 3) for c in convs)


def test_loss_matches_cross_entropy():
    torch.manual_seed(1)
    head = AuxHead(6, 7, 4, kind="mlp")
    x, y = torch.randn(9, 6, 7, 7), torch.randint(0, 4, (9,))
    loss, correct = head.loss(x, y)
    logits = head.to_reference()(x)  # second pass updates BN stats again, outputs equal in train mode
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y), rtol=1e-6, atol=1e-6)
    assert int(correct) == int((logits.argmax(1) == y).sum())


@pytest.mark.parametrize("shape,match", [
    ((2, 8, 8, 8), r"expected features of shape \[B, 16, 8, 8\], got \[2, 8, 8, 8\]"),
    ((2, 16, 4, 4), r"expected features of shape \[B, 16, 8, 8\], got \[2, 16, 4, 4\]"),
    ((2, 16, 64), r"expected features of shape \[B, 16, 8, 8\], got \[2, 16, 64\]"),
])
def test_wrong_input_shape(shape, match):
    head = AuxHead(16, 8, 10)
    with pytest.raises(ValueError, match=match):
        head(torch.randn(shape))


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown aux head kind 'conv'; expected one of mlp-sr"):
        AuxHead(8, 4, 10, kind="conv")
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        AuxHead(0, 4, 10)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        AuxHead(8, 4, 1)
