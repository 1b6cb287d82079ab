"""Checks of ``python -m dgl_fast train`` options that argparse's per-option types cannot make alone:
the option types (finite numbers, bounded integers), --slowdown, which options combine, input sizes
against the network's pooling, and a resumed checkpoint's optimizer settings. Each failure raises
ValueError (or argparse.ArgumentTypeError) with one line naming the option, what it expects and what
it got; ``dgl_fast.cli`` prints it and exits 2."""

from __future__ import annotations

import argparse
import math
import os

from .data import FIXED_IN_SIZE

# Options of asynchronous DGL and their defaults; outside --mode async a changed one is refused.
ASYNC_DEFAULTS = {"buffer_capacity": 30, "policy": "priority_lifo", "max_reuse": None, "slowdown": [],
                  "schedule": "random", "buffer_dtype": None}
_DEFAULT_IN_SIZE = {"synthetic": 32, "imagefolder": 224}
# Options a resumed run must keep: each changes what it trains on or the course of training (the
# batches, their order, the learning rate of an epoch, async mode's draws and buffers). They are
# saved in the checkpoint (Trainer.run_options); a resume with another value is refused by name.
# The others may change: --epochs (to continue), how it runs (--device, --engine, --amp, ...),
# where it writes (--out) and what it shows.
RESUME_KEPT = ("batch_size", "lr_step", "lr_decay", "seed", "data", "in_size", "buffer_capacity", "policy",
               "max_reuse", "slowdown", "schedule", "buffer_dtype")


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value >= high):
            want = f"an integer >= {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def _finite_float(low: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = _int_at_least(1)
seed_int = _int_at_least(0, 2 ** 32)
positive_float = _finite_float(0.0, inclusive=False)
nonnegative_float = _finite_float(0.0, inclusive=True)


def parse_slowdown(items: list[str]) -> dict[int, float]:
    slowdown: dict[int, float] = {}
    for item in items:
        try:
            stage_text, noise_text = item.split(":")
            stage, noise = int(stage_text), float(noise_text)
        except ValueError:
            stage, noise = None, math.nan
        if stage is None or stage < 1 or not 0 <= noise < 1:
            raise ValueError(f"argument --slowdown: expected STAGE:NOISE with a stage number >= 1 and "
                             f"0 <= NOISE < 1, such as 3:0.1, got {item!r}")
        if stage in slowdown:
            raise ValueError(f"argument --slowdown: stage {stage} is given twice ({item!r})")
        slowdown[stage] = noise
    return slowdown


def input_size(args) -> tuple[int, str]:
    """The input height/width this run's data has, and the option that sets it."""
    if args.data in FIXED_IN_SIZE:
        return FIXED_IN_SIZE[args.data], f"--data {args.data}"
    if args.in_size is not None:
        return args.in_size, f"--in-size {args.in_size}"
    return _DEFAULT_IN_SIZE[args.data], f"--data {args.data} (default size)"


def check_args(args) -> None:
    """Semantic checks of ``train`` options that argparse's per-option types cannot make; raises
    ValueError with a one-line message naming the option, what it expects and what it got."""
    if args.mode != "async":
        changed = [f"--{k.replace('_', '-')}" for k, v in ASYNC_DEFAULTS.items() if getattr(args, k) != v]
        if changed:
            raise ValueError(f"argument {changed[0]}: {', '.join(changed)} "
                             f"{'applies' if len(changed) == 1 else 'apply'} to --mode async only, this run uses "
                             f"--mode {args.mode}; drop {'it' if len(changed) == 1 else 'them'} or pass --mode async")
    parse_slowdown(args.slowdown)
    if args.batch_size < 2:  # every network of dgl_fast.models has BatchNorm layers
        raise ValueError(f"argument --batch-size: the networks' BatchNorm layers cannot train on batches of "
                         f"{args.batch_size} sample: expected --batch-size >= 2, got {args.batch_size}")
    if args.in_size is not None and args.data in FIXED_IN_SIZE and args.in_size != FIXED_IN_SIZE[args.data]:
        size = FIXED_IN_SIZE[args.data]
        raise ValueError(f"argument --in-size: --in-size applies to --data synthetic and imagefolder only; --data "
                         f"{args.data} has a fixed input size of {size}, got --in-size {args.in_size}")
    if args.download and args.data != "cifar10":
        raise ValueError(f"argument --download: applies to --data cifar10 only, this run uses --data {args.data}")
    if args.data_dir != "data" and args.data not in ("cifar10", "imagefolder"):
        raise ValueError(f"argument --data-dir: applies to --data cifar10 and imagefolder only, this run uses "
                         f"--data {args.data}")
    # the learning rate at the last epoch of the schedule (largest with --lr-decay > 1, smallest below 1)
    k = (args.epochs - 1) // args.lr_step
    try:
        last = args.lr * args.lr_decay ** k
    except OverflowError:
        last = math.inf
    if not (math.isfinite(last) and last > 0):
        raise ValueError(f"argument --lr-decay: --lr {args.lr:g} x --lr-decay {args.lr_decay:g} ** {k} (epoch "
                         f"{k * args.lr_step + 1} of --epochs {args.epochs}, --lr-step {args.lr_step}) is {last:g}; "
                         "expected a finite learning rate > 0 at every epoch")
    size, source = input_size(args)
    if args.model == "aux-study" or args.model.startswith("vgg"):
        from . import models  # noqa: PLC0415

        if args.model == "aux-study":
            pools, what = sum(1 for i in (2, 4) if i <= (args.depth or 6)), f"--model aux-study --depth {args.depth or 6}"
        else:
            pools, what = sum(v == "M" for v in models.VGG_CONFIGS.get(args.model, [])), f"--model {args.model}"
        if size < 2 ** pools:
            flag = "--in-size" if source.startswith("--in-size") else "--data"
            raise ValueError(f"argument {flag}: {what} max-pools {pools} times (2x2), so it needs inputs of at least "
                             f"{2 ** pools}x{2 ** pools}, got {size}x{size} ({source})")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"argument --out: expected a folder (created when missing), got the existing file {args.out}")
    if not args.distributed and (args.replicas != 1 or args.timeout != 300.0):
        raise ValueError("arguments --replicas and --timeout: apply to --distributed runs only")
    if args.resume is not None:
        if args.distributed and not os.path.isdir(args.resume):
            raise ValueError(f"argument --resume: a --distributed run resumes from the checkpoint folder of a "
                             f"previous run (OUT/checkpoint, with manifest.json), got {args.resume}")
        if not os.path.exists(args.resume):
            raise ValueError(f"argument --resume: expected a checkpoint file written by a previous run, "
                             f"{args.resume} does not exist")


def run_options(args) -> dict:
    """This run's :data:`RESUME_KEPT` options by flag, as the checkpoint keeps them."""
    return {f"--{k.replace('_', '-')}": getattr(args, k) for k in RESUME_KEPT}


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "(none)"
    return "(default)" if value is None else str(value)


def check_resumed_options(args, saved) -> None:
    """Refuse a resume whose :data:`RESUME_KEPT` options differ from those ``saved`` with the
    checkpoint, naming the first flag that differs (a checkpoint without them is not checked)."""
    if not isinstance(saved, dict):
        return
    for flag, value in run_options(args).items():
        if flag in saved and saved[flag] != value:
            raise ValueError(f"argument {flag}: {args.resume} was trained with {flag} {_shown(saved[flag])}, got {flag} "
                             f"{_shown(value)}; resume with the options it was trained with (the README lists those "
                             "that may change)")


def check_resumed_optimizer(args, trainer) -> None:
    """The optimizer's settings and the :data:`RESUME_KEPT` options come from the checkpoint:
    refuse options that say otherwise."""
    check_resumed_options(args, trainer.run_options)
    for flag, key, given in (("--lr", "initial_lr", args.lr), ("--momentum", "momentum", args.momentum),
                             ("--weight-decay", "weight_decay", args.weight_decay)):
        saved = {g.get(key) for opt in trainer.optimizers for g in opt.param_groups}
        if len(saved) == 1:
            (value,) = saved
            if isinstance(value, (int, float)) and value != given:
                raise ValueError(f"argument {flag}: {args.resume} was trained with {flag} {value:g}, got {flag} "
                                 f"{given:g}; resume with the options it was trained with")
    planned = getattr(trainer, "planned_epochs", None)  # sequential mode: epochs per stage
    if args.mode == "sequential" and trainer.epoch > 0 and planned is not None and planned != args.epochs:
        raise ValueError(f"argument --epochs: {args.resume} is a --mode sequential run planned with --epochs {planned} "
                         f"per stage; resume with --epochs {planned}, got --epochs {args.epochs}")
    if args.mode != "sequential" and trainer.epoch > args.epochs:
        raise ValueError(f"argument --epochs: {args.resume} has trained {trainer.epoch} epochs already; expected "
                         f"--epochs >= {trainer.epoch} to continue it, got --epochs {args.epochs}")

