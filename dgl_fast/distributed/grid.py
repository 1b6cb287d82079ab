"""The grid a distributed run trains on: which stage group holds each stage (even, given, or
balanced on rank 0 and broadcast), and the checks of a batch size against the replicas.

A replica row trains its share of every batch (``tensor_split``: shares differ by at most one
sample); BatchNorm needs at least two samples a share, so a batch size below ``2 x replicas``
is refused before the first step, and a last batch too small to give every row two samples is
skipped by every row alike (as a loader's ``drop_last`` would).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import DecoupledModel
from ..utils import has_batchnorm
from .protocol import PeerError, describe_failure

__all__ = ["even_placement", "choose_placement", "min_share", "check_batch_size"]


def even_placement(num_stages: int, groups: int) -> list[int]:
    """Stage group of each stage: contiguous groups, as even as possible (earlier groups get the extra)."""
    if groups < 1 or num_stages < groups:
        raise ValueError(f"cannot place {num_stages} stages on {groups} stage groups: every group needs a stage")
    base, extra = divmod(num_stages, groups)
    placement = []
    for g in range(groups):
        placement += [g] * (base + (1 if g < extra else 0))
    return placement


def _sample_batch(model: DecoupledModel, batch: int):
    shapes = model.check_shapes(model.input_shape)
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    x = torch.randn((batch, *model.input_shape), generator=g).to(dtype)
    return x, torch.randint(0, shapes[-1][1], (batch,), generator=g)


def choose_placement(model: DecoupledModel, placement, groups: int, optimizer, device, balance_batch: int, group):
    """``(placement, balance)``: ``placement`` as given (checked), ``"even"``, or ``"balance"``
    (timed on rank 0, broadcast over ``group``; ``balance`` is its report, else None)."""
    K = model.num_stages
    if placement == "even":
        return even_placement(K, groups), None
    if placement == "balance":
        if groups == 1:
            return [0] * K, None
        if K < groups:
            raise ValueError(f"cannot place {K} stages on {groups} stage groups: every group needs a stage")
        from ..balancing import balance  # noqa: PLC0415

        result = [None]
        if dist.get_rank() == 0:
            result[0] = balance(model, _sample_batch(model, balance_batch), groups, optimizer=optimizer, device=device)
        try:
            dist.broadcast_object_list(result, src=0, group=group)
        except RuntimeError as exc:
            raise PeerError(f"rank {dist.get_rank()}: receiving the balanced placement from rank 0 failed: "
                            f"{describe_failure(exc)}") from None
        return list(result[0].placement), result[0]
    placement = [int(g) for g in placement]
    if len(placement) != K or placement[0] != 0 or placement[-1] != groups - 1 or any(
            b - a not in (0, 1) for a, b in zip(placement, placement[1:])):
        raise ValueError(f"placement must give each of the {K} stages a stage group, non-decreasing from 0 to "
                         f"{groups - 1} without gaps, got {placement}")
    return placement, None


def min_share(model: nn.Module) -> int:
    """Samples a replica row needs to train: 2 with BatchNorm layers (batch statistics), else 1."""
    return 2 if has_batchnorm(model) else 1


def check_batch_size(batch_size: int | None, replicas: int, need: int) -> str | None:
    """Why ``batch_size`` cannot train on ``replicas`` rows needing ``need`` samples each (None: it can)."""
    if batch_size is None or batch_size // replicas >= need:
        return None
    return (f"a batch size of {batch_size} split over {replicas} replica rows leaves a row {batch_size // replicas} "
            f"sample{'s' if batch_size // replicas != 1 else ''}; each row needs at least {need}"
            f"{' (BatchNorm)' if need == 2 else ''}: expected a batch size >= {need * replicas}")
