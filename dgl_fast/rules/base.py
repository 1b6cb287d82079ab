"""The protocol every local-learning rule follows, and what the rules share.

A rule (one file of :mod:`dgl_fast.rules`) is a :class:`Rule`: its options (named as the harness
names them, with its defaults), how many local modules a requested K gives (AugLocal subtracts
``aux_net_depth``), and :meth:`Rule.make_head`, which builds the auxiliary network(s) of local
module i as a :class:`LocalHead`. A head is what the stage step calls:

- ``forward(h)``: the logits of its classifier (evaluation, shape checks);
- ``loss(h, y, image=None)``: the module's local loss and the classifier's number of correct
  predictions, ``(loss, correct)``; ``image`` (the input batch, normalised as the model sees it)
  is given when ``needs_image`` is True (InfoPro's reconstruction);
- ``metrics``: the unweighted terms of the last loss (detached tensors), e.g. ``{"ce", "recon"}``.

Every harness rule weighs its two terms as ``ixx_r * L_x + ixy_r * L_ce`` with
``ratio = i / (K - 2)`` (0 when K = 2) for local module i = 0..K-2, ``ixx_r = ixx_1 (1 - ratio) +
ixx_2 ratio`` and ``ixy_r`` alike (:func:`interpolate`); a rule without an ``L_x`` (DGL, AugLocal)
still multiplies its cross-entropy by ``ixy_r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops

__all__ = ["ModuleInfo", "LocalHead", "ClassifierHead", "CE_WEIGHTS", "Rule", "interpolate", "ce_and_correct", "number",
           "positive_int", "widen"]


@dataclass(frozen=True)
class ModuleInfo:
    """What a rule knows when it builds local module ``index``'s head.

    ``channels``/``size``: the module output's C and (H, W); ``layer``: the harness's global index
    of the module's last layer (0 the stem, 1.. the blocks) and ``group`` its group (0 the stem,
    1..3); ``net_dim``: output channels of every
    layer; ``widths``: the network's (stem, group 1, 2, 3) widths; ``image_shape``: (C, H, W) of
    the input; ``num_local``: K - 1, the modules with a local loss."""

    index: int
    num_local: int
    channels: int
    size: tuple[int, int]
    layer: int
    group: int
    net_dim: tuple[int, ...]
    widths: tuple[int, int, int, int]
    image_shape: tuple[int, int, int]
    num_classes: int

    @property
    def last_group(self) -> bool:
        """True when the module ends in group 3: the harness's ``inplanes == 64``."""
        return self.group == 3


def interpolate(index: int, num_local: int, first: float, last: float) -> float:
    """The harness's weight of local module ``index`` (0-based) of ``num_local`` = K - 1."""
    ratio = index / (num_local - 1) if num_local > 1 else 0
    return first * (1 - ratio) + last * ratio


def ce_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (``nn.CrossEntropyLoss``) and correct arg-max predictions (fused op)."""
    return ops.softmax_xent(logits, y)


class LocalHead(nn.Module):
    """Base of a rule's auxiliary network(s) for one local module; subclasses set ``classifier``
    and override :meth:`local_terms`."""

    needs_image = False

    def __init__(self, ixx: float, ixy: float):
        super().__init__()
        self.ixx, self.ixy = float(ixx), float(ixy)
        self.metrics: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    def local_terms(self, h: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor | None:
        """The rule's second term ``L_x`` (None: the rule has none)."""
        return None

    def loss(self, h: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None = None):
        """``(ixx * L_x + ixy * L_ce, correct)``; the terms go to :attr:`metrics`."""
        if self.needs_image and image is None:
            raise ValueError(f"{type(self).__name__} needs the input image for its loss; none was given "
                             "(the engine does not carry it)")
        ce, correct = ce_and_correct(self.classifier(h), y)
        extra = self.local_terms(h, y, image)
        self.metrics = {"ce": ce.detach()}
        if extra is None:
            return self.ixy * ce, correct
        self.metrics["aux"] = extra.detach()
        return self.ixx * extra + self.ixy * ce, correct

    def extra_repr(self) -> str:
        return f"ixx={self.ixx:g}, ixy={self.ixy:g}"


class ClassifierHead(LocalHead):
    """A local head with a classifier only (DGL, AugLocal): loss ``ixy_r * CE``."""

    def __init__(self, classifier: nn.Module, ixx: float, ixy: float):
        super().__init__(ixx, ixy)
        self.classifier = classifier


#: the weights of a rule with cross-entropy only (train.py's defaults; ``ixx_*`` have no effect)
CE_WEIGHTS = {"ixx_1": 0.0, "ixy_1": 1.0, "ixx_2": 0.0, "ixy_2": 1.0}


class Rule:
    """A local-learning rule: ``name``, ``options`` (name -> default), ``needs_image``."""

    name = "rule"
    options: dict = {}
    needs_image = False

    def resolve(self, given: dict, net: str) -> dict:
        """The options with defaults filled in; an unknown name raises a ValueError listing the known."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(f"rule {self.name!r} takes options {', '.join(sorted(self.options)) or '(none)'}; "
                             f"got {', '.join(unknown)}")
        opts = {k: (v(net) if callable(v) else v) for k, v in self.options.items()}
        opts.update(given)
        self.check(opts)
        return opts

    def check(self, opts: dict) -> None:
        """Validate resolved options (ValueError naming the option)."""
        for key in ("ixx_1", "ixy_1", "ixx_2", "ixy_2"):
            if key in opts:
                number(opts[key], key)

    def local_modules(self, requested: int, opts: dict) -> int:
        """The number of local modules a requested K gives (all but AugLocal: K)."""
        return requested

    def weights(self, info: ModuleInfo, opts: dict) -> tuple[float, float]:
        """``(ixx_r, ixy_r)`` of module ``info.index``."""
        return (interpolate(info.index, info.num_local, opts.get("ixx_1", 0.0), opts.get("ixx_2", 0.0)),
                interpolate(info.index, info.num_local, opts.get("ixy_1", 1.0), opts.get("ixy_2", 1.0)))

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


def number(v, name: str, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    return float(v)


def positive_int(v, name: str, lo: int = 1) -> int:
    """``v`` as an int >= ``lo``, else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def widen(c: int, w: float) -> int:
    """``int(c * widen)``, as the harness sizes widened layers."""
    return int(c * w)
