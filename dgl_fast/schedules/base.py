"""What every schedule shares: the step result, per-stage device metrics and the protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils import hand_off

__all__ = ["Schedule", "StageMetrics", "StepOutput", "Metrics", "stack_output"]


@dataclass
class StepOutput:
    """Result of one :meth:`Schedule.feed` (and of :meth:`dgl_fast.Trainer.step`), kept on the
    training device (no host synchronisation).

    Attributes:
        losses: [K] float32 mean loss of each stage's head; NaN for stages not trained this step.
            None where the schedule keeps its metrics on the device only (CUDA graphs, free-running
            streams: read them with ``read_metrics``).
        correct: [K] int64 number of correct predictions of each head (0 where not run; None as above).
        batch_size: number of samples in the fresh batch.
        samples: samples each stage trained on in this step (host ints; in async mode a stage may
            run several times, or not at all, per fresh batch).
        skipped: [K] int64 steps of each stage whose update was skipped because its loss or
            gradients were not finite (:mod:`dgl_fast.finite`; None as ``losses``).
    """

    losses: torch.Tensor | None
    correct: torch.Tensor | None
    batch_size: int
    samples: tuple[int, ...] = ()
    skipped: torch.Tensor | None = None


_IDLE: dict = {}  # device -> (NaN, 0): constants for stages idle in a step, made once per device


def stack_output(losses: list, correct: list, batch_size: int, samples: tuple, device: torch.device,
                 skipped: list | None = None) -> StepOutput:
    """Stack per-stage metrics (None for a stage that did not train: NaN / 0) on ``device``
    (stages on other devices hand theirs over; the caller orders ``device``'s current stream
    after the stages' work). ``skipped``: each stage's skip flag or count (None: 0)."""
    if device not in _IDLE:
        _IDLE[device] = (torch.full((), math.nan, device=device), torch.zeros((), dtype=torch.long, device=device))
    nan, zero = _IDLE[device]

    def stack(vals, fill, cast=None):
        return torch.stack([fill if v is None else hand_off(v if cast is None else v.to(cast), device) for v in vals])
    return StepOutput(stack(losses, nan, torch.float32), stack(correct, zero), batch_size, samples,
                      stack(skipped if skipped is not None else [None] * len(losses), zero, torch.long))


class Metrics(tuple):
    """What :meth:`Schedule.read_metrics` returns: a tuple ``(mean losses, correct, samples)`` per
    stage, with ``skipped``: per stage, the steps whose update was skipped (non-finite loss or
    gradients, :mod:`dgl_fast.finite`) since the last reset."""

    def __new__(cls, losses: list, correct: list, samples: list, skipped: list):
        self = super().__new__(cls, (losses, correct, samples))
        self.skipped = skipped
        return self


class StageMetrics:
    """Per-stage sums of the loss and of correct predictions, kept on the device.

    Stage j adds to element j only (one kernel each), on whatever stream runs its step, so stages
    on different streams never touch the same memory; :meth:`read` is a host synchronisation
    the caller orders after the stages' work. With ``stage_devices`` (stages on several devices)
    each device keeps its own sums (``loss_sum`` and ``correct_sum`` are ``device``'s) and stage j
    adds on its own device."""

    def __init__(self, K: int, device: torch.device, stage_devices: list | None = None):
        stage_devices = list(stage_devices) if stage_devices is not None else [device] * K
        sums = {d: (torch.zeros(K, dtype=torch.float64, device=d), torch.zeros(K, dtype=torch.long, device=d),
                    torch.zeros(K, dtype=torch.long, device=d)) for d in dict.fromkeys([device, *stage_devices])}
        self.loss_sum, self.correct_sum, self.skipped_sum = sums[device]
        self._sums = list(sums.values())
        self._stage = [sums[d] for d in stage_devices]
        self.samples = [0] * K  # known on the host: every step's batch size

    def add(self, j: int, loss: torch.Tensor, correct: torch.Tensor, n: int, count: bool = True,
            skipped: torch.Tensor | None = None) -> None:
        """Add a step's mean loss (times its ``n`` samples), correct count and skip flag (or
        count) to stage j; ``count=False`` leaves the host sample count to the caller (inside a
        CUDA graph)."""
        loss_sum, correct_sum, skipped_sum = self._stage[j]
        loss_sum.select(0, j).add_(loss.detach(), alpha=n)
        correct_sum.select(0, j).add_(correct)
        if skipped is not None:
            skipped_sum.select(0, j).add_(skipped)
        if count:
            self.samples[j] += n

    def read(self, reset: bool = True) -> Metrics:
        """Per-stage (mean loss, correct, samples) since the last reset, and ``.skipped`` (a host sync)."""
        # other devices' sums are zero except for their own stages
        sums, hits, skips = ([sum(v) for v in zip(*(s[i].tolist() for s in self._sums))] for i in range(3))
        samples = list(self.samples)
        if reset:
            for tensors in self._sums:
                for t in tensors:
                    t.zero_()
            self.samples = [0] * len(samples)
        return Metrics([t / n if n else math.nan for t, n in zip(sums, samples)], hits, samples, skips)


class Schedule:
    """How stage steps run on fresh batches. A schedule gets its stage steps (and buffers, streams)
    from the trainer, never the trainer itself, and counts each stage's steps in ``counts``.

    Every schedule sums per-stage metrics on the device in ``metrics`` (a :class:`StageMetrics`,
    read with :meth:`read_metrics`); ``accumulates``: whether that is the only place they go,
    :meth:`feed` returning no per-step metrics; ``collect`` (set by the caller) asks a schedule
    that can do both to return per-step metrics too.
    """

    accumulates = False

    def __init__(self, K: int, device: torch.device, stage_devices: list | None = None):
        self.K, self.device = K, device
        self.counts = [0] * K  # times each stage trained
        self.collect = True
        self.metrics = StageMetrics(K, device, stage_devices)  # device-side, one entry per stage

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Train on one checked, on-device batch."""
        raise NotImplementedError

    def flush(self) -> None:
        """Finish every batch in flight; order the caller's stream after the stages' work."""

    def read_metrics(self, reset: bool = True) -> Metrics:
        """Per-stage (mean loss, correct, samples) summed on the device since the last reset, with
        ``.skipped`` (a :class:`Metrics`; a host sync)."""
        self.flush()
        return self.metrics.read(reset)

    def on_lr_change(self, stage: int | None = None) -> None:
        """The optimizers' learning rates changed (stage ``stage``'s, or every stage's)."""

    def reset(self) -> None:
        """Forget what depends on the replaced model or optimizer state (captured graphs)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
