"""Auxiliary classifiers ("heads") of DGL stages, as in the authors' code (PAPER.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops

__all__ = ["AuxHead", "HEAD_KINDS"]

#: Head kinds: ``mlp-sr``, ``mlp`` and ``cnn`` are the auxiliary heads of the paper's study, ``last``
#: is the classifier of the last stage, ``linear`` is a global-average-pool + linear head
#: (InfoPro's ``0c1f``, torchvision ResNet's own classifier).
HEAD_KINDS = ("mlp-sr", "mlp", "cnn", "last", "linear")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"in_size must be an int or (height, width), got {size!r}")
    return size


def _mlp(in_features: int, hidden: int, depth: int, num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return layers


class AuxHead(nn.Module):
    """The auxiliary classifier of one DGL stage.

    Args:
        in_channels: channels C of the stage output it reads ([B, C, H, W]).
        in_size: spatial size of that output, ``s`` or ``(H, W)``.
        num_classes: number of classes.
        kind: ``"mlp-sr"`` (pool to ceil(s/4), 3 x [1x1 conv, BN, ReLU], pool to 2x2, 3 x [Linear,
            BN1d, ReLU], Linear), ``"mlp"`` (pool to 2x2, 3 x [Linear, BN1d, ReLU], Linear),
            ``"cnn"`` (2 x [3x3 conv, BN, ReLU], pool to 2x2, BN, Linear), ``"last"`` (pool to 2x2,
            2 x [Linear, BN1d, ReLU], Linear) or ``"linear"`` (global average pool, Linear).
        hidden: width of the hidden linear layers (default 4C, as in the paper; the asynchronous
            experiments use 256). For ``cnn`` it is the width of the convolutions (default C).

    ``forward(x)`` returns logits; :meth:`loss` returns the mean cross-entropy and the number of
    correct predictions (fused softmax + cross-entropy op). :meth:`to_reference` returns a plain
    ``nn.Sequential`` that shares this head's parameters: the oracle of fused implementations.
    """

    def __init__(self, in_channels: int, in_size, num_classes: int, kind: str = "mlp-sr", hidden: int | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown aux head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        h, w = _pair(in_size)
        if h < 1 or w < 1:
            raise ValueError(f"in_size must be positive, got {(h, w)}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
        self.in_channels, self.in_size, self.num_classes, self.kind = in_channels, (h, w), num_classes, kind
        C = in_channels
        layers: list[nn.Module]
        if kind == "mlp-sr":
            hid = hidden or 4 * C
            layers = [nn.AdaptiveAvgPool2d((math.ceil(h / 4), math.ceil(w / 4)))]
            for _ in range(3):
                layers += [nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU()]
            layers += [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()] + _mlp(4 * C, hid, 3, num_classes)
        elif kind == "mlp":
            hid = hidden or 4 * C
            layers = [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()] + _mlp(4 * C, hid, 3, num_classes)
        elif kind == "last":
            hid = hidden or 4 * C
            layers = [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()] + _mlp(4 * C, hid, 2, num_classes)
        elif kind == "cnn":
            hid = hidden or C
            layers = [nn.Conv2d(C, hid, 3, padding=1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
                      nn.Conv2d(hid, hid, 3, padding=1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
                      nn.AdaptiveAvgPool2d((2, 2)), nn.BatchNorm2d(hid), nn.Flatten(), nn.Linear(4 * hid, num_classes)]
        else:  # linear
            hid = C
            layers = [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(C, num_classes)]
        self.hidden = hid
        self.layers = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, in_channels={self.in_channels}, in_size={self.in_size}, "
                f"num_classes={self.num_classes}, hidden={self.hidden}")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless ``x`` has shape [B, in_channels, *in_size]."""
        expected = f"[B, {self.in_channels}, {self.in_size[0]}, {self.in_size[1]}]"
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.in_size:
            raise ValueError(f"AuxHead({self.kind}) expected features of shape {expected}, got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.layers(x)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of this head on ``x`` and the number of correct predictions."""
        return ops.softmax_cross_entropy(self(x), labels)

    def to_reference(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` computing the same function with the same (shared) modules."""
        return nn.Sequential(*self.layers)
