"""What every schedule shares: the step result, per-stage device metrics and the protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils import hand_off

__all__ = ["Schedule", "StageMetrics", "StepOutput", "stack_output"]


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
    """

    losses: torch.Tensor | None
    correct: torch.Tensor | None
    batch_size: int
    samples: tuple[int, ...] = ()


_IDLE: dict = {}  # device -> (NaN, 0): constants for stages idle in a step, made once per device


def stack_output(losses: list, correct: list, batch_size: int, samples: tuple, device: torch.device) -> StepOutput:
    """Stack per-stage metrics (None for a stage that did not train: NaN / 0) on ``device``
    (stages on other devices hand theirs over; the caller orders ``device``'s current stream
    after the stages' work)."""
    if device not in _IDLE:
        _IDLE[device] = (torch.full((), math.nan, device=device), torch.zeros((), dtype=torch.long, device=device))
    nan, zero = _IDLE[device]
    return StepOutput(torch.stack([nan if v is None else hand_off(v.float(), device) for v in losses]),
                      torch.stack([zero if v is None else hand_off(v, device) for v in correct]), batch_size, samples)


class StageMetrics:
    """Per-stage sums of the loss and of correct predictions, kept on the device.

    Stage j adds to element j only (one kernel each), on whatever stream runs its step, so stages
    on different streams never touch the same memory; :meth:`read` is a host synchronisation
    the caller orders after the stages' work. With ``stage_devices`` (stages on several devices)
    each device keeps its own sums (``loss_sum`` and ``correct_sum`` are ``device``'s) and stage j
    adds on its own device."""

    def __init__(self, K: int, device: torch.device, stage_devices: list | None = None):
        stage_devices = list(stage_devices) if stage_devices is not None else [device] * K
        sums = {d: (torch.zeros(K, dtype=torch.float64, device=d), torch.zeros(K, dtype=torch.long, device=d))
                for d in dict.fromkeys([device, *stage_devices])}
        self.loss_sum, self.correct_sum = sums[device]
        self._sums = list(sums.values())
        self._stage = [sums[d] for d in stage_devices]
        self.samples = [0] * K  # known on the host: every step's batch size

    def add(self, j: int, loss: torch.Tensor, correct: torch.Tensor, n: int, count: bool = True) -> None:
        """Add a step's mean loss (times its ``n`` samples) and correct count to stage j;
        ``count=False`` leaves the host sample count to the caller (inside a CUDA graph)."""
        loss_sum, correct_sum = self._stage[j]
        loss_sum.select(0, j).add_(loss.detach(), alpha=n)
        correct_sum.select(0, j).add_(correct)
        if count:
            self.samples[j] += n

    def read(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct, samples) since the last reset (a host sync)."""
        sums, hits, samples = self.loss_sum.tolist(), self.correct_sum.tolist(), list(self.samples)
        for loss_sum, correct_sum in self._sums[1:]:  # other devices: zero except their own stages
            sums = [a + b for a, b in zip(sums, loss_sum.tolist())]
            hits = [a + b for a, b in zip(hits, correct_sum.tolist())]
        if reset:
            for loss_sum, correct_sum in self._sums:
                loss_sum.zero_()
                correct_sum.zero_()
            self.samples = [0] * len(samples)
        return [t / n if n else math.nan for t, n in zip(sums, samples)], hits, samples


class Schedule:
    """How stage steps run on fresh batches. A schedule gets its stage steps (and buffers, streams)
    from the trainer, never the trainer itself, and counts each stage's steps in ``counts``.

    ``accumulates``: whether per-stage metrics are summed on the device (read with
    :meth:`read_metrics`) rather than returned by :meth:`feed`; ``collect`` (set by the caller)
    asks a schedule that can do both to return per-step metrics too.
    """

    accumulates = False

    def __init__(self, K: int, device: torch.device):
        self.K, self.device = K, device
        self.counts = [0] * K  # times each stage trained
        self.collect = True

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Train on one checked, on-device batch."""
        raise NotImplementedError

    def flush(self) -> None:
        """Finish every batch in flight; order the caller's stream after the stages' work."""

    def read_metrics(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct, samples) summed on the device (a host sync)."""
        raise RuntimeError(f"the {type(self).__name__} returns its metrics from step() (StepOutput.losses and "
                           ".correct); read_metrics serves the pipelined and free-running engines")

    def on_lr_change(self, stage: int | None = None) -> None:
        """The optimizers' learning rates changed (stage ``stage``'s, or every stage's)."""

    def reset(self) -> None:
        """Forget what depends on the replaced model or optimizer state (captured graphs)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
