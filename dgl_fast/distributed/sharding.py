"""Sharded loading: each replica row's feeding rank loads only its own share of the data.

A feeding rank's loader yields *its row's* batches. Three ways to build one:

- :func:`shard_loader` (``DistributedDGL.shard``): a ``DataLoader`` over a map-style dataset with a
  ``DistributedSampler`` over the replica rows (row r reads samples ``perm[r::R]`` of the epoch's
  permutation, which ``set_epoch`` and the seed fix; the tail that does not split evenly is
  dropped, so every row has as many samples and no sample is read twice); the batch size given
  is the whole step's, each row loading ``batch_size / R`` of it.
- A :class:`~dgl_fast.data.TensorLoader` with ``share=(row, rows)`` (``share_of``): row r's
  contiguous share of every batch of the unshared loader (the CLI's way: the grid then equals the
  single-process run on the unshared loader).
- The user's own loader or sampler: whatever it yields is the row's batch.

Every step the feeding ranks all-gather their batch sizes over their replica group (one small
collective; DDP's all-reduces use the same group, in the same order on every row): the sum is the
step's whole batch, by which each row weights its gradients, and a step that would leave some
row fewer samples than it needs (2 with BatchNorm) is skipped by every row alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .protocol import PeerError, describe_failure

__all__ = ["shard_loader", "loader_rows", "set_epoch", "row_sizes"]


def shard_loader(dataset, batch_size: int, replica: int, replicas: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` of replica row ``replica``'s shard of ``dataset`` (``DistributedSampler``,
    ``drop_last=True`` over the rows), ``batch_size // replicas`` samples a step; ``drop_last``:
    the DataLoader's (a last partial batch)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < replicas or batch_size % replicas:
        raise ValueError(f"batch_size is the whole step's batch and must split evenly over the {replicas} replica rows, "
                         f"got {batch_size!r}")
    if "sampler" in loader_kwargs or "batch_sampler" in loader_kwargs:
        raise ValueError("shard() makes the sampler: pass your own loader to fit instead of a sampler here")
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=replica, shuffle=shuffle, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size // replicas, sampler=sampler, drop_last=drop_last,
                      **loader_kwargs)


def loader_rows(loader, replica: int, replicas: int, name: str) -> tuple[int, str | None]:
    """Over how many rows ``loader``'s ``batch_size`` splits (its ``share``'s rows, else 1: a row's
    own batches) and why the loader cannot feed this row (a ``share`` that is not its; None: it can)."""
    share = getattr(loader, "share", None)
    if share is None:
        return 1, None
    if tuple(share) != (replica, replicas):
        return 1, (f"{name}: the loader of replica row {replica + 1} of {replicas} must load share "
                   f"{(replica, replicas)}, got share={tuple(share)}")
    return replicas, None


def set_epoch(loader, epoch: int) -> None:
    """Select ``epoch``'s order: the loader's ``set_epoch``, else its sampler's (a DistributedSampler)."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def row_sizes(size: int, group, device: torch.device, name: str) -> list[int]:
    """Every replica row's batch size of this step (``group``: the feeding ranks' replica group;
    None: this row alone)."""
    if group is None:
        return [size]
    mine = torch.tensor([size], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, mine, group=group)
    except RuntimeError as exc:
        raise PeerError(f"{name}: sharing the batch sizes with the replica rows failed: {describe_failure(exc)}") from None
    return torch.cat(parts).tolist()
