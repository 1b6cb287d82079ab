"""Command line: ``python -m dgl_fast train ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from .data import DATASETS, FIXED_IN_SIZE
from .heads import HEAD_KINDS
from .trainer import MODES

EXIT_USAGE = 2  # a bad option or input file: one line "error: ..." on stderr
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss); the last good checkpoint is left untouched

# Options of asynchronous DGL and their defaults; outside --mode async a changed one is refused.
_ASYNC_DEFAULTS = {"buffer_capacity": 30, "policy": "priority_lifo", "max_reuse": None, "slowdown": [],
                   "schedule": "random", "buffer_dtype": None}
_DEFAULT_IN_SIZE = {"synthetic": 32, "imagefolder": 224}

_EPILOG = ("Exit status: 0 when training finished; 2 for a bad option or input file (one line 'error: ...' on "
           "stderr naming the option, what it expects and what it got); 3 when training diverged (a stage's loss "
           "became NaN or infinite): the message names the stage, the steps and the last good checkpoint, which "
           "is left untouched, and metrics.jsonl holds no record of the diverged epoch.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --lr: expected ..., got ...`` and exit 2."""

    def error(self, message: str):
        _print_error(message)
        sys.exit(EXIT_USAGE)


def _print_error(message) -> None:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print("error: " + "; ".join(lines), file=sys.stderr)


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


_positive_int = _int_at_least(1)
_seed = _int_at_least(0, 2 ** 32)
_positive_float = _finite_float(0.0, inclusive=False)
_nonnegative_float = _finite_float(0.0, inclusive=True)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network with DGL (or a baseline) and report held-out accuracy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=_EPILOG)
    p.add_argument("--model", default="aux-study", help="network: aux-study, vgg11/13/16/19, resnet20/32/56/110, "
                   "resnet18/34/50/101/152")
    p.add_argument("--aux", default="mlp-sr", choices=HEAD_KINDS, help="auxiliary head kind")
    p.add_argument("--mode", default="dgl", choices=MODES)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=_positive_int, default=None, help="number of stages K")
    g.add_argument("--block-size", type=_positive_int, default=None, help="layers per stage (aux-study, VGG)")
    p.add_argument("--depth", type=_positive_int, default=None, help="layers of aux-study (paper: 6)")
    p.add_argument("--width", type=_positive_int, default=None, help="channels of the first layer")
    p.add_argument("--hidden", type=_positive_int, default=None, help="hidden width of the heads (default 4C)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="epochs (per stage in sequential mode)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=0.1)
    p.add_argument("--momentum", type=_nonnegative_float, default=0.9)
    p.add_argument("--weight-decay", type=_nonnegative_float, default=5e-4)
    p.add_argument("--lr-step", type=_positive_int, default=15,
                   help="multiply the lr by --lr-decay every this many epochs")
    p.add_argument("--lr-decay", type=_positive_float, default=0.2)
    p.add_argument("--data", default="mnist5k", choices=DATASETS, help="mnist5k and digits ship offline")
    p.add_argument("--data-dir", default="data", help="where cifar10 / imagefolder data lives")
    p.add_argument("--download", action="store_true", help="download cifar10 into --data-dir (needs a network)")
    p.add_argument("--in-size", type=_positive_int, default=None,
                   help="input size of synthetic (default 32) and imagefolder (default 224) data; mnist5k (28), "
                        "digits (8) and cifar10 (32) have a fixed size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", default=None, help="folder for metrics.jsonl, summary.json, accuracy.png, checkpoint.pt")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (same model, mode and optimizer options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="auto", choices=["auto", "sequential", "pipeline", "streams"],
                   help="auto: CUDA streams (+ graphs) on a GPU, sequential on the CPU")
    e.add_argument("--cuda-graphs", default=None, action=argparse.BooleanOptionalAction,
                   help="one CUDA graph per stage step (default: on with the streams engine and SGD)")
    e.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast each stage")
    e.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    e.add_argument("--distributed", action="store_true",
                   help="place stages across torch.distributed ranks: launch with torchrun (NCCL on GPUs, gloo on CPUs)")
    a = p.add_argument_group("asynchronous DGL (--mode async only; refused with another mode)")
    d = _ASYNC_DEFAULTS
    a.add_argument("--buffer-capacity", type=_positive_int, default=d["buffer_capacity"],
                   help="mini-batches per replay buffer (M)")
    a.add_argument("--policy", default=d["policy"], choices=["priority_lifo", "fifo", "uniform"])
    a.add_argument("--max-reuse", type=_positive_int, default=d["max_reuse"],
                   help="times a buffered batch may be sampled")
    a.add_argument("--slowdown", action="append", default=d["slowdown"], metavar="STAGE:NOISE",
                   help="slow stage STAGE (from 1): drawn with weight 1-NOISE (0 <= NOISE < 1); repeatable "
                        "(paper: 3:0.1)")
    a.add_argument("--schedule", default=d["schedule"], choices=["random", "round_robin"])
    a.add_argument("--buffer-dtype", default=d["buffer_dtype"], choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the buffers")


def _parse_slowdown(items: list[str]) -> dict[int, float]:
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


def _input_size(args) -> tuple[int, str]:
    """The input height/width this run's data has, and the option that sets it."""
    if args.data in FIXED_IN_SIZE:
        return FIXED_IN_SIZE[args.data], f"--data {args.data}"
    if args.in_size is not None:
        return args.in_size, f"--in-size {args.in_size}"
    return _DEFAULT_IN_SIZE[args.data], f"--data {args.data} (default size)"


def _check_args(args) -> None:
    """Semantic checks of ``train`` options that argparse's per-option types cannot make; raises
    ValueError with a one-line message naming the option, what it expects and what it got."""
    if args.mode != "async":
        changed = [f"--{k.replace('_', '-')}" for k, v in _ASYNC_DEFAULTS.items() if getattr(args, k) != v]
        if changed:
            raise ValueError(f"argument {changed[0]}: {', '.join(changed)} "
                             f"{'applies' if len(changed) == 1 else 'apply'} to --mode async only, this run uses "
                             f"--mode {args.mode}; drop {'it' if len(changed) == 1 else 'them'} or pass --mode async")
    _parse_slowdown(args.slowdown)
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
    size, source = _input_size(args)
    if args.model == "aux-study" or args.model.startswith("vgg"):
        from . import models  # noqa: PLC0415

        if args.model == "aux-study":
            pools, what = sum(1 for i in (2, 4) if i <= (args.depth or 6)), f"--model aux-study --depth {args.depth or 6}"
        else:
            pools, what = sum(v == "M" for v in models._VGG.get(args.model, [])), f"--model {args.model}"
        if size < 2 ** pools:
            flag = "--in-size" if source.startswith("--in-size") else "--data"
            raise ValueError(f"argument {flag}: {what} max-pools {pools} times (2x2), so it needs inputs of at least "
                             f"{2 ** pools}x{2 ** pools}, got {size}x{size} ({source})")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"argument --out: expected a folder (created when missing), got the existing file {args.out}")
    if args.resume is not None:
        if args.distributed:
            raise ValueError("argument --resume: --distributed runs cannot resume from a checkpoint")
        if not os.path.exists(args.resume):
            raise ValueError(f"argument --resume: expected a checkpoint file written by a previous run, "
                             f"{args.resume} does not exist")


def _load_data(args, device):
    from . import data as data_mod  # noqa: PLC0415

    try:
        return data_mod.load(args.data, batch_size=args.batch_size, data_dir=args.data_dir, device=device,
                             seed=args.seed, download=args.download, in_size=args.in_size)
    except ValueError as exc:
        if args.data == "cifar10":  # a batch file that is not the official one
            raise ValueError(f"argument --data-dir: {exc}") from exc
        raise


def _build_model(args, spec):
    from . import models  # noqa: PLC0415

    try:
        return models.build(args.model, num_classes=spec.num_classes, block_size=args.block_size,
                            stages=args.stages, aux=args.aux, in_size=spec.in_size, in_channels=spec.in_channels,
                            width=args.width, depth=args.depth, hidden=args.hidden)
    except ValueError as exc:
        opts = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}"
                        for k in ("depth", "width", "hidden", "stages", "block_size") if getattr(args, k) is not None)
        _, source = _input_size(args)
        raise ValueError(f"argument --model: cannot build --model {args.model} --aux {args.aux}{' ' + opts if opts else ''} "
                         f"for {spec.in_channels}x{spec.in_size}x{spec.in_size} inputs ({source}): {exc}") from exc


def _lr_schedule(args):
    step, decay = args.lr_step, args.lr_decay
    return lambda e: decay ** (e // step)


def _check_resumed_optimizer(args, trainer) -> None:
    """The optimizer's settings come from the checkpoint: refuse options that say otherwise."""
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


def _plot(history: list[dict], path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    key = "test_acc" if all("test_acc" in r for r in history) else "train_acc"
    K = len(history[0][key])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    epochs = [r["epoch"] for r in history]
    for j in range(K):
        vals = [math.nan if r[key][j] is None else 100 * r[key][j] for r in history]
        ax.plot(epochs, vals, marker="o", ms=3, label=f"stage {j + 1}" + (" (network)" if j == K - 1 else ""))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(("test" if key == "test_acc" else "train") + " accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def cmd_train(args) -> int:
    """``train``: returns 0, or EXIT_USAGE / EXIT_DIVERGED after one line ``error: ...`` on stderr.

    Bad options, input files and checkpoints (ValueError, CheckpointError, FileNotFoundError) and
    a diverged run (TrainingDiverged) end here; any other exception is a bug and keeps its traceback."""
    from .trainer import TrainingDiverged  # noqa: PLC0415

    try:
        _check_args(args)
        if args.distributed:
            return cmd_train_distributed(args)
        return _train(args)
    except TrainingDiverged as exc:
        _print_error(exc)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        _print_error(exc)
        return EXIT_USAGE


def _train(args) -> int:
    from .trainer import Trainer, resolve_device  # noqa: PLC0415

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise ValueError(f"{exc} (--device {args.device})") from exc
    torch.manual_seed(args.seed)
    spec = _load_data(args, device)
    model = _build_model(args, spec)
    slowdown = _parse_slowdown(args.slowdown)
    if slowdown and max(slowdown) > model.num_stages:
        raise ValueError(f"argument --slowdown: expected stage numbers 1..{model.num_stages} (the model has "
                         f"{model.num_stages} stages), got stage {max(slowdown)}")

    def optimizer(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    try:
        trainer = Trainer(model, optimizer=optimizer, mode=args.mode, device=device, lr_schedule=_lr_schedule(args),
                          buffer_capacity=args.buffer_capacity, policy=args.policy, max_reuse=args.max_reuse,
                          slowdown=slowdown, schedule=args.schedule,
                          buffer_dtype=getattr(torch, args.buffer_dtype) if args.buffer_dtype else None,
                          seed=args.seed, engine=args.engine, cuda_graphs=args.cuda_graphs, amp=args.amp,
                          channels_last=args.channels_last)
    except ValueError as exc:
        given = [f"--mode {args.mode}", f"--engine {args.engine}", f"--device {args.device}"]
        given += [f"--{'' if args.cuda_graphs else 'no-'}cuda-graphs"] if args.cuda_graphs is not None else []
        given += [f"--amp {args.amp}"] if args.amp else []
        given += ["--channels-last"] if args.channels_last else []
        raise ValueError(f"{exc} (options {' '.join(given)})") from exc
    if args.resume:
        try:
            trainer.load(args.resume)
        except OSError as exc:
            raise ValueError(f"argument --resume: cannot read {args.resume} ({exc.strerror or exc})") from exc
        except ValueError as exc:
            from .checkpoint import CheckpointError  # noqa: PLC0415

            if isinstance(exc, CheckpointError):
                raise ValueError(f"argument --resume: {exc}") from exc
            raise ValueError(f"argument --resume: {args.resume} does not fit this run's options (--model, --aux, "
                             f"--depth, --width, --hidden, --stages/--block-size, --mode, --data): {exc}") from exc
        _check_resumed_optimizer(args, trainer)
        if trainer.last_checkpoint is None:  # the last good checkpoint, named if the run diverges
            trainer.last_checkpoint = (os.fspath(args.resume), trainer.global_step)

    out = args.out
    if out:
        try:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        except OSError as exc:
            raise ValueError(f"argument --out: cannot write to the folder {out} ({exc.strerror or exc})") from exc

    n_params = sum(p.numel() for p in model.stages.parameters())
    n_aux = sum(p.numel() for p in model.heads.parameters())
    print(f"dgl_fast: {args.model} K={model.num_stages} aux={args.aux} mode={args.mode} on {device} "
          f"(engine {trainer.engine_name}{', CUDA graphs' if trainer.cuda_graphs else ''}); "
          f"{spec.name}: {len(spec.train)} batches/epoch; trunk {n_params / 1e6:.2f}M params, heads {n_aux / 1e6:.2f}M",
          file=sys.stderr)
    if args.resume:
        print(f"resumed from {args.resume} at epoch {trainer.epoch}", file=sys.stderr)

    def on_epoch(record: dict) -> None:
        acc = record.get("test_acc") or record["train_acc"]
        shown = " ".join(f"{100 * a:.2f}" if a is not None else "-" for a in acc)
        stage = f" (stage {record['stage']})" if record["stage"] else ""
        print(f"epoch {record['epoch']}{stage}: lr {record['lr']:.4g}, {record['images_per_s']:.0f} img/s, "
              f"{'test' if 'test_acc' in record else 'train'} accuracy per stage (%): {shown}", file=sys.stderr)
        if out:
            # the checkpoint first: Trainer.save refuses a non-finite model, and then no record is written
            trainer.save(os.path.join(out, "checkpoint.pt"))
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            _plot(trainer.history, os.path.join(out, "accuracy.png"), f"{args.model} K={model.num_stages} "
                  f"{args.mode} ({args.aux}) on {spec.name}")

    start = time.perf_counter()
    trainer.fit(spec.train, epochs=args.epochs, eval_loader=spec.test, progress=not args.no_progress,
                callback=on_epoch)
    final = trainer.evaluate(spec.test)
    summary = {
        "model": args.model, "mode": args.mode, "aux": args.aux, "stages": model.num_stages, "data": spec.name,
        "epochs_done": trainer.epoch, "test_acc_per_stage": final, "test_acc": final[-1],
        "test_acc_ensemble": trainer.evaluate_ensemble(spec.test),
        "train_time_s": time.perf_counter() - start, "device": str(device), "torch": torch.__version__,
    }
    if out:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"held-out accuracy ({spec.name}, {len(spec.test.y) if hasattr(spec.test, 'y') else '?'} images): "
          f"{100 * final[-1]:.2f}%  (per stage: {' '.join(f'{100 * a:.2f}' for a in final)})")
    return 0


def cmd_train_distributed(args) -> int:
    """``torchrun ... -m dgl_fast train --distributed``: one rank per stage group (DistributedDGL)."""
    import torch.distributed as dist  # noqa: PLC0415

    from .distributed import DistributedDGL  # noqa: PLC0415
    from .trainer import Trainer  # noqa: PLC0415

    if "RANK" not in os.environ:
        raise ValueError("--distributed expects to be launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR are unset)")
    if args.mode != "dgl" or args.engine not in ("auto", "sequential") or args.amp:
        raise ValueError("--distributed trains synchronous DGL (--mode dgl) without --engine or --amp")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device.startswith("cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank = dist.get_rank()
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        spec = _load_data(args, device)
        model = _build_model(args, spec)
        full = copy.deepcopy(model)

        def optimizer(params):
            return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

        ddgl = DistributedDGL(model, optimizer=optimizer, device=device)
        print(f"rank {rank}: stages {[j + 1 for j in ddgl.stages]} of {model.num_stages} on {device}", file=sys.stderr)
        start = time.perf_counter()
        records = ddgl.fit(spec.train if ddgl.is_first else None, epochs=args.epochs, lr_schedule=_lr_schedule(args))
        state = ddgl.full_state_dict()
        if rank == 0:
            full.load_state_dict(state)
            final = Trainer(full, device=device, engine="sequential").evaluate(spec.test)
            summary = {"model": args.model, "stages": model.num_stages, "ranks": dist.get_world_size(),
                       "placement": ddgl.placement, "data": spec.name, "epochs_done": ddgl.epoch,
                       "train": records, "test_acc_per_stage": final, "test_acc": final[-1],
                       "train_time_s": time.perf_counter() - start, "torch": torch.__version__}
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=1)
            print(f"held-out accuracy ({spec.name}, {dist.get_world_size()} ranks): {100 * final[-1]:.2f}%  "
                  f"(per stage: {' '.join(f'{100 * a:.2f}' for a in final)})")
    finally:
        dist.destroy_process_group()
    return 0


def cmd_bench(name: str, rest: list[str]) -> int:
    """Run benchmarks/bench_<name>.py (benchmarks live in the source checkout, beside the package)."""
    import runpy  # noqa: PLC0415

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    path = os.path.join(folder, f"bench_{name}.py")
    if not os.path.isfile(path):
        found = sorted(f[6:-3] for f in os.listdir(folder) if f.startswith("bench_")) if os.path.isdir(folder) else []
        print(f"error: no benchmark {name!r}; expected one of {', '.join(found) or '(none: run from a source checkout)'}",
              file=sys.stderr)
        return 2
    old_argv = sys.argv
    sys.argv = [path, *rest]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dgl_fast`` and the ``dgl-fast`` script."""
    # One hardware queue per stage stream (the streams engine; up to 32 stages): the CUDA runtime
    # reads this when it initialises, which no command has done yet at this point.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    parser = _Parser(prog="python -m dgl_fast", description="dgl_fast: fast Decoupled Greedy Learning")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("info", help="print what was compiled (build_config) and the devices seen")
    b = sub.add_parser("bench", help="run a benchmark from the repository's benchmarks/ folder, e.g. `bench replay`")
    b.add_argument("name", help="benchmark name: NAME runs benchmarks/bench_NAME.py")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see its --help)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return cmd_bench(args.name, args.rest)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "info":
        from ._native import build_config  # noqa: PLC0415

        print(json.dumps(build_config(), indent=1))
        return 0
    return 2
