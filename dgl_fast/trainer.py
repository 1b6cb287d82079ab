"""Trainer: synchronous DGL, sequential greedy and end-to-end backprop on a DecoupledModel.

This is the plain-PyTorch reference trainer: one stage after another on the current stream. Its
``mode="dgl"`` defines the parameters every concurrent engine must reproduce.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import checkpoint
from .buffer import ReplayBuffer
from .engine import AsyncGraphs, PipelinedEngine, StageMetrics
from .model import DecoupledModel
from .stage import BackpropStep, StageStep
from .streams import CudaStreams
from .utils import has_batchnorm, kept_modes, resolve_device, to_device

__all__ = ["Trainer", "StepOutput", "TrainingDiverged", "MODES", "SCHEDULES", "resolve_device", "default_optimizer"]

MODES = ("dgl", "sequential", "backprop", "async")
SCHEDULES = ("random", "round_robin")
ENGINES = ("auto", "sequential", "pipeline", "streams")
AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_STATE_VERSION = 2


class TrainingDiverged(RuntimeError):
    """A stage's training loss became NaN or infinite; :meth:`Trainer.fit` stopped there.

    Attributes: ``stage`` (1-based), ``steps`` (first, last): the steps between the last finite
    reading and the one that found it, ``last_checkpoint``: ``(path, step)`` of the last
    :meth:`Trainer.save`, written before the divergence (or None)."""

    def __init__(self, message: str, stage: int | None = None, steps: tuple[int, int] | None = None,
                 last_checkpoint: tuple[str, int] | None = None):
        super().__init__(message)
        self.stage, self.steps, self.last_checkpoint = stage, steps, last_checkpoint


def _check_factor(factor, what: str) -> float:
    try:
        value = float(factor)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a number, got {factor!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: expected a finite learning-rate factor >= 0, got {factor!r}")
    return value


def _check_hyperparameters(opt: torch.optim.Optimizer) -> None:
    """Learning rate finite and positive; every other numeric setting finite, and weight decay,
    momentum and dampening >= 0 (NaN or a negative rate would train silently wrong)."""
    for i, group in enumerate(opt.param_groups):
        lr = group.get("lr")
        lr_value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else math.nan
        if not (math.isfinite(lr_value) and lr_value > 0):
            raise ValueError(f"{type(opt).__name__} parameter group {i}: expected a finite learning rate > 0, got {lr!r}")
        for key, v in group.items():
            values = v if isinstance(v, tuple) else (v,)
            for x in values:
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{type(opt).__name__} parameter group {i}: expected a finite {key}, got {v!r}")
            if key in ("weight_decay", "momentum", "dampening") and isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{type(opt).__name__} parameter group {i}: expected {key} >= 0, got {v!r}")


@dataclass
class StepOutput:
    """Result of :meth:`Trainer.step`, kept on the training device (no host synchronisation).

    Attributes:
        losses: [K] float32 mean loss of each stage's head; NaN for stages not trained this step.
            None under CUDA graphs, whose metrics accumulate on the device (read them with
            :meth:`Trainer.fit`'s records or the engine's ``read_metrics``).
        correct: [K] int64 number of correct predictions of each head (0 where not run; None
            under CUDA graphs).
        batch_size: number of samples in the fresh batch.
        samples: samples each stage trained on in this step (host ints; in ``async`` mode a stage
            may run several times, or not at all, per fresh batch).
    """

    losses: torch.Tensor | None
    correct: torch.Tensor | None
    batch_size: int
    samples: tuple[int, ...] = ()


def default_optimizer(params) -> torch.optim.Optimizer:
    """The paper's CIFAR optimizer: SGD, lr 0.1, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _check_stream_connections(K: int) -> None:
    # One stream per stage: beyond CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 by default),
    # streams share queues and independent stages can wait on each other.
    connections = int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))
    if K > connections:
        warnings.warn(f"{K} stage streams but CUDA_DEVICE_MAX_CONNECTIONS={connections}: stages share hardware queues "
                      "and may serialise; set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA initialises (python -m "
                      "dgl_fast does)", stacklevel=3)


class Trainer:
    """Trains a :class:`DecoupledModel` in place, with one optimizer per stage.

    Args:
        model: the model; it is moved to ``device``.
        optimizer: factory ``params -> torch.optim.Optimizer``, called once per stage with the
            parameters of stage j and head j (``mode="backprop"``: once, with every stage and the
            last head). Default: :func:`default_optimizer` (the paper's SGD).
        mode: ``"dgl"`` (synchronous DGL), ``"sequential"`` (sequential greedy: stage 1 for all
            epochs, then frozen with BatchNorm in eval mode, then stage 2, ...), ``"backprop"``
            (end-to-end, the last head's loss only), ``"async"`` (asynchronous DGL with a
            :class:`~dgl_fast.ReplayBuffer` between stages, simulated as in the authors' code).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        lr_schedule: optional ``epoch -> factor``; each epoch's learning rate is the optimizer's
            initial one times the factor (epochs count per stage in sequential and async modes).
        buffer_capacity, policy, max_reuse, buffer_dtype: the replay buffers of ``async`` mode
            (see :class:`~dgl_fast.ReplayBuffer`; ``buffer_dtype`` is the storage dtype).
        slowdown: ``{stage: noise}`` (stages numbered from 1): in ``async`` mode with the
            ``random`` schedule each tick draws one stage with weight ``1 - noise`` for slowed
            stages and 1 for the others (slowdown factor ``1 / (1 - noise)``).
        schedule: ``"random"`` (the authors' simulation: buffers are first filled in stage order,
            then stages are drawn at random) or ``"round_robin"`` (stages 1..K in turn, one round
            per fresh batch; with ``buffer_capacity=1`` and ``policy="fifo"`` this is exactly
            synchronous DGL).
        seed: seed of the async schedule's draws and of the ``uniform`` policy.
        engine: how stages are scheduled: ``"sequential"`` (stage 1 to K on each batch, the
            reference), ``"pipeline"`` (``mode="dgl"``: stage j trains on batch t - j at tick t; on
            CPU its stages run in turn: the schedule logic of the streams engine), ``"streams"``
            (CUDA only: the pipeline with one stream per stage; with ``mode="async"``, every stage
            free-runs on its own stream between its replay buffers, and the host never waits) or
            ``"auto"`` (streams on CUDA, sequential elsewhere). Pipelined engines give the
            sequential engine's parameters; the last batches leave the pipeline at the end of
            each epoch (or on :meth:`flush`).
        cuda_graphs: replay one CUDA graph per stage step in the streams engine (default: on CUDA
            with ``torch.optim.SGD`` optimizers and without fp16). The graphs run torch's own SGD
            ops (bitwise equal to eager steps) with the learning rate captured as a number, so a
            learning-rate change captures them again; a partial last batch runs eagerly. In
            ``async`` mode each stage step replays its graph between an eager sample of its input
            buffer and a push to its output buffer (:class:`~dgl_fast.engine.AsyncGraphs`; not with
            ``max_reuse``; async batches keep one size, and :meth:`fit` skips a partial last one).
        amp: ``None``, ``"bf16"`` or ``"fp16"``: autocast per stage (fp16 with a loss scaler per
            stage; CUDA only).
        channels_last: keep the model and its inputs in channels_last memory format.
        streams: what ``mode="async"`` on ``engine="streams"`` runs its free-running stages on:
            real CUDA streams by default; :class:`dgl_fast.streams.RecordedStreams` runs that
            schedule on the CPU and records the order a GPU would enforce (with emulated CUDA
            graphs when ``cuda_graphs`` is on), which is how CI checks its ordering.

    In ``async`` mode one :meth:`step` feeds one fresh batch: it runs scheduled stage ticks until
    stage 1 has consumed it. With ``max_reuse`` set, a stage finding its buffer used up skips
    its tick; telling so reads one flag from the device (the reference trainer's only host sync).
    On the streams engine the stages free-run: stage 1 waits only for its batch (made on the
    caller's stream), every other stage only for its buffers, and nothing waits for the caller
    until :meth:`flush` (called by :meth:`read_metrics`, :meth:`evaluate`, :meth:`state_dict`,
    :meth:`load_state_dict` and learning-rate changes) joins the stages into the caller's stream;
    their next steps then wait for what the caller did meanwhile. :meth:`step` returns no
    per-step metrics there (``losses`` and ``correct`` are None): they accumulate on the device,
    per stage on its own stream, for :meth:`read_metrics`.

    Metrics stay on the device: :meth:`step` returns tensors and :meth:`fit` reads them only
    every ``log_every`` steps and at the end of each epoch.
    """

    def __init__(self, model: DecoupledModel, optimizer: Callable | None = None, mode: str = "dgl",
                 device="cpu", lr_schedule: Callable[[int], float] | None = None, *, buffer_capacity: int = 30,
                 policy: str = "priority_lifo", max_reuse: int | None = None, slowdown: dict | None = None,
                 schedule: str = "random", buffer_dtype: torch.dtype | None = None, seed: int = 0,
                 engine: str = "auto", cuda_graphs: bool | None = None, amp: str | None = None,
                 channels_last: bool = False, streams=None):
        if not isinstance(model, DecoupledModel):
            raise TypeError(f"Trainer expects a dgl_fast.DecoupledModel, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        K = model.num_stages
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        slowdown = dict(slowdown or {})
        for stage, noise in slowdown.items():
            if not isinstance(stage, int) or not 1 <= stage <= K:
                raise ValueError(f"slowdown keys are stage numbers 1..{K}, got {stage!r}")
            if not 0 <= float(noise) < 1:
                raise ValueError(f"slowdown noise must be in [0, 1), got {noise!r} for stage {stage}")
        if mode == "async":
            from .ops import REPLAY_POLICIES  # noqa: PLC0415

            if not isinstance(buffer_capacity, int) or buffer_capacity < 1:
                raise ValueError(f"buffer_capacity must be an int >= 1, got {buffer_capacity!r}")
            if policy not in REPLAY_POLICIES:
                raise ValueError(f"unknown replay policy {policy!r}; expected one of {', '.join(REPLAY_POLICIES)}")
            if max_reuse is not None and (not isinstance(max_reuse, int) or max_reuse < 1):
                raise ValueError(f"max_reuse must be None or an int >= 1, got {max_reuse!r}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a factory: a callable taking parameters and returning an optimizer")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError("lr_schedule must be a callable epoch -> learning-rate factor")
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        recorded = bool(getattr(streams, "recorded", False))
        if streams is not None and not (recorded or isinstance(streams, CudaStreams)):
            raise TypeError(f"streams must be a dgl_fast.streams.CudaStreams or RecordedStreams, got {type(streams).__name__}")
        if streams is not None and not (mode == "async" and engine == "streams"):
            raise ValueError(f"streams= sets the stream backend of mode='async' on engine='streams', got mode={mode!r}, "
                             f"engine={engine!r}")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        if amp not in AMP:
            raise ValueError(f"unknown amp {amp!r}; expected None, 'bf16' or 'fp16'")
        if engine == "pipeline" and mode != "dgl":
            raise ValueError(f"engine='pipeline' pipelines synchronous DGL (mode='dgl'), got mode={mode!r}")
        if engine == "streams" and mode not in ("dgl", "async"):
            raise ValueError(f"engine='streams' runs mode='dgl' (pipelined) or mode='async' (free-running stages), "
                             f"got mode={mode!r}")
        if engine == "streams" and mode == "async" and max_reuse is not None:
            raise ValueError("async DGL on streams never waits for the host: it does not take max_reuse (whose "
                             "'nothing available' check reads the device); use engine='sequential'")
        if engine == "streams" and not cuda and not recorded:
            raise ValueError(f"engine='streams' needs a CUDA device, got device {self.device}; "
                             "use engine='pipeline' (same schedule, stages in turn) or 'sequential'")
        if cuda_graphs and not cuda and not recorded:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device {self.device}")
        if amp == "fp16" and not cuda:
            raise ValueError(f"amp='fp16' needs a CUDA device, got device {self.device}; use amp='bf16' on the CPU")
        if amp == "bf16" and cuda and torch.cuda.get_device_capability(self.device)[0] < 8:
            raise ValueError(f"amp='bf16' is not supported by {torch.cuda.get_device_name(self.device)}; use 'fp16'")
        if amp == "fp16" and cuda_graphs:
            raise ValueError("amp='fp16' needs a loss scaler whose inf checks sync the host, which CUDA graphs cannot "
                             "capture; use amp='bf16' or cuda_graphs=False")
        if cuda_graphs and engine in ("sequential", "pipeline"):
            raise ValueError(f"cuda_graphs=True runs in the streams engine, got engine={engine!r}")
        self.mode = mode
        self.amp = AMP[amp]
        self.channels_last = bool(channels_last)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.lr_schedule = lr_schedule
        factory = optimizer or default_optimizer
        if mode == "backprop":
            params = [p for s in model.stages for p in s.parameters()] + list(model.heads[-1].parameters())
            self.optimizers = [factory(params)]
        else:
            self.optimizers = [factory(model.stage_parameters(j)) for j in range(K)]
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
            _check_hyperparameters(opt)
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.epoch = 0  # epochs completed (over all stages in sequential mode)
        self.global_step = 0
        self.active_stage = 0  # the stage being trained in sequential mode
        self.history: list[dict] = []
        self.buffer_capacity, self.policy, self.max_reuse = buffer_capacity, policy, max_reuse
        self.buffer_dtype, self.schedule, self.seed = buffer_dtype, schedule, int(seed)
        self.slowdown = {j - 1: float(v) for j, v in slowdown.items()}
        self.stage_steps = [0] * K  # times each stage trained (async mode counts per stage)
        self.buffers: list[ReplayBuffer] | None = None
        self._warm = 0  # async/random: buffers filled so far, in stage order
        self._schedule_rng = torch.Generator().manual_seed(self.seed)
        self._weights = torch.tensor([1.0 - self.slowdown.get(j, 0.0) for j in range(K)], dtype=torch.float64)
        self._stage_schedule: Callable[[int], float] | None = None
        self._stage_epoch = [-1] * K
        self._batches_per_epoch: int | None = None
        self._fit_epochs: int | None = None  # sequential mode: the epochs per stage its plan was made with
        #: (path, global step) of the last checkpoint :meth:`save` wrote
        self.last_checkpoint: tuple[str, int] | None = None
        self._has_bn = has_batchnorm(model)
        self._idle_metrics = None  # (NaN, 0) device constants for stages idle in a step
        self._fit_weights: dict = {}  # per-stage sample counts as device tensors, by value
        self._collect = True  # step() materialises per-stage metrics (fit turns it off for engines)
        self._train_modes_for: int | None = None  # the stage set up by set_train_modes (None: redo)
        scalers = [torch.amp.GradScaler("cuda") if amp == "fp16" else None for _ in self.optimizers]
        #: the stage steps (:class:`~dgl_fast.stage.StageStep`): what every engine runs; empty in backprop mode
        self.steps = ([] if mode == "backprop" else
                      [StageStep(j, model.stages[j], model.heads[j], o, self.device, self.amp, s)
                       for j, (o, s) in enumerate(zip(self.optimizers, scalers))])
        self.backprop_step = (BackpropStep(model.stages, model.heads[-1], self.optimizers[0], self.device, self.amp,
                                           scalers[0]) if mode == "backprop" else None)
        if engine == "auto":
            free_async = mode == "async" and max_reuse is None
            engine = "streams" if cuda and (mode == "dgl" or free_async) else "sequential"
        if cuda_graphs is None:
            cuda_graphs = (engine == "streams" and mode in ("dgl", "async") and amp != "fp16"
                           and all(type(o) is torch.optim.SGD for o in self.optimizers))
        if cuda_graphs and engine != "streams":
            why = " (async with max_reuse runs the sequential engine)" if mode == "async" else ""
            raise ValueError(f"cuda_graphs=True runs in the streams engine; this trainer resolved to engine="
                             f"{engine!r}{why}")
        if cuda_graphs and not all(type(o) is torch.optim.SGD for o in self.optimizers):
            raise ValueError("cuda_graphs=True captures torch.optim.SGD steps; the optimizer factory returned "
                             f"{type(self.optimizers[0]).__name__} (use cuda_graphs=False)")
        if (amp == "fp16" and engine == "streams"
                and not all(getattr(o, "_step_supports_amp_scaling", False) for o in self.optimizers)):
            warnings.warn("amp='fp16' on the streams engine: GradScaler reads its inf flag on the host at every "
                          "stage step, so the stage streams run one after another; build the optimizers with "
                          "fused=True (e.g. torch.optim.SGD(..., fused=True)) to keep the check on the device, "
                          "or use amp='bf16'", stacklevel=2)
        self.engine_name, self.cuda_graphs = engine, bool(cuda_graphs)
        self._engine = (PipelinedEngine(self, streams=engine == "streams", graphs=self.cuda_graphs)
                        if engine in ("pipeline", "streams") and mode == "dgl" else None)
        # async on streams: stage j free-runs on its own stream; buffers order push/sample by events
        free = engine == "streams" and mode == "async"
        self._ordering = (streams or CudaStreams(self.device)) if free else None
        self._async_streams = [self._ordering.new_stream() for _ in range(K)] if free else None
        self._async_graphs = (AsyncGraphs(self, self._async_streams, emulate_graphs=recorded)
                              if free and self.cuda_graphs else None)
        self._async_done = [self._ordering.new_event() for _ in range(K)] if free else None
        self._async_ran = [False] * K  # stage j has recorded its done event
        self._async_rejoin = False  # the caller's stream did work the stages must wait for
        self._async_metrics = StageMetrics(K, self.device) if free else None
        if cuda and engine == "streams":
            _check_stream_connections(K)
        self._input_shape = model.input_shape
        self._num_classes = None
        self._stage_shapes = None
        if self._input_shape is not None:
            self._stage_shapes = model.check_shapes(self._input_shape)
            self._num_classes = self._stage_shapes[-1][1]

    # ------------------------------------------------------------------ inputs

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Per-sample input shape (from the model, or the first batch seen)."""
        return self._input_shape

    def prepare_batch(self, x, y, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a batch (shape, dtype, device kind, labels) and move it to the device; nothing
        is updated before this passes. ``training=False`` (evaluation) allows batches of one and
        any batch size in async mode."""
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
        if self._input_shape is None:
            self._stage_shapes = self.model.check_shapes(tuple(x.shape[1:]))
            self._input_shape, self._num_classes = tuple(x.shape[1:]), self._stage_shapes[-1][1]
        if tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, self._input_shape))}], got {list(x.shape)}")
        if training and B < 2 and self._has_bn:
            raise ValueError("batch size 1 cannot train BatchNorm layers; expected at least 2 samples per batch")
        if training and self.buffers and B != self.buffers[0].batch_shape[0]:
            raise ValueError(f"async mode keeps a fixed batch size: expected batches of {self.buffers[0].batch_shape[0]}, "
                             f"got {B}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"expected integer class labels, got dtype {y.dtype}")
        if y.shape != (B,):
            raise ValueError(f"expected labels of shape [{B}], got {list(y.shape)}")
        if y.device.type == "cpu":
            # On the host the check is free; labels already on a GPU are checked by the loss
            # kernel (NaN loss) so that no host synchronisation enters the hot path.
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self._num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"expected labels in [0, {self._num_classes}), got {bad}")
        return to_device(x, y, self.device, self.channels_last)

    def _autocast(self):
        """Autocast context of the trainer's ``amp`` setting (a no-op without amp)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # ------------------------------------------------------------------ training

    def _step_output(self, losses: list, correct: list, batch_size: int, samples: tuple) -> StepOutput:
        """Stack per-stage metrics; stages that did not train this step get NaN / 0 (constants made
        once, not per step)."""
        if self._idle_metrics is None:
            self._idle_metrics = (torch.full((), math.nan, device=self.device),
                                  torch.zeros((), dtype=torch.long, device=self.device))
        nan, zero = self._idle_metrics
        return StepOutput(torch.stack([nan if v is None else v.float() for v in losses]),
                          torch.stack([zero if v is None else v for v in correct]), batch_size, samples)

    def set_train_modes(self) -> None:
        """Put the model in training mode for the next step (sequential mode: the stages before the
        active one stay frozen, BatchNorm in eval mode)."""
        # Walking every module costs host time per step: done again only when the model was put in
        # eval mode (evaluate restores the modes it found) or sequential mode moved to a new stage.
        key = self.active_stage if self.mode == "sequential" else -1
        if self.model.training and self._train_modes_for == key:
            return
        self.model.train()
        if self.mode == "sequential":
            for j in range(self.active_stage):
                self.model.stages[j].eval()
                self.model.heads[j].eval()
        self._train_modes_for = key

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Train on one mini-batch: every stage in ``dgl`` mode, the active stage in ``sequential``
        mode, the whole network in ``backprop`` mode. Inputs are checked before anything changes."""
        x, y = self.prepare_batch(x, y)
        self.set_train_modes()
        if self.mode == "async":
            return self._step_async(x, y)
        if self._engine is not None:
            return self._step_engine(x, y)
        K = self.model.num_stages
        losses, correct = [None] * K, [None] * K
        stages = self.model.stages
        if self.mode == "dgl":
            h = x
            for j in range(K):
                h, losses[j], correct[j] = self.steps[j].step(h, y)
        elif self.mode == "sequential":
            j = self.active_stage
            h = x
            with torch.no_grad(), self._autocast():
                for i in range(j):
                    h = stages[i](h)
            _, losses[j], correct[j] = self.steps[j].step(h, y)
        else:  # backprop
            losses[K - 1], correct[K - 1] = self.backprop_step.step(x, y)
        self.global_step += 1
        B = x.shape[0]
        if self.mode == "dgl":
            samples = (B,) * K
        else:
            trained = self.active_stage if self.mode == "sequential" else K - 1
            samples = tuple(B if j == trained else 0 for j in range(K))
        for j, n in enumerate(samples):
            self.stage_steps[j] += n > 0
        return self._step_output(losses, correct, B, samples)

    # ------------------------------------------------------------------ pipelined engines

    def _step_engine(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        res = self._engine.feed(x, y)
        self.global_step += 1
        if not self._collect:  # fit reads the engine's device accumulators instead
            return StepOutput(None, None, x.shape[0], res.samples)
        return self._tick_output(res, x.shape[0])

    def _tick_output(self, res, batch_size: int) -> StepOutput:
        if res.losses is None:  # graph ticks keep their metrics in device accumulators only
            return StepOutput(None, None, batch_size, res.samples)
        self._engine.sync_to_current()
        return self._step_output(res.losses, res.correct, batch_size, res.samples)

    def flush(self) -> None:
        """Let every batch inside a pipelined engine finish its remaining stages; join async DGL's
        free-running stage streams into the caller's stream (no host wait), so that what the
        caller does next sees every stage's work and the stages' next steps wait for it. A no-op
        for the other engines. :meth:`fit`, :meth:`evaluate` and :meth:`state_dict` flush first."""
        if self._engine is not None:
            self._engine.flush()
            self._engine.sync_to_current()
        if self._async_streams is not None:
            st = self._ordering
            cur = st.current()
            for ev, ran in zip(self._async_done, self._async_ran):
                if ran:
                    st.wait_event(cur, ev)
            self._async_rejoin = True

    def read_metrics(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct predictions, samples) accumulated on the device since the
        last reset, for engines whose :meth:`step` returns no per-step metrics (pipelined engines,
        async DGL on streams). A host synchronisation: call it every few steps, not every step."""
        if self._engine is not None:
            return self._engine.read_metrics(reset=reset)
        if self._async_metrics is not None:
            self.flush()
            return self._async_metrics.read(reset)
        raise RuntimeError(f"engine {self.engine_name!r} in mode {self.mode!r} returns its metrics from step() "
                           "(StepOutput.losses and .correct); read_metrics serves the pipelined and free-running engines")

    def _accumulates(self) -> bool:
        return self._engine is not None or self._async_metrics is not None

    # ------------------------------------------------------------------ async DGL

    def _make_buffers(self, B: int) -> None:
        self.buffers = self._new_buffers(B, [self._stage_shapes[j][0] for j in range(self.model.num_stages - 1)])

    def _new_buffers(self, B: int, shapes: list[tuple]) -> list[ReplayBuffer]:
        dtype = next(self.model.parameters()).dtype
        return [ReplayBuffer(self.buffer_capacity, (B, *shape), dtype=dtype, device=self.device, policy=self.policy,
                             max_reuse=self.max_reuse, storage_dtype=self.buffer_dtype, seed=self.seed + j,
                             streams=self._ordering) for j, shape in enumerate(shapes)]

    def _run_stage(self, j: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """One training step of stage j (async mode): on (x, y) for stage 1, else on a sample of
        buffer j-1; pushes its output to buffer j. Returns (loss, correct, samples) or None."""
        self._stage_lr(j)
        graphs = self._async_graphs
        ordering = self._ordering
        if graphs is not None and graphs.ready(j):
            # for RecordedStreams, the step is marked between its sample and its push
            loss, corr, n = graphs.step(j, x, y, on_replay=None if ordering is None else lambda: ordering.mark(("step", j)))
            self.stage_steps[j] += 1
            # the graph's static metrics: used right away on this stream (free-running), or kept
            return (loss, corr, n) if ordering is not None else (loss.clone(), corr.clone(), n)
        if j > 0:
            sample = self.buffers[j - 1].sample()
            if self.max_reuse is not None and not bool(sample.valid):
                return None  # every slot used up: this stage skips its turn
            x, y = sample
        h, loss, corr = self.steps[j].step(x, y)
        if ordering is not None:
            ordering.mark(("step", j))
        if graphs is not None:
            graphs.eager_step_done(j)
        if j < self.model.num_stages - 1:
            self.buffers[j].push(h, y)
        self.stage_steps[j] += 1
        return loss, corr, x.shape[0]

    def _stage_lr(self, j: int) -> None:
        """Async mode: stage j's learning rate follows the schedule by its own epoch count."""
        if self._stage_schedule is None or not self._batches_per_epoch:
            return
        epoch = self.stage_steps[j] // self._batches_per_epoch
        if epoch != self._stage_epoch[j]:
            self._stage_epoch[j] = epoch
            factor = _check_factor(self._stage_schedule(epoch), f"lr_schedule({epoch}) for stage {j + 1}")
            for group in self.optimizers[j].param_groups:
                group["lr"] = group["initial_lr"] * factor
            if self._async_graphs is not None:  # on stage j's stream, before its next replay
                self._async_graphs.on_lr_change(j)

    def _step_async(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        K = self.model.num_stages
        if self.buffers is None:
            self._make_buffers(x.shape[0])
        runs: list[list] = [[] for _ in range(K)]
        streams, st = self._async_streams, self._ordering
        if streams is not None:
            cur = st.current()
            if self._async_rejoin:  # the caller used the model, metrics or learning rates: stages wait for it
                ev = st.new_event()
                st.record(ev, cur)
                for s in streams:
                    st.wait_event(s, ev)
                self._async_rejoin = False

        def tick(j, *batch):
            if streams is None:
                r = self._run_stage(j, *batch)
                if r is not None:
                    runs[j].append(r)
                return
            # stage j on its own stream: it waits for its batch (stage 1: the caller's stream, where
            # the batch was made; others: their input buffer), never for the host
            with st.use(streams[j]):
                if j == 0:
                    st.wait_stream(streams[0], cur)
                    for t in batch:
                        st.keep_alive(t, streams[0])
                r = self._run_stage(j, *batch)
                if r is not None:
                    self._async_metrics.add(j, *r)
                    runs[j].append((None, None, r[2]))
                st.record(self._async_done[j], streams[j])
                self._async_ran[j] = True

        if self.schedule == "round_robin":
            tick(0, x, y)
            for j in range(1, K):
                tick(j)
        elif self._warm < K - 1:
            # warm-up: fill the buffers in stage order (stage 1 from fresh batches, stage j from buffer j-1)
            tick(0, x, y)
            while self._warm < K - 1 and len(self.buffers[self._warm]) == self.buffer_capacity:
                self._warm += 1
                if self._warm < K - 1:
                    for _ in range(self.buffer_capacity):
                        tick(self._warm)
        else:
            while True:
                j = int(torch.multinomial(self._weights, 1, generator=self._schedule_rng))
                if j == 0:
                    tick(0, x, y)
                    break
                tick(j)
        samples = tuple(sum(r[2] for r in rs) for rs in runs)
        self.global_step += 1
        if streams is not None:  # metrics stay on the stage streams (read_metrics)
            return StepOutput(None, None, x.shape[0], samples)
        losses = [torch.stack([r[0] for r in rs]).mean() if rs else None for rs in runs]
        correct = [torch.stack([r[1] for r in rs]).sum() if rs else None for rs in runs]
        return self._step_output(losses, correct, x.shape[0], samples)

    def set_lr_factor(self, factor: float) -> None:
        """Set every optimizer's learning rate to its initial value times ``factor`` (finite, >= 0)."""
        factor = _check_factor(factor, "set_lr_factor")
        self.flush()  # batches in flight finish with the learning rate they started with
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        if self._engine is not None:
            self._engine.on_lr_change()
        if self._async_graphs is not None:
            self._async_graphs.on_lr_change()

    def fit(self, train_loader: Iterable, epochs: int, lr_schedule: Callable[[int], float] | None = None,
            eval_loader: Iterable | None = None, log_every: int = 20, progress: bool = True,
            callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train for ``epochs`` epochs (per stage in sequential mode), resuming at ``self.epoch``.

        After each epoch a record (epoch, stage, lr, train loss and accuracy per stage, test
        accuracy per stage when ``eval_loader`` is given, time, images/s) is appended to
        ``self.history`` and passed to ``callback``. Returns the records of this call.

        Every ``log_every`` steps and at the end of each epoch the per-stage losses are read from
        the device (one host sync); the first NaN or infinite loss stops training with
        :class:`TrainingDiverged`, which names the stage, the steps and the last checkpoint saved
        before (the callback never sees, and so never saves, a diverged epoch). A sequential
        (greedy) run keeps the epochs per stage it was planned with: resuming it with another
        ``epochs`` is refused rather than silently re-planned.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        if self.mode == "sequential":
            if self._fit_epochs is not None and self.epoch > 0 and epochs != self._fit_epochs:
                raise ValueError(f"this sequential run was planned with epochs={self._fit_epochs} per stage and is at "
                                 f"epoch {self.epoch} of {self._fit_epochs * self.model.num_stages}; fit(epochs={epochs}) "
                                 f"would re-plan its stages: resume with epochs={self._fit_epochs}")
            self._fit_epochs = epochs
        from tqdm.auto import tqdm  # noqa: PLC0415

        schedule = lr_schedule or self.lr_schedule or (lambda e: 1.0)
        K = self.model.num_stages
        total = epochs * (K if self.mode == "sequential" else 1)
        records = []
        while self.epoch < total:
            if self.mode == "sequential":
                self.active_stage, local_epoch = divmod(self.epoch, epochs)
            else:
                local_epoch = self.epoch
            factor = _check_factor(schedule(local_epoch), f"lr_schedule({local_epoch})")
            if self.mode == "async":
                self._stage_schedule = schedule
                if self._batches_per_epoch is None and hasattr(train_loader, "__len__"):
                    self._batches_per_epoch = max(1, len(train_loader))
            else:
                self.set_lr_factor(factor)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(self.epoch)
            loss_sum = torch.zeros(K, dtype=torch.float64, device=self.device)
            hits = torch.zeros(K, dtype=torch.long, device=self.device)
            seen, per_stage = 0, [0] * K
            batch_size = None
            start = time.perf_counter()
            checked = self.global_step  # the last step whose losses were read finite
            desc = f"epoch {self.epoch + 1}/{total}" + (f" stage {self.active_stage + 1}" if self.mode == "sequential" else "")
            bar = tqdm(train_loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
            accumulates = self._accumulates()
            self._collect = not accumulates

            try:
                for i, (x, y) in enumerate(bar):
                    if self.mode == "async":
                        batch_size = batch_size or x.shape[0]
                        if x.shape[0] != batch_size:
                            continue  # async buffers hold fixed-size batches: a final partial batch is skipped
                    out = self.step(x, y)
                    seen += out.batch_size
                    if not accumulates:
                        weights = self._fit_weights.get(out.samples)
                        if weights is None:  # one host-to-device copy per distinct pattern, not per step
                            weights = torch.tensor(out.samples, dtype=torch.float64).to(self.device)
                            self._fit_weights[out.samples] = weights
                        # idle stages report NaN with weight 0; a trained stage's NaN stays NaN
                        loss_sum += torch.where(weights > 0, out.losses.double() * weights, 0.0)
                        hits += out.correct
                        per_stage = [a + b for a, b in zip(per_stage, out.samples)]
                    if (i + 1) % log_every == 0:
                        ls, hs, n = self._fit_sums(accumulates, loss_sum, hits, per_stage, reset=False)
                        self._check_finite(ls, n, checked)
                        checked = self.global_step
                        if progress:
                            bar.set_postfix_str(" ".join(f"s{j + 1}:{ls[j] / n[j]:.3f}/{100 * hs[j] / n[j]:.1f}%"
                                                         for j in range(K) if n[j]))
            finally:
                self._collect = True
            bar.close()
            if seen == 0:
                raise ValueError("the training loader yielded no batch")
            if accumulates:
                self.flush()
            ls, hs, per_stage = self._fit_sums(accumulates, loss_sum, hits, per_stage, reset=True)
            self._check_finite(ls, per_stage, checked)
            elapsed = time.perf_counter() - start
            losses = [ls[j] / per_stage[j] if per_stage[j] else None for j in range(K)]
            record = {
                "epoch": self.epoch + 1,
                "stage": self.active_stage + 1 if self.mode == "sequential" else None,
                "lr": [g["lr"] for g in self.optimizers[min(self.active_stage, len(self.optimizers) - 1)].param_groups][0],
                "train_loss": losses,
                "train_acc": [hs[j] / per_stage[j] if per_stage[j] else None for j in range(K)],
                "stage_samples": per_stage,
                "time_s": elapsed,
                "images_per_s": seen / elapsed if elapsed > 0 else None,
            }
            if eval_loader is not None:
                record["test_acc"] = self.evaluate(eval_loader)
            self.epoch += 1
            self.history.append(record)
            records.append(record)
            if callback is not None:
                callback(record)
        return records

    def _fit_sums(self, accumulates: bool, loss_sum, hits, per_stage, reset: bool):
        """Per-stage (loss sum, correct, samples) of the epoch so far (a host sync)."""
        if accumulates:
            means, hs, n = self.read_metrics(reset=reset)
            return [m * k for m, k in zip(means, n)], hs, n
        return loss_sum.tolist(), hits.tolist(), per_stage

    def _check_finite(self, loss_sums: list[float], samples: list[int], since: int) -> None:
        for j, (total, n) in enumerate(zip(loss_sums, samples)):
            if n and not math.isfinite(total):
                last = self.last_checkpoint
                where = (f"; the last checkpoint, {last[0]} (step {last[1]}), was written before it and is left "
                         "untouched" if last is not None and last[1] <= since else "; no checkpoint was saved before it")
                raise TrainingDiverged(
                    f"training diverged: stage {j + 1}'s loss became {total} (NaN or infinite) between steps {since + 1} "
                    f"and {self.global_step} (epoch {self.epoch + 1}); every parameter trained since may be non-finite"
                    f"{where}. Lower the learning rate or check the inputs for NaN/inf.",
                    stage=j + 1, steps=(since + 1, self.global_step), last_checkpoint=last)

    def memory_report(self, x: torch.Tensor, y: torch.Tensor):
        """Bytes a training step on batch ``(x, y)`` keeps per stage (parameters, gradients,
        optimizer state, hand-offs, activations saved for the backward), with the totals of the
        sequential and pipelined DGL engines and of end-to-end backprop on the same network
        (:func:`dgl_fast.memory.memory_report`; no parameter or statistic changes)."""
        from .memory import memory_report  # noqa: PLC0415

        x, y = self.prepare_batch(x, y)
        self.flush()
        optimizers = self.optimizers if len(self.optimizers) == self.model.num_stages else None
        return memory_report(self.model, x, y, optimizers, autocast=self._autocast)

    def evaluate(self, loader: Iterable) -> list[float]:
        """Accuracy of every head on ``loader`` (inference, eval mode); the last is the network's."""
        return self._eval_pass(loader)[0]

    def evaluate_ensemble(self, loader: Iterable) -> float:
        """Accuracy of the ensemble of all heads that the authors' ImageNet code reports: the
        heads' softmax probabilities weighted 2^j (stage j = 1..K) and summed."""
        return self._eval_pass(loader)[1]

    @torch.no_grad()
    def _eval_pass(self, loader: Iterable) -> tuple[list[float], float]:
        self.flush()
        K = self.model.num_stages
        hits = torch.zeros(K + 1, dtype=torch.long, device=self.device)  # K heads, then the ensemble
        bad_labels = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        with kept_modes(self.model):
            self.model.eval()
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(f"expected the evaluation loader to yield (input, labels) pairs, got "
                                     f"{type(batch).__name__}{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}")
                x, y = self.prepare_batch(*batch, training=False)  # the checks step() makes (labels on the CPU)
                if batch[1].device.type != "cpu":  # labels already on the GPU: checked once, at the end
                    bad_labels += ((y < 0) | (y >= self._num_classes)).sum()
                with self._autocast():
                    all_logits = self.model.forward_all(x)
                ensemble = 0
                for j, logits in enumerate(all_logits):
                    hits[j] += (logits.argmax(dim=1) == y).sum()
                    ensemble = ensemble + 2.0 ** (j + 1) * torch.softmax(logits.float(), dim=1)
                hits[K] += (ensemble.argmax(dim=1) == y).sum()
                seen += x.shape[0]
        if seen == 0:
            raise ValueError("the evaluation loader yielded no batch")
        if int(bad_labels):
            raise ValueError(f"expected labels in [0, {self._num_classes}), got {int(bad_labels)} outside that range")
        acc = (hits.double() / seen).tolist()
        return acc[:K], acc[K]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Model, optimizers, schedule position (epoch, step, active stage, sequential plan),
        history, RNG states and, in async mode, the replay buffers (contents and state)."""
        self.flush()
        state = {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "num_stages": self.model.num_stages,
            "optimizer_types": [type(opt).__name__ for opt in self.optimizers],
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "epoch": self.epoch,
            "global_step": self.global_step,
            "active_stage": self.active_stage,
            "fit_epochs": self._fit_epochs,
            "history": self.history,
            "rng": checkpoint.rng_state(self.device),
            "stage_steps": list(self.stage_steps),
            "schedule_rng": self._schedule_rng.get_state(),
        }
        if self.buffers is not None:
            state["async"] = {"buffers": [b.state_dict() for b in self.buffers], "warm": self._warm,
                              "stage_epoch": list(self._stage_epoch), "batches_per_epoch": self._batches_per_epoch}
        return state

    def _check_state(self, state) -> None:
        """Refuse a state that does not fit this trainer, before anything is copied."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a dgl_fast trainer state of version {_STATE_VERSION} (got version {got!r})")
        if state["mode"] != self.mode:
            raise ValueError(f"state was saved in mode {state['mode']!r}, this trainer runs mode {self.mode!r}")
        if state["num_stages"] != self.model.num_stages:
            raise ValueError(f"state was saved with K={state['num_stages']} stages, this model has {self.model.num_stages}")
        types = [type(o).__name__ for o in self.optimizers]
        if state["optimizer_types"] != types:
            raise ValueError(f"state was saved with optimizers {state['optimizer_types']}, this trainer uses {types}")
        checkpoint.check_tensors("model", state["model"], self.model.state_dict())
        for j, (opt, saved) in enumerate(zip(self.optimizers, state["optimizers"])):
            checkpoint.check_optimizer(f"optimizer {j + 1}", saved, opt)
        if "async" in state:
            for j, b in enumerate(state["async"]["buffers"]):
                if b.get("config", {}).get("capacity") != self.buffer_capacity or b["config"]["policy"] != self.policy \
                        or b["config"]["max_reuse"] != self.max_reuse:
                    raise ValueError(f"state's replay buffer {j + 1} is {b.get('config')}; this trainer uses capacity "
                                     f"{self.buffer_capacity}, policy {self.policy!r}, max_reuse {self.max_reuse}")

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved: all or nothing. The state is checked against this
        trainer first (mode, K, every model tensor's name, shape and dtype, optimizer types and
        state, replay buffers) and a mismatch raises a ValueError naming it, with nothing changed."""
        self._check_state(state)
        self.flush()
        buffers = None
        if "async" in state:  # built and filled aside, so a refusal leaves the current ones
            B = state["async"]["buffers"][0]["config"]["batch_shape"][0] if state["async"]["buffers"] else None
            buffers = self._new_buffers(B, [tuple(b["config"]["batch_shape"][1:]) for b in state["async"]["buffers"]])
            for buf, saved in zip(buffers, state["async"]["buffers"]):
                buf.load_state_dict(saved)
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if self._engine is not None:  # captured graphs point at the replaced optimizer state
            self._engine.reset()
        if self._async_graphs is not None:  # ... and, in async mode, at the replaced buffers
            self._async_graphs.reset()
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.active_stage, self.history = int(state["active_stage"]), list(state["history"])
        self._fit_epochs = state["fit_epochs"]
        self.stage_steps = list(state["stage_steps"])
        self._schedule_rng.set_state(state["schedule_rng"])
        self.buffers, self._warm, self._stage_epoch = buffers, 0, [-1] * self.model.num_stages
        if "async" in state:
            a = state["async"]
            self._warm, self._stage_epoch, self._batches_per_epoch = a["warm"], list(a["stage_epoch"]), a["batches_per_epoch"]
        checkpoint.set_rng_state(state["rng"], self.device)
        self._train_modes_for = None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` with a checksum, atomically and durably
        (:mod:`dgl_fast.checkpoint`). A model with NaN or infinite parameters or statistics is
        refused, so a diverged run never overwrites a good checkpoint."""
        state = self.state_dict()
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"refusing to save to {os.fspath(path)}: {len(bad)} model tensors hold NaN or "
                                   f"infinite values (first: {bad[0]!r}); the file there is left untouched",
                                   last_checkpoint=self.last_checkpoint)
        checkpoint.save(state, path)
        self.last_checkpoint = (os.fspath(path), self.global_step)

    def load(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save`: its checksum is verified, it is read with
        ``weights_only`` (no code runs) and checked against this trainer before anything changes."""
        self.load_state_dict(checkpoint.load(path))
