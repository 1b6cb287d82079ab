"""Local-learning rules, one file each, behind the protocol of :mod:`dgl_fast.rules.base`.

| rule | file | auxiliary network(s) of a local module | local loss |
|---|---|---|---|
| ``dgl`` | ``dgl.py`` | the harness's DGL head, or any dgl_fast head kind | ``ixy_r CE`` |
| ``infopro`` | ``infopro.py`` | ``XcYf`` classifier + image decoder | ``ixx_r BCE(recon, image) + ixy_r CE`` |
| ``predsim`` | ``predsim.py`` | pooled linear classifier + 3x3 conv | ``ixx_r MSE(similarity) + ixy_r CE`` |
| ``auglocal`` | ``auglocal.py`` | blocks sampled from the following layers | ``ixy_r CE`` |
| ``backprop`` | (here) | none trained: end-to-end on the last head (``Trainer(mode="backprop")``) | |

Adding a rule: one file with a :class:`~dgl_fast.rules.base.Rule` subclass, an entry in
:data:`RULES`, its test in ``tests/test_rules.py``.
"""

from __future__ import annotations

import torch.nn as nn

from ..heads import AuxHead
from .auglocal import AugLocalRule
from .base import LocalHead, ModuleInfo, Rule, interpolate
from .dgl import DGLRule
from .infopro import InfoProRule
from .predsim import PredSimRule

__all__ = ["RULES", "get_rule", "Rule", "LocalHead", "ModuleInfo", "interpolate"]


class BackpropRule(Rule):
    """End-to-end backprop (the baseline): intermediate modules get a global-pool linear head that
    ``mode="backprop"`` never trains (it reads the last head only); the harness's BP is K = 1."""

    name = "backprop"
    options: dict = {}

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:
        return AuxHead(info.channels, info.size, info.num_classes, kind="linear")


#: rule name -> rule
RULES: dict[str, Rule] = {r.name: r for r in (DGLRule(), InfoProRule(), PredSimRule(), AugLocalRule(), BackpropRule())}


def get_rule(name: str) -> Rule:
    """The rule called ``name`` (a ValueError lists the known ones)."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; expected one of {', '.join(RULES)}")
    return RULES[name]
