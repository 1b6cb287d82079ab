"""Replicas of a stage group: each stage and its head in ``DistributedDataParallel``.

The grid's process groups come from ``torch.distributed.device_mesh.init_device_mesh`` with the
dimensions ``("replica", "stage_group")``: the mesh's rank ``r * G + g`` is the layout's rank of
replica row r and stage group g (:class:`~.protocol.Layout`), so the mesh's ``"replica"`` group of
a rank holds the replicas of its stage group. Each of the rank's stage steps then runs its stage
and head as one module (:class:`StageWithHead`: one forward and one backward a step, as DDP
expects) wrapped in ``DistributedDataParallel`` over that group: DDP's reducer all-reduces
gradient *buckets* while the backward still runs, and the backward returns with the gradients
averaged, before the optimizer's step (and the step guard, :mod:`dgl_fast.finite`, which reads
them there, so every replica decides alike).

Each replica row feeds its share of every batch; replica r's stage loss is the mean over its
``b_r`` samples, so the gradient of the whole batch (``b_1 + ... + b_R`` samples) is
``sum_r (b_r / B) * grad_r``. The communication hook :func:`weighted_allreduce` scales each bucket
by ``b_r / B`` and sums it over the replicas (DDP's own hook would divide by R, which is only the
whole batch's gradient when every share is equal). So the step equals the single-process step on
the concatenated batch (exactly in real arithmetic; in floating point to rounding) for models
without BatchNorm. ``BatchNorm`` normalises each replica's share with its own statistics (and
keeps its own running statistics: ``forward_sync_buffers=False``), as DDP does; with ``sync_bn`` on
CUDA the runner converts it to ``SyncBatchNorm`` over the replica group (PyTorch has no CPU
``SyncBatchNorm``: refused there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ..stage import head_loss
from .protocol import Layout

__all__ = ["StageWithHead", "ReplicaState", "weighted_allreduce", "replica_mesh", "check_options", "sync_batchnorm",
           "replicate", "DDP_OPTIONS"]

#: the DistributedDataParallel options a caller may set (``ddp_options``); the runner sets the others
DDP_OPTIONS = ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph")


class StageWithHead(nn.Module):
    """A stage and its head as one module: ``(h_in, y, image) -> (h, loss, correct)``, the step's
    forward and local loss (the head's loss as :func:`dgl_fast.stage.head_loss` computes it)."""

    def __init__(self, stage: nn.Module, head: nn.Module):
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, h_in: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None = None):
        h = self.stage(h_in)
        loss, correct = head_loss(self.head, h, y, image)
        return h, loss, correct


class ReplicaState:
    """The communication hook's state: the replica ``group``, this row's ``weight`` ``b_r / B``
    (set before each step) and ``calls``, the all-reduces started so far (one per bucket a step)."""

    def __init__(self, group):
        self.group, self.weight, self.calls = group, 1.0, 0


def weighted_allreduce(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP communication hook: the bucket (a ``dist.GradBucket``) scaled by ``state.weight`` (a
    :class:`ReplicaState`) and summed over the replicas; returns the future of the bucket."""
    t = bucket.buffer()
    if state.weight != 1.0:
        t.mul_(state.weight)
    state.calls += 1
    return dist.all_reduce(t, group=state.group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def replica_mesh(layout: Layout, device: torch.device):
    """The grid's device mesh (``replica`` x ``stage_group``; every rank must call this, after the
    default process group is up) and this rank's replica group."""
    mesh = init_device_mesh(device.type, (layout.replicas, layout.groups), mesh_dim_names=("replica", "stage_group"))
    return mesh, mesh.get_group("replica")


def check_options(sync_bn: bool, ddp_options: dict | None, device: torch.device) -> None:
    """Refuse ``sync_bn`` on a device PyTorch's SyncBatchNorm cannot train on, and DDP options the
    runner does not let a caller set (one line each)."""
    if not isinstance(sync_bn, bool):
        raise ValueError(f"sync_bn must be True or False, got {sync_bn!r}")
    if sync_bn and device.type != "cuda":
        raise ValueError(f"sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no {device.type} implementation), "
                         f"got device {device}")
    unknown = sorted(set(ddp_options or {}) - set(DDP_OPTIONS)) if isinstance(ddp_options, (dict, type(None))) else [
        ddp_options]
    if unknown:
        raise ValueError(f"ddp_options may set {', '.join(DDP_OPTIONS)}, got {', '.join(map(repr, unknown))}")


def sync_batchnorm(modules: list[nn.Module], group) -> list[nn.Module]:
    """``modules`` with every ``nn.BatchNorm*d`` converted to ``SyncBatchNorm`` over ``group`` (the
    same parameter and buffer tensors; fused BatchNorm ops of dgl_fast are left as they are)."""
    return [nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group=group) for m in modules]


def replicate(steps, group, device: torch.device, options: dict | None = None) -> ReplicaState:
    """Wrap each of ``steps`` (:class:`~dgl_fast.stage.StageStep`) in DDP over ``group``: its
    ``forward_module`` becomes the DDP of its stage and head, with :func:`weighted_allreduce`.
    ``options``: more of DDP's arguments (:data:`DDP_OPTIONS`, checked by :func:`check_options`).
    Returns the hooks' shared state."""
    options = {"gradient_as_bucket_view": True, **(options or {})}  # the gradients are views of the buckets: no copies
    state = ReplicaState(group)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    for step in steps:
        ddp = DistributedDataParallel(StageWithHead(step.stage, step.head), device_ids=ids, process_group=group,
                                      forward_sync_buffers=False, **options)
        ddp.register_comm_hook(state, weighted_allreduce)
        step.forward_module = ddp
    return state
