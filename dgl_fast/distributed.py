"""Synchronous DGL with stages placed on several processes (GPUs, machines) via ``torch.distributed``.

No gradient crosses a stage boundary, so a stage placed on another process only ever needs the
*activations* of its predecessor, never anything back: rank r trains its stages on batch t and
sends the output (and the labels) to rank r + 1, then goes on with batch t + 1 while rank r + 1
trains on batch t. The result is the sequential trainer's parameters (each stage sees the same
inputs in the same order), with the pipeline spread over processes.

Launch one process per rank, e.g. ``torchrun --nproc-per-node 4 train.py`` with::

    import torch.distributed as dist
    dist.init_process_group("nccl")           # "gloo" on CPUs
    net = dgl_fast.models.build("vgg13", block_size=3)          # same seed on every rank
    ddgl = dgl_fast.distributed.DistributedDGL(net, optimizer=..., device=f"cuda:{local_rank}")
    ddgl.fit(loader if ddgl.is_first else None, epochs=50, lr_schedule=...)
    full_state = ddgl.full_state_dict()       # every rank gets every stage's weights

Only the first rank reads data; the others receive (header, activations, labels) messages: the
header carries the batch size, so a partial last batch travels like any other, and a batch size
of 0 ends the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .model import DecoupledModel
from .trainer import Trainer

__all__ = ["DistributedDGL", "even_placement"]


def even_placement(num_stages: int, world_size: int) -> list[int]:
    """Rank of each stage: contiguous groups, as even as possible (earlier ranks get the extra)."""
    if world_size < 1 or num_stages < world_size:
        raise ValueError(f"cannot place {num_stages} stages on {world_size} ranks: every rank needs a stage")
    base, extra = divmod(num_stages, world_size)
    placement = []
    for r in range(world_size):
        placement += [r] * (base + (1 if r < extra else 0))
    return placement


class DistributedDGL:
    """One rank's share of a pipelined, multi-process synchronous DGL run.

    Args:
        model: the whole :class:`~dgl_fast.DecoupledModel`, identical on every rank (same seed);
            it needs ``input_shape`` (models from :func:`dgl_fast.models.build` have it). Each rank
            keeps and trains only its own stages and heads.
        optimizer: factory ``params -> Optimizer``, as for :class:`~dgl_fast.Trainer`.
        placement: rank of each stage (non-decreasing, every rank at least one stage); default
            :func:`even_placement`.
        device: this rank's device (``"cuda:N"`` with NCCL, ``"cpu"`` with gloo).
        group: process group (default: the world).
        max_in_flight: sends a rank may have outstanding before it waits for the oldest.
    """

    def __init__(self, model: DecoupledModel, optimizer: Callable | None = None, placement: list[int] | None = None,
                 device="cpu", group=None, max_in_flight: int = 2, **trainer_kwargs):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedDGL needs torch.distributed initialised (dist.init_process_group)")
        if model.input_shape is None:
            raise ValueError("DistributedDGL needs the model's input_shape (build it with input_shape=...)")
        if trainer_kwargs.get("amp") or trainer_kwargs.get("engine") or trainer_kwargs.get("mode"):
            raise ValueError("DistributedDGL runs each rank's stages with the sequential engine in its parameters' "
                             "dtype: amp, engine and mode cannot be set")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        K = model.num_stages
        placement = even_placement(K, self.world) if placement is None else [int(r) for r in placement]
        if len(placement) != K or placement[0] != 0 or placement[-1] != self.world - 1 or any(
                b - a not in (0, 1) for a, b in zip(placement, placement[1:])):
            raise ValueError(f"placement must give each of the {K} stages a rank, non-decreasing from 0 to "
                             f"{self.world - 1} without gaps, got {placement}")
        self.placement = placement
        self.stages = [j for j in range(K) if placement[j] == self.rank]
        shapes = model.check_shapes(model.input_shape)  # (per-sample output shape, logits) of every stage
        first = self.stages[0]
        in_shape = model.input_shape if first == 0 else shapes[first - 1][0]
        self.out_shape = shapes[self.stages[-1]][0]
        local = DecoupledModel([model.stages[j] for j in self.stages], [model.heads[j] for j in self.stages],
                               input_shape=in_shape)
        self.trainer = Trainer(local, optimizer=optimizer, mode="dgl", device=device, engine="sequential",
                               **trainer_kwargs)
        self.device = self.trainer.device
        if self.device.type == "cuda":  # NCCL collectives (all_gather_object too) use the current device
            torch.cuda.set_device(self.device)
        self.max_in_flight = max(1, int(max_in_flight))
        self._sends: list = []
        self._dtype = next(local.parameters()).dtype
        self.history: list[dict] = []
        self.epoch = 0

    @property
    def is_first(self) -> bool:
        """This rank owns stage 1 and reads the data."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    # ------------------------------------------------------------------ messages

    def _send(self, h: torch.Tensor | None, y: torch.Tensor | None) -> None:
        dst = self.rank + 1
        header = torch.tensor([0 if h is None else h.shape[0]], dtype=torch.long, device=self.device)
        msgs = [header] if h is None else [header, h.contiguous(), y]
        for t in msgs:
            self._sends.append((dist.isend(t, dst, group=self.group), t))
        while len(self._sends) > 3 * self.max_in_flight:
            work, _ = self._sends.pop(0)
            work.wait()

    def _recv(self):
        src = self.rank - 1
        header = torch.empty(1, dtype=torch.long, device=self.device)
        dist.recv(header, src, group=self.group)
        B = int(header.item())
        if B == 0:
            return None
        h = torch.empty((B, *self.trainer.input_shape), dtype=self._dtype, device=self.device)
        y = torch.empty(B, dtype=torch.long, device=self.device)
        dist.recv(h, src, group=self.group)
        dist.recv(y, src, group=self.group)
        return h, y

    def _flush_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ------------------------------------------------------------------ training

    def _train_local(self, h, y, sums, hits, seen):
        for i in range(len(self.stages)):
            h, loss, correct = self.trainer.steps[i].step(h, y)
            sums[i] += loss.double() * y.shape[0]
            hits[i] += correct
            seen[i] += y.shape[0]
        return h

    def train_epoch(self, loader: Iterable | None = None) -> dict:
        """One epoch: the first rank feeds ``loader``'s batches, the others receive theirs.

        Returns this epoch's record, with the per-stage loss and accuracy of *every* stage
        (gathered from all ranks)."""
        if self.is_first and loader is None:
            raise ValueError("the first rank must pass the training loader")
        tr = self.trainer
        tr.set_train_modes()
        n = len(self.stages)
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        hits = torch.zeros(n, dtype=torch.long, device=self.device)
        seen = [0] * n
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        batches = iter(loader) if self.is_first else None
        while True:
            if self.is_first:
                nxt = next(batches, None)
                item = None if nxt is None else tr.prepare_batch(*nxt)
            else:
                item = self._recv()
            if item is None:
                if not self.is_last:
                    self._send(None, None)
                break
            h = self._train_local(item[0], item[1], sums, hits, seen)
            if not self.is_last:
                self._send(h, item[1])
        self._flush_sends()
        local = {j: (s, c, k) for j, s, c, k in zip(self.stages, sums.tolist(), hits.tolist(), seen)}
        parts = [None] * self.world
        dist.all_gather_object(parts, local, group=self.group)
        stats = {j: v for part in parts for j, v in part.items()}
        K = len(self.placement)
        record = {
            "epoch": self.epoch + 1,
            "train_loss": [stats[j][0] / stats[j][2] if stats[j][2] else None for j in range(K)],
            "train_acc": [stats[j][1] / stats[j][2] if stats[j][2] else None for j in range(K)],
            "stage_samples": [stats[j][2] for j in range(K)],
        }
        self.epoch += 1
        self.history.append(record)
        return record

    def fit(self, loader: Iterable | None, epochs: int, lr_schedule: Callable[[int], float] | None = None,
            callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train for ``epochs`` epochs from ``self.epoch`` (``loader`` on the first rank only)."""
        records = []
        while self.epoch < epochs:
            self.trainer.set_lr_factor(float(lr_schedule(self.epoch)) if lr_schedule else 1.0)
            records.append(self.train_epoch(loader))
            if callback is not None:
                callback(records[-1])
        return records

    def full_state_dict(self) -> dict:
        """The whole model's ``state_dict`` (every rank's stages), on every rank, on the CPU."""
        local = self.trainer.model.state_dict()
        mine = {}
        for key, value in local.items():
            kind, i, rest = key.split(".", 2)  # "stages.<i>.<...>" / "heads.<i>.<...>"
            mine[f"{kind}.{self.stages[int(i)]}.{rest}"] = value.detach().cpu()
        parts = [None] * self.world
        dist.all_gather_object(parts, mine, group=self.group)
        return {k: v for part in parts for k, v in part.items()}

