"""Trainer: synchronous DGL, sequential greedy and end-to-end backprop on a DecoupledModel.

This is the plain-PyTorch reference trainer: one stage after another on the current stream. Its
``mode="dgl"`` defines the parameters every concurrent engine must reproduce.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .heads import AuxHead
from .model import DecoupledModel

__all__ = ["Trainer", "StepOutput", "MODES", "resolve_device", "default_optimizer"]

MODES = ("dgl", "sequential", "backprop", "async")
_STATE_VERSION = 1


@dataclass
class StepOutput:
    """Result of :meth:`Trainer.step`, kept on the training device (no host synchronisation).

    Attributes:
        losses: [K] float32 mean loss of each stage's head; NaN for stages not trained this step.
        correct: [K] int64 number of correct predictions of each head on this batch (0 where the
            head was not run).
        batch_size: number of samples in the batch.
    """

    losses: torch.Tensor
    correct: torch.Tensor
    batch_size: int


def default_optimizer(params) -> torch.optim.Optimizer:
    """The paper's CIFAR optimizer: SGD, lr 0.1, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


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


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Trainer:
    """Trains a :class:`DecoupledModel` in place, with one optimizer per stage.

    Args:
        model: the model; it is moved to ``device``.
        optimizer: factory ``params -> torch.optim.Optimizer``, called once per stage with the
            parameters of stage j and head j (``mode="backprop"``: once, with every stage and the
            last head). Default: :func:`default_optimizer` (the paper's SGD).
        mode: ``"dgl"`` (synchronous DGL), ``"sequential"`` (sequential greedy: stage 1 for all
            epochs, then frozen with BatchNorm in eval mode, then stage 2, ...), ``"backprop"``
            (end-to-end, the last head's loss only). ``"async"`` is reserved for the replay buffer.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        lr_schedule: optional ``epoch -> factor``; each epoch's learning rate is the optimizer's
            initial one times the factor (epochs count per stage in sequential mode).

    Metrics stay on the device: :meth:`step` returns tensors and :meth:`fit` reads them only
    every ``log_every`` steps and at the end of each epoch.
    """

    def __init__(self, model: DecoupledModel, optimizer: Callable | None = None, mode: str = "dgl",
                 device="cpu", lr_schedule: Callable[[int], float] | None = None):
        if not isinstance(model, DecoupledModel):
            raise TypeError(f"Trainer expects a dgl_fast.DecoupledModel, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "async":
            raise NotImplementedError("mode='async' (asynchronous DGL with a replay buffer) is not available yet; "
                                      "use 'dgl', 'sequential' or 'backprop'")
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a factory: a callable taking parameters and returning an optimizer")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError("lr_schedule must be a callable epoch -> learning-rate factor")
        self.device = resolve_device(device)
        self.mode = mode
        self.model = model.to(self.device)
        self.lr_schedule = lr_schedule
        factory = optimizer or default_optimizer
        K = model.num_stages
        if mode == "backprop":
            params = [p for s in model.stages for p in s.parameters()] + list(model.heads[-1].parameters())
            self.optimizers = [factory(params)]
        else:
            self.optimizers = [factory(model.stage_parameters(j)) for j in range(K)]
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.epoch = 0  # epochs completed (over all stages in sequential mode)
        self.global_step = 0
        self.active_stage = 0  # the stage being trained in sequential mode
        self.history: list[dict] = []
        self._has_bn = _has_batchnorm(model)
        self._input_shape = model.input_shape
        self._num_classes = None
        if self._input_shape is not None:
            self._num_classes = model.check_shapes(self._input_shape)[-1][1]

    # ------------------------------------------------------------------ inputs

    def _check_batch(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"expected tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        dtype = next(self.model.parameters()).dtype
        if x.dtype != dtype:
            raise ValueError(f"expected input of dtype {dtype}, got {x.dtype}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch, got input of shape {list(x.shape)} (batch size 0)")
        B = x.shape[0]
        if self._input_shape is None:
            shapes = self.model.check_shapes(tuple(x.shape[1:]))
            self._input_shape, self._num_classes = tuple(x.shape[1:]), shapes[-1][1]
        if tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, self._input_shape))}], got {list(x.shape)}")
        if B < 2 and self._has_bn:
            raise ValueError("batch size 1 cannot train BatchNorm layers; expected at least 2 samples per batch")
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
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, dtype=torch.long, non_blocking=True)
        return x, y

    def _head_loss(self, j: int, h: torch.Tensor, y: torch.Tensor):
        head = self.model.heads[j]
        if isinstance(head, AuxHead):
            return head.loss(h, y)
        return ops.softmax_cross_entropy(head(h), y)

    # ------------------------------------------------------------------ training

    def _set_train_modes(self) -> None:
        self.model.train()
        if self.mode == "sequential":
            for j in range(self.active_stage):
                self.model.stages[j].eval()
                self.model.heads[j].eval()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Train on one mini-batch: every stage in ``dgl`` mode, the active stage in ``sequential``
        mode, the whole network in ``backprop`` mode. Inputs are checked before anything changes."""
        x, y = self._check_batch(x, y)
        self._set_train_modes()
        K = self.model.num_stages
        nan = torch.full((), math.nan, device=self.device)
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        losses, correct = [nan] * K, [zero] * K
        stages = self.model.stages
        if self.mode == "dgl":
            h = x
            for j in range(K):
                h = stages[j](h.detach())
                loss, corr = self._head_loss(j, h, y)
                loss.backward()
                self.optimizers[j].step()
                self.optimizers[j].zero_grad(set_to_none=True)
                losses[j], correct[j] = loss.detach(), corr
        elif self.mode == "sequential":
            j = self.active_stage
            h = x
            with torch.no_grad():
                for i in range(j):
                    h = stages[i](h)
            h = stages[j](h)
            loss, corr = self._head_loss(j, h, y)
            loss.backward()
            self.optimizers[j].step()
            self.optimizers[j].zero_grad(set_to_none=True)
            losses[j], correct[j] = loss.detach(), corr
        else:  # backprop
            h = x
            for stage in stages:
                h = stage(h)
            loss, corr = self._head_loss(K - 1, h, y)
            loss.backward()
            self.optimizers[0].step()
            self.optimizers[0].zero_grad(set_to_none=True)
            losses[K - 1], correct[K - 1] = loss.detach(), corr
        self.global_step += 1
        return StepOutput(torch.stack([v.float() for v in losses]), torch.stack(correct), x.shape[0])

    def set_lr_factor(self, factor: float) -> None:
        """Set every optimizer's learning rate to its initial value times ``factor``."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def fit(self, train_loader: Iterable, epochs: int, lr_schedule: Callable[[int], float] | None = None,
            eval_loader: Iterable | None = None, log_every: int = 20, progress: bool = True,
            callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train for ``epochs`` epochs (per stage in sequential mode), resuming at ``self.epoch``.

        After each epoch a record (epoch, stage, lr, train loss and accuracy per stage, test
        accuracy per stage when ``eval_loader`` is given, time, images/s) is appended to
        ``self.history`` and passed to ``callback``. Returns the records of this call.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
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
            factor = float(schedule(local_epoch))
            self.set_lr_factor(factor)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(self.epoch)
            loss_sum = torch.zeros(K, device=self.device)
            hits = torch.zeros(K, dtype=torch.long, device=self.device)
            seen = 0
            start = time.perf_counter()
            desc = f"epoch {self.epoch + 1}/{total}" + (f" stage {self.active_stage + 1}" if self.mode == "sequential" else "")
            bar = tqdm(train_loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
            for i, (x, y) in enumerate(bar):
                out = self.step(x, y)
                loss_sum += out.losses * out.batch_size
                hits += out.correct
                seen += out.batch_size
                if progress and (i + 1) % log_every == 0:
                    ls, acc = (loss_sum / seen).tolist(), (hits.double() / seen).tolist()
                    bar.set_postfix_str(" ".join(f"s{j + 1}:{ls[j]:.3f}/{100 * acc[j]:.1f}%"
                                                 for j in range(K) if not math.isnan(ls[j])))
            bar.close()
            if seen == 0:
                raise ValueError("the training loader yielded no batch")
            elapsed = time.perf_counter() - start
            losses = [None if math.isnan(v) else v for v in (loss_sum / seen).tolist()]
            record = {
                "epoch": self.epoch + 1,
                "stage": self.active_stage + 1 if self.mode == "sequential" else None,
                "lr": [g["lr"] for g in self.optimizers[min(self.active_stage, len(self.optimizers) - 1)].param_groups][0],
                "train_loss": losses,
                "train_acc": [None if losses[j] is None else v for j, v in enumerate((hits.double() / seen).tolist())],
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

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> list[float]:
        """Accuracy of every head on ``loader`` (inference, eval mode); the last is the network's."""
        modes = [m.training for m in self.model.modules()]
        self.model.eval()
        K = self.model.num_stages
        hits = torch.zeros(K, dtype=torch.long, device=self.device)
        seen = 0
        try:
            for x, y in loader:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, dtype=torch.long, non_blocking=True)
                for j, logits in enumerate(self.model.forward_all(x)):
                    hits[j] += (logits.argmax(dim=1) == y).sum()
                seen += x.shape[0]
        finally:
            for m, t in zip(self.model.modules(), modes):
                m.training = t
        if seen == 0:
            raise ValueError("the evaluation loader yielded no batch")
        return (hits.double() / seen).tolist()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Model, optimizers, schedule position (epoch, step, active stage), history and RNG states."""
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "epoch": self.epoch,
            "global_step": self.global_step,
            "active_stage": self.active_stage,
            "history": self.history,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved; the mode and stage count must match."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a dgl_fast trainer state (expected version {_STATE_VERSION})")
        if state["mode"] != self.mode:
            raise ValueError(f"state was saved in mode {state['mode']!r}, this trainer runs mode {self.mode!r}")
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"state has {len(state['optimizers'])} optimizers, this trainer has {len(self.optimizers)}")
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.active_stage, self.history = int(state["active_stage"]), list(state["history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(tuple(rng["python"][:1]) + (tuple(rng["python"][1]),) + tuple(rng["python"][2:]))
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (a temporary file, then a rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dgl_fast-", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save` (``weights_only`` loading: no code runs)."""
        self.load_state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=True))
