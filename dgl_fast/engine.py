"""Stage engines: how a Trainer schedules the K stage steps of synchronous DGL.

- ``SequentialEngine`` is the reference (no class needed: ``Trainer.step`` runs stage 1 to K on
  one batch, one after another).
- :class:`PipelinedEngine` runs the pipelined schedule: at tick t stage j trains on batch t - j,
  so all K stages have work at once. Stage j's input for batch b is what stage j - 1 produced
  for batch b one tick earlier, after exactly the updates it has in the sequential loop, so the
  parameters are the same as the sequential trainer's (PAPER.md section 1). On the CPU
  (``engine="pipeline"``) the stages of a tick run one after another: the schedule logic that CI
  tests. On CUDA (``engine="streams"``) each stage runs on its own stream, ordered only by events
  (stage j at tick t waits for stage j - 1 at tick t - 1), and with ``cuda_graphs=True`` each stage
  step (forward, head, loss, backward, optimizer step, metrics) replays a CUDA graph.

Hand-offs between stages: eager mode passes fresh tensors (their lifetime across streams is
declared with ``record_stream``); graph mode uses static buffers double-buffered by batch
parity: stage j writes ``out[j][b % 2]`` for batch b while stage j + 1 reads ``out[j][(b - 1) % 2]``.
Stage j at tick t therefore also waits for stage j + 1 at tick t - 1 (the reader of the buffer it
is about to overwrite). Metrics accumulate on the device, in the graphs themselves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .utils import kept_modes

__all__ = ["AsyncGraphs", "PipelinedEngine", "GraphSGD", "StageMetrics", "TickResult"]


class StageMetrics:
    """Per-stage sums of the loss and of correct predictions, kept on the device.

    Stage j adds to element j only (one kernel each), on whatever stream runs its step, so stages
    on different streams never touch the same memory; :meth:`read` is a host synchronisation
    the caller orders after the stages' work."""

    def __init__(self, K: int, device: torch.device):
        self.loss_sum = torch.zeros(K, dtype=torch.float64, device=device)
        self.correct_sum = torch.zeros(K, dtype=torch.long, device=device)
        self.samples = [0] * K  # known on the host: every step's batch size

    def add(self, j: int, loss: torch.Tensor, correct: torch.Tensor, n: int, count: bool = True) -> None:
        """Add a step's mean loss (times its ``n`` samples) and correct count to stage j;
        ``count=False`` leaves the host sample count to the caller (inside a CUDA graph)."""
        self.loss_sum.select(0, j).add_(loss.detach(), alpha=n)
        self.correct_sum.select(0, j).add_(correct)
        if count:
            self.samples[j] += n

    def read(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct, samples) since the last reset (a host sync)."""
        sums, hits, samples = self.loss_sum.tolist(), self.correct_sum.tolist(), list(self.samples)
        if reset:
            self.loss_sum.zero_()
            self.correct_sum.zero_()
            self.samples = [0] * len(samples)
        return [t / n if n else math.nan for t, n in zip(sums, samples)], hits, samples


@dataclass
class TickResult:
    """What one tick trained: for each stage, the batch index it worked on (None if idle), the
    samples, and (eager ticks only) the loss and correct-count tensors of each stage that ran."""

    batches: list[int | None]
    samples: tuple[int, ...]
    losses: list | None = None
    correct: list | None = None


class GraphSGD:
    """A CUDA-graph-capturable step of a ``torch.optim.SGD``, bitwise equal to torch's own.

    It runs the foreach ops of torch's multi-tensor SGD (weight decay, momentum, dampening,
    Nesterov; the same ops, in the same order, as torch's single-tensor SGD on the CPU) on the
    optimizer's own parameters and momentum buffers (which must exist: take one eager step first),
    so a replayed graph produces exactly the parameters of eager ``opt.step()`` calls. Like torch's
    SGD it passes the learning rate to the kernels as a number: a captured graph keeps the rate it
    was captured with. :meth:`stale` tells when the optimizer's rate has changed since; the engines
    then capture the stage step again (once per learning-rate change, not per step).
    """

    def __init__(self, opt: torch.optim.Optimizer):
        if type(opt) is not torch.optim.SGD:
            raise ValueError(f"CUDA graphs capture torch.optim.SGD steps; got {type(opt).__name__} "
                             "(use cuda_graphs=False for other optimizers)")
        for g in opt.param_groups:
            if g.get("maximize", False):
                raise ValueError("GraphSGD does not support maximize=True")
        self.opt = opt
        #: the learning rate of each parameter group, as captured
        self.lr = [float(g["lr"]) for g in opt.param_groups]

    def stale(self) -> bool:
        """Whether the optimizer's learning rates differ from the captured ones."""
        return any(float(g["lr"]) != lr for g, lr in zip(self.opt.param_groups, self.lr))

    @torch.no_grad()
    def step(self) -> None:
        for lr, g in zip(self.lr, self.opt.param_groups):
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, mom, damp, nesterov = g["weight_decay"], g["momentum"], g["dampening"], g["nesterov"]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if mom != 0:
                bufs = []
                for p in params:
                    buf = self.opt.state[p].get("momentum_buffer")
                    if buf is None:
                        raise RuntimeError("GraphSGD needs momentum buffers: run one eager optimizer step first")
                    bufs.append(buf)
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads, alpha=1 - damp)
                grads = torch._foreach_add(grads, bufs, alpha=mom) if nesterov else bufs
            torch._foreach_add_(params, grads, alpha=-lr)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``): inside a graph whose capture started without
        gradients, each replay's backward writes them afresh, so no fill is needed."""
        for g in self.opt.param_groups:
            for p in g["params"]:
                p.grad = None


class _StageGraphs:
    """The two CUDA graphs (one per batch parity) of one stage step, and their static buffers."""

    def __init__(self):
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None, None]
        self.inputs: list[torch.Tensor | None] = [None, None]  # stage 0 only: its own input buffers
        self.outputs: list[torch.Tensor | None] = [None, None]
        self.labels: list[torch.Tensor | None] = [None, None]


class PipelinedEngine:
    """Pipelined synchronous DGL over a :class:`~dgl_fast.Trainer`'s model and optimizers.

    Args:
        trainer: the trainer whose stages, heads, optimizers and amp settings are used.
        streams: one CUDA stream per stage (CUDA only); False runs a tick's stages in order.
        graphs: replay one CUDA graph per stage step after ``warmup`` eager ticks (CUDA only).
    """

    def __init__(self, trainer, streams: bool, graphs: bool, warmup: int = 3, emulate_graphs: bool = False):
        self.tr = trainer
        self.K = trainer.model.num_stages
        self.device = trainer.device
        cuda = self.device.type == "cuda"
        if (streams or (graphs and not emulate_graphs)) and not cuda:
            raise ValueError("CUDA streams and graphs need a CUDA device")
        # emulate_graphs (tests, any device): "capture" stores the stage-step function bound to the
        # static buffers and "replay" calls it, so the graph path's data flow (parity buffers,
        # label hand-offs, GraphSGD, in-graph metrics) runs where no GPU is.
        self.emulate_graphs = emulate_graphs
        self.streams = [torch.cuda.Stream(self.device) for _ in range(self.K)] if streams else None
        self.use_graphs = graphs
        self.warmup = warmup
        self.pending: list[tuple | None] = [None] * self.K  # eager: (h, y, batch) waiting for stage j
        self.next_batch = 0  # index of the next batch fed
        self.ticks = 0
        self.done = [None] * self.K  # event: stage j finished its last tick
        # two events per stage, used by tick parity: a tick waits on the previous tick's events
        # while it records its own, with no new event object per stage step
        self._events = [[torch.cuda.Event(), torch.cuda.Event()] for _ in range(self.K)] if streams else None
        self.metrics = StageMetrics(self.K, self.device)  # device-side, one entry per stage
        self._graph_state: list[_StageGraphs] | None = None
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
        neighbours = (j - 1, j + 1) if self._graph_state is not None else (j - 1,)
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
        prev = list(self.done)
        cur = torch.cuda.current_stream(self.device) if self.streams is not None else None
        for j in reversed(range(self.K)):  # any order is valid: a tick's stages are independent
            if inputs[j] is None:
                continue
            h_in, y, b = inputs[j]
            stream = self._stream(j)
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                self._wait_neighbours(j, prev, cur)
                if stream is not None:
                    h_in.record_stream(stream)
                    y.record_stream(stream)
                start = self._trace_start(j)
                h_out, loss, correct = self.tr.steps[j].step(h_in, y)
                self.metrics.add(j, loss, correct, y.shape[0])
                self._record_done(j)
                self._trace_end(j, b, start)
            if stream is not None:
                loss.record_stream(cur)
                correct.record_stream(cur)
            if j + 1 < self.K:
                nxt[j + 1] = (h_out, y, b)
            batches[j], samples[j] = b, y.shape[0]
            losses[j], hits[j] = loss, correct
            self.tr.stage_steps[j] += 1
        self.pending = nxt
        self.ticks += 1
        return TickResult(batches, tuple(samples), losses, hits)

    # ------------------------------------------------------------------ graph ticks

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture each stage's step for both batch parities (the pipeline is empty)."""
        tr, dev = self.tr, self.device
        self._graph_opts = [GraphSGD(opt) for opt in tr.optimizers]
        state = [_StageGraphs() for _ in range(self.K)]
        probes = []  # each stage's output (shape, dtype, memory format), without touching BN statistics
        with torch.no_grad(), kept_modes(tr.model):
            tr.model.eval()
            h = x
            for j in range(self.K - 1):
                with tr.steps[j].autocast():
                    h = tr.steps[j].stage(h)
                probes.append(h)
        for p in range(2):
            state[0].inputs[p] = torch.empty_like(x)
        for j in range(self.K):
            for p in range(2):
                state[j].labels[p] = torch.empty_like(y)
        for j in range(self.K):
            for p in range(2):
                src = state[0].inputs[p] if j == 0 else state[j - 1].outputs[p]
                if j < self.K - 1:
                    state[j].outputs[p] = torch.empty_like(probes[j])
                for opt in tr.optimizers:
                    opt.zero_grad(set_to_none=True)
                if self.emulate_graphs:
                    state[j].graphs[p] = _EmulatedGraph(self._graph_body, j, src, state[j].labels[p], state[j].outputs[p])
                    continue
                g = torch.cuda.CUDAGraph()
                stream = self.streams[j]
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.device(dev), torch.cuda.graph(g, stream=stream):
                    self._graph_body(j, src, state[j].labels[p], state[j].outputs[p])
                state[j].graphs[p] = g
        if self.streams is not None:
            for s in self.streams:
                torch.cuda.current_stream(dev).wait_stream(s)
        for opt in tr.optimizers:  # .grad must not point into a graph's memory for an eager step
            opt.zero_grad(set_to_none=True)
        self._graph_state = state
        self._graph_shape = tuple(x.shape)
        self.captures += 1

    def _graph_body(self, j: int, h_in, y, out) -> None:
        loss, correct = self.tr.steps[j].graph_body(h_in, y, self._graph_opts[j], out)
        self.metrics.add(j, loss, correct, y.shape[0], count=False)  # replays count on the host

    def _graph_tick(self, fresh) -> TickResult:
        st = self._graph_state
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
                else:
                    st[j].labels[p].copy_(st[j - 1].labels[p], non_blocking=True)
                start = self._trace_start(j)
                st[j].graphs[p].replay()
                self._record_done(j)
                self._trace_end(j, b, start)
            batches[j], samples[j] = b, self._graph_shape[0]
            self.metrics.samples[j] += self._graph_shape[0]
            self.tr.stage_steps[j] += 1
        self._in_flight_graph = inflight
        self.ticks += 1
        return TickResult(batches, tuple(samples))

    # ------------------------------------------------------------------ public

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> TickResult:
        """Put one (checked, on-device) batch into the pipeline and run one tick."""
        b = self.next_batch
        self.next_batch += 1
        if not self.use_graphs:
            return self._eager_tick((x, y, b))
        if self._graph_state is not None and tuple(x.shape) != self._graph_shape:
            # a partial or re-shaped batch: drain, then run it through the eager pipeline
            self.flush()
            self._eager_ticks = 0
            if tuple(x.shape)[0] < self._graph_shape[0]:
                res = self._eager_tick((x, y, b))
                self.flush()
                return res
            self._drop_graphs()
        if self._graph_state is None:
            if self._eager_ticks < self.warmup:
                self._eager_ticks += 1
                return self._eager_tick((x, y, b))
            self.flush()
            self._capture(x, y)
        return self._graph_tick((x, y, b))

    def flush(self) -> list[TickResult]:
        """Run ticks without new batches until every batch has left the pipeline."""
        out = []
        with torch.enable_grad():  # callers may sit inside no_grad (evaluate); the stage steps train
            out += self._drain()
        return out

    def _drain(self) -> list[TickResult]:
        out = []
        while not all(p is None for p in self.pending):
            out.append(self._eager_tick(None))
        while any(b is not None for b in self._in_flight_graph):
            out.append(self._graph_tick(None))
        return out

    def sync_to_current(self) -> None:
        """Make the current stream wait for every stage's last work (no host wait)."""
        if self.streams is None:
            return
        cur = torch.cuda.current_stream(self.device)
        for ev in self.done:
            if ev is not None:
                cur.wait_event(ev)

    def read_metrics(self, reset: bool = True) -> tuple[list[float], list[int], list[int]]:
        """Per-stage (mean loss, correct, samples) since the last reset; a host sync."""
        if self.streams is not None:
            torch.cuda.synchronize(self.device)
        out = self.metrics.read(reset)
        if reset:
            self._streams_wait_current()
        return out

    def _streams_wait_current(self) -> None:
        """Make every stage stream wait for what the caller's stream has queued (a reset of the
        metric accumulators, a new learning rate) before its next step."""
        if self.streams is None:
            return
        cur = torch.cuda.current_stream(self.device)
        for s in set(self.streams):
            s.wait_stream(cur)

    def reset(self) -> None:
        """Forget captured graphs (they re-capture after the warm-up ticks): after the model's or
        optimizers' state tensors were replaced, e.g. by ``load_state_dict``. The pipeline must be
        empty (flush first)."""
        if not self.idle():
            raise RuntimeError("flush the pipeline before resetting the engine")
        self._drop_graphs()
        self._eager_ticks = 0

    def on_lr_change(self) -> None:
        """After the optimizers' learning rates changed (the pipeline is flushed): graphs captured
        with other rates are dropped and captured again at the next batch, without new warm-up."""
        if self._graph_opts is not None and any(o.stale() for o in self._graph_opts):
            self._drop_graphs()
        self._streams_wait_current()

    def _drop_graphs(self) -> None:
        if not self.idle():
            raise RuntimeError("flush the pipeline before dropping its graphs")
        if self._graph_state is not None and not self.emulate_graphs:
            # replays may still run on the stage streams; a rare event (a learning-rate change, a
            # new batch shape), so the host simply waits before the graphs and buffers are freed
            torch.cuda.synchronize(self.device)
        self._graph_state, self._graph_opts, self._graph_shape = None, None, None


class _AsyncStage:
    """Static tensors and the captured graph of one async stage step."""

    def __init__(self):
        self.graph = None
        self.x = self.y = self.info = None  # the step's input: copied in (stage 1) or sampled into
        self.h = None  # the stage's output, pushed to the next buffer after the replay
        self.loss = self.correct = None  # the step's metrics, written by the graph


class AsyncGraphs:
    """Asynchronous DGL with one CUDA graph per stage step (``Trainer(mode="async", engine="streams",
    cuda_graphs=True)``).

    Stage j's step is: sample buffer j - 1 into static tensors (stage 1: copy the fresh batch in),
    replay the graph (stage forward, head, loss, backward, a :class:`GraphSGD` step, metrics, the
    output into a static tensor), then push that output to buffer j. Sample and push stay outside
    the graph, so the buffers'
    event protocol orders only them against the neighbouring stages' streams, exactly as in the
    eager trainer: a stage's training never waits for its neighbours' training. The static
    tensors are reused in stream order on the stage's own stream. Each stage runs its first
    ``warmup`` steps eagerly (momentum buffers, cuDNN and cuBLAS warm-up), is captured on its own
    stream at its next step and replays from then on.

    ``max_reuse`` is not supported: the trainer would have to read the "nothing available" flag.
    """

    def __init__(self, trainer, streams: list | None, warmup: int = 2, emulate_graphs: bool = False):
        self.tr = trainer
        self.K = trainer.model.num_stages
        self.device = trainer.device
        if not emulate_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.streams, self.warmup, self.emulate_graphs = streams, warmup, emulate_graphs
        self.stages: list[_AsyncStage | None] = [None] * self.K
        self.opts: list[GraphSGD | None] = [None] * self.K
        self.eager_steps = [0] * self.K  # eager steps since the last reset: capture waits for `warmup`

    def ready(self, j: int) -> bool:
        """Whether stage j's next step replays (or captures) its graph. Counts eager steps itself
        (not the trainer's step counts, which a resumed checkpoint restores), so every capture in a
        process follows eager warm-up steps on the same stream."""
        return self.stages[j] is not None or self.eager_steps[j] >= self.warmup

    def eager_step_done(self, j: int) -> None:
        self.eager_steps[j] += 1

    def reset(self) -> None:
        """Forget every captured graph (after the model, optimizers or buffers were replaced)."""
        self.stages, self.opts, self.eager_steps = [None] * self.K, [None] * self.K, [0] * self.K

    def on_lr_change(self, j: int | None = None) -> None:
        """After stage j's (or every stage's) learning rate changed: a graph captured with another
        rate is dropped, and the stage's next step captures it again (no new warm-up)."""
        for k in range(self.K) if j is None else (j,):
            if self.opts[k] is not None and self.opts[k].stale():
                if not self.emulate_graphs:
                    # its replays may still run; once per learning-rate change, the host waits
                    (self.streams[k] if self.streams is not None else torch.cuda.current_stream(self.device)).synchronize()
                self.stages[k], self.opts[k] = None, None

    def _body(self, j: int, st: _AsyncStage) -> None:
        loss, correct = self.tr.steps[j].graph_body(st.x, st.y, self.opts[j], st.h)
        st.loss.copy_(loss)
        st.correct.copy_(correct)

    def _capture(self, j: int, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        tr, dev = self.tr, self.device
        st = _AsyncStage()
        if j == 0:
            st.x, st.y = torch.empty_like(x), torch.empty_like(y)
        else:
            buf = tr.buffers[j - 1]
            st.x = torch.empty(buf.batch_shape, dtype=buf.dtype, device=dev)
            st.y = torch.empty(buf.batch_shape[0], dtype=torch.long, device=dev)
            st.info = torch.empty(2, dtype=torch.long, device=dev)
        if j < self.K - 1:
            nxt = tr.buffers[j]
            st.h = torch.empty(nxt.batch_shape, dtype=nxt.dtype, device=dev)
        st.loss = torch.zeros((), dtype=torch.float32, device=dev)
        st.correct = torch.zeros((), dtype=torch.long, device=dev)
        self.opts[j] = GraphSGD(tr.optimizers[j])
        tr.optimizers[j].zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        if self.emulate_graphs:
            st.graph = _EmulatedGraph(self._body, j, st)
        else:
            g = torch.cuda.CUDAGraph()
            cur = torch.cuda.current_stream(dev)
            stream = self.streams[j] if self.streams is not None else torch.cuda.Stream(dev)
            stream.wait_stream(cur)
            with torch.cuda.device(dev), torch.cuda.graph(g, stream=stream):
                self._body(j, st)
            cur.wait_stream(stream)
            st.graph = g
        tr.optimizers[j].zero_grad(set_to_none=True)  # .grad must not point into the graph's memory
        self.stages[j] = st

    def step(self, j: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None, on_replay=None):
        """Stage j's step on the current stream (captured first if needed); ``on_replay()`` is
        called between the replay and the push. Returns ``(loss, correct, samples)``: the graph's
        static metric tensors, valid until stage j's next step (clone them to keep them longer)."""
        tr = self.tr
        if self.stages[j] is None:
            self._capture(j, x, y)
        st = self.stages[j]
        if j == 0:
            if tuple(x.shape) != tuple(st.x.shape):
                raise ValueError(f"async CUDA graphs keep a fixed batch: expected {list(st.x.shape)}, got {list(x.shape)}")
            st.x.copy_(x, non_blocking=True)
            st.y.copy_(y, non_blocking=True)
        else:
            tr.buffers[j - 1].sample_into(st.x, st.y, st.info)
        st.graph.replay()
        if on_replay is not None:
            on_replay()
        if st.h is not None:
            tr.buffers[j].push(st.h, st.y)
        return st.loss, st.correct, st.y.shape[0]


class _EmulatedGraph:
    """Stands in for a captured CUDA graph when ``emulate_graphs`` is set: replay calls the
    stage-step function on the same static buffers a real capture would have recorded."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def replay(self) -> None:
        with torch.enable_grad():
            self.fn(*self.args)
