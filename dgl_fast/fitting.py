"""The epoch loop behind :meth:`dgl_fast.Trainer.fit`: learning-rate schedule, progress bar,
per-stage metrics read every few steps, the divergence guard and the per-epoch records."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from .config import check_factor

__all__ = ["TrainingDiverged", "fit", "check_lr_plan"]


class TrainingDiverged(RuntimeError):
    """A stage's training loss became NaN or infinite; :meth:`Trainer.fit` stopped there.

    Attributes: ``stage`` (1-based), ``steps`` (first, last): the steps between the last finite
    reading and the one that found it, ``last_checkpoint``: ``(path, step)`` of the last
    :meth:`Trainer.save`, written before the divergence (or None)."""

    def __init__(self, message: str, stage: int | None = None, steps: tuple[int, int] | None = None,
                 last_checkpoint: tuple[str, int] | None = None):
        super().__init__(message)
        self.stage, self.steps, self.last_checkpoint = stage, steps, last_checkpoint


class _EpochSums:
    """Per-stage loss sums, correct counts and samples of an epoch: summed here from each step's
    output, or (schedules that accumulate on the device) read from the schedule."""

    def __init__(self, trainer, K: int):
        self.tr, self.K = trainer, K
        self.accumulates = trainer.schedule.accumulates
        self.loss = torch.zeros(K, dtype=torch.float64, device=trainer.device)
        self.hits = torch.zeros(K, dtype=torch.long, device=trainer.device)
        self.samples = [0] * K
        self.skipped = torch.zeros(K, dtype=torch.long, device=trainer.device)
        self._weights: dict = {}  # per-stage sample counts as device tensors, by value

    def add(self, out) -> None:
        if self.accumulates:
            return
        weights = self._weights.get(out.samples)
        if weights is None:  # one host-to-device copy per distinct pattern, not per step
            weights = self._weights[out.samples] = torch.tensor(out.samples, dtype=torch.float64).to(self.loss.device)
        # idle stages report NaN with weight 0; a trained stage's NaN stays NaN (never nan_to_num)
        self.loss += torch.where(weights > 0, out.losses.double() * weights, 0.0)
        self.hits += out.correct
        self.skipped += out.skipped
        self.samples = [a + b for a, b in zip(self.samples, out.samples)]

    def read(self, reset: bool) -> tuple[list[float], list[int], list[int], list[int]]:
        """(loss sums, correct, samples, skipped steps) per stage so far: a host sync."""
        if self.accumulates:
            m = self.tr.read_metrics(reset=reset)
            return [a * k for a, k in zip(m[0], m[2])], m[1], m[2], m.skipped
        return self.loss.tolist(), self.hits.tolist(), self.samples, self.skipped.tolist()


def _check_finite(tr, loss_sums: list[float], samples: list[int], since: int, skipped: list[int]) -> None:
    for j, (total, n) in enumerate(zip(loss_sums, samples)):
        if n and not math.isfinite(total):
            kept = (f"; its {skipped[j]} step(s) with a non-finite loss or gradients were skipped (their updates never "
                    "reached the weights)" if skipped[j] else "; every parameter trained since may be non-finite")
            last = tr.last_checkpoint
            where = (f"; the last checkpoint, {last[0]} (step {last[1]}), was written before it and is left untouched"
                     if last is not None and last[1] <= since else "; no checkpoint was saved before it")
            raise TrainingDiverged(
                f"training diverged: stage {j + 1}'s loss became {total} (NaN or infinite) between steps {since + 1} "
                f"and {tr.global_step} (epoch {tr.epoch + 1}){kept}{where}. Lower the learning rate or check the inputs "
                "for NaN/inf.",
                stage=j + 1, steps=(since + 1, tr.global_step), last_checkpoint=last)


def check_lr_plan(saved: list[float] | None, factors: list[float], done: int) -> None:
    """Refuse (ValueError) a resumed run (``done`` epochs trained) whose learning-rate factors
    differ from the ``saved`` plan at an epoch both plan."""
    if not saved or done == 0:
        return
    for e, (a, b) in enumerate(zip(saved, factors)):
        if a != b:
            raise ValueError(f"this run was trained ({done} epochs) with a learning-rate schedule giving factor {a:g} at "
                             f"epoch {e + 1}, this fit's lr_schedule gives {b:g} there: resume with the schedule it was "
                             "planned with (or set lr_factors = None to re-plan on purpose)")


def _no_batch(loader) -> str:
    """Why ``loader`` yielded no batch, as far as it tells (samples, batch size, drop_last)."""
    n = getattr(getattr(loader, "dataset", None), "__len__", None)
    n = n() if n is not None else (loader.x.shape[0] if hasattr(loader, "x") else None)
    size, drop = getattr(loader, "batch_size", None), getattr(loader, "drop_last", None)
    if n is None or size is None or n >= size:
        return "the training loader yielded no batch"
    why = ("it drops a last partial batch (drop_last)" if drop else
           "a last batch of one sample cannot train BatchNorm and is dropped" if n == 1 else "")
    return (f"the training loader yielded no batch: its {n} samples are fewer than its batch size {size}"
            + (f" and {why}" if why else "") + "; lower the batch size or add data")


def _epoch(tr, loader: Iterable, total: int, log_every: int, progress: bool) -> dict:
    """Train one epoch; returns its record (without test accuracy)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    K = tr.model.num_stages
    sums = _EpochSums(tr, K)
    seen, batch_size, start = 0, None, time.perf_counter()
    checked = tr.global_step  # the last step whose losses were read finite
    desc = f"epoch {tr.epoch + 1}/{total}" + (f" stage {tr.active_stage + 1}" if tr.mode == "sequential" else "")
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    tr.schedule.collect = not sums.accumulates
    try:
        for i, (x, y) in enumerate(bar):
            if tr.mode == "async":
                batch_size = batch_size or x.shape[0]
                if x.shape[0] != batch_size:
                    continue  # async buffers hold fixed-size batches: a final partial batch is skipped
            out = tr.step(x, y)
            seen += out.batch_size
            sums.add(out)
            if (i + 1) % log_every == 0:
                ls, hs, n, skipped = sums.read(reset=False)
                _check_finite(tr, ls, n, checked, skipped)
                checked = tr.global_step
                if progress:
                    bar.set_postfix_str(" ".join(f"s{j + 1}:{ls[j] / n[j]:.3f}/{100 * hs[j] / n[j]:.1f}%"
                                                 for j in range(K) if n[j]))
    finally:
        tr.schedule.collect = True
    bar.close()
    if seen == 0:
        raise ValueError(_no_batch(loader))
    tr.flush()  # the epoch's last batches leave the pipeline
    ls, hs, n, skipped = sums.read(reset=True)
    _check_finite(tr, ls, n, checked, skipped)
    elapsed = time.perf_counter() - start
    opt = tr.optimizers[min(tr.active_stage, len(tr.optimizers) - 1)]
    return {"epoch": tr.epoch + 1, "stage": tr.active_stage + 1 if tr.mode == "sequential" else None,
            "lr": opt.param_groups[0]["lr"], "train_loss": [ls[j] / n[j] if n[j] else None for j in range(K)],
            "train_acc": [hs[j] / n[j] if n[j] else None for j in range(K)], "stage_samples": n,
            "time_s": elapsed, "images_per_s": seen / elapsed if elapsed > 0 else None}


def fit(tr, train_loader: Iterable, epochs: int, lr_schedule: Callable[[int], float] | None = None,
        eval_loader: Iterable | None = None, log_every: int = 20, progress: bool = True,
        callback: Callable[[dict], None] | None = None) -> list[dict]:
    """:meth:`dgl_fast.Trainer.fit` (see there)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if tr.mode == "sequential":
        plan = tr.planned_epochs
        if plan is not None and tr.epoch > 0 and epochs != plan:
            raise ValueError(f"this sequential run was planned with epochs={plan} per stage and is at epoch {tr.epoch} "
                             f"of {plan * tr.model.num_stages}; fit(epochs={epochs}) would re-plan its stages: resume "
                             f"with epochs={plan}")
        tr.planned_epochs = epochs
    schedule = lr_schedule or tr.lr_schedule or (lambda e: 1.0)
    factors = [check_factor(schedule(e), f"lr_schedule({e})") for e in range(epochs)]
    check_lr_plan(tr.lr_factors, factors, tr.epoch)
    tr.lr_factors = factors
    total = epochs * (tr.model.num_stages if tr.mode == "sequential" else 1)
    records = []
    while tr.epoch < total:
        if tr.mode == "sequential":
            tr.active_stage, local_epoch = divmod(tr.epoch, epochs)
        else:
            local_epoch = tr.epoch
        factor = check_factor(schedule(local_epoch), f"lr_schedule({local_epoch})")
        if tr.mode == "async":  # each stage follows the schedule by its own epoch count
            tr.schedule.set_lr_schedule(schedule, len(train_loader) if hasattr(train_loader, "__len__") else None,
                                        check_factor)
        else:
            tr.set_lr_factor(factor)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(tr.epoch)
        record = _epoch(tr, train_loader, total, log_every, progress)
        if eval_loader is not None:
            record["test_acc"] = tr.evaluate(eval_loader)
        tr.epoch += 1
        tr.history.append(record)
        records.append(record)
        if callback is not None:
            callback(record)
    return records
