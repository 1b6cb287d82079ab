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

from .data import DATASETS
from .heads import HEAD_KINDS
from .trainer import MODES


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network with DGL (or a baseline) and report held-out accuracy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="aux-study", help="network: aux-study, vgg11/13/16/19, resnet20/32/56/110, "
                   "resnet18/34/50/101/152")
    p.add_argument("--aux", default="mlp-sr", choices=HEAD_KINDS, help="auxiliary head kind")
    p.add_argument("--mode", default="dgl", choices=MODES)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="number of stages K")
    g.add_argument("--block-size", type=int, default=None, help="layers per stage (aux-study, VGG)")
    p.add_argument("--depth", type=int, default=None, help="layers of aux-study (paper: 6)")
    p.add_argument("--width", type=int, default=None, help="channels of the first layer")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of the heads (default 4C)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (per stage in sequential mode)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-step", type=int, default=15, help="multiply the lr by --lr-decay every this many epochs")
    p.add_argument("--lr-decay", type=float, default=0.2)
    p.add_argument("--data", default="mnist5k", choices=DATASETS, help="mnist5k and digits ship offline")
    p.add_argument("--data-dir", default="data", help="where cifar10 / imagefolder data lives")
    p.add_argument("--download", action="store_true", help="download cifar10 into --data-dir (needs a network)")
    p.add_argument("--in-size", type=int, default=None, help="input size for imagefolder / synthetic")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for metrics.jsonl, summary.json, accuracy.png, checkpoint.pt")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (same model and mode)")
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
    a = p.add_argument_group("asynchronous DGL (--mode async)")
    a.add_argument("--buffer-capacity", type=int, default=30, help="mini-batches per replay buffer (M)")
    a.add_argument("--policy", default="priority_lifo", choices=["priority_lifo", "fifo", "uniform"])
    a.add_argument("--max-reuse", type=int, default=None, help="times a buffered batch may be sampled")
    a.add_argument("--slowdown", action="append", default=[], metavar="STAGE:NOISE",
                   help="slow stage STAGE (from 1): drawn with weight 1-NOISE; repeatable (paper: 3:0.1)")
    a.add_argument("--schedule", default="random", choices=["random", "round_robin"])
    a.add_argument("--buffer-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the buffers")


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
    from . import data as data_mod  # noqa: PLC0415
    from . import models  # noqa: PLC0415
    from .trainer import Trainer, resolve_device  # noqa: PLC0415

    if args.distributed:
        return cmd_train_distributed(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    spec = data_mod.load(args.data, batch_size=args.batch_size, data_dir=args.data_dir, device=device,
                         seed=args.seed, download=args.download, in_size=args.in_size)
    model = models.build(args.model, num_classes=spec.num_classes, block_size=args.block_size, stages=args.stages,
                         aux=args.aux, in_size=spec.in_size, in_channels=spec.in_channels, width=args.width,
                         depth=args.depth, hidden=args.hidden)

    def optimizer(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    slowdown = {}
    for item in args.slowdown:
        try:
            stage, noise = item.split(":")
            slowdown[int(stage)] = float(noise)
        except ValueError as exc:
            raise ValueError(f"--slowdown expects STAGE:NOISE such as 3:0.1, got {item!r}") from exc
    step, decay = args.lr_step, args.lr_decay
    trainer = Trainer(model, optimizer=optimizer, mode=args.mode, device=device,
                      lr_schedule=lambda e: decay ** (e // step), buffer_capacity=args.buffer_capacity,
                      policy=args.policy, max_reuse=args.max_reuse, slowdown=slowdown, schedule=args.schedule,
                      buffer_dtype=getattr(torch, args.buffer_dtype) if args.buffer_dtype else None, seed=args.seed,
                      engine=args.engine, cuda_graphs=args.cuda_graphs, amp=args.amp, channels_last=args.channels_last)
    if args.resume:
        trainer.load(args.resume)
        print(f"resumed from {args.resume} at epoch {trainer.epoch}", file=sys.stderr)
    n_params = sum(p.numel() for p in model.stages.parameters())
    n_aux = sum(p.numel() for p in model.heads.parameters())
    print(f"dgl_fast: {args.model} K={model.num_stages} aux={args.aux} mode={args.mode} on {device} "
          f"(engine {trainer.engine_name}{', CUDA graphs' if trainer.cuda_graphs else ''}); "
          f"{spec.name}: {len(spec.train)} batches/epoch; trunk {n_params / 1e6:.2f}M params, heads {n_aux / 1e6:.2f}M",
          file=sys.stderr)

    out = args.out
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    def on_epoch(record: dict) -> None:
        acc = record.get("test_acc") or record["train_acc"]
        shown = " ".join(f"{100 * a:.2f}" if a is not None else "-" for a in acc)
        stage = f" (stage {record['stage']})" if record["stage"] else ""
        print(f"epoch {record['epoch']}{stage}: lr {record['lr']:.4g}, {record['images_per_s']:.0f} img/s, "
              f"{'test' if 'test_acc' in record else 'train'} accuracy per stage (%): {shown}", file=sys.stderr)
        if out:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            trainer.save(os.path.join(out, "checkpoint.pt"))
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

    from . import data as data_mod  # noqa: PLC0415
    from . import models  # noqa: PLC0415
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
        spec = data_mod.load(args.data, batch_size=args.batch_size, data_dir=args.data_dir, device=device,
                             seed=args.seed, download=args.download, in_size=args.in_size)
        model = models.build(args.model, num_classes=spec.num_classes, block_size=args.block_size, stages=args.stages,
                             aux=args.aux, in_size=spec.in_size, in_channels=spec.in_channels, width=args.width,
                             depth=args.depth, hidden=args.hidden)
        full = copy.deepcopy(model)

        def optimizer(params):
            return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

        ddgl = DistributedDGL(model, optimizer=optimizer, device=device)
        print(f"rank {rank}: stages {[j + 1 for j in ddgl.stages]} of {model.num_stages} on {device}", file=sys.stderr)
        step, decay = args.lr_step, args.lr_decay
        start = time.perf_counter()
        records = ddgl.fit(spec.train if ddgl.is_first else None, epochs=args.epochs,
                           lr_schedule=lambda e: decay ** (e // step))
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
    parser = argparse.ArgumentParser(prog="python -m dgl_fast", description="dgl_fast: fast Decoupled Greedy Learning")
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
        try:
            return cmd_train(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "info":
        from ._native import build_config  # noqa: PLC0415

        print(json.dumps(build_config(), indent=1))
        return 0
    return 2
