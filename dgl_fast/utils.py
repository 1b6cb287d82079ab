"""Small helpers shared across the package: devices, training modes, batches."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["resolve_device", "has_batchnorm", "kept_modes", "to_device"]


def resolve_device(device) -> torch.device:
    """``torch.device`` for ``device``, or a ValueError saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def kept_modes(model: nn.Module):
    """Run the body (which may call ``model.eval()``) and restore every module's training flag."""
    modes = [m.training for m in model.modules()]
    try:
        yield
    finally:
        for m, t in zip(model.modules(), modes):
            m.training = t


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool = False):
    """A batch on ``device`` (non-blocking), labels as int64, images channels_last if asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, dtype=torch.long, non_blocking=True)
