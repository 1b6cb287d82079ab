"""The training step of one DGL stage, the unit every schedule, the distributed runner, the memory
report and the benchmarks call.

A :class:`StageStep` owns stage j's modules (the stage and its head), its optimizer, its autocast
dtype and (fp16) its loss scaler. :meth:`StageStep.step` is the eager step ``(h, y) -> (h_out,
loss, correct)``: forward, head loss, backward, optimizer step, with no gradient flowing into
``h``. :meth:`StageStep.graph_body` is the same step in the form a CUDA graph captures.
:class:`BackpropStep` is end-to-end backprop's one step over every stage and the last head.

Every step is guarded (:mod:`dgl_fast.finite`): where its loss or a gradient is not finite, the
update is undone on the device (parameters, optimizer state, BatchNorm statistics), no host
synchronisation; ``skipped`` then holds the step's device flag (0-dim bool, True: skipped).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from . import ops
from .finite import StepGuard
from .heads import AuxHead
from .utils import hand_off

__all__ = ["StageStep", "BackpropStep", "head_loss", "default_optimizer"]


def default_optimizer(params) -> torch.optim.Optimizer:
    """The paper's CIFAR optimizer: SGD, lr 0.1, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def head_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor,
              image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local loss of ``head`` on ``h`` and its number of correct predictions: the head's own
    ``loss`` (an :class:`AuxHead`'s fused cross-entropy, a rule's local loss, given ``image`` when
    the head ``needs_image``), else the mean cross-entropy of its logits (fused op)."""
    if getattr(head, "needs_image", False):
        if image is None:
            raise ValueError(f"the head ({type(head).__name__}) needs the input image for its loss; "
                             "this stage step was given none")
        return head.loss(h, y, image)
    if isinstance(head, AuxHead) or callable(getattr(head, "loss", None)):
        return head.loss(h, y)
    return ops.softmax_xent(head(h), y)


class _Precision:
    def __init__(self, device: torch.device, amp: torch.dtype | None, scaler=None, modules=()):
        self.device, self.amp, self.scaler = device, amp, scaler
        self.guard = StepGuard(list(modules))
        #: the last step's device flag (0-dim bool): its loss or gradients were not finite, its update undone
        self.skipped: torch.Tensor | None = None

    def autocast(self):
        """Autocast context of the step's precision (a no-op without amp)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, begun=None) -> torch.Tensor:
        """Backward of ``loss`` and ``opt``'s guarded step (through the loss scaler under fp16,
        which also skips on its own); ``begun``: the guard's snapshot taken before the forward.
        Returns (and keeps in ``skipped``) the device flag of a skipped step."""
        begun = begun if begun is not None else ([], [])
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            self.skipped = self.guard.step(opt, loss, lambda: self.scaler.step(opt), begun)
            self.scaler.update()
        else:
            loss.backward()
            self.skipped = self.guard.step(opt, loss, opt.step, begun, host=True)
        opt.zero_grad(set_to_none=True)
        return self.skipped

    def guarded_graph_step(self, loss: torch.Tensor, sgd, begun) -> None:
        """The graph form of :meth:`backward_step`: backward, ``sgd``'s step guarded, gradients dropped."""
        loss.backward()
        self.skipped = self.guard.step(sgd.opt, loss, sgd.step, begun)
        sgd.zero_grad()


class StageStep(_Precision):
    """Stage ``index``'s step: ``stage`` and ``head`` trained by ``optimizer`` under autocast
    ``amp`` (None, torch.bfloat16, torch.float16) with an optional ``torch.amp.GradScaler``."""

    def __init__(self, index: int, stage: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: torch.dtype | None = None, scaler=None):
        super().__init__(device, amp, scaler, (stage, head))
        self.index, self.stage, self.head, self.optimizer = index, stage, head, optimizer
        #: the head's loss needs the network's input image (InfoPro): pass it as ``image``
        self.needs_image = bool(getattr(head, "needs_image", False))
        #: None, or a module ``(h_in, y, image) -> (h, loss, correct)`` run in place of the stage and
        #: the head (the distributed runner's DistributedDataParallel over both, one forward a step)
        self.forward_module: nn.Module | None = None

    def forward_loss(self, h_in: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None = None):
        """Stage forward and head loss under autocast: ``(h, loss, correct)``, ``h`` attached.
        ``image``: the input batch, for a head that ``needs_image``."""
        with self.autocast():
            if self.forward_module is not None:
                return self.forward_module(h_in.detach(), y, image)
            h = self.stage(h_in.detach())
            loss, correct = head_loss(self.head, h, y, image)
        return h, loss, correct

    def step(self, h_in: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None = None):
        """One optimizer step on input ``h_in``. Returns ``(h_out, loss, correct)``: ``h_out``
        detached (the hand-off to the next stage), ``loss`` a float32 scalar, ``correct`` int64."""
        begun = self.guard.begin()
        h, loss, correct = self.forward_loss(h_in, y, image)
        self.backward_step(loss, self.optimizer, begun)
        return h.detach(), loss.detach().float(), correct

    def graph_body(self, h_in: torch.Tensor, y: torch.Tensor, sgd, out: torch.Tensor | None = None,
                   image: torch.Tensor | None = None):
        """The step as a CUDA graph captures it: forward, loss, backward, ``sgd`` (a
        :class:`~dgl_fast.schedules.GraphSGD` of this step's optimizer), gradients dropped (a capture
        starts without them, so each replay's backward writes them afresh), the output copied into
        the static ``out``; ``image``: the static input image, for a head that ``needs_image``.
        Guarded like :meth:`step` (``skipped``: the graph-owned flag). Returns ``(loss, correct)``
        (graph-owned)."""
        begun = self.guard.begin()
        h, loss, correct = self.forward_loss(h_in, y, image)
        self.guarded_graph_step(loss, sgd, begun)
        if out is not None:
            out.copy_(h.detach())
        return loss.detach(), correct


class BackpropStep(_Precision):
    """End-to-end backprop's step: every stage, then the last head, one optimizer. With
    ``stage_devices`` (one per stage; the last head sits with the last stage) the activations and
    their gradients cross devices (differentiable copies)."""

    def __init__(self, stages: nn.ModuleList, head: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: torch.dtype | None = None, scaler=None, stage_devices: list | None = None):
        super().__init__(device, amp, scaler, (*stages, head))
        self.stages, self.head, self.optimizer = stages, head, optimizer
        self.stage_devices = list(stage_devices) if stage_devices is not None else [device] * len(stages)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor):
        with self.autocast():
            h = x
            for stage, dev in zip(self.stages, self.stage_devices):
                h = stage(hand_off(h, dev))
            return head_loss(self.head, h, hand_off(y, self.stage_devices[-1]))

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """Returns ``(loss, correct)`` of the last head."""
        begun = self.guard.begin()
        loss, correct = self.forward_loss(x, y)
        self.backward_step(loss, self.optimizer, begun)
        return loss.detach(), correct

    def graph_body(self, x: torch.Tensor, y: torch.Tensor, sgd):
        """The step as a CUDA graph captures it (see :meth:`StageStep.graph_body`)."""
        begun = self.guard.begin()
        loss, correct = self.forward_loss(x, y)
        self.guarded_graph_step(loss, sgd, begun)
        return loss.detach(), correct
