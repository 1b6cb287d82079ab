"""DistributedDGL: one rank's share of DGL across processes, GPUs and machines.

No gradient crosses a stage boundary, so a stage placed on another process only ever needs the
*activations* of its predecessor, never anything back. Ranks form a grid of ``G`` stage groups x
``R`` replicas (:class:`~dgl_fast.distributed.protocol.Layout`): rank ``(r, g)`` trains stage
group ``g`` on replica row ``r``'s share of each batch (the row's feeding rank loads only that:
:mod:`.sharding`) and sends its output and labels to ``(r, g + 1)``; the replicas of a stage
group average gradients through ``DistributedDataParallel`` (:mod:`.replicas`). In
``mode="dgl"`` (synchronous) the result is the single-process trainer's on the whole batch:
bitwise with one replica, to rounding with several (for models without BatchNorm, see
replicas.py). In ``mode="async"`` the receiving rank keeps what arrives in a
:class:`~dgl_fast.ReplayBuffer` and trains on samples of it without waiting for its slower
neighbour (asynchronous between ranks, stage after stage inside one rank).
A rule whose loss needs the network's input (InfoPro) gets it on every rank: the links towards
ranks holding such a stage carry each batch's image with its activations (:class:`.protocol.Link`),
and the receiving replay buffer of async mode keeps it per slot.

Launch one process per rank (``torchrun --nnodes N --nproc-per-node G``)::

    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))   # "gloo" on CPUs
    net = dgl_fast.models.build("vgg13", block_size=3)          # same seed on every rank
    ddgl = DistributedDGL(net, optimizer=..., device=f"cuda:{local_rank}", replicas=2)
    loader = ddgl.shard(train_set, batch_size=256, seed=0)      # this row's shard (feeding ranks)
    ddgl.fit(loader if ddgl.feeds else None, epochs=50, lr_schedule=..., checkpoint_dir="ckpt")
    acc = ddgl.evaluate(test_loader if ddgl.feeds else None)    # per-stage accuracy, every rank

At start-up every rank checks that all were launched alike (:mod:`.agreement`); every exchange waits
at most ``timeout`` seconds and a stalled or dead peer raises a one-line :class:`.protocol.PeerError`.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ..buffer import ReplayBuffer
from ..fitting import TrainingDiverged, check_lr_plan
from ..model import DecoupledModel
from ..trainer import Trainer
from . import files, resharding
from .agreement import agree, model_fingerprint, roll_call
from .grid import check_batch_size, choose_placement, even_placement, min_share
from .protocol import END, Layout, Link, PeerError, Receiver, describe_failure, make_link_groups
from .replicas import check_options, replica_mesh, replicate, sync_batchnorm
from .sharding import loader_rows, row_sizes, set_epoch, shard_loader

__all__ = ["DistributedDGL", "even_placement"]


def _optimizer_fields(opt: torch.optim.Optimizer):
    return (type(opt).__name__, [sorted((k, repr(v)) for k, v in g.items() if k != "params") for g in opt.param_groups])


class DistributedDGL:
    """One rank's share of a distributed DGL run.

    Args:
        model: the whole :class:`~dgl_fast.DecoupledModel`, identical on every rank (same seed;
            checked); it needs ``input_shape``. Each rank keeps and trains only its stages.
        optimizer: factory ``params -> Optimizer``, as for :class:`~dgl_fast.Trainer`.
        placement: stage group of each stage (non-decreasing from 0, no gaps), ``"balance"``
            (default: :func:`dgl_fast.balancing.balance` on rank 0 with a ``balance_batch``-sized
            random batch; the predicted throughput is kept in :attr:`balance`) or ``"even"``.
        replicas: replica rows R; the world size must be R x the number of stage groups.
        device: this rank's device (``"cuda:N"`` with NCCL, ``"cpu"`` with gloo).
        mode: ``"dgl"`` (synchronous) or ``"async"`` (replay buffers between ranks; R = 1).
        timeout: seconds any exchange may wait (also set the process group's timeout, used by
            its collectives, when calling ``init_process_group``).
        buffer_capacity, policy, max_reuse: the receiving ranks' replay buffers (async mode).
        fingerprint: more fields every rank must agree on (the CLI passes its arguments).
        max_in_flight: messages a rank may have outstanding before it waits for the oldest.
        sync_bn: with replicas, BatchNorm as ``SyncBatchNorm`` over the replicas (CUDA only).
        ddp_options: more ``DistributedDataParallel`` arguments for the replicas
            (``bucket_cap_mb``, ``gradient_as_bucket_view``, ``static_graph``).
    """

    def __init__(self, model: DecoupledModel, optimizer: Callable | None = None, placement="balance",
                 replicas: int = 1, device="cpu", mode: str = "dgl", timeout: float = 300.0,
                 buffer_capacity: int = 4, policy: str = "priority_lifo", max_reuse: int | None = None,
                 fingerprint: dict | None = None, max_in_flight: int = 2, balance_batch: int = 32, sync_bn: bool = False,
                 ddp_options: dict | None = None, **trainer_kwargs):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedDGL needs torch.distributed initialised (dist.init_process_group)")
        if model.input_shape is None:
            raise ValueError("DistributedDGL needs the model's input_shape (build it with input_shape=...)")
        if trainer_kwargs.get("amp") or trainer_kwargs.get("engine") or trainer_kwargs.get("mode"):
            raise ValueError("DistributedDGL runs each rank's stages with the sequential engine in its parameters' "
                             "dtype: amp, engine and mode cannot be set")
        if mode not in ("dgl", "async"):
            raise ValueError(f"DistributedDGL mode must be 'dgl' or 'async', got {mode!r}")
        if not (isinstance(timeout, (int, float)) and 1 <= timeout <= 1e7):
            raise ValueError(f"timeout must be a positive number of seconds from 1 to 1e7, got {timeout!r}")
        self.rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device(device)
        check_options(sync_bn, ddp_options, dev)
        if dev.type == "cuda":  # first: NCCL (and object collectives) use the current device
            torch.cuda.set_device(dev)
        # The runner's own collectives (agreement, placement, metrics, checkpoints) run on a gloo
        # group with this timeout, whatever the default group's: they fail with PeerError in time.
        self._ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=float(timeout)))
        self._marks = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=float(timeout)))  # roll calls
        if not isinstance(replicas, int) or replicas < 1 or world % replicas:
            raise ValueError(f"replicas must divide the world size {world}, got {replicas!r}")
        if mode == "async" and replicas > 1:
            raise ValueError("mode='async' runs one replica row (replicas=1): replicas average gradients step by step")
        self.mode, self.timeout = mode, float(timeout)
        self._need = min_share(model)  # samples each replica row needs of a batch
        groups = world // replicas
        placement, self.balance = choose_placement(model, placement, groups, optimizer, device, balance_batch, self._ctl)
        self.layout = Layout(tuple(placement), replicas)
        self.placement = list(placement)
        self.replica, self.group = self.layout.coords(self.rank)
        self.stages = self.layout.stages(self.group)
        self.name = self.layout.describe(self.rank)
        fields = {"world size": world, "replicas": replicas, "placement": self.placement, "mode": mode,
                  "dtype": str(next(model.parameters()).dtype), "timeout": self.timeout,
                  "sync bn": sync_bn, "ddp options": sorted((ddp_options or {}).items()),
                  **model_fingerprint(model), **(fingerprint or {})}
        if mode == "async":
            fields.update({"buffer capacity": buffer_capacity, "policy": policy, "max reuse": max_reuse})
        agree(fields, group=self._ctl)
        shapes = model.check_shapes(model.input_shape)  # (per-sample output shape, logits) of every stage
        first = self.stages[0]
        in_shape = tuple(model.input_shape if first == 0 else shapes[first - 1][0])
        # the replica groups: the grid's device mesh (replicas x stage groups), made by every rank
        self.mesh, replica_group = replica_mesh(self.layout, dev) if replicas > 1 else (None, None)
        self._replicas_group = replica_group
        mods = [model.stages[j] for j in self.stages], [model.heads[j] for j in self.stages]
        if sync_bn and replica_group is not None:
            mods = sync_batchnorm(mods[0], replica_group), sync_batchnorm(mods[1], replica_group)
        local = DecoupledModel(*mods, input_shape=in_shape)
        trainer_kwargs.setdefault("channels_last", False)  # the links send contiguous (NCHW) activations
        self.trainer = Trainer(local, optimizer=optimizer, mode="dgl", device=device, engine="sequential",
                               **trainer_kwargs)
        self.device = self.trainer.device
        dtype = next(local.parameters()).dtype
        mine = dict(zip(self.stages, self.trainer.optimizers))  # compared among the ranks holding each stage
        agree({f"optimizer of stage {j + 1}": _optimizer_fields(mine[j]) if j in mine else None
               for j in range(len(placement))} | {"trainer options": sorted((k, repr(v)) for k, v in trainer_kwargs.items())},
              "optimizer", group=self._ctl)
        pg, me = make_link_groups(self.layout, timeout), self.rank  # each direction of a rank: its own group
        needs = [bool(getattr(h, "needs_image", False)) for h in model.heads]  # the image: to ranks that need it
        image = (tuple(model.input_shape), dtype)
        self.inbound = None if self.feeds else Link(self.layout, me, me - 1, self.device, timeout,
                                                    expect=(in_shape, dtype), group=pg[me - 1, me],
                                                    image=image if any(needs[first:]) else None)
        self.outbound = None if self.group == groups - 1 else Link(
            self.layout, me, me + 1, self.device, timeout, max_in_flight=max_in_flight, group=pg[me, me + 1],
            image=image if any(needs[self.stages[-1] + 1:]) else None)
        #: the DDP communication hooks' state (None with one replica row): ``calls`` counts the all-reduces
        self.replication = None if replica_group is None else replicate(self.trainer.steps, replica_group,
                                                                         self.device, ddp_options)
        self.buffer_options = dict(capacity=buffer_capacity, policy=policy, max_reuse=max_reuse)
        self.buffer: ReplayBuffer | None = None
        self.history: list[dict] = []
        self.epoch = 0

    @property
    def feeds(self) -> bool:
        """This rank owns stage 1 of its replica row and reads the data."""
        return self.group == 0

    @property
    def is_last(self) -> bool:
        return self.group == self.layout.groups - 1

    # ------------------------------------------------------------------ training

    def shard(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
              **loader_kwargs):
        """A ``DataLoader`` of this replica row's shard of ``dataset`` for :meth:`fit` on a feeding
        rank: a ``DistributedSampler`` over the replica rows (its order each epoch from ``seed``
        and the epoch), ``batch_size`` the whole step's batch (divisible by the replicas), each row
        loading its ``batch_size / R`` (:mod:`.sharding`)."""
        return shard_loader(dataset, batch_size, self.replica, self.layout.replicas, shuffle, seed, drop_last,
                            **loader_kwargs)

    def _train_local(self, h, y, total, acc, image=None):
        if self.replication is not None:
            self.replication.weight = y.shape[0] / total
        for i, step in enumerate(self.trainer.steps):
            try:
                h, loss, correct = step.step(h, y, image) if step.needs_image else step.step(h, y)
            except dist.DistError as exc:  # DDP's all-reduce of the replicas' gradients, in the backward
                raise PeerError(f"{self.name}: averaging gradients with the replicas failed: "
                                f"{describe_failure(exc)}") from None
            acc[0][i] += loss.double() * y.shape[0]
            acc[1][i] += correct
            acc[2][i] += y.shape[0]
        return h

    def _inputs(self, loader, progress: bool = False):
        """This epoch's ``(h, y, total, image)`` inputs: from ``loader`` on feeding ranks (the
        image: the input itself), else received (``progress``: a bar on rank 0)."""
        if self.feeds:
            if progress and self.rank == 0:
                from tqdm.auto import tqdm  # noqa: PLC0415

                loader = tqdm(loader, desc=f"epoch {self.epoch + 1} ({self.layout.world} ranks)", leave=False,
                              dynamic_ncols=True)
            for x, y in loader:  # this row's batches (its shard)
                sizes = row_sizes(len(y), self._replicas_group, self.device, self.name)
                if min(sizes) < self._need:  # every row sees every row's size: all skip it alike
                    continue  # (a last batch that would leave a row fewer samples than BatchNorm needs)
                x, y = self.trainer.prepare_batch(x, y)
                yield x, y, sum(sizes), x  # the image: the row's own input batch
            return
        while (msg := self.inbound.recv()) is not None:
            yield msg

    def _async_inputs(self, acc_reuse):
        """Async mode on a receiving rank: samples of the replay buffer, refilled from the thread
        that receives; waits only when nothing is there to sample (start, or ``max_reuse`` used up)."""
        receiver = Receiver(self.inbound, self.buffer_options["capacity"])
        ended = False
        while True:
            block = self.buffer is None or acc_reuse[0]
            got, done = receiver.take(block=block and not ended)
            ended |= done
            for h, y, image in got:
                if self.buffer is None:
                    o = self.buffer_options
                    self.buffer = ReplayBuffer(o["capacity"], h.shape, h.dtype, self.device, policy=o["policy"],
                                               max_reuse=o["max_reuse"], image_shape=None if image is None else
                                               image.shape, image_dtype=None if image is None else image.dtype)
                if tuple(h.shape) == self.buffer.batch_shape:  # a partial last batch does not fit the ring
                    self.buffer.push(h, y, image)
                    acc_reuse[0] = False
            if ended:
                break
            sample = self.buffer.sample()
            if not bool(sample.valid):
                acc_reuse[0] = True
                continue
            h, y = sample
            yield h, y, y.shape[0], sample.image
        receiver.join()
        self.dropped = receiver.dropped

    def train_epoch(self, loader: Iterable | None = None, progress: bool = False) -> dict:
        """One epoch: feeding ranks run ``loader``'s batches, the others what they receive.
        Returns the epoch's record with every stage's loss and accuracy (gathered from all ranks).
        A NaN or infinite loss of any stage raises :class:`~dgl_fast.fitting.TrainingDiverged` on
        every rank at the epoch's end, before the record is kept or a checkpoint written."""
        if self.feeds and loader is None:
            raise ValueError(f"{self.name} feeds stage 1 and must pass the training loader")
        tr = self.trainer
        tr.set_train_modes()
        n = len(self.stages)
        acc = (torch.zeros(n, dtype=torch.float64, device=self.device),
               torch.zeros(n, dtype=torch.long, device=self.device), [0] * n)
        set_epoch(loader, self.epoch)
        start = time.perf_counter()
        inputs = self._inputs(loader, progress) if self.feeds or self.mode == "dgl" else self._async_inputs([False])
        for h, y, total, image in inputs:
            out = self._train_local(h, y, total, acc, image)
            if self.outbound is not None:
                self.outbound.send(out, y, total, image=image)
        if self.outbound is not None:
            self.outbound.send(None, kind=END)
            self.outbound.drain()
        stats = self._gather({j: (s, c, k) for j, s, c, k in zip(self.stages, acc[0].tolist(), acc[1].tolist(),
                                                                acc[2])}, "the epoch's metrics")
        K = len(self.placement)
        tot = {j: [sum(p[j][i] for p in stats if j in p) for i in range(3)] for j in range(K)}
        record = {"epoch": self.epoch + 1, "mode": self.mode,
                  "train_loss": [tot[j][0] / tot[j][2] if tot[j][2] else None for j in range(K)],
                  "train_acc": [tot[j][1] / tot[j][2] if tot[j][2] else None for j in range(K)],
                  "stage_samples": [tot[j][2] for j in range(K)], "time_s": time.perf_counter() - start}
        bad = [j for j, loss in enumerate(record["train_loss"]) if loss is not None and not math.isfinite(loss)]
        if bad:
            raise TrainingDiverged(f"training diverged in epoch {self.epoch + 1}: the loss of stage {bad[0] + 1} is "
                                   f"{record['train_loss'][bad[0]]} (stages {', '.join(str(j + 1) for j in bad)}); "
                                   "no checkpoint of this epoch was written", stage=bad[0] + 1)
        self.epoch += 1
        self.history.append(record)
        return record

    def _gather(self, obj, what: str) -> list:
        roll_call(self.layout, self.rank, self._marks, self._ctl, self.timeout, f"{self.name}: gathering {what}")
        parts = [None] * self.layout.world
        try:
            dist.all_gather_object(parts, obj, group=self._ctl)
        except RuntimeError as exc:
            raise PeerError(f"{self.name}: gathering {what} failed: {describe_failure(exc)}") from None
        return parts

    def fit(self, loader: Iterable | None, epochs: int, lr_schedule: Callable[[int], float] | None = None,
            callback: Callable[[dict], None] | None = None, checkpoint_dir: str | None = None,
            progress: bool = False) -> list[dict]:
        """Train for ``epochs`` epochs from :attr:`epoch` (``loader`` on feeding ranks only: this
        replica row's batches, e.g. :meth:`shard`'s or a TensorLoader's ``share_of``), after
        every rank agreed on ``epochs``, the learning-rate factors and the batches per epoch. A
        loader batch size that leaves a replica row fewer samples than it needs (2 with BatchNorm)
        is refused before the first step, a last batch that would is skipped by every row; a
        resumed run whose factors differ from the saved plan is refused (see Trainer.fit).
        With ``checkpoint_dir``, :meth:`save` runs after every epoch; ``progress`` shows a bar
        on rank 0."""
        factors = [float(lr_schedule(e)) if lr_schedule else 1.0 for e in range(epochs)]
        if self.feeds and self.layout.replicas > 1 and not hasattr(loader, "__len__"):
            raise ValueError(f"{self.name}: with replicas every replica row must run as many batches: pass a loader "
                             "with a length (len(loader)), as many batches on every row")
        batches = len(loader) if self.feeds and hasattr(loader, "__len__") else None
        agree({"epochs": epochs, "learning-rate factors": factors, "batches per epoch": batches}, "fit argument",
              group=self._ctl)
        size = getattr(loader, "batch_size", None) if self.feeds else None
        rows, problem = loader_rows(loader, self.replica, self.layout.replicas, self.name) if self.feeds else (1, None)
        if problem is None and (problem := check_batch_size(size, rows, self._need)):
            problem += "; pass a larger batch size or fewer replicas"
        problems = [p for p in self._gather(problem, "the batch sizes") if p]
        if problems:  # every rank refuses before the first step
            raise ValueError(problems[0])
        check_lr_plan(self.trainer.lr_factors, factors, self.epoch)
        self.trainer.lr_factors = factors
        records = []
        while self.epoch < epochs:
            self.trainer.set_lr_factor(factors[self.epoch])
            records.append(self.train_epoch(loader, progress))
            if checkpoint_dir is not None:
                self.save(checkpoint_dir)
            if callback is not None:
                callback(records[-1])
        return records

    # ------------------------------------------------------------------ evaluation and state

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None) -> list[float]:
        """Accuracy of every stage's head on ``loader`` (given on every feeding rank; each replica
        row evaluates its loader's batches: its shard), the pipeline run forward in eval mode; every rank
        returns the list (rank 0 prints it)."""
        self.trainer.model.eval()
        n = len(self.stages)
        hits, seen = [0] * n, 0
        if self.feeds:
            if loader is None:
                raise ValueError(f"{self.name} feeds stage 1 and must pass the evaluation loader")
            inputs = ((*s, 0, s[0]) for s in (self.trainer.prepare_batch(x, y, training=False)
                                               for x, y in loader if len(y)))
        else:
            inputs = iter(self.inbound.recv, None)
        for h, y, _, image in inputs:  # (a row's empty share of a batch smaller than the replicas is not sent)
            for i, (stage, head) in enumerate(zip(self.trainer.model.stages, self.trainer.model.heads)):
                h = stage(h)
                hits[i] += int((head(h).argmax(1) == y).sum())
            seen += y.shape[0]
            if self.outbound is not None:
                self.outbound.send(h, y, y.shape[0], image=image)
        if self.outbound is not None:
            self.outbound.send(None, kind=END)
            self.outbound.drain()
        self.trainer.model.train()
        self.trainer.set_train_modes()
        parts = self._gather({j: (c, seen) for j, c in zip(self.stages, hits)}, "the evaluation counts")
        counts = [[0, 0] for _ in self.placement]
        for part in parts:
            for j, (c, k) in part.items():
                counts[j][0] += c
                counts[j][1] += k
        return [c / k if k else float("nan") for c, k in counts]

    def full_state_dict(self) -> dict:
        """The whole model's ``state_dict`` (replica row 1's stages), on every rank, on the CPU."""
        mine = {}
        if self.replica == 0:
            for key, value in self.trainer.model.state_dict().items():
                kind, i, rest = key.split(".", 2)  # "stages.<i>.<...>" / "heads.<i>.<...>"
                mine[f"{kind}.{self.stages[int(i)]}.{rest}"] = value.detach().cpu()
        return {k: v for part in self._gather(mine, "the model") for k, v in part.items()}

    def save(self, directory: str) -> None:
        """Checkpoint this epoch into ``directory``. Sync mode: one set through
        ``torch.distributed.checkpoint`` that any grid of the model loads (:mod:`.resharding`).
        Async mode: every rank writes its stages' trainer state (checksummed, atomic); rank 0
        then writes ``manifest.json`` naming each file's SHA-256 (:mod:`.files`; same grid only)."""
        self.trainer.epoch, self.trainer.history = self.epoch, self.history
        if self.mode == "dgl":  # one set any grid can load (:mod:`.resharding`)
            return resharding.save_set(self, directory, self._gather, self._ctl)
        digest, error = None, None
        try:
            digest = files.save_rank(self.trainer, directory, self.rank, self.epoch)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not wait for a stall
            error = f"{self.name}: {type(exc).__name__}: {exc}"
        results = self._gather((digest, error), "the checkpoint digests")
        resharding.raise_first([e for _, e in results if e], f"saving the checkpoint set in {directory}")
        if self.rank == 0:
            try:
                files.write_manifest(directory, self.layout, self.epoch, [d for d, _ in results], self.mode)
            except Exception as exc:  # noqa: BLE001
                error = f"{self.name}: writing the manifest: {type(exc).__name__}: {exc}"
        resharding.raise_first([e for e in self._gather(error, "the manifest") if e], f"saving in {directory}")
        files.remove_others(directory, self.rank, self.epoch)

    def load(self, directory: str) -> None:
        """Resume from :meth:`save`'s set (a sync set: saved on any grid; an async one: this grid):
        every rank checks the manifest and the digests; if any rank finds a problem all raise,
        naming it, before any state changes."""
        problem, state = None, None
        if resharding.is_dcp(directory):
            state = resharding.load_set(self, directory, self._gather, self._ctl)
        try:
            state = state or files.load_rank(directory, self.layout, self.rank, self.mode)
            self.trainer.check_state(state)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not wait for a stall
            problem = f"{self.name}: {exc}"
        resharding.raise_first([p for p in self._gather(problem, "the checkpoint checks") if p],
                          f"resuming from {directory}")
        self.trainer.load_state_dict(state)
        self.epoch, self.history = self.trainer.epoch, list(self.trainer.history)
