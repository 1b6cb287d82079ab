"""A trainer's configuration, checked and resolved in one place.

What is allowed, and what ``"auto"`` / ``None`` pick:

| mode | engines | ``engine="auto"`` |
|---|---|---|
| ``dgl`` | ``sequential``, ``pipeline``, ``streams`` (CUDA) | ``streams`` on CUDA, else ``sequential`` |
| ``sequential``, ``backprop`` | ``sequential`` | ``sequential`` |
| ``async`` | ``sequential``, ``streams`` (CUDA, no ``max_reuse``) | ``streams`` on CUDA without ``max_reuse`` |

``cuda_graphs=None`` turns graphs on for the ``streams`` engine with SGD optimizers and no fp16.
``cuda_graphs=True`` needs the streams engine (or a recorded stream backend) and SGD optimizers;
``cuda_graphs="emulate"`` runs the graph code path without capturing, on any device and any
engine that has one (``pipeline``/``streams`` in dgl mode, async): how CI tests it. ``amp``:
``None``, ``"bf16"`` (CPU or CUDA with bf16 support), ``"fp16"`` (CUDA, one loss scaler per stage,
no graphs). A :class:`~dgl_fast.streams.RecordedStreams` backend (``streams=``) runs async's
free-running streams on the CPU.

``channels_last="auto"`` (the default) keeps a model with 2-d convolutions and its inputs in
channels_last where that layout is the faster one: on x86 CPUs whose torch has oneDNN, for
float32 (and bf16) models, where oneDNN's convolutions run channels_last natively (measured: a
DGL step of the README's job 1.26x faster on this project's 2-core Xeon, 1.28x on an EPYC;
``python -m dgl_fast bench step``), and on CUDA under ``amp`` (tensor-core convolutions are
channels_last); elsewhere (float64, other CPUs, CUDA fp32, several devices of different kinds)
it stays off. ``True`` / ``False`` force it. The resolved choice is ``Trainer.channels_last``.

Several devices (``devices=[...]``, one process, stages in contiguous groups): ``dgl`` on the
``sequential`` and ``pipeline`` engines (any devices, CUDA or CPU) and on ``streams`` (every device
CUDA); ``sequential`` and ``backprop`` on the ``sequential`` engine; ``async`` on one device only.
A list naming one device only (``["cpu", "cpu"]``) runs anything one device runs. Streams, CUDA
graphs and fp16 need every device to be CUDA; ``amp`` needs devices of one kind.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .ops import REPLAY_POLICIES
from .schedules import SCHEDULES
from .streams import CudaStreams
from .utils import cpu_features

__all__ = ["MODES", "ENGINES", "AMP", "Config", "check_options", "resolve_engine", "resolve_channels_last", "check_factor",
           "check_hyperparameters"]

MODES = ("dgl", "sequential", "backprop", "async")
ENGINES = ("auto", "sequential", "pipeline", "streams")
AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config:
    """The resolved configuration (see the module docstring for the rules)."""

    mode: str
    device: torch.device
    engine: str = "auto"
    cuda_graphs: bool = False
    emulate_graphs: bool = False
    amp: torch.dtype | None = None
    channels_last: bool | str = False  # "auto" until resolve_channels_last
    streams: object = None  # the stream backend of async on streams (CudaStreams or RecordedStreams)
    # async
    buffer_capacity: int = 30
    policy: str = "priority_lifo"
    max_reuse: int | None = None
    buffer_dtype: torch.dtype | None = None
    slowdown: dict | None = None  # {stage index (0-based): noise}
    schedule: str = "random"
    seed: int = 0
    devices: tuple = ()  # the distinct devices the stages run on (the first is ``device``)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(K: int, mode, device: torch.device, *, engine, cuda_graphs, amp, channels_last, streams,
                  buffer_capacity, policy, max_reuse, buffer_dtype, slowdown, schedule, seed, devices=()) -> Config:
    """Check every option that does not depend on the optimizers; a ValueError (TypeError for a
    wrong kind of object) names what was expected and what was given. ``devices``: the devices
    of the stage groups (``device`` is the first), when the stages are spread over several."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    slowdown = dict(slowdown or {})
    for stage, noise in slowdown.items():
        if not _is_int(stage) or not 1 <= stage <= K:
            raise ValueError(f"slowdown keys are stage numbers 1..{K}, got {stage!r}")
        if not 0 <= float(noise) < 1:
            raise ValueError(f"slowdown noise must be in [0, 1), got {noise!r} for stage {stage}")
    if mode == "async":
        if not _is_int(buffer_capacity) or buffer_capacity < 1:
            raise ValueError(f"buffer_capacity must be an int >= 1, got {buffer_capacity!r}")
        if policy not in REPLAY_POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}; expected one of {', '.join(REPLAY_POLICIES)}")
        if max_reuse is not None and (not _is_int(max_reuse) or max_reuse < 1):
            raise ValueError(f"max_reuse must be None or an int >= 1, got {max_reuse!r}")
    devices = tuple(dict.fromkeys([device, *devices]))
    cuda = all(d.type == "cuda" for d in devices)
    if len(devices) > 1:
        device = ", ".join(map(str, devices))  # named in the messages below
        if mode == "async":
            raise ValueError(f"mode='async' runs on one device, got devices {device}; on several devices use mode='dgl' "
                             "(engines sequential, pipeline, streams), 'sequential' or 'backprop' (engine sequential)")
        if amp is not None and not cuda and any(d.type == "cuda" for d in devices):
            raise ValueError(f"amp={amp!r} autocasts one kind of device, got devices {device}; use devices of one kind")
    recorded = bool(getattr(streams, "recorded", False))
    if streams is not None and not (recorded or isinstance(streams, CudaStreams)):
        raise TypeError(f"streams must be a dgl_fast.streams.CudaStreams or RecordedStreams, got {type(streams).__name__}")
    if streams is not None and not (mode == "async" and engine == "streams"):
        raise ValueError(f"streams= sets the stream backend of mode='async' on engine='streams', got mode={mode!r}, "
                         f"engine={engine!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if channels_last not in (True, False, "auto") or isinstance(channels_last, int) and not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
    if amp not in AMP:
        raise ValueError(f"unknown amp {amp!r}; expected None, 'bf16' or 'fp16'")
    if cuda_graphs not in (None, True, False, "emulate"):
        raise ValueError(f"cuda_graphs must be None, True, False or 'emulate', got {cuda_graphs!r}")
    if engine == "pipeline" and mode != "dgl":
        raise ValueError(f"engine='pipeline' pipelines synchronous DGL (mode='dgl'), got mode={mode!r}")
    if engine == "streams" and mode not in ("dgl", "async"):
        raise ValueError(f"engine='streams' runs mode='dgl' (pipelined) or mode='async' (free-running stages), "
                         f"got mode={mode!r}")
    if engine == "streams" and mode == "async" and max_reuse is not None:
        raise ValueError("async DGL on streams never waits for the host: it does not take max_reuse (whose "
                         "'nothing available' check reads the device); use engine='sequential'")
    if engine == "streams" and not cuda and not recorded:
        raise ValueError(f"engine='streams' needs a CUDA device, got device {device}; "
                         "use engine='pipeline' (same schedule, stages in turn) or 'sequential'")
    if cuda_graphs is True and not cuda and not recorded:
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got device {device} (cuda_graphs='emulate' runs "
                         "the graph code path anywhere)")
    if amp == "fp16" and not cuda:
        raise ValueError(f"amp='fp16' needs a CUDA device, got device {device}; use amp='bf16' on the CPU")
    for d in devices if amp == "bf16" and cuda else ():
        if torch.cuda.get_device_capability(d)[0] < 8:
            raise ValueError(f"amp='bf16' is not supported by {torch.cuda.get_device_name(d)}; use 'fp16'")
    if amp == "fp16" and cuda_graphs:
        raise ValueError("amp='fp16' needs a loss scaler whose inf checks sync the host, which CUDA graphs cannot "
                         "capture; use amp='bf16' or cuda_graphs=False")
    if cuda_graphs is True and engine in ("sequential", "pipeline"):
        raise ValueError(f"cuda_graphs=True runs in the streams engine, got engine={engine!r}")
    return Config(mode, devices[0], engine, cuda_graphs, False, AMP[amp], channels_last, streams, buffer_capacity,
                  policy, max_reuse, buffer_dtype, {j - 1: float(v) for j, v in slowdown.items()}, schedule, int(seed),
                  devices)


def resolve_engine(cfg: Config, optimizers: list, K: int) -> Config:
    """Resolve ``"auto"`` and ``cuda_graphs=None`` (the table above) now that the optimizers exist."""
    mode, cuda = cfg.mode, all(d.type == "cuda" for d in cfg.devices or (cfg.device,))
    recorded = bool(getattr(cfg.streams, "recorded", False))
    engine = cfg.engine
    if engine == "auto":
        free_async = mode == "async" and cfg.max_reuse is None
        engine = "streams" if cuda and (mode == "dgl" or free_async) else "sequential"
    sgd = all(type(o) is torch.optim.SGD for o in optimizers)
    graphs, emulate = cfg.cuda_graphs, cfg.cuda_graphs == "emulate"
    if graphs is None:
        graphs = engine == "streams" and mode in ("dgl", "async") and cfg.amp is not torch.float16 and sgd
    if emulate and not (mode == "async" or (mode == "dgl" and engine in ("pipeline", "streams"))):
        raise ValueError(f"cuda_graphs='emulate' runs the graph code path of the pipelined (dgl) or async schedules, "
                         f"got mode={mode!r}, engine={engine!r}")
    if graphs is True and engine != "streams":
        why = " (async with max_reuse runs the sequential engine)" if mode == "async" else ""
        raise ValueError(f"cuda_graphs=True runs in the streams engine; this trainer resolved to engine={engine!r}{why}")
    if graphs and not sgd:
        raise ValueError("cuda_graphs=True captures torch.optim.SGD steps; the optimizer factory returned "
                         f"{type(optimizers[0]).__name__} (use cuda_graphs=False)")
    if (cfg.amp is torch.float16 and engine == "streams"
            and not all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)):
        warnings.warn("amp='fp16' on the streams engine: GradScaler reads its inf flag on the host at every "
                      "stage step, so the stage streams run one after another; build the optimizers with "
                      "fused=True (e.g. torch.optim.SGD(..., fused=True)) to keep the check on the device, "
                      "or use amp='bf16'", stacklevel=3)
    if cuda and engine == "streams":
        _check_stream_connections(K)
    cfg.engine, cfg.cuda_graphs = engine, bool(graphs)
    cfg.emulate_graphs = emulate or (bool(graphs) and recorded)
    if engine == "streams" and mode == "async" and cfg.streams is None:
        cfg.streams = CudaStreams(cfg.device)
    return cfg


def resolve_channels_last(cfg: Config, model: torch.nn.Module) -> Config:
    """Resolve ``channels_last="auto"`` for ``model`` (the rule in the module docstring)."""
    if cfg.channels_last != "auto":
        cfg.channels_last = bool(cfg.channels_last)
        return cfg
    devices = cfg.devices or (cfg.device,)
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if not convs:
        on = False
    elif all(d.type == "cuda" for d in devices):
        on = cfg.amp is not None
    elif all(d.type == "cpu" for d in devices):
        cpu = cpu_features()
        on = cpu["onednn"] and cpu["arch"].lower() in ("x86_64", "amd64") and dtype in (torch.float32, torch.bfloat16)
    else:
        on = False
    cfg.channels_last = bool(on)
    return cfg


def _check_stream_connections(K: int) -> None:
    # One stream per stage: beyond CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 by default),
    # streams share queues and independent stages can wait on each other.
    connections = int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))
    if K > connections:
        warnings.warn(f"{K} stage streams but CUDA_DEVICE_MAX_CONNECTIONS={connections}: stages share hardware queues "
                      "and may serialise; set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA initialises (python -m "
                      "dgl_fast does)", stacklevel=4)


def check_factor(factor, what: str) -> float:
    """A learning-rate factor: finite and >= 0, else a ValueError naming ``what``."""
    try:
        value = float(factor)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a number, got {factor!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: expected a finite learning-rate factor >= 0, got {factor!r}")
    return value


def check_hyperparameters(opt: torch.optim.Optimizer) -> None:
    """Learning rate finite and positive; every other numeric setting finite, and weight decay,
    momentum and dampening >= 0 (NaN or a negative rate would train silently wrong)."""
    for i, group in enumerate(opt.param_groups):
        lr = group.get("lr")
        lr_value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else math.nan
        if not (math.isfinite(lr_value) and lr_value > 0):
            raise ValueError(f"{type(opt).__name__} parameter group {i}: expected a finite learning rate > 0, got {lr!r}")
        for key, v in group.items():
            for x in v if isinstance(v, tuple) else (v,):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{type(opt).__name__} parameter group {i}: expected a finite {key}, got {v!r}")
            if key in ("weight_decay", "momentum", "dampening") and isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{type(opt).__name__} parameter group {i}: expected {key} >= 0, got {v!r}")
