"""The graph ticks of the pipelined schedule (:mod:`dgl_fast.schedules.pipelined`): each stage
step captured once per batch parity and replayed on static buffers.

Hand-offs are double-buffered by batch parity: stage j writes ``outputs[b % 2]`` for batch b
while stage j + 1 reads ``outputs[(b - 1) % 2]``, so stage j at tick t also waits for stage j + 1
at tick t - 1 (the reader of the buffer it is about to overwrite). Labels travel the same way:
before its replay stage j copies stage j - 1's ``labels[p]`` into its own. A stage starting a
group (``receives``) copies its input into its own ``inputs[p]``.

**The input image** (a rule whose loss reconstructs it, InfoPro: ``step.needs_image``) is a static
input of the graphs of the stages that need it, and travels with the labels: stage 0's image is
its own input buffer ``inputs[p]`` (the batch copied in); every stage 1 .. L (L: the last stage
whose loss needs the image) has ``images[p]`` and, before its replay, copies into it the image
buffer of the same parity of stage j - 1 (stage 0: ``inputs[p]``). That buffer holds batch b's
image exactly while stage j - 1's output buffer holds batch b's activations (it is overwritten at
tick t + 1 only, after stage j's step of tick t, by the same neighbour wait), so the image a stage
trains on is always its batch's. Stages after L carry none. Cost: one image copy per carrying
stage per tick, two image buffers per carrying stage.
"""

from __future__ import annotations

import contextlib

import torch

from ..utils import hand_off, kept_modes
from .graphs import CaptureWatch, GraphSGD, capture

__all__ = ["StageGraphs", "GraphTicks"]


class StageGraphs:
    """The two CUDA graphs (one per batch parity) of one stage step, and their static buffers."""

    def __init__(self):
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None, None]
        self.inputs: list[torch.Tensor | None] = [None, None]  # stage 0 and group starts: own input buffers
        self.outputs: list[torch.Tensor | None] = [None, None]
        self.labels: list[torch.Tensor | None] = [None, None]
        self.images: list[torch.Tensor | None] = [None, None]  # stages 1 .. L: the batch's input image

    def image(self, p: int) -> torch.Tensor | None:
        """The image buffer of parity ``p`` a next stage copies from (stage 0: its input)."""
        return self.images[p] if self.images[p] is not None else self.inputs[p]


class GraphTicks:
    """The graph half of :class:`~dgl_fast.schedules.PipelinedSchedule` (a mixin: it uses the
    schedule's steps, streams, events and metrics)."""

    def _image_stages(self) -> int:
        """L + 1: the stages 0 .. L that carry the input image (0 when no stage needs it)."""
        need = [j for j, s in enumerate(self.steps) if getattr(s, "needs_image", False)]
        return need[-1] + 1 if need else 0

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture each stage's step for both batch parities (the pipeline is empty)."""
        optimizers = [s.optimizer for s in self.steps]
        self._graph_opts = [GraphSGD(opt) for opt in optimizers]
        state = [StageGraphs() for _ in range(self.K)]
        carry = self._image_stages()
        probes = []  # each stage's output (shape, dtype, memory format), without touching BN statistics
        with torch.no_grad():
            h = x
            for step in self.steps[:-1]:
                with kept_modes(step.stage), step.autocast():
                    step.stage.eval()
                    h = step.stage(hand_off(h, step.device))
                probes.append(h)
        for j, dev in enumerate(self.stage_devices):
            for p in range(2):
                state[j].labels[p] = torch.empty_like(y, device=dev)
                if self.receives[j]:  # stage 0 and the first stage of each group: own input buffers
                    state[j].inputs[p] = torch.empty_like(x if j == 0 else probes[j - 1], device=dev)
                if 0 < j < carry:
                    state[j].images[p] = torch.empty_like(x, device=dev)
        for j in range(self.K):
            dev, step = self.stage_devices[j], self.steps[j]
            # the two parity graphs of a stage replay in turn on one stream, never at once, and
            # neither reads memory the other allocated: they share one memory pool (captured on
            # one stream, as torch advises for sharing); stages run concurrently: a pool each
            if self.emulate_graphs:
                pool, stream = object(), None
            else:
                pool = torch.cuda.graph_pool_handle()
                stream = self._stream(j) if self.streams is not None else torch.cuda.Stream(dev)
            for p in range(2):
                src = state[j].inputs[p] if self.receives[j] else state[j - 1].outputs[p]
                image = state[j].image(p) if step.needs_image else None
                if j < self.K - 1:
                    state[j].outputs[p] = torch.empty_like(probes[j])
                for opt in optimizers:  # gradients are allocated inside the graph
                    opt.zero_grad(set_to_none=True)
                watch = None
                if self.emulate_graphs:
                    static = {"input": src, "labels": state[j].labels[p], "output": state[j].outputs[p]}
                    if image is not None:
                        static["image"] = image
                    watch = CaptureWatch(j, dev, {"stage": step.stage, "head": step.head}, step.optimizer, static)
                state[j].graphs[p] = capture(self._graph_body, j, src, state[j].labels[p], state[j].outputs[p], image,
                                             device=dev, stream=stream, emulate=self.emulate_graphs, pool=pool,
                                             watch=watch)
        for opt in optimizers:  # .grad must not point into a graph's memory for an eager step
            opt.zero_grad(set_to_none=True)
        self.graph_state = state
        self._graph_shape = tuple(x.shape)
        self.captures += 1

    def _graph_body(self, j: int, h_in, y, out, image) -> None:
        loss, correct = self.steps[j].graph_body(h_in, y, self._graph_opts[j], out, image)
        # replays count samples on the host
        self.metrics.add(j, loss, correct, y.shape[0], count=False, skipped=self.steps[j].skipped)

    def _replay_tick(self, fresh) -> tuple[list, tuple]:
        """One graph tick (``fresh``: ``(x, y, batch index)`` or None): each stage's batch index and samples."""
        st = self.graph_state
        batches: list[int | None] = [None] * self.K
        samples = [0] * self.K
        # stage j takes over the batch stage j - 1 held in the previous tick
        inflight = [None] + self._in_flight_graph[:-1]
        if fresh is not None:
            x, y, b = fresh
            inflight[0] = b
        prev = list(self.done)
        cur = torch.cuda.current_stream(self.device) if self.streams is not None else None
        for j in reversed(range(self.K)):
            b = inflight[j]
            if b is None:
                continue
            p = b % 2
            stream = self._stream(j)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._wait_neighbours(j, prev, cur)
                if j == 0:
                    if stream is not None:
                        x.record_stream(stream)
                        y.record_stream(stream)
                    st[0].inputs[p].copy_(x, non_blocking=True)
                    st[0].labels[p].copy_(y, non_blocking=True)
                else:  # after the producer's event: cross-device copies follow this stream
                    if self.receives[j]:
                        st[j].inputs[p].copy_(st[j - 1].outputs[p], non_blocking=True)
                    st[j].labels[p].copy_(st[j - 1].labels[p], non_blocking=True)
                    if st[j].images[p] is not None:  # the batch's image, from the stage before
                        st[j].images[p].copy_(st[j - 1].image(p), non_blocking=True)
                start = self._trace_start(j)
                st[j].graphs[p].replay()
                self._record_done(j)
                self._trace_end(j, b, start)
            batches[j], samples[j] = b, self._graph_shape[0]
            self.metrics.samples[j] += self._graph_shape[0]
            self.counts[j] += 1
        self._in_flight_graph = inflight
        self.ticks += 1
        return batches, tuple(samples)
