"""Small helpers shared across the package: devices, training modes, batches."""

from __future__ import annotations

import contextlib
import functools
import platform

import torch
import torch.nn as nn

__all__ = ["cpu_features", "resolve_device", "has_batchnorm", "kept_modes", "to_device", "hand_off", "BatchChecker"]


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


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict:
    """What this CPU offers the CPU paths: ``arch`` (``platform.machine()``), ``capability``
    (torch's vector ISA, e.g. ``AVX512``), ``onednn`` (oneDNN/mkldnn built in, torch's fast
    channels_last convolutions on x86), ``avx512_bf16`` and ``amx_bf16`` (bf16 instructions, read
    from ``/proc/cpuinfo`` on Linux; None where it cannot be read). ``lscpu | grep -o 'avx512_bf16\\|amx_bf16'``
    tells the same from a shell."""
    flags = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"arch": platform.machine(), "capability": capability, "onednn": bool(torch.backends.mkldnn.is_available()),
            "avx512_bf16": None if flags is None else "avx512_bf16" in flags,
            "amx_bf16": None if flags is None else "amx_bf16" in flags}


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


def hand_off(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, for a stage (or head, or metric) there: ``t`` itself when it already is,
    else a copy, non-blocking (blocking from CUDA to the CPU, whose host reads it at once).

    On CUDA, PyTorch runs a cross-device copy on the source device's current stream, ordered after
    the current streams of both devices: the caller makes the destination's current stream (the
    consuming stage's stream) wait for the producer's event first. The source is read on its
    device's current stream, so it is recorded there (``record_stream``): its memory is not reused
    before the copy ran, even if the producer's stream drops it at once."""
    if t.device == device:
        return t
    if t.device.type == "cuda":
        t.record_stream(torch.cuda.current_stream(t.device))
        return t.to(device, non_blocking=device.type == "cuda")
    return t.to(device, non_blocking=True)


class BatchChecker:
    """Validates training and evaluation batches for one model and moves them to its device.

    It learns the per-sample input shape from the model (``input_shape``) or the first batch, and
    from it each stage's output shape and the class count (one shape probe, nothing changes)."""

    def __init__(self, model, device: torch.device, channels_last: bool = False):
        self.model, self.device, self.channels_last = model, device, channels_last
        self.has_bn = has_batchnorm(model)
        self.input_shape = model.input_shape
        self.stage_shapes = self.num_classes = None
        if self.input_shape is not None:
            self.stage_shapes = model.check_shapes(self.input_shape)
            self.num_classes = self.stage_shapes[-1][1]

    def __call__(self, x, y, training: bool = True, fixed_batch: int | None = None):
        """Check ``(x, y)`` (types, devices, dtype, shapes, labels on the CPU) and return them on the
        device. ``training=False`` allows a batch of one; ``fixed_batch`` is async mode's size."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"expected tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        for name, t in (("input", x), ("labels", y)):
            if t.device.type not in ("cpu", "cuda"):
                raise ValueError(f"expected {name} on the CPU or a CUDA device (this trainer runs on {self.device}), "
                                 f"got a tensor on {t.device}")
        dtype = next(self.model.parameters()).dtype
        if x.dtype != dtype:
            raise ValueError(f"expected input of dtype {dtype}, got {x.dtype}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch, got input of shape {list(x.shape)} (batch size 0)")
        B = x.shape[0]
        if self.input_shape is None:
            self.stage_shapes = self.model.check_shapes(tuple(x.shape[1:]))
            self.input_shape, self.num_classes = tuple(x.shape[1:]), self.stage_shapes[-1][1]
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if training and B < 2 and self.has_bn:
            raise ValueError("batch size 1 cannot train BatchNorm layers; expected at least 2 samples per batch")
        if training and fixed_batch is not None and B != fixed_batch:
            raise ValueError(f"async mode keeps a fixed batch size: expected batches of {fixed_batch}, got {B}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"expected integer class labels, got dtype {y.dtype}")
        if y.shape != (B,):
            raise ValueError(f"expected labels of shape [{B}], got {list(y.shape)}")
        if y.device.type == "cpu":
            # On the host the check is free; labels already on a GPU are checked by the loss
            # kernel (NaN loss) so that no host synchronisation enters the hot path.
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"expected labels in [0, {self.num_classes}), got {lo if lo < 0 else hi}")
        return to_device(x, y, self.device, self.channels_last)
