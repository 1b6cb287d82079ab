"""Local-learning rules against end-to-end backprop on the harness's ResNet-32: step time, memory
and held-out accuracy, in one run.

    python -m dgl_fast bench rules            # ResNet-32 K=16 at the harness's sizes (meant for a GPU)
    python -m dgl_fast bench rules --quick    # CPU: batch-32 steps; a width-4 net trained 1 epoch at batch 32
    python -m dgl_fast bench rules --rules dgl,infopro --epochs 1

**Speed and memory**: the harness's ResNet-32 (widths ``--width`` x (1, 1, 2, 4), ``--in-size``
inputs, 10 classes) cut into ``--local-modules`` K modules with each rule's auxiliary networks
(``dgl``, ``infopro``, ``predsim``, ``auglocal`` with ``aux_net_depth=1``, which the harness
subtracts from K), against ``backprop`` (the harness's BP: the same network as one module, K = 1,
``mode="backprop"``), trained by :class:`~dgl_fast.Trainer` on the ``--engine`` (sequential by
default) with the harness's SGD (Nesterov 0.9, weight decay 1e-4). Inputs are uniform in [0, 1]
(InfoPro is told they are un-normalised). Each configuration runs ``--warmup`` steps, then
``--steps`` timed steps interleaved with the other configurations' (step s of every one, then
step s + 1: a machine whose speed drifts slows every one alike); the figure is the median.
Memory: :func:`dgl_fast.memory.memory_report`'s exact bytes of the step (parameters, gradients,
momentum, hand-offs, saved activations: the sequential engine's total for a rule, backprop's for
backprop; no workspaces or allocator overhead); on CUDA also the allocator's peak over the timed
steps.

**Accuracy**: ``python -m dgl_fast train --model resnet32 --local-modules K --rule R --data
mnist5k --width W --batch-size B --epochs E --seed 0`` for each rule and ``--rule backprop --mode
backprop``, the same seed and batches (the train command's defaults otherwise: SGD lr 0.1, momentum
0.9, weight decay 5e-4); the held-out accuracy of the last module, which is the network's.

Writes ``rules-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import dgl_fast

from .accuracy import run as train_run
from .common import command_line, env_header, md_header, md_table, parser, publish

RULES = ("dgl", "infopro", "predsim", "auglocal")
QUICK = dict(batch=32, warmup=2, steps=5, train_width=4, train_batch=32, epochs=1)
FULL = dict(batch=1024, warmup=5, steps=20, train_width=16, train_batch=128, epochs=10)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _model(rule: str, K: int, width: int, in_size: int) -> dgl_fast.DecoupledModel:
    kw = dict(image_mean=(0.0,) * 3, image_std=(1.0,) * 3) if rule == "infopro" else {}
    return dgl_fast.models.build("resnet32", num_classes=10, rule=rule, local_modules=None if rule == "backprop" else K,
                                 width=width, in_size=in_size, **kw)


def _elapsed_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def speed_and_memory(rules, K, width, in_size, batch, warmup, steps, device, engine) -> dict:
    """Per configuration (each rule, then ``backprop``): K, median step ms, the step's memory."""
    names = [*rules, "backprop"]
    runs = {}
    for name in names:
        torch.manual_seed(0)
        trainer = dgl_fast.Trainer(_model(name, K, width, in_size), optimizer=_sgd, device=device,
                                   mode="backprop" if name == "backprop" else "dgl",
                                   engine="sequential" if name == "backprop" else engine)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(batch, 3, in_size, in_size, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        report = trainer.memory_report(x, y)
        runs[name] = {"trainer": trainer, "x": x, "y": y, "times": [], "row": {
            "rule": name, "K": trainer.model.num_stages, "engine": trainer.engine_name,
            "channels_last": trainer.channels_last,
            "memory_bytes": report.backprop if name == "backprop" else report.dgl_sequential,
            "memory_pipelined_bytes": None if name == "backprop" else report.dgl_pipelined,
            "aux_params": sum(p.numel() for h in trainer.model.heads[:-1] for p in h.parameters())
            if name != "backprop" else 0}}
    for r in runs.values():
        for _ in range(warmup):
            r["trainer"].step(r["x"], r["y"])
    for r in runs.values():  # CUDA: what one step allocates above what is resident (every configuration's state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _elapsed_ms(lambda r=r: (r["trainer"].step(r["x"], r["y"]), r["trainer"].flush()), device)
            r["row"]["cuda_step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    for _ in range(steps):  # interleaved: step s of every configuration, then step s + 1
        for r in runs.values():
            r["times"].append(_elapsed_ms(lambda r=r: (r["trainer"].step(r["x"], r["y"]), r["trainer"].flush()), device))
    out = {}
    for name, r in runs.items():
        row = r["row"]
        row["step_ms"] = statistics.median(r["times"])
        row["step_ms_all"] = [round(t, 3) for t in r["times"]]
        out[name] = row
    return out


def accuracy(rules, K, width, batch, epochs, data, device) -> dict:
    """Held-out accuracy of each rule and backprop through ``python -m dgl_fast train``."""
    base = ["--model", "resnet32", "--width", str(width), "--batch-size", str(batch), "--epochs", str(epochs),
            "--data", data, "--seed", "0"]
    out = {}
    for name in [*rules, "backprop"]:
        flags = (["--rule", "backprop", "--mode", "backprop"] if name == "backprop" else
                 ["--rule", name, "--local-modules", str(K)])
        summary = train_run(flags, base, device)
        out[name] = {"rule": name, "flags": " ".join(flags), "stages": summary["stages"], "test_acc": summary["test_acc"],
                     "test_acc_per_stage": summary["test_acc_per_stage"], "train_time_s": summary["train_time_s"]}
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def markdown(header: dict, cfg: dict, speed: dict, acc: dict) -> str:
    bp, bpa = speed["backprop"], acc["backprop"]
    lines = md_header(header, f"Local-learning rules against backprop: ResNet-32, K = {cfg['local_modules']}",
                      f"Speed and memory: the harness's ResNet-32, widths {cfg['width']}x(1, 1, 2, 4), "
                      f"{cfg['in_size']}x{cfg['in_size']} inputs, batch {cfg['batch']}, engine {cfg['engine']}; "
                      f"median of {cfg['steps']} steps after {cfg['warmup']} warm-up steps, interleaved across "
                      "configurations; memory: `memory_report`'s exact bytes of a step (sequential engine for a rule, "
                      "backprop for backprop; no workspaces). Backprop is the harness's BP: the same network as one "
                      "module.",
                      f"Accuracy: `python -m dgl_fast train --model resnet32 --width {cfg['train_width']} --batch-size "
                      f"{cfg['train_batch']} --epochs {cfg['epochs']} --data {cfg['data']} --seed 0` plus each row's "
                      f"flags (`--rule R --local-modules {cfg['local_modules']}`, or `--rule backprop --mode backprop`), "
                      "same seed and batches; "
                      "held-out accuracy of the last module." + cfg.get("note", ""))
    rows = []
    for name, s in speed.items():
        a = acc[name]
        rows.append([name, s["K"], f"{s['step_ms']:.1f}", f"{s['step_ms'] / bp['step_ms']:.2f}", _mib(s["memory_bytes"]),
                     f"{s['memory_bytes'] / bp['memory_bytes']:.2f}", f"{100 * a['test_acc']:.2f}",
                     f"{100 * (a['test_acc'] - bpa['test_acc']):+.2f}", f"{a['train_time_s']:.0f}"])
    lines += md_table(["rule", "K", "step ms", "x backprop", "memory MiB", "x backprop", "held-out acc %",
                       "vs backprop (points)", "train s"], rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = parser("rules", __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU sizes: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of: " + ", ".join(RULES))
    p.add_argument("--local-modules", type=int, default=16)
    p.add_argument("--engine", default="sequential", choices=["sequential", "pipeline", "streams", "auto"])
    p.add_argument("--width", type=int, default=16, help="speed: stem width (16: the harness's 16/16/32/64)")
    p.add_argument("--in-size", type=int, default=32, help="speed: input side (CIFAR's 32)")
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "digits"], help="accuracy: offline data")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {FULL[key]}, --quick {QUICK[key]}")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules or any(r not in RULES for r in rules):
        p.error(f"argument --rules: expected some of {', '.join(RULES)}, got {args.rules!r}")
    for key in ("local_modules", "width", "in_size", *FULL):
        value = getattr(args, key)
        if value is not None and value < (2 if key == "local_modules" else 1):
            p.error(f"argument --{key.replace('_', '-')}: expected a positive int (K >= 2), got {value}")
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k] for k in FULL}
    cfg = dict(local_modules=args.local_modules, width=args.width, in_size=args.in_size, engine=args.engine,
               data=args.data, quick=args.quick, **sizes)
    if args.quick:
        cfg["note"] = (" --quick: sizes chosen so that the whole benchmark takes about 5 minutes on a shared 2-core "
                       "CPU (speed at the harness's widths, batch 32; accuracy of a width-4 net after one epoch): "
                       "the accuracies rank the rules' early progress, not their final accuracy.")
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    start = time.perf_counter()
    try:
        speed = speed_and_memory(rules, args.local_modules, args.width, args.in_size, sizes["batch"], sizes["warmup"],
                                 sizes["steps"], device, args.engine)
    except ValueError as exc:  # an engine or device the trainer refuses for a rule: one line, exit 2
        p.error(f"{exc} (--engine {args.engine}, --device {args.device})")
    acc = accuracy(rules, args.local_modules, sizes["train_width"], sizes["train_batch"], sizes["epochs"], args.data,
                   args.device)
    cfg["wall_s"] = round(time.perf_counter() - start, 1)
    payload = {"header": header, "config": cfg, "speed": speed, "accuracy": acc}
    return publish(args, "rules", device, payload, markdown(header, cfg, speed, acc))


if __name__ == "__main__":
    sys.exit(main())
