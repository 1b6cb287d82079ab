"""Asynchronous DGL (PAPER.md section 5): a replay buffer between consecutive stages, stages ticking
at their own pace.

As the authors simulate it: the buffers are filled in stage order, then each tick draws one stage
(weight ``1 - noise`` for slowed stages, 1 for the others); stage 1 reads fresh batches, stage j
samples buffer j-1, every stage but the last pushes its output. One :meth:`AsyncSchedule.feed`
runs ticks until stage 1 has consumed the fresh batch. Per-stage epoch counters drive each
stage's learning-rate schedule. With capacity 1, ``fifo`` and the ``round_robin`` schedule it is
exactly synchronous DGL.

On streams (a :mod:`dgl_fast.streams` backend) the stages free-run: stage j runs on its own
stream, stage 1 waits only for its batch (made on the caller's stream), stage j only for its
buffers, and nothing waits for the caller until :meth:`AsyncSchedule.flush` joins the stages into
the caller's stream; their next steps then wait for what the caller did meanwhile. Metrics stay
on the device, each stage adding on its own stream. With graphs, each stage step (stage, head,
loss, backward, SGD, metrics) replays one CUDA graph between an eager sample of its input buffer
and a push to its output buffer, so the buffers' event protocol orders only sample and push.

A rule whose loss needs the network's input (InfoPro's reconstruction, ``step.needs_image``):
the replay buffers keep each batch's input image with its activations and labels (a
:class:`~dgl_fast.ReplayBuffer` with ``image_shape``; its slot is the activations' slot), so the
image stage j trains on is always the one of the activation it sampled. Stage 1 takes the fresh
batch as its image; only the buffers feeding a stage up to the last one that needs the image
keep images. With graphs the sampled image is a static input of the stage's graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..buffer import ReplayBuffer
from .base import Schedule, StepOutput, stack_output
from .graphs import CaptureWatch, GraphSGD, capture

__all__ = ["AsyncSchedule", "SCHEDULES"]

SCHEDULES = ("random", "round_robin")


class _GraphStage:
    """Static tensors and the captured graph of one async stage step."""

    def __init__(self):
        self.graph = None
        self.x = self.y = self.info = self.image = None  # the step's input: copied in (stage 1) or sampled into
        self.h = None  # the stage's output, pushed to the next buffer after the replay
        self.loss = self.correct = self.skipped = None  # the step's metrics, written by the graph


class _AsyncGraphs:
    """One CUDA graph per stage step. Each stage runs its first ``warmup`` steps eagerly (momentum
    buffers, cuDNN and cuBLAS warm-up), is captured on its own stream at its next step and replays
    from then on; a learning-rate change makes its graph stale and it is captured again."""

    def __init__(self, steps: list, device: torch.device, streams: list | None, warmup: int, emulate: bool):
        self.steps, self.device, self.streams, self.warmup, self.emulate = steps, device, streams, warmup, emulate
        self.K = len(steps)
        self.stages: list[_GraphStage | None] = [None] * self.K
        self.opts: list[GraphSGD | None] = [None] * self.K
        self.eager_steps = [0] * self.K  # eager steps since the last reset: capture waits for `warmup`

    def ready(self, j: int) -> bool:
        """Whether stage j's next step replays (or captures) its graph. Counts eager steps itself
        (not the restored step counts of a checkpoint), so every capture in a process follows
        eager warm-up steps on the same stream."""
        return self.stages[j] is not None or self.eager_steps[j] >= self.warmup

    def reset(self) -> None:
        self.stages, self.opts, self.eager_steps = [None] * self.K, [None] * self.K, [0] * self.K

    def on_lr_change(self, j: int | None = None) -> None:
        for k in range(self.K) if j is None else (j,):
            if self.opts[k] is not None and self.opts[k].stale():
                if not self.emulate:
                    # its replays may still run; once per learning-rate change, the host waits
                    (self.streams[k] if self.streams is not None else torch.cuda.current_stream(self.device)).synchronize()
                self.stages[k], self.opts[k] = None, None

    def _body(self, j: int, st: _GraphStage) -> None:
        image = (st.x if j == 0 else st.image) if self.steps[j].needs_image else None
        loss, correct = self.steps[j].graph_body(st.x, st.y, self.opts[j], st.h, image)
        st.loss.copy_(loss)
        st.correct.copy_(correct)
        st.skipped.copy_(self.steps[j].skipped)

    def _capture(self, j: int, x, y, buffers: list[ReplayBuffer]) -> None:
        dev, st = self.device, _GraphStage()
        if j == 0:
            st.x, st.y = torch.empty_like(x), torch.empty_like(y)
        else:
            buf = buffers[j - 1]
            st.x = torch.empty(buf.batch_shape, dtype=buf.dtype, device=dev)
            st.y = torch.empty(buf.batch_shape[0], dtype=torch.long, device=dev)
            st.info = torch.empty(2, dtype=torch.long, device=dev)
            if buf.image_store is not None:
                st.image = torch.empty(buf.image_shape, dtype=buf.image_dtype, device=dev)
        if j < self.K - 1:
            st.h = torch.empty(buffers[j].batch_shape, dtype=buffers[j].dtype, device=dev)
        st.loss = torch.zeros((), dtype=torch.float32, device=dev)
        st.correct = torch.zeros((), dtype=torch.long, device=dev)
        st.skipped = torch.zeros((), dtype=torch.bool, device=dev)
        opt = self.steps[j].optimizer
        self.opts[j] = GraphSGD(opt)
        opt.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        watch = None
        if self.emulate:
            step = self.steps[j]
            watch = CaptureWatch(j, dev, {"stage": step.stage, "head": step.head}, opt,
                                 lambda: {"input": st.x, "labels": st.y, "output": st.h, "loss": st.loss,
                                          "correct": st.correct, "skipped": st.skipped, "image": st.image})
        st.graph = capture(self._body, j, st, device=dev, stream=self.streams[j] if self.streams is not None else None,
                           emulate=self.emulate, watch=watch)
        opt.zero_grad(set_to_none=True)  # .grad must not point into the graph's memory
        self.stages[j] = st

    def step(self, j: int, x, y, buffers: list[ReplayBuffer], on_replay=None):
        """Stage j's step on the current stream (captured first if needed); ``on_replay()`` runs
        between the replay and the push. Returns the graph's static ``(loss, correct, skipped)``
        and the batch size: valid until stage j's next step."""
        if self.stages[j] is None:
            self._capture(j, x, y, buffers)
        st = self.stages[j]
        if j == 0:
            if tuple(x.shape) != tuple(st.x.shape):
                raise ValueError(f"async CUDA graphs keep a fixed batch: expected {list(st.x.shape)}, got {list(x.shape)}")
            st.x.copy_(x, non_blocking=True)
            st.y.copy_(y, non_blocking=True)
        else:
            buffers[j - 1].sample_into(st.x, st.y, st.info, st.image)
        st.graph.replay()
        if on_replay is not None:
            on_replay()
        if st.h is not None:
            buffers[j].push(st.h, st.y, (st.x if j == 0 else st.image) if buffers[j].image_store is not None else None)
        return st.loss, st.correct, st.y.shape[0], st.skipped


class AsyncSchedule(Schedule):
    """Asynchronous DGL over K stage steps.

    Args:
        steps: the :class:`~dgl_fast.stage.StageStep` of each stage.
        device: where stages and buffers live; ``dtype``: the activations' dtype.
        capacity, policy, max_reuse, buffer_dtype: the replay buffers (:class:`~dgl_fast.ReplayBuffer`).
        slowdown: ``{stage index (0-based): noise}`` of the random schedule.
        schedule: ``"random"`` or ``"round_robin"``; ``seed``: its draws' and the buffers' seed.
        streams: a :mod:`dgl_fast.streams` backend to free-run the stages on (None: in turn).
        graphs: one CUDA graph per stage step; ``emulate_graphs``: the graph code path without
            capture (any device).
    """

    def __init__(self, steps: list, device: torch.device, dtype: torch.dtype, *, capacity: int, policy: str,
                 max_reuse: int | None, buffer_dtype: torch.dtype | None, slowdown: dict, schedule: str, seed: int,
                 streams=None, graphs: bool = False, emulate_graphs: bool = False, warmup: int = 2):
        super().__init__(len(steps), device)
        K = self.K
        self.steps, self.dtype = steps, dtype
        self.capacity, self.policy, self.max_reuse, self.buffer_dtype = capacity, policy, max_reuse, buffer_dtype
        self.schedule, self.seed = schedule, seed
        self.buffers: list[ReplayBuffer] | None = None
        self.warm = 0  # random schedule: buffers filled so far, in stage order
        self._rng = torch.Generator().manual_seed(seed)
        self._weights = torch.tensor([1.0 - slowdown.get(j, 0.0) for j in range(K)], dtype=torch.float64)
        self._lr_schedule: Callable[[int], float] | None = None
        self._batches_per_epoch: int | None = None
        self._stage_epoch = [-1] * K
        self.ordering = streams  # the stream backend (None: stages run in turn on the current stream)
        self.streams = [streams.new_stream() for _ in range(K)] if streams is not None else None
        self.graphs = _AsyncGraphs(steps, device, self.streams, warmup, emulate_graphs) if graphs else None
        self.accumulates = streams is not None
        if streams is not None:
            self._done = [streams.new_event() for _ in range(K)]
            self._ran = [False] * K  # stage j has recorded its done event
            self._rejoin = False  # the caller's stream did work the stages must wait for

    # ---------------------------------------------------------------- buffers and learning rates

    def make_buffers(self, B: int, shapes: list[tuple], image: tuple | None = None,
                     image_dtype: torch.dtype | None = None) -> list[ReplayBuffer]:
        """The K - 1 replay buffers for batches of ``B`` with per-sample stage output ``shapes``;
        ``image``: the per-sample input shape, kept (as ``image_dtype``) by the buffers that feed a
        stage up to the last one whose loss needs it."""
        need = [j for j, s in enumerate(self.steps) if getattr(s, "needs_image", False)]
        carry = need[-1] if need and image is not None else 0  # buffers 0 .. carry - 1 keep the image
        return [ReplayBuffer(self.capacity, (B, *shape), dtype=self.dtype, device=self.device, policy=self.policy,
                             max_reuse=self.max_reuse, storage_dtype=self.buffer_dtype, seed=self.seed + j,
                             streams=self.ordering, image_shape=(B, *image) if j < carry else None,
                             image_dtype=image_dtype) for j, shape in enumerate(shapes)]

    def set_lr_schedule(self, schedule: Callable[[int], float], batches_per_epoch: int | None,
                        check: Callable) -> None:
        """Each stage's learning rate follows ``schedule`` by its own epoch count (its steps over
        ``batches_per_epoch``); ``check(factor, what)`` validates each factor."""
        self._lr_schedule, self._check_factor = schedule, check
        if self._batches_per_epoch is None and batches_per_epoch:
            self._batches_per_epoch = max(1, batches_per_epoch)

    def _stage_lr(self, j: int) -> None:
        if self._lr_schedule is None or not self._batches_per_epoch:
            return
        epoch = self.counts[j] // self._batches_per_epoch
        if epoch != self._stage_epoch[j]:
            self._stage_epoch[j] = epoch
            factor = self._check_factor(self._lr_schedule(epoch), f"lr_schedule({epoch}) for stage {j + 1}")
            for group in self.steps[j].optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            if self.graphs is not None:  # on stage j's stream, before its next replay
                self.graphs.on_lr_change(j)

    # ---------------------------------------------------------------- one stage step

    def _run_stage(self, j: int, x=None, y=None):
        """One step of stage j: on (x, y) for stage 1, else on a sample of buffer j-1; pushes its
        output to buffer j. Returns (loss, correct, samples, skipped), or None when ``max_reuse``
        left nothing to sample."""
        self._stage_lr(j)
        graphs, ordering = self.graphs, self.ordering
        if graphs is not None and graphs.ready(j):
            # for RecordedStreams, the step is marked between its sample and its push
            loss, corr, n, skip = graphs.step(j, x, y, self.buffers,
                                              on_replay=None if ordering is None else lambda: ordering.mark(("step", j)))
            self.counts[j] += 1
            # the graph's static metrics: used right away on this stream (free-running), or kept
            return (loss, corr, n, skip) if ordering is not None else (loss.clone(), corr.clone(), n, skip.clone())
        image = x
        if j > 0:
            sample = self.buffers[j - 1].sample()
            if self.max_reuse is not None and not bool(sample.valid):
                return None  # every slot used up: this stage skips its turn
            (x, y), image = sample, sample.image
        h, loss, corr = self.steps[j].step(x, y, image if self.steps[j].needs_image else None)
        if ordering is not None:
            ordering.mark(("step", j))
        if graphs is not None:
            graphs.eager_steps[j] += 1
        if j < self.K - 1:
            self.buffers[j].push(h, y, image if self.buffers[j].image_store is not None else None)
        self.counts[j] += 1
        return loss, corr, x.shape[0], self.steps[j].skipped

    def feed(self, x: torch.Tensor, y: torch.Tensor, shapes: list[tuple] | None = None) -> StepOutput:
        """Feed one fresh batch (``shapes``: the stage outputs' per-sample shapes, needed to make
        the buffers on the first batch)."""
        K = self.K
        if self.buffers is None:
            self.buffers = self.make_buffers(x.shape[0], shapes, tuple(x.shape[1:]), x.dtype)
        runs: list[list] = [[] for _ in range(K)]
        streams, st = self.streams, self.ordering
        if streams is not None:
            cur = st.current()
            if self._rejoin:  # the caller used the model, metrics or learning rates: stages wait for it
                ev = st.new_event()
                st.record(ev, cur)
                for s in streams:
                    st.wait_event(s, ev)
                self._rejoin = False

        def tick(j, *batch):
            if streams is None:
                r = self._run_stage(j, *batch)
                if r is not None:
                    self.metrics.add(j, r[0], r[1], r[2], skipped=r[3])
                    runs[j].append(r)
                return
            # stage j on its own stream: it waits for its batch (stage 1: the caller's stream, where
            # the batch was made; others: their input buffer), never for the host
            with st.use(streams[j]):
                if j == 0:
                    st.wait_stream(streams[0], cur)
                    for t in batch:
                        st.keep_alive(t, streams[0])
                r = self._run_stage(j, *batch)
                if r is not None:
                    self.metrics.add(j, r[0], r[1], r[2], skipped=r[3])
                    runs[j].append((None, None, r[2]))
                st.record(self._done[j], streams[j])
                self._ran[j] = True

        if self.schedule == "round_robin":
            tick(0, x, y)
            for j in range(1, K):
                tick(j)
        elif self.warm < K - 1:
            # warm-up: fill the buffers in stage order (stage 1 from fresh batches, stage j from buffer j-1)
            tick(0, x, y)
            while self.warm < K - 1 and len(self.buffers[self.warm]) == self.capacity:
                self.warm += 1
                if self.warm < K - 1:
                    for _ in range(self.capacity):
                        tick(self.warm)
        else:
            while True:
                j = int(torch.multinomial(self._weights, 1, generator=self._rng))
                if j == 0:
                    tick(0, x, y)
                    break
                tick(j)
        samples = tuple(sum(r[2] for r in rs) for rs in runs)
        if streams is not None:  # metrics stay on the stage streams (read_metrics)
            return StepOutput(None, None, x.shape[0], samples)
        losses = [torch.stack([r[0] for r in rs]).mean() if rs else None for rs in runs]
        correct = [torch.stack([r[1] for r in rs]).sum() if rs else None for rs in runs]
        skipped = [torch.stack([r[3] for r in rs]).sum() if rs else None for rs in runs]
        return stack_output(losses, correct, x.shape[0], samples, self.device, skipped)

    # ---------------------------------------------------------------- protocol

    def flush(self) -> None:
        """Join the free-running stage streams into the caller's stream (no host wait); the
        stages' next steps will wait for what the caller does meanwhile."""
        if self.streams is None:
            return
        cur = self.ordering.current()
        for ev, ran in zip(self._done, self._ran):
            if ran:
                self.ordering.wait_event(cur, ev)
        self._rejoin = True

    def on_lr_change(self, stage: int | None = None) -> None:
        if self.graphs is not None:
            self.graphs.on_lr_change(stage)

    def reset(self) -> None:
        if self.graphs is not None:  # captured graphs point at replaced optimizer state and buffers
            self.graphs.reset()

    def state_dict(self) -> dict:
        if self.buffers is None:
            return {}
        return {"buffers": [b.state_dict() for b in self.buffers], "warm": self.warm,
                "stage_epoch": list(self._stage_epoch), "batches_per_epoch": self._batches_per_epoch,
                "rng": self._rng.get_state()}

    def check_state(self, state: dict) -> None:
        """Refuse buffers of another configuration (before anything is loaded)."""
        for j, b in enumerate(state.get("buffers", [])):
            c = b.get("config", {})
            if (c.get("capacity"), c.get("policy"), c.get("max_reuse")) != (self.capacity, self.policy, self.max_reuse):
                raise ValueError(f"state's replay buffer {j + 1} is {c}; this trainer uses capacity {self.capacity}, "
                                 f"policy {self.policy!r}, max_reuse {self.max_reuse}")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self.buffers, self.warm, self._stage_epoch = None, 0, [-1] * self.K
        if state:
            saved = state["buffers"]
            image = saved[0]["config"].get("image_shape") if saved else None
            buffers = self.make_buffers(saved[0]["config"]["batch_shape"][0] if saved else 1,
                                        [tuple(b["config"]["batch_shape"][1:]) for b in saved],
                                        None if image is None else tuple(image[1:]),
                                        getattr(torch, saved[0]["config"]["image_dtype"].split(".")[-1]) if image else None)
            for buf, s in zip(buffers, saved):
                buf.load_state_dict(s)
            self.buffers, self.warm = buffers, state["warm"]
            self._stage_epoch, self._batches_per_epoch = list(state["stage_epoch"]), state["batches_per_epoch"]
            self._rng.set_state(state["rng"])
        self.reset()
