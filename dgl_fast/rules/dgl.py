"""Rule ``dgl``: Decoupled Greedy Learning (Belilovsky et al., 2020) as the harness trains it.

Loss of local module i: ``ixy_r * CE(aux(h), y)`` (the harness's ``loss_ixx`` is 0 for DGL, so
``ixx_1``/``ixx_2`` are accepted and have no effect). ``aux_net_config``:

- ``"DGL"`` (default; AugLocal's ``AuxNetwork(net_config='DGL')``, after the DGL authors' study):
  with s the module output's side, ``AdaptiveAvgPool2d(ceil(s/4))``, 3 x [1x1 conv (no bias), BN,
  ReLU], ``AdaptiveAvgPool2d(m)`` with ``m = min(ceil(s/4), 2)``, Flatten, 2 x [Linear(f, f, no
  bias), BatchNorm1d, ReLU], Linear(f, classes), ``f = C m m``. The harness reads s from the width
  (16: the image side, 32: half, 64: a quarter), which is the output side of its networks; dgl_fast
  reads the side itself, so tiny test widths keep the same layers;
- any :data:`dgl_fast.heads.HEAD_KINDS` name (``mlp-sr``, ``mlp``, ``cnn``, ``last``, ``linear``):
  dgl_fast's own :class:`~dgl_fast.heads.AuxHead` of that kind (``hidden`` its hidden width).
"""

from __future__ import annotations

import math

import torch.nn as nn

from ..heads import HEAD_KINDS, AuxHead
from .base import CE_WEIGHTS, ClassifierHead, ModuleInfo, Rule

__all__ = ["DGLRule", "dgl_classifier"]


def dgl_classifier(c: int, side: int, num_classes: int) -> nn.Sequential:
    """The harness's DGL auxiliary classifier for a C x side x side input."""
    p = math.ceil(side / 4)
    m = min(p, 2)
    f = c * m * m
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(p)]
    for _ in range(3):
        layers += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(m), nn.Flatten()]
    for _ in range(2):
        layers += [nn.Linear(f, f, bias=False), nn.BatchNorm1d(f), nn.ReLU()]
    layers.append(nn.Linear(f, num_classes))
    return nn.Sequential(*layers)


class DGLRule(Rule):
    name = "dgl"
    options = {"aux_net_config": "DGL", "hidden": None, **CE_WEIGHTS}

    def check(self, opts: dict) -> None:
        super().check(opts)
        kinds = ("DGL", *HEAD_KINDS)
        if opts["aux_net_config"] not in kinds:
            raise ValueError(f"rule 'dgl': aux_net_config must be one of {', '.join(kinds)}, got {opts['aux_net_config']!r}")

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:
        kind = opts["aux_net_config"]
        if kind == "DGL":
            clf = dgl_classifier(info.channels, info.size[0], info.num_classes)
        else:
            clf = AuxHead(info.channels, info.size, info.num_classes, kind=kind, hidden=opts["hidden"])
        return ClassifierHead(clf, *self.weights(info, opts))
