"""Rule ``auglocal``: AugLocal (Ma et al., ICLR 2024), as its harness builds it.

The auxiliary network of the module ending at layer L is built from layers of the network that
follow L, sampled uniformly: with N layers (the stem and every block) and depth d, layers
``round(L + (N - L - 1) / d * i)`` for i = 1..d (Python's ``round``: halves to even), or every
following layer when ``d >= N - 1 - L``. Each sampled layer becomes a fresh BasicBlock of that
layer's width (times ``aux_net_widen``); a block whose width doubles takes stride 2 (the pooling
is owed until a block takes it). Then global average pool, Flatten, [BatchNorm1d when d <= 1],
Linear(., classes). Loss: ``ixy_r * CE`` (no second term; ``ixx_*`` have no effect).

Surprises kept from the harness, by default:

- **K shrinks by the depth**: ``train.py`` sets ``local_module_num -= aux_net_depth`` for rule
  AugLocal, so ``local_modules=16, aux_net_depth=3`` builds 13 modules (``subtract_depth=False``
  builds the K asked for);
- ``pyramid``: module i's depth is ``max(1, round(d (1 - i c / (K - 2)) + i c / (K - 2)))`` with
  ``c = pyramid_coeff`` (K after the subtraction; needs K >= 3), indexed by the module's layer;
- ``aux_net_depth`` is 0 in train.py's defaults, which divides by zero there; run.sh uses 1, 3, 5:
  the default here is 1 and 0 is refused;
- a widened block narrower than the previous one fails the harness's assertion: refused here.
"""

from __future__ import annotations

import math

import torch.nn as nn

from ..local_nets import BasicBlock
from .base import CE_WEIGHTS, ClassifierHead, ModuleInfo, Rule, number, positive_int, widen

__all__ = ["AugLocalRule", "sampled_layers", "pyramid_depths", "auglocal_classifier"]


def sampled_layers(layer: int, n_layers: int, depth: int) -> list[int]:
    """The layers AugLocal samples for the module ending at ``layer``."""
    if depth >= n_layers - 1 - layer:
        return list(range(layer + 1, n_layers))
    return [round(layer + (n_layers - layer - 1) / depth * i) for i in range(1, depth + 1)]


def pyramid_depths(depth: int, coeff: float, K: int) -> list[int]:
    """Pyramidal depths of modules 0..K-2 (``K`` local modules after the subtraction)."""
    return [max(1, round(depth * (1 - (i * coeff) / (K - 2)) + (i * coeff) / (K - 2) * 1)) for i in range(K - 1)]


def auglocal_classifier(info: ModuleInfo, depth: int, w: float) -> nn.Sequential:
    """AugLocal's auxiliary network for module ``info`` with ``depth`` sampled layers."""
    dims = info.net_dim
    inplanes, planes, owed = info.channels, info.channels, 0
    layers: list[nn.Module] = []
    for idx in sampled_layers(info.layer, len(dims), depth):
        if dims[idx] < inplanes:
            raise ValueError(f"auglocal: layer {idx} has {dims[idx]} channels, fewer than the widened {inplanes} "
                             f"before it (aux_net_widen={w:g}); the harness asserts against this")
        owed += int(math.log2(dims[idx] // inplanes))
        stride = 1
        if owed >= 1:
            stride, owed = 2, owed - 1
        layers.append(BasicBlock(inplanes, widen(dims[idx], w), stride))
        inplanes, planes = widen(dims[idx], w), dims[idx]
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
    if depth <= 1:
        layers.append(nn.BatchNorm1d(widen(planes, w)))
    layers.append(nn.Linear(widen(planes, w), info.num_classes))
    return nn.Sequential(*layers)


class AugLocalRule(Rule):
    name = "auglocal"
    options = {"aux_net_depth": 1, "aux_net_widen": 1.0, "pyramid": False, "pyramid_coeff": 0.5,
               "subtract_depth": True, **CE_WEIGHTS}

    def check(self, opts: dict) -> None:
        super().check(opts)
        positive_int(opts["aux_net_depth"], "aux_net_depth")
        if number(opts["aux_net_widen"], "aux_net_widen") <= 0:
            raise ValueError(f"aux_net_widen must be > 0, got {opts['aux_net_widen']!r}")
        number(opts["pyramid_coeff"], "pyramid_coeff")
        for key in ("pyramid", "subtract_depth"):
            if not isinstance(opts[key], bool):
                raise ValueError(f"{key} must be True or False, got {opts[key]!r}")

    def local_modules(self, requested: int, opts: dict) -> int:
        K = requested - opts["aux_net_depth"] if opts["subtract_depth"] else requested
        if K < 2:
            raise ValueError(f"auglocal: local_modules={requested} minus aux_net_depth={opts['aux_net_depth']} leaves "
                             f"{K} modules; the harness subtracts the depth (subtract_depth=False keeps K), need >= 2")
        if opts["pyramid"] and K < 3:
            raise ValueError(f"auglocal: pyramid depths divide by K - 2 and need K >= 3 modules, got K={K}")
        return K

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:
        depth = opts["aux_net_depth"]
        if opts["pyramid"]:
            depths = pyramid_depths(depth, opts["pyramid_coeff"], info.num_local + 1)
            if info.layer >= len(depths):
                raise ValueError(f"auglocal: pyramid depths are indexed by the module's layer ({info.layer}), "
                                 f"which needs the 'auglocal' split table")
            depth = depths[info.layer]
        return ClassifierHead(auglocal_classifier(info, depth, opts["aux_net_widen"]), *self.weights(info, opts))
