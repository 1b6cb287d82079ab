"""The pipelined schedule of synchronous DGL: at tick t stage j trains on batch t - j, so all K
stages have work at once.

Stage j's input for batch b is what stage j - 1 produced for batch b one tick earlier, after
exactly the updates it has in the sequential loop, so the parameters are the sequential
schedule's (PAPER.md section 1). On the CPU (``engine="pipeline"``) the stages of a tick run one
after another: the schedule logic that CI tests. On CUDA (``engine="streams"``) each stage runs on
its own stream, ordered only by events (stage j at tick t waits for stage j - 1 at tick t - 1), and
with CUDA graphs each stage step (forward, head, loss, backward, optimizer step, metrics) replays
a graph.

Hand-offs between stages: eager ticks pass fresh tensors (their lifetime across streams is
declared with ``record_stream``); graph ticks (:mod:`dgl_fast.schedules.pipeline_graphs`) use
static buffers double-buffered by batch parity. Metrics accumulate on the device, in the graphs
themselves.

A rule whose loss needs the network's input (InfoPro's reconstruction, ``step.needs_image``)
gets it on every tick: in eager ticks (also the warm-up ticks before a capture) each batch in
flight carries its input image with its activations and stage j receives the image of the batch
it trains on (handed to its device); in graph ticks the image is a static input of the graphs of
the stages that need it, copied along with the labels (see ``pipeline_graphs.py``).

Stages on several devices (``steps[j].device``, one process): stage j's stream lives on its
device and its graphs are captured there. At a group boundary (``placement``) the activations and
labels cross with non-blocking copies made in the receiving stage's stream context after it
waited for the producer's event (eager: fresh copies, the source recorded on the stream that
reads it; graphs: into the receiver's own static input buffers, double-buffered like the rest).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..utils import hand_off
from .base import Schedule, StepOutput, stack_output
from .graphs import GraphSGD
from .pipeline_graphs import GraphTicks, StageGraphs

__all__ = ["PipelinedSchedule"]


@dataclass
class TickResult:
    """What one tick trained: for each stage, the batch index it worked on (None if idle), the
    samples, and (eager ticks only) the loss and correct-count tensors of each stage that ran."""

    batches: list[int | None]
    samples: tuple[int, ...]
    losses: list | None = None
    correct: list | None = None
    skipped: list | None = None


class PipelinedSchedule(GraphTicks, Schedule):
    """Pipelined synchronous DGL over K stage steps.

    Args:
        steps: the :class:`~dgl_fast.stage.StageStep` of each stage.
        device: where the stages run.
        streams: one CUDA stream per stage (CUDA only); False runs a tick's stages in order.
        graphs: replay one CUDA graph per stage step after ``warmup`` eager ticks.
        emulate_graphs: run the graph code path without capturing (any device; see
            :mod:`dgl_fast.schedules.graphs`).
        placement: group of each stage (default: by device); a stage starting a group receives
            its input by a copy into its own buffers (also between groups on one device).
    """

    accumulates = True

    def __init__(self, steps: list, device: torch.device, streams: bool, graphs: bool, warmup: int = 3,
                 emulate_graphs: bool = False, placement: list[int] | None = None):
        super().__init__(len(steps), device, [s.device for s in steps])  # metrics: one entry per stage
        self.steps = steps
        self.stage_devices = [s.device for s in steps]
        self.all_devices = list(dict.fromkeys([self.device, *self.stage_devices]))
        cuda = all(d.type == "cuda" for d in self.all_devices)
        if (streams or (graphs and not emulate_graphs)) and not cuda:
            raise ValueError("CUDA streams and graphs need CUDA devices")
        groups = placement if placement is not None else self.stage_devices
        #: whether stage j starts a group: its input arrives by a copy into its own buffers
        self.receives = [j == 0 or groups[j] != groups[j - 1] for j in range(self.K)]
        # emulate_graphs (tests, any device): "capture" stores the stage-step function bound to the
        # static buffers and "replay" calls it, so the graph path's data flow (parity buffers,
        # label hand-offs, GraphSGD, in-graph metrics) runs where no GPU is.
        self.emulate_graphs = emulate_graphs
        self.streams = [torch.cuda.Stream(d) for d in self.stage_devices] if streams else None
        self.use_graphs = graphs
        self.warmup = warmup
        self.pending: list[tuple | None] = [None] * self.K  # eager: (h, y, batch, image) waiting for stage j
        #: some stage's loss needs the input image: eager ticks carry it with the activations (graphs: buffers)
        self.carries_image = any(getattr(s, "needs_image", False) for s in steps)
        self.next_batch = 0  # index of the next batch fed
        self.ticks = 0
        self.done = [None] * self.K  # event: stage j finished its last tick
        # two events per stage, used by tick parity: a tick waits on the previous tick's events
        # while it records its own, with no new event object per stage step
        self._events = [[torch.cuda.Event(), torch.cuda.Event()] for _ in range(self.K)] if streams else None
        #: the captured graphs and their static buffers (None before capture)
        self.graph_state: list[StageGraphs] | None = None
        self._graph_shape = None
        self._eager_ticks = 0
        self._graph_opts: list[GraphSGD] | None = None
        self._in_flight_graph: list[int | None] = [None] * self.K  # batch index in static buffers
        self.captures = 0  # times the stage graphs were captured (first use, learning-rate changes, new shapes)
        #: set to a list to record (stage, batch, start event, end event) of every stage step (CUDA)
        self.trace: list | None = None

    # ------------------------------------------------------------------ helpers

    def _stream(self, j: int):
        return self.streams[j] if self.streams is not None else None

    def _wait_neighbours(self, j: int, prev: list, cur) -> None:
        """Order stage j's step of this tick: after its input's producer (stage j - 1, previous
        tick), after the reader of the buffers it overwrites (stage j + 1, previous tick; graph
        mode only: eager hand-offs are fresh tensors) and, for stage 0, after the caller's stream
        (which made the batch). `prev` is the snapshot of the done events taken at the tick's start."""
        if self.streams is None:
            return
        s = self.streams[j]
        if j == 0:
            s.wait_stream(cur)
        neighbours = (j - 1, j + 1) if self.graph_state is not None else (j - 1,)
        for k in neighbours:
            if 0 <= k < self.K and prev[k] is not None:
                s.wait_event(prev[k])

    def _record_done(self, j: int) -> None:
        if self.streams is None:
            return
        ev = self._events[j][self.ticks % 2]
        ev.record(self.streams[j])
        self.done[j] = ev

    def _trace_start(self, j: int):
        if self.trace is None or self.streams is None:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.streams[j])
        return ev

    def _trace_end(self, j: int, b: int, start) -> None:
        if start is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.streams[j])
            self.trace.append((j, b, start, ev))

    def idle(self) -> bool:
        """True when no batch is inside the pipeline."""
        return all(p is None for p in self.pending) and all(b is None for b in self._in_flight_graph)

    # ------------------------------------------------------------------ eager ticks

    def _eager_tick(self, fresh) -> TickResult:
        inputs = list(self.pending)
        inputs[0] = fresh
        nxt: list[tuple | None] = [None] * self.K
        batches: list[int | None] = [None] * self.K
        samples = [0] * self.K
        losses: list = [None] * self.K
        hits: list = [None] * self.K
        skips: list = [None] * self.K
        prev = list(self.done)
        cur = torch.cuda.current_stream(self.device) if self.streams is not None else None
        for j in reversed(range(self.K)):  # any order is valid: a tick's stages are independent
            if inputs[j] is None:
                continue
            h_in, y, b, image = inputs[j]
            stream = self._stream(j)
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                self._wait_neighbours(j, prev, cur)
                dev = self.stage_devices[j]
                if stream is not None and h_in.device == dev:
                    h_in.record_stream(stream)
                    y.record_stream(stream)
                h_in, y = hand_off(h_in, dev), hand_off(y, dev)  # a copy made (and allocated) on this stream
                own = None
                if image is not None and self.steps[j].needs_image:
                    if stream is not None and image.device == dev:
                        image.record_stream(stream)
                    own = hand_off(image, dev)
                start = self._trace_start(j)
                h_out, loss, correct = self.steps[j].step(h_in, y, own)
                skipped = self.steps[j].skipped
                self.metrics.add(j, loss, correct, y.shape[0], skipped=skipped)
                self._record_done(j)
                self._trace_end(j, b, start)
            if stream is not None:  # read later on the current stream of their device
                for t in (loss, correct, skipped):
                    t.record_stream(torch.cuda.current_stream(t.device))
            if j + 1 < self.K:
                nxt[j + 1] = (h_out, y, b, image)
            batches[j], samples[j] = b, y.shape[0]
            losses[j], hits[j], skips[j] = loss, correct, skipped
            self.counts[j] += 1
        self.pending = nxt
        self.ticks += 1
        return TickResult(batches, tuple(samples), losses, hits, skips)

    # ------------------------------------------------------------------ graph ticks (pipeline_graphs.py)

    def _graph_tick(self, fresh) -> TickResult:
        return TickResult(*self._replay_tick(fresh))

    # ------------------------------------------------------------------ public

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Put one (checked, on-device) batch into the pipeline and run one tick. Per-stage losses
        come back only for eager ticks with ``collect`` on (graph ticks keep them on the device)."""
        res = self._feed(x, y)
        if not self.collect or res.losses is None:
            return StepOutput(None, None, x.shape[0], res.samples)
        self.sync_to_current()
        return stack_output(res.losses, res.correct, x.shape[0], res.samples, self.device, res.skipped)

    def _feed(self, x: torch.Tensor, y: torch.Tensor) -> TickResult:
        b = self.next_batch
        self.next_batch += 1
        fresh = (x, y, b, x if self.carries_image else None)  # eager ticks: the image travels with h
        if not self.use_graphs:
            return self._eager_tick(fresh)
        if self.graph_state is not None and tuple(x.shape) != self._graph_shape:
            # a partial or re-shaped batch: drain, then run it through the eager pipeline
            self._drain_all()
            self._eager_ticks = 0
            if tuple(x.shape)[0] < self._graph_shape[0]:
                res = self._eager_tick(fresh)
                self._drain_all()
                return res
            self._drop_graphs()
        if self.graph_state is None:
            if self._eager_ticks < self.warmup:
                self._eager_ticks += 1
                return self._eager_tick(fresh)
            self._drain_all()
            self._capture(x, y)
        return self._graph_tick((x, y, b))

    def flush(self) -> None:
        """Run ticks without new batches until every batch has left the pipeline; the caller's
        stream then waits for every stage (no host wait)."""
        self._drain_all()
        self.sync_to_current()

    def _drain_all(self) -> list[TickResult]:
        with torch.enable_grad():  # callers may sit inside no_grad (evaluate); the stage steps train
            return self._drain()

    def _drain(self) -> list[TickResult]:
        out = []
        while not all(p is None for p in self.pending):
            out.append(self._eager_tick(None))
        while any(b is not None for b in self._in_flight_graph):
            out.append(self._graph_tick(None))
        return out

    def sync_to_current(self) -> None:
        """Make the current stream (of every device a stage or the caller uses) wait for every
        stage's last work (no host wait)."""
        if self.streams is None:
            return
        for d in self.all_devices:
            cur = torch.cuda.current_stream(d)
            for ev in self.done:
                if ev is not None:
                    cur.wait_event(ev)

    def read_metrics(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct, samples) since the last reset; a host sync."""
        if self.streams is not None:
            self._synchronize()
        out = self.metrics.read(reset)
        if reset:
            self._streams_wait_current()
        return out

    def _streams_wait_current(self) -> None:
        """Make every stage stream wait for what the caller's stream has queued (a reset of the
        metric accumulators, a new learning rate) before its next step."""
        if self.streams is None:
            return
        for s in set(self.streams):
            s.wait_stream(torch.cuda.current_stream(s.device))
            if s.device != self.device:
                s.wait_stream(torch.cuda.current_stream(self.device))

    def reset(self) -> None:
        """Forget captured graphs (they re-capture after the warm-up ticks): after the model's or
        optimizers' state tensors were replaced, e.g. by ``load_state_dict``. The pipeline must be
        empty (flush first)."""
        if not self.idle():
            raise RuntimeError("flush the pipeline before resetting the engine")
        self._drop_graphs()
        self._eager_ticks = 0

    def on_lr_change(self, stage: int | None = None) -> None:
        """After the optimizers' learning rates changed (the pipeline is flushed): graphs captured
        with other rates are dropped and captured again at the next batch, without new warm-up."""
        if self._graph_opts is not None and any(o.stale() for o in self._graph_opts):
            self._drop_graphs()
        self._streams_wait_current()

    def _drop_graphs(self) -> None:
        if not self.idle():
            raise RuntimeError("flush the pipeline before dropping its graphs")
        if self.graph_state is not None and not self.emulate_graphs:
            # replays may still run on the stage streams; a rare event (a learning-rate change, a
            # new batch shape), so the host simply waits before the graphs and buffers are freed
            self._synchronize()
        self.graph_state = None
        self._graph_opts, self._graph_shape = None, None

    def _synchronize(self) -> None:
        for d in self.all_devices:
            torch.cuda.synchronize(d)
