"""Stages on several devices in one process: the trainer's ``devices=`` and ``placement=``.

:func:`plan` checks the options and picks the placement (given, or :func:`dgl_fast.balancing.balance`
on a sample batch); :func:`place` moves each stage and its head to its device; :class:`PlacedModel`
is the model seen through its placement (inference and shape probes hand the activations from
device to device), which evaluation and the batch checks use.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .balancing import Balance, balance
from .model import DecoupledModel
from .utils import hand_off, kept_modes, resolve_device

__all__ = ["Plan", "plan", "check_placement", "place", "PlacedModel"]


@dataclass
class Plan:
    """Where the stages run: ``devices`` (one per group), ``placement`` (group of each stage),
    ``stage_devices`` (device of each stage) and the :class:`~dgl_fast.balancing.Balance` that chose
    the placement (None when it was given, or with one group)."""

    devices: list[torch.device]
    placement: list[int]
    stage_devices: list[torch.device]
    balance: Balance | None = None

    @property
    def distinct(self) -> list[torch.device]:
        """The devices, each once, in order."""
        return list(dict.fromkeys(self.devices))


def check_placement(placement, K: int, groups: int) -> list[int]:
    """``placement`` as a list of ints: one group index per stage, non-decreasing from 0 to
    ``groups - 1`` without gaps (so every group has a stage), else a ValueError."""
    try:
        out = [operator.index(g) for g in placement]  # ints (numpy's too), not bools, floats or strings
        ok = not any(isinstance(g, bool) for g in placement)
    except TypeError:
        out, ok = [], False
    if not ok or len(out) != K or out[0] != 0 or out[-1] != groups - 1 or any(
            b - a not in (0, 1) for a, b in zip(out, out[1:])):
        raise ValueError(f"placement must give each of the {K} stages a device index, non-decreasing from 0 to "
                         f"{groups - 1} without gaps (every device at least one stage), got {placement!r}")
    return out


def plan(model: DecoupledModel, device, devices, placement, *, optimizer=None, balance_batch: int = 32) -> Plan:
    """Check ``device`` / ``devices`` / ``placement`` (ValueErrors name what was expected and
    given) and choose the placement: the given one, or :func:`~dgl_fast.balancing.balance` over the
    groups, timed on ``devices[0]`` with a random batch of ``balance_batch`` inputs of the model's
    ``input_shape``."""
    K = model.num_stages
    if devices is None:
        if placement is not None:
            raise ValueError("placement= places stages on the devices of devices=[...]; no devices= was given")
        dev = resolve_device("cpu" if device is None else device)
        return Plan([dev], [0] * K, [dev] * K)
    if device is not None:
        raise ValueError(f"pass either device= or devices=, not both (got device={device!r}, devices={devices!r})")
    if isinstance(devices, (str, torch.device)) or not hasattr(devices, "__len__"):
        raise ValueError(f"devices must be a list of devices, e.g. ['cuda:0', 'cuda:1'], got {devices!r}")
    if not 1 <= len(devices) <= K:
        raise ValueError(f"devices must list 1 to {K} devices (one per group of stages, {K} stages), got "
                         f"{len(devices)}: {list(devices)!r}")
    groups = [resolve_device(d) for d in devices]
    if placement is not None:
        return Plan(groups, (p := check_placement(placement, K, len(groups))), [groups[g] for g in p])
    if len(groups) == 1:
        return Plan(groups, [0] * K, groups * K)
    if model.input_shape is None:
        raise ValueError("devices=[...] without placement= balances the stages on a sample batch of the model's "
                         "input_shape, which this model lacks: give placement= or build the model with input_shape")
    if not isinstance(balance_batch, int) or isinstance(balance_batch, bool) or balance_batch < 2:
        raise ValueError(f"balance_batch must be an int >= 2, got {balance_batch!r}")
    dtype = next(model.parameters()).dtype
    x = torch.randn((balance_batch, *model.input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    bal = balance(model, x, len(groups), optimizer=optimizer, device=groups[0])
    return Plan(groups, list(bal.placement), [groups[g] for g in bal.placement], bal)


def place(model: DecoupledModel, p: Plan) -> DecoupledModel:
    """Move stage j and head j to ``p.stage_devices[j]`` (the whole model when on one device)."""
    if len(p.distinct) == 1:
        return model.to(p.devices[0])
    for stage, head, dev in zip(model.stages, model.heads, p.stage_devices):
        stage.to(dev)
        head.to(dev)
    return model


class PlacedModel(nn.Module):
    """``model`` with its stages on ``stage_devices``: ``forward_all`` and ``check_shapes`` hand
    the activations from device to device and return logits on ``device`` (the first stage's).
    The parameters are the model's own; nothing is copied."""

    def __init__(self, model: DecoupledModel, stage_devices: list[torch.device], device: torch.device):
        super().__init__()
        self.model, self.stage_devices, self.device = model, list(stage_devices), device

    @property
    def num_stages(self) -> int:
        return self.model.num_stages

    @property
    def input_shape(self):
        return self.model.input_shape

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head (inference), on ``device``."""
        out = []
        for stage, head, dev in zip(self.model.stages, self.model.heads, self.stage_devices):
            x = stage(hand_off(x, dev))
            out.append(hand_off(head(x), self.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[-1]

    @torch.no_grad()
    def check_shapes(self, input_shape) -> list[tuple[tuple[int, ...], int]]:
        """As :meth:`DecoupledModel.check_shapes`, through the placement."""
        dtype = next(self.model.parameters()).dtype
        x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)).to(self.device, dtype)
        shapes = []
        with kept_modes(self.model):
            self.model.eval()
            for j, (stage, head, dev) in enumerate(zip(self.model.stages, self.model.heads, self.stage_devices)):
                try:
                    x = stage(hand_off(x, dev))
                    logits = head(x)
                except Exception as exc:
                    raise ValueError(f"stage {j} or its head fails on input of shape {list(x.shape)}: {exc}") from exc
                if logits.dim() != 2:
                    raise ValueError(f"head {j} must return logits [B, classes], got shape {list(logits.shape)}")
                shapes.append((tuple(x.shape[1:]), int(logits.shape[1])))
        return shapes
