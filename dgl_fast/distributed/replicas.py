"""Replicas of a stage group average their gradients, overlapped with the backward.

Each replica row feeds its share of every batch; replica r's stage loss is the mean over its
``b_r`` samples, so the gradient of the whole batch (``b_1 + ... + b_R`` samples) is
``sum_r (b_r / B) * grad_r``. As soon as the backward has accumulated a parameter's gradient, a
hook scales it by ``b_r / B`` and starts an asynchronous ``all_reduce`` (SUM) on the replicas'
process group; the optimizer's step pre-hook waits for that stage's reductions. So the step
equals the single-process step on the concatenated batch (exactly in real arithmetic; in
floating point to rounding) for models without BatchNorm; ``BatchNorm`` normalises each
replica's share with its own statistics (and keeps its own running statistics), as DDP does
without ``SyncBatchNorm`` (which the runner does not set up).
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from .protocol import PeerError, describe_failure

__all__ = ["GradientAverager"]


class GradientAverager:
    """Hooks averaging the gradients of ``optimizers``' parameters over ``group`` (the replicas
    of this rank's stage group). ``describe`` names this rank in errors. Set :attr:`weight` to
    ``b_r / B`` before each step."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], group, timeout: float, describe: str):
        self.group, self.describe = group, describe
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.weight = 1.0
        self._pending: dict[int, list] = {}
        self._handles = []
        seen: set[int] = set()
        for i, opt in enumerate(optimizers):
            self._pending[i] = []
            for pg in opt.param_groups:
                for p in pg["params"]:
                    if not p.requires_grad:
                        continue
                    if id(p) in seen:
                        raise ValueError("a parameter is trained by two stage optimizers: its gradient would be "
                                         "averaged twice")
                    seen.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._launcher(i)))
            self._handles.append(opt.register_step_pre_hook(self._finisher(i)))

    def _launcher(self, i: int):
        def launch(p: torch.Tensor) -> None:
            if self.weight != 1.0:
                p.grad.mul_(self.weight)
            try:
                self._pending[i].append(dist.all_reduce(p.grad, group=self.group, async_op=True))
            except RuntimeError as exc:
                raise PeerError(f"{self.describe}: averaging gradients with the replicas failed: "
                                f"{describe_failure(exc)}") from None
        return launch

    def _finisher(self, i: int):
        def finish(opt, args, kwargs) -> None:
            started = time.monotonic()
            works, self._pending[i] = self._pending[i], []
            for work in works:
                try:
                    work.wait(self.timeout)
                except RuntimeError as exc:
                    raise PeerError(f"{self.describe}: averaging gradients with the replicas failed after "
                                    f"{time.monotonic() - started:.1f} s: {describe_failure(exc)}") from None
        return finish

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
