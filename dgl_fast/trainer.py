"""Trainer: the facade users call. Options -> configuration (:mod:`dgl_fast.config`) -> stage steps
(:mod:`dgl_fast.stage`) -> a schedule (:mod:`dgl_fast.schedules`); ``step``, ``fit``, ``evaluate``,
``flush``, ``save`` / ``load`` on top.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from . import checkpoint, config, fitting
from . import placement as placing
from .config import MODES
from .evaluation import accuracy
from .fitting import TrainingDiverged
from .model import DecoupledModel
from .schedules import SCHEDULES, AsyncSchedule, PipelinedSchedule, SequentialSchedule, StepOutput
from .stage import BackpropStep, StageStep, default_optimizer
from .utils import BatchChecker, resolve_device

__all__ = ["Trainer", "StepOutput", "TrainingDiverged", "MODES", "SCHEDULES", "resolve_device", "default_optimizer"]

_STATE_VERSION = 3


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
        device: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
        devices: instead of ``device``, a list of devices, one per contiguous group of stages (in
            order; a device may repeat, CPU allowed): stage j runs on ``devices[placement[j]]``,
            activations and labels cross groups by non-blocking copies (ordered by events on
            CUDA), every device keeps its own stage streams and CUDA graphs. Supported: ``dgl`` on
            the sequential, pipeline and streams (all-CUDA) engines; ``sequential`` and ``backprop``
            on the sequential engine; ``async`` on one distinct device only. Inputs, metrics and
            :class:`StepOutput` live on ``devices[0]`` (``trainer.device``).
        placement: the group (index into ``devices``) of each stage, non-decreasing from 0 to
            ``len(devices) - 1`` without gaps. Default: :func:`dgl_fast.balancing.balance` times the
            stage steps on a random batch of ``balance_batch`` inputs of the model's
            ``input_shape`` (on ``devices[0]``) and picks the grouping with the fastest slowest
            group. Attributes: ``placement``, ``stage_devices``, ``devices``, ``balance_report``
            (the :class:`~dgl_fast.balancing.Balance`, or None) and ``predicted_throughput``
            (samples/s its timings predict; None when the placement was given).
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
            with ``torch.optim.SGD`` optimizers and without fp16; ``"emulate"`` runs the graph code
            path without capture on any device, as CI does). The graphs run torch's own SGD
            ops (bitwise equal to eager steps) with the learning rate captured as a number, so a
            learning-rate change captures them again; a partial last batch runs eagerly. In
            ``async`` mode each stage step replays its graph between an eager sample of its input
            buffer and a push to its output buffer (:mod:`dgl_fast.schedules.asynchronous`; not with
            ``max_reuse``; async batches keep one size, and :meth:`fit` skips a partial last one).
        amp: ``None``, ``"bf16"`` or ``"fp16"``: autocast per stage (fp16 with a loss scaler per
            stage; CUDA only).
        channels_last: keep the model and its inputs in channels_last memory format: ``True``,
            ``False`` or ``"auto"`` (the default: on where it is the faster layout, i.e. float32/bf16
            models with convolutions on x86 CPUs with oneDNN, and on CUDA under ``amp``; see
            :mod:`dgl_fast.config`). The resolved choice is the attribute ``channels_last``.
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

    The trainer is a facade: :mod:`dgl_fast.config` checks and resolves the options, the stage
    steps (:mod:`dgl_fast.stage`) do the work, a schedule (:mod:`dgl_fast.schedules`, attribute
    ``schedule``) orders them, :mod:`dgl_fast.checkpoint` writes and verifies files.
    """

    def __init__(self, model: DecoupledModel, optimizer: Callable | None = None, mode: str = "dgl",
                 device=None, lr_schedule: Callable[[int], float] | None = None, *, buffer_capacity: int = 30,
                 policy: str = "priority_lifo", max_reuse: int | None = None, slowdown: dict | None = None,
                 schedule: str = "random", buffer_dtype: torch.dtype | None = None, seed: int = 0,
                 engine: str = "auto", cuda_graphs: bool | str | None = None, amp: str | None = None,
                 channels_last: bool | str = "auto", streams=None, devices=None, placement=None, balance_batch: int = 32):
        if not isinstance(model, DecoupledModel):
            raise TypeError(f"Trainer expects a dgl_fast.DecoupledModel, got {type(model).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a factory: a callable taking parameters and returning an optimizer")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError("lr_schedule must be a callable epoch -> learning-rate factor")
        K = model.num_stages
        plan = placing.plan(model, device, devices, placement, optimizer=optimizer, balance_batch=balance_batch)
        cfg = config.check_options(K, mode, plan.devices[0], devices=plan.distinct, engine=engine, cuda_graphs=cuda_graphs,
                                   amp=amp, channels_last=channels_last, streams=streams, buffer_capacity=buffer_capacity,
                                   policy=policy, max_reuse=max_reuse, buffer_dtype=buffer_dtype, slowdown=slowdown,
                                   schedule=schedule, seed=seed)
        cfg = config.resolve_channels_last(cfg, model)
        self.mode, self.device, self.amp, self.channels_last = mode, cfg.device, cfg.amp, cfg.channels_last
        #: the group devices, each stage's group and device, and the balance that chose them (or None)
        self.devices, self.placement, self.stage_devices = plan.devices, plan.placement, plan.stage_devices
        self.balance_report = plan.balance
        #: samples/s the balance's stage timings predict for the placement (None if not balanced)
        self.predicted_throughput = plan.balance.predicted_throughput if plan.balance is not None else None
        self.model = placing.place(model, plan)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.lr_schedule = lr_schedule
        factory = optimizer or default_optimizer
        if mode == "backprop":
            self.optimizers = [factory([p for s in model.stages for p in s.parameters()] + list(model.heads[-1].parameters()))]
        else:
            self.optimizers = [factory(model.stage_parameters(j)) for j in range(K)]
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
            config.check_hyperparameters(opt)
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.config = cfg = config.resolve_engine(cfg, self.optimizers, K)
        self.engine_name, self.cuda_graphs = cfg.engine, cfg.cuda_graphs
        scalers = [torch.amp.GradScaler("cuda") if amp == "fp16" else None for _ in self.optimizers]
        #: the stage steps (:class:`~dgl_fast.stage.StageStep`) every schedule runs; empty in backprop mode
        self.steps = [] if mode == "backprop" else [
            StageStep(j, model.stages[j], model.heads[j], o, self.stage_devices[j], self.amp, s)
            for j, (o, s) in enumerate(zip(self.optimizers, scalers))]
        self.backprop_step = (BackpropStep(model.stages, model.heads[-1], self.optimizers[0], self.device, self.amp,
                                           scalers[0], self.stage_devices) if mode == "backprop" else None)
        self.schedule = self._make_schedule(cfg, K)
        # the model as evaluation and batch checks see it: through the placement when it spans devices
        self._placed = placing.PlacedModel(model, self.stage_devices, self.device) if len(plan.distinct) > 1 else model
        self.batches = BatchChecker(self._placed, self.device, self.channels_last)
        self.epoch = 0  # epochs completed (over all stages in sequential mode)
        self.global_step = 0
        self.active_stage = 0  # the stage being trained in sequential mode
        self.history: list[dict] = []
        #: sequential mode: the epochs per stage its run was planned with (fit refuses another)
        self.planned_epochs: int | None = None
        #: the learning-rate factors of the planned epochs, recorded by :meth:`fit` and saved: a
        #: resumed fit whose schedule gives another factor for one of them is refused
        #: (set it to None to re-plan on purpose)
        self.lr_factors: list[float] | None = None
        #: options the caller keeps with the state (the CLI: its training options), saved and restored
        self.run_options: dict = {}
        #: (path, global step) of the last checkpoint :meth:`save` wrote
        self.last_checkpoint: tuple[str, int] | None = None
        self._train_modes_for: int | None = None  # the stage set up by set_train_modes (None: redo)

    def _make_schedule(self, cfg: config.Config, K: int):
        graphs = cfg.cuda_graphs or cfg.emulate_graphs
        if cfg.mode == "async":
            return AsyncSchedule(self.steps, self.device, next(self.model.parameters()).dtype,
                                 capacity=cfg.buffer_capacity, policy=cfg.policy, max_reuse=cfg.max_reuse,
                                 buffer_dtype=cfg.buffer_dtype, slowdown=cfg.slowdown, schedule=cfg.schedule,
                                 seed=cfg.seed, streams=cfg.streams if cfg.engine == "streams" else None,
                                 graphs=graphs, emulate_graphs=cfg.emulate_graphs)
        if cfg.mode == "dgl" and cfg.engine in ("pipeline", "streams"):
            return PipelinedSchedule(self.steps, self.device, streams=cfg.engine == "streams", graphs=graphs,
                                     emulate_graphs=cfg.emulate_graphs, placement=self.placement)
        return SequentialSchedule(cfg.mode, self.steps, self.backprop_step, K, self.device)

    # ------------------------------------------------------------------ state the schedule keeps

    @property
    def stage_steps(self) -> list[int]:
        """Times each stage trained (async mode counts per stage)."""
        return self.schedule.counts

    @property
    def buffers(self):
        """Async mode's replay buffers (None before the first step and in other modes)."""
        return getattr(self.schedule, "buffers", None)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Per-sample input shape (from the model, or the first batch seen)."""
        return self.batches.input_shape

    # ------------------------------------------------------------------ training

    def prepare_batch(self, x, y, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a batch (shape, dtype, device kind, labels) and move it to the device; nothing
        is updated before this passes. ``training=False`` (evaluation) allows batches of one and
        any batch size in async mode."""
        fixed = self.buffers[0].batch_shape[0] if self.buffers else None
        return self.batches(x, y, training=training, fixed_batch=fixed)

    def set_train_modes(self) -> None:
        """Put the model in training mode for the next step (sequential mode: the stages before the
        active one stay frozen, BatchNorm in eval mode). Walking every module costs host time, so
        it is redone only when the model was put in eval mode or the active stage moved."""
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
        mode, the whole network in ``backprop`` mode, scheduled ticks in ``async`` mode. Inputs are
        checked before anything changes. A stage step whose loss or gradients are not finite is
        undone on the device (:mod:`dgl_fast.finite`, no host sync) and counted in
        ``StepOutput.skipped`` and ``read_metrics().skipped``."""
        x, y = self.prepare_batch(x, y)
        self.set_train_modes()
        if self.mode == "sequential":
            self.schedule.active_stage = self.active_stage
        if self.mode == "async":  # the stage outputs' shapes size the buffers made at the first step
            shapes = None if self.buffers is not None else [s for s, _ in self.batches.stage_shapes[:-1]]
            out = self.schedule.feed(x, y, shapes)
        else:
            out = self.schedule.feed(x, y)
        self.global_step += 1
        return out

    def flush(self) -> None:
        """Let every batch inside a pipelined schedule finish its remaining stages, and order the
        caller's stream after every stage's work (no host wait); async DGL's free-running stages
        then wait for what the caller does next. :meth:`fit`, :meth:`evaluate` and
        :meth:`state_dict` flush first."""
        self.schedule.flush()

    def read_metrics(self, reset: bool = True):
        """Per-stage (mean loss, correct predictions, samples) accumulated on the device since the
        last reset, on every schedule (those whose :meth:`step` returns no per-step metrics too:
        pipelined, async on streams), and ``.skipped``: per stage, the steps whose update was
        skipped because their loss or gradients were not finite (:mod:`dgl_fast.finite`). A
        :class:`~dgl_fast.schedules.Metrics` tuple; a host synchronisation: call it every few
        steps, not every step."""
        return self.schedule.read_metrics(reset)

    def set_lr_factor(self, factor: float) -> None:
        """Set every optimizer's learning rate to its initial value times ``factor`` (finite, >= 0)."""
        factor = config.check_factor(factor, "set_lr_factor")
        self.flush()  # batches in flight finish with the learning rate they started with
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        self.schedule.on_lr_change()

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
        return fitting.fit(self, train_loader, epochs, lr_schedule, eval_loader, log_every, progress, callback)

    def memory_report(self, x: torch.Tensor, y: torch.Tensor):
        """Bytes a training step on batch ``(x, y)`` keeps per stage (parameters, gradients,
        optimizer state, hand-offs, activations saved for the backward), with the totals of the
        sequential and pipelined DGL engines and of end-to-end backprop on the same network
        (:func:`dgl_fast.memory.memory_report`; no parameter or statistic changes)."""
        from .memory import memory_report  # noqa: PLC0415

        if self._placed is not self.model:
            raise ValueError(f"memory_report measures a model on one device; this trainer's stages are on {self.devices}")
        x, y = self.prepare_batch(x, y)
        self.flush()
        optimizers = self.optimizers if len(self.optimizers) == self.model.num_stages else None
        return memory_report(self.model, x, y, optimizers, autocast=self._autocast)

    def _autocast(self):
        return (self.steps[0] if self.steps else self.backprop_step).autocast()

    def evaluate(self, loader: Iterable) -> list[float]:
        """Accuracy of every head on ``loader`` (inference, eval mode); the last is the network's.
        Batches are checked as :meth:`step` checks them (a batch of one is fine)."""
        return self._eval_pass(loader)[0]

    def evaluate_ensemble(self, loader: Iterable) -> float:
        """Accuracy of the ensemble of all heads that the authors' ImageNet code reports: the
        heads' softmax probabilities weighted 2^j (stage j = 1..K) and summed."""
        return self._eval_pass(loader)[1]

    def _eval_pass(self, loader: Iterable) -> tuple[list[float], float]:
        self.flush()
        return accuracy(self._placed, loader, lambda x, y: self.prepare_batch(x, y, training=False), self._autocast,
                        lambda: self.batches.num_classes, self.device)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Model, optimizers, schedule position (epoch, step, active stage, sequential plan),
        learning-rate factors of the planned epochs, :attr:`run_options`, history, RNG states and,
        in async mode, the replay buffers (contents and state)."""
        self.flush()
        return {"version": _STATE_VERSION, "mode": self.mode, "num_stages": self.model.num_stages,
                "optimizer_types": [type(opt).__name__ for opt in self.optimizers], "model": self.model.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers], "epoch": self.epoch,
                "global_step": self.global_step, "active_stage": self.active_stage, "fit_epochs": self.planned_epochs,
                "lr_factors": self.lr_factors, "run_options": dict(self.run_options), "history": self.history,
                "rng": checkpoint.rng_state(self.device), "stage_steps": list(self.stage_steps),
                "schedule": self.schedule.state_dict()}

    def check_state(self, state) -> None:
        """Raise ValueError naming what in ``state`` does not fit this trainer (nothing changes)."""
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
        if isinstance(self.schedule, AsyncSchedule):
            self.schedule.check_state(state["schedule"])

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved: all or nothing. The state is checked against this
        trainer first (mode, K, every model tensor's name, shape and dtype, optimizer types and
        state, replay buffers) and a mismatch raises a ValueError naming it, with nothing changed."""
        self.check_state(state)
        self.flush()
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])  # and forget graphs of the replaced state
        self.schedule.reset()
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.active_stage, self.history = int(state["active_stage"]), list(state["history"])
        self.planned_epochs = state["fit_epochs"]
        self.lr_factors, self.run_options = state.get("lr_factors"), dict(state.get("run_options") or {})
        self.stage_steps[:] = state["stage_steps"]
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
