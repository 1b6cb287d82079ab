"""The reference schedule: every stage of a batch in turn, on the current stream.

``mode="dgl"`` trains stage 1 to K on each batch (synchronous DGL: the parameters every faster
schedule must reproduce); ``"sequential"`` trains only the active stage, the earlier ones frozen
(sequential greedy); ``"backprop"`` runs end-to-end backprop on the last head.
"""

from __future__ import annotations

import torch

from ..utils import hand_off
from .base import Schedule, StepOutput, stack_output

__all__ = ["SequentialSchedule"]


class SequentialSchedule(Schedule):
    """Args: ``mode`` (``"dgl"``, ``"sequential"``, ``"backprop"``), the stage ``steps`` (dgl,
    sequential) or the ``backprop_step``, ``K`` and the device. ``active_stage`` is the stage the
    sequential mode trains (set by the caller). Metrics are returned per step and summed on the
    device (:meth:`read_metrics`)."""

    def __init__(self, mode: str, steps: list, backprop_step, K: int, device: torch.device):
        devices = [s.device for s in steps] if steps else getattr(backprop_step, "stage_devices", None)
        super().__init__(K, device, devices)
        self.mode, self.steps, self.backprop_step = mode, steps, backprop_step
        self.active_stage = 0

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        K = self.K
        losses, correct, skipped = [None] * K, [None] * K, [None] * K
        if self.mode == "dgl":  # stages on other devices get the activations and labels handed over
            h, y_j = x, y
            for j, step in enumerate(self.steps):
                h, y_j = hand_off(h, step.device), hand_off(y_j, step.device)
                image = hand_off(x, step.device) if step.needs_image else None  # InfoPro's target
                h, losses[j], correct[j] = step.step(h, y_j, image)
                skipped[j] = step.skipped
        elif self.mode == "sequential":
            j = self.active_stage
            h = x
            with torch.no_grad():
                for step in self.steps[:j]:
                    with step.autocast():
                        h = step.stage(hand_off(h, step.device))
            dev = self.steps[j].device
            image = hand_off(x, dev) if self.steps[j].needs_image else None
            _, losses[j], correct[j] = self.steps[j].step(hand_off(h, dev), hand_off(y, dev), image)
            skipped[j] = self.steps[j].skipped
        else:  # backprop
            losses[K - 1], correct[K - 1] = self.backprop_step.step(x, y)
            skipped[K - 1] = self.backprop_step.skipped
        B = x.shape[0]
        if self.mode == "dgl":
            samples = (B,) * K
        else:
            trained = self.active_stage if self.mode == "sequential" else K - 1
            samples = tuple(B if j == trained else 0 for j in range(K))
        for j, n in enumerate(samples):
            self.counts[j] += n > 0
            if n:
                self.metrics.add(j, losses[j], correct[j], n, skipped=skipped[j])
        if not self.collect:
            return StepOutput(None, None, B, samples)
        return stack_output(losses, correct, B, samples, self.device, skipped)
