"""Command line: ``python -m dgl_fast train ...`` (see ``--help``), ``info``, ``check`` and ``bench NAME``.

The option checks live in ``cli_checks``, the accuracy plot in ``plots``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import cli_rules
from .cli_checks import (
    ASYNC_DEFAULTS,
    check_args,
    check_resumed_optimizer,
    check_resumed_options,
    input_size,
    nonnegative_float,
    parse_slowdown,
    positive_float,
    positive_int,
    run_options,
    seed_int,
)
from .data import DATASETS
from .distributed.protocol import PeerError
from .heads import HEAD_KINDS
from .plots import plot_accuracy
from .trainer import MODES

EXIT_USAGE = 2  # a bad option or input file: one line "error: ..." on stderr
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss); the last good checkpoint is left untouched
EXIT_PEER = 4  # --distributed: another rank stalled, died or sent what this one did not expect

_EPILOG = ("Exit status: 0 when training finished; 2 for a bad option or input file (one line 'error: ...' on "
           "stderr naming the option, what it expects and what it got); 3 when training diverged (a stage's loss "
           "became NaN or infinite): the message names the stage, the steps and the last good checkpoint, which "
           "is left untouched, and metrics.jsonl holds no record of the diverged epoch; 4 (--distributed) when another rank "
           "stalled, died or became unreachable: one line names this rank, its stages and the peer.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --lr: expected ..., got ...`` and exit 2."""

    def error(self, message: str):
        _print_error(message)
        sys.exit(EXIT_USAGE)


def _print_error(message) -> None:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print("error: " + "; ".join(lines), file=sys.stderr)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network with DGL (or a baseline) and report held-out accuracy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=_EPILOG)
    p.add_argument("--model", default="aux-study", help="network: aux-study, vgg11/13/16/19, resnet20/32/56/110, "
                   "resnet18/34/50/101/152")
    p.add_argument("--aux", default="mlp-sr", choices=HEAD_KINDS, help="auxiliary head kind")
    p.add_argument("--mode", default="dgl", choices=MODES)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=positive_int, default=None, help="number of stages K")
    g.add_argument("--block-size", type=positive_int, default=None, help="layers per stage (aux-study, VGG)")
    p.add_argument("--depth", type=positive_int, default=None, help="layers of aux-study (paper: 6)")
    p.add_argument("--width", type=positive_int, default=None, help="channels of the first layer")
    p.add_argument("--hidden", type=positive_int, default=None, help="hidden width of the heads (default 4C)")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs (per stage in sequential mode)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--momentum", type=nonnegative_float, default=0.9)
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4)
    p.add_argument("--lr-step", type=positive_int, default=15,
                   help="multiply the lr by --lr-decay every this many epochs")
    p.add_argument("--lr-decay", type=positive_float, default=0.2)
    p.add_argument("--data", default="mnist5k", choices=DATASETS, help="mnist5k and digits ship offline")
    p.add_argument("--data-dir", default="data", help="where cifar10 / imagefolder data lives")
    p.add_argument("--download", action="store_true", help="download cifar10 into --data-dir (needs a network)")
    p.add_argument("--in-size", type=positive_int, default=None,
                   help="input size of synthetic (default 32) and imagefolder (default 224) data; mnist5k (28), "
                        "digits (8) and cifar10 (32) have a fixed size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="folder for metrics.jsonl, summary.json, accuracy.png, checkpoint.pt")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (same model, mode and optimizer options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="auto", choices=["auto", "sequential", "pipeline", "streams"],
                   help="auto: CUDA streams (+ graphs) on a GPU, sequential on the CPU")
    e.add_argument("--cuda-graphs", default=None, action=argparse.BooleanOptionalAction,
                   help="one CUDA graph per stage step (default: on with the streams engine and SGD)")
    e.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                   help="autocast each stage. On a CPU with bf16 instructions (avx512_bf16 or amx_bf16 in `lscpu`, "
                        "or dgl_fast.cpu_features()) --amp bf16 is the fast choice: the README's job trains about 2.5x "
                        "faster at the held-out accuracy of fp32 (within 0.3 points: "
                        "benchmarks/results/accuracy_mnist5k-cpu.md, python -m dgl_fast bench accuracy)")
    e.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last model and inputs (default: auto, on where it is faster: float32/bf16 "
                        "convolutions on x86 CPUs with oneDNN, CUDA with --amp; the choice is printed)")
    e.add_argument("--distributed", action="store_true",
                   help="place stages across torch.distributed ranks: launch with torchrun (NCCL on GPUs, gloo on CPUs)")
    e.add_argument("--replicas", type=positive_int, default=1,
                   help="--distributed: replica rows; WORLD_SIZE / REPLICAS stage groups each, gradients averaged")
    e.add_argument("--sync-bn", action="store_true",
                   help="--distributed with --replicas: BatchNorm as SyncBatchNorm over the replicas (CUDA only)")
    e.add_argument("--timeout", type=positive_float, default=300.0,
                   help="--distributed: seconds any exchange with another rank may wait before this rank stops")
    a = p.add_argument_group("asynchronous DGL (--mode async only; refused with another mode)")
    d = ASYNC_DEFAULTS
    a.add_argument("--buffer-capacity", type=positive_int, default=d["buffer_capacity"],
                   help="mini-batches per replay buffer (M)")
    a.add_argument("--policy", default=d["policy"], choices=["priority_lifo", "fifo", "uniform"])
    a.add_argument("--max-reuse", type=positive_int, default=d["max_reuse"],
                   help="times a buffered batch may be sampled")
    a.add_argument("--slowdown", action="append", default=d["slowdown"], metavar="STAGE:NOISE",
                   help="slow stage STAGE (from 1): drawn with weight 1-NOISE (0 <= NOISE < 1); repeatable "
                        "(paper: 3:0.1)")
    a.add_argument("--schedule", default=d["schedule"], choices=["random", "round_robin"])
    a.add_argument("--buffer-dtype", default=d["buffer_dtype"], choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the buffers")
    cli_rules.add_arguments(p)



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

    if cli_rules.uses_rule(args):
        kw = cli_rules.build_kwargs(args, spec)
        try:
            return models.build(args.model, num_classes=spec.num_classes, in_size=spec.in_size,
                                in_channels=spec.in_channels, **kw)
        except ValueError as exc:
            raise ValueError(f"argument --rule: cannot build --model {args.model} --rule {kw['rule'] or 'dgl'} for "
                             f"{spec.in_channels}x{spec.in_size}x{spec.in_size} inputs: {exc}") from exc
    try:
        return models.build(args.model, num_classes=spec.num_classes, block_size=args.block_size,
                            stages=args.stages, aux=args.aux, in_size=spec.in_size, in_channels=spec.in_channels,
                            width=args.width, depth=args.depth, hidden=args.hidden)
    except ValueError as exc:
        opts = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}"
                        for k in ("depth", "width", "hidden", "stages", "block_size") if getattr(args, k) is not None)
        _, source = input_size(args)
        raise ValueError(f"argument --model: cannot build --model {args.model} --aux {args.aux}{' ' + opts if opts else ''} "
                         f"for {spec.in_channels}x{spec.in_size}x{spec.in_size} inputs ({source}): {exc}") from exc


def _lr_schedule(args):
    if args.cos_lr:
        if args.lr_step != 15 or args.lr_decay != 0.2:
            raise ValueError("argument --cos-lr: the cosine schedule replaces --lr-step/--lr-decay; drop them")
        return cli_rules.harness_cosine(args.lr, args.epochs)
    step, decay = args.lr_step, args.lr_decay
    return lambda e: decay ** (e // step)



def cmd_train(args) -> int:
    """``train``: returns 0, or EXIT_USAGE / EXIT_DIVERGED after one line ``error: ...`` on stderr.

    Bad options, input files and checkpoints (ValueError, CheckpointError, FileNotFoundError) and
    a diverged run (TrainingDiverged) end here; any other exception is a bug and keeps its traceback."""
    from .trainer import TrainingDiverged  # noqa: PLC0415

    try:
        check_args(args)
        if args.distributed and args.check_isolation:
            cli_rules.run_isolation_check(args, None, None)  # refuses --distributed (exit 2)
        if args.distributed:
            from .cli_distributed import train_distributed  # noqa: PLC0415

            return train_distributed(args, _load_data, _build_model, _lr_schedule)
        return _train(args)
    except TrainingDiverged as exc:
        _print_error(exc)
        return EXIT_DIVERGED
    except PeerError as exc:
        _print_error(exc)
        return EXIT_PEER
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
    slowdown = parse_slowdown(args.slowdown)
    if slowdown and max(slowdown) > model.num_stages:
        raise ValueError(f"argument --slowdown: expected stage numbers 1..{model.num_stages} (the model has "
                         f"{model.num_stages} stages), got stage {max(slowdown)}")

    def optimizer(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               nesterov=args.nesterov)

    try:
        trainer = Trainer(model, optimizer=optimizer, mode=args.mode, device=device, lr_schedule=_lr_schedule(args),
                          buffer_capacity=args.buffer_capacity, policy=args.policy, max_reuse=args.max_reuse,
                          slowdown=slowdown, schedule=args.schedule,
                          buffer_dtype=getattr(torch, args.buffer_dtype) if args.buffer_dtype else None,
                          seed=args.seed, engine=args.engine, cuda_graphs=args.cuda_graphs, amp=args.amp,
                          channels_last="auto" if args.channels_last is None else args.channels_last)
    except ValueError as exc:
        given = [f"--mode {args.mode}", f"--engine {args.engine}", f"--device {args.device}"]
        given += [f"--{'' if args.cuda_graphs else 'no-'}cuda-graphs"] if args.cuda_graphs is not None else []
        given += [f"--amp {args.amp}"] if args.amp else []
        given += [f"--{'' if args.channels_last else 'no-'}channels-last"] if args.channels_last is not None else []
        raise ValueError(f"{exc} (options {' '.join(given)})") from exc
    if args.resume:
        _resume(args, trainer)
    trainer.run_options = run_options(args)

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
    heads = f"rule={model.rule}" if getattr(model, "rule", None) else f"aux={args.aux}"
    print(f"dgl_fast: {args.model} K={model.num_stages} {heads} mode={args.mode} on {device} "
          f"(engine {trainer.engine_name}{', CUDA graphs' if trainer.cuda_graphs else ''}"
          f"{', amp ' + args.amp if args.amp else ''}, channels_last "
          f"{'on' if trainer.channels_last else 'off'}{' (auto)' if args.channels_last is None else ''}); "
          f"{spec.name}: {len(spec.train)} batches/epoch; trunk {n_params / 1e6:.2f}M params, heads {n_aux / 1e6:.2f}M",
          file=sys.stderr)
    if args.resume:
        print(f"resumed from {args.resume} at epoch {trainer.epoch}", file=sys.stderr)
    if args.check_isolation:
        cli_rules.run_isolation_check(args, trainer, spec.train)

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
            plot_accuracy(trainer.history, os.path.join(out, "accuracy.png"), f"{args.model} K={model.num_stages} "
                  f"{args.mode} ({args.aux}) on {spec.name}")

    start = time.perf_counter()
    trainer.fit(spec.train, epochs=args.epochs, eval_loader=spec.test, progress=not args.no_progress,
                callback=on_epoch)
    final = trainer.evaluate(spec.test)
    summary = {
        "model": args.model, "mode": args.mode, "aux": args.aux, "rule": getattr(model, "rule", None),
        "stages": model.num_stages, "data": spec.name,
        "epochs_done": trainer.epoch, "test_acc_per_stage": final, "test_acc": final[-1],
        "test_acc_ensemble": trainer.evaluate_ensemble(spec.test),
        "train_time_s": time.perf_counter() - start, "device": str(device), "torch": torch.__version__,
        "amp": args.amp, "channels_last": trainer.channels_last, "engine": trainer.engine_name,
    }
    if out:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"held-out accuracy ({spec.name}, {len(spec.test.y) if hasattr(spec.test, 'y') else '?'} images): "
          f"{100 * final[-1]:.2f}%  (per stage: {' '.join(f'{100 * a:.2f}' for a in final)})")
    return 0


def _resume(args, trainer) -> None:
    from .checkpoint import CheckpointError, load  # noqa: PLC0415

    try:
        state = load(args.resume)
    except OSError as exc:
        raise ValueError(f"argument --resume: cannot read {args.resume} ({exc.strerror or exc})") from exc
    except CheckpointError as exc:
        raise ValueError(f"argument --resume: {exc}") from exc
    check_resumed_options(args, state.get("run_options") if isinstance(state, dict) else None)  # names the flag
    try:
        trainer.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"argument --resume: {args.resume} does not fit this run's options (--model, --aux, "
                         f"--depth, --width, --hidden, --stages/--block-size, --mode, --data): {exc}") from exc
    check_resumed_optimizer(args, trainer)
    if trainer.last_checkpoint is None:  # the last good checkpoint, named if the run diverges
        trainer.last_checkpoint = (os.fspath(args.resume), trainer.global_step)


def cmd_bench(name: str, rest: list[str]) -> int:
    """``bench NAME [args]``: ``dgl_fast.bench.NAME.main(args)``; EXIT_USAGE for an unknown name."""
    from . import bench  # noqa: PLC0415

    if name not in bench.NAMES:
        _print_error(f"no benchmark {name!r}; expected one of {', '.join(bench.NAMES)}")
        return EXIT_USAGE
    return bench.run(name, rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dgl_fast`` and the ``dgl-fast`` script."""
    # One hardware queue per stage stream (the streams engine; up to 32 stages): the CUDA runtime
    # reads this when it initialises, which no command has done yet at this point.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    parser = _Parser(prog="python -m dgl_fast", description="dgl_fast: fast Decoupled Greedy Learning")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("info", help="print what was compiled (build_config) and the devices seen")
    c = sub.add_parser("check", help="self-check of this build on this device: every op against its reference, "
                       "graphs, streams, async, a short benchmark; exit 1 on any failure")
    from . import selfcheck  # noqa: PLC0415

    selfcheck.add_arguments(c)
    b = sub.add_parser("bench", help="run a benchmark (dgl_fast.bench), e.g. `bench replay_buffer`; results go to "
                       "benchmarks/results/ in the current directory unless --out-dir says otherwise")
    b.add_argument("name", help="benchmark name: NAME runs dgl_fast.bench.NAME (accuracy, aux_head, memory, overlap, "
                   "replay)")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see its --help)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return cmd_bench(args.name, args.rest)
    if args.command == "check":
        rest = list(sys.argv[1:] if argv is None else argv)
        return selfcheck.run_cli(args, rest[rest.index("check") + 1:] if "check" in rest else [])
    if args.command == "train":
        return cmd_train(args)
    if args.command == "info":
        from ._native import build_config  # noqa: PLC0415

        print(json.dumps(build_config(), indent=1))
        return 0
    return 2
