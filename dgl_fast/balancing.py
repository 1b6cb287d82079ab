"""Which stages go on which device: time each stage step, then cut the K stages into contiguous
groups whose slowest group is as fast as possible.

:func:`partition` is the pure part (stage times -> placement, exact); :func:`balance` measures the
times of a model's stage steps (forward, head loss, backward, optimizer step) on a copy of the
model and partitions them. :class:`dgl_fast.Trainer` (``devices=[...]`` without ``placement=``)
and the distributed runner call both.

A pipeline of groups runs at the pace of its slowest group: ``predicted_throughput`` is the batch
size over the slowest group's time (hand-off copies not included; their sizes are reported).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch

from .model import DecoupledModel
from .stage import StageStep, default_optimizer
from .utils import resolve_device

__all__ = ["Balance", "balance", "partition", "group_times"]


@dataclass(frozen=True)
class Balance:
    """What :func:`balance` measured and chose.

    Attributes:
        placement: group (device) index of each stage, non-decreasing from 0 to ``parts - 1``.
        stage_times_s: median seconds of each stage's training step on the sample batch.
        group_times_s: the summed stage times of each group.
        handoff_bytes: bytes of each stage's output for one batch (what crosses to the next stage).
        batch_size: samples in the sample batch.
        predicted_throughput: samples per second, ``batch_size / max(group_times_s)``.
    """

    placement: list[int]
    stage_times_s: list[float]
    group_times_s: list[float]
    handoff_bytes: list[int]
    batch_size: int
    predicted_throughput: float

    def __str__(self) -> str:
        ms = lambda ts: "/".join(f"{1e3 * t:.3g}" for t in ts)
        return (f"balance: {len(self.stage_times_s)} stages in {len(self.group_times_s)} groups, placement "
                f"{self.placement}; stage ms {ms(self.stage_times_s)}; group ms {ms(self.group_times_s)}; hand-off KiB "
                f"{'/'.join(f'{b / 1024:.4g}' for b in self.handoff_bytes)}; predicted {self.predicted_throughput:.4g} "
                f"samples/s at batch {self.batch_size}")


def _check_parts(parts, K: int) -> int:
    if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= K:
        raise ValueError(f"parts must be an int from 1 to the number of stages ({K}), got {parts!r}")
    return parts


def group_times(times, placement) -> list[float]:
    """Summed ``times`` of each group of ``placement``."""
    out = [0.0] * (max(placement) + 1)
    for t, g in zip(times, placement):
        out[g] += float(t)
    return out


def partition(times, parts: int) -> list[int]:
    """Group index of each stage for the contiguous split of ``times`` (seconds per stage) into
    ``parts`` non-empty groups whose largest group sum is smallest (exact, dynamic programming).
    Among optimal splits: the most even (smallest sum of squared group sums), then the earliest
    (the lexicographically smallest placement: earlier groups take the extra stages)."""
    times = [float(t) for t in times]
    K = len(times)
    if K == 0:
        raise ValueError("partition needs at least one stage time, got none")
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise ValueError(f"stage times must be finite and >= 0, got {times}")
    parts = _check_parts(parts, K)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    cost = lambda a, b: prefix[b] - prefix[a]  # stages a..b-1
    inf = math.inf
    # best[p][i]: the smallest possible largest group of stages i..K-1 in p groups
    best = [[inf] * (K + 1) for _ in range(parts + 1)]
    best[0][K] = 0.0
    for p in range(1, parts + 1):
        for i in range(K - p, -1, -1):
            best[p][i] = min(max(cost(i, e), best[p - 1][e]) for e in range(i + 1, K - p + 2))
    bound = best[parts][0]
    # even[p][i]: the smallest sum of squares of stages i..K-1 in p groups, none above the bound
    even = [[inf] * (K + 1) for _ in range(parts + 1)]
    even[0][K] = 0.0
    for p in range(1, parts + 1):
        for i in range(K - p, -1, -1):
            even[p][i] = min((cost(i, e) ** 2 + even[p - 1][e] for e in range(i + 1, K - p + 2)
                              if cost(i, e) <= bound), default=inf)
    placement, i = [], 0
    for g in range(parts):
        p = parts - g
        ends = [e for e in range(i + 1, K - p + 2) if cost(i, e) <= bound and cost(i, e) ** 2 + even[p - 1][e] == even[p][i]]
        e = max(ends)  # the longest first group among the tied ones: the earliest placement
        placement += [g] * (e - i)
        i = e
    return placement


def _sample(model: DecoupledModel, sample_batch, device: torch.device):
    x, y = sample_batch if isinstance(sample_batch, (tuple, list)) and len(sample_batch) == 2 else (sample_batch, None)
    if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
        got = (f"({type(x).__name__}, {type(y).__name__})" if isinstance(sample_batch, (tuple, list)) and y is not None
               else type(sample_batch).__name__)
        raise TypeError(f"sample_batch must be a tensor x or a pair (x, y) of torch tensors, got {got}"
                        " (convert numpy arrays with torch.from_numpy)")
    for name, t in (("x", x), ("y", y)):
        if t is not None and t.device.type == "meta":
            raise ValueError(f"sample_batch's {name} is a meta tensor (no data): balance times real steps and needs "
                             "a batch with data on the device to time")
    shape = model.input_shape
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"sample batch of shape {list(x.shape)} does not match the model's input_shape: expected "
                         f"[B, {', '.join(map(str, shape))}]")
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"the sample batch needs at least 2 samples (BatchNorm trains on it), got shape {list(x.shape)}")
    if y is None:
        classes = min(c for _, c in model.check_shapes(tuple(x.shape[1:])))
        y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels of shape [{x.shape[0]}], got {list(y.shape)}")
    dtype = next(model.parameters()).dtype
    return x.to(device, dtype=dtype), y.to(device, dtype=torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def balance(model: DecoupledModel, sample_batch, parts: int, *, optimizer=None, device=None, repeats: int = 5,
            warmup: int = 2, clock=time.perf_counter) -> Balance:
    """Time each stage step of ``model`` on ``sample_batch`` and split the stages into ``parts``
    contiguous groups with the smallest slowest group (:func:`partition`).

    Args:
        model: the :class:`~dgl_fast.DecoupledModel`; it is not changed (a deep copy trains, and
            the global RNG states are restored).
        sample_batch: ``(x, y)``, or ``x`` alone (labels drawn at random); ``x`` of shape
            ``[B, *model.input_shape]``.
        parts: number of groups, 1..K.
        optimizer: factory ``params -> Optimizer`` as for :class:`~dgl_fast.Trainer` (default: the
            trainer's SGD).
        device: where to time (default: the model's device).
        repeats: timed passes; each stage's time is the median. ``warmup`` untimed passes first.
        clock: the time source, a callable returning seconds (default ``time.perf_counter``),
            read before and after each stage step (after a device sync on CUDA); tests pass a
            fake clock to check the logic without depending on the machine's speed.
    """
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {type(clock).__name__}")
    if not isinstance(model, DecoupledModel):
        raise TypeError(f"balance expects a dgl_fast.DecoupledModel, got {type(model).__name__}")
    meta = next((n for n, t in model.state_dict().items() if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"balance times real stage steps, but the model's {meta!r} is a meta tensor (no data): "
                         "build or load the model on a real device first")
    K = model.num_stages
    _check_parts(parts, K)
    for name, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    x, y = _sample(model, sample_batch, device)
    factory = optimizer or default_optimizer
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        net = copy.deepcopy(model).to(device).train()
        steps = [StageStep(j, net.stages[j], net.heads[j], factory(net.stage_parameters(j)), device) for j in range(K)]
        samples: list[list[float]] = [[] for _ in range(K)]
        handoff = [0] * K
        for r in range(warmup + repeats):
            h = x
            for j, step in enumerate(steps):
                _sync(device)
                start = clock()
                h, _, _ = step.step(h, y, x if step.needs_image else None)
                _sync(device)
                if r >= warmup:
                    samples[j].append(float(clock()) - start)
                handoff[j] = h.numel() * h.element_size()
    times = [statistics.median(s) for s in samples]
    placement = partition(times, parts)
    groups = group_times(times, placement)
    slowest = max(groups)
    return Balance(placement, times, groups, handoff, int(x.shape[0]),
                   x.shape[0] / slowest if slowest > 0 else math.inf)
