"""One training step of a named model: DGL and backprop through dgl_fast's Trainer in fp32,
channels_last, bf16 autocast and both, against the authors' way of running DGL (stage after
stage, NCHW, float32, one plain SGD per stage and its auxiliary head, the heads as plain PyTorch
modules, ``loss.item()`` per stage), all measured side by side in one process.

    python -m dgl_fast bench step               # the README's job: aux-study depth 4, width 64, b128, 28x28x1
    python -m dgl_fast bench step --model vgg13 --block-size 3 --in-size 32 --in-channels 3 --batch 64
    python -m dgl_fast bench step --quick       # tiny sizes (smoke run)

Each variant runs ``--warmup`` steps, then ``--repeats`` rounds of ``--steps`` steps; the rounds of
all variants are interleaved (round r of every variant, then round r + 1), so that a machine
whose speed drifts slows every variant alike; the figure is the median round. Ratios are to the
authors' way measured in the same run. Writes ``step_<model>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dgl_fast

from .common import command_line, env_header, md_header, md_table, parser, publish

VARIANTS = {  # name: (mode, channels_last, amp)
    "DGL fp32 NCHW": ("dgl", False, None),
    "DGL channels_last": ("dgl", True, None),
    "DGL bf16": ("dgl", False, "bf16"),
    "DGL bf16 + channels_last": ("dgl", True, "bf16"),
    "backprop fp32 NCHW": ("backprop", False, None),
    "backprop bf16 + channels_last": ("backprop", True, "bf16"),
}


def _sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


class AuthorsDGL:
    """DGL as the authors' training loop runs it: for each stage in turn, forward the detached
    input through the block and its auxiliary classifier, cross-entropy, backward, SGD step,
    ``loss.item()`` for the log; NCHW float32 throughout, plain PyTorch heads."""

    def __init__(self, net: dgl_fast.DecoupledModel, device: torch.device):
        self.blocks = [copy.deepcopy(s).to(device).train() for s in net.stages]
        self.heads = [(h.to_reference() if hasattr(h, "to_reference") else copy.deepcopy(h)).to(device).train()
                      for h in net.heads]
        self.opts = [_sgd(list(b.parameters()) + list(h.parameters())) for b, h in zip(self.blocks, self.heads)]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        losses = []
        h = x
        for block, head, opt in zip(self.blocks, self.heads, self.opts):
            opt.zero_grad()
            out = block(h.detach())
            loss = F.cross_entropy(head(out), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            h = out
        return losses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = parser("step", __doc__)
    p.add_argument("--model", default="aux-study")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--aux", default="mlp-sr")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--in-size", type=int, default=28)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"argument --variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    for flag in ("batch", "steps", "repeats", "in_size", "in_channels", "depth", "width"):
        if getattr(args, flag) < 1:
            p.error(f"argument --{flag.replace('_', '-')}: expected a positive int, got {getattr(args, flag)}")
    if args.quick:
        args.depth, args.width, args.batch, args.steps, args.repeats, args.warmup = 2, 8, 16, 1, 2, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device} is not available (torch.cuda.is_available() is False)")
    if device.type == "cuda":  # fp32 means fp32: no TF32 in the products or the convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    header = env_header(device, command_line(p, argv))
    if device.type == "cpu":
        header["cpu_bf16"] = dgl_fast.cpu_features()

    torch.manual_seed(0)
    build = dict(num_classes=10, aux=args.aux, in_size=args.in_size, in_channels=args.in_channels)
    if args.model == "aux-study":
        build.update(depth=args.depth, width=args.width)
    if args.block_size:
        build["block_size"] = args.block_size
    net = dgl_fast.models.build(args.model, **build)
    xs = [torch.randn(args.batch, args.in_channels, args.in_size, args.in_size, device=device) for _ in range(2)]
    ys = [torch.randint(0, 10, (args.batch,), device=device) for _ in range(2)]

    runners = {"authors' way (DGL, NCHW fp32)": AuthorsDGL(net, device).step}
    for name in names:
        mode, cl, amp = VARIANTS[name]
        tr = dgl_fast.Trainer(copy.deepcopy(net), optimizer=_sgd, mode=mode, device=device, engine="sequential",
                              channels_last=cl, amp=amp)
        runners[name] = tr.step
    rounds: dict[str, list[float]] = {k: [] for k in runners}
    it = [0]

    def one_round(fn, n):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            it[0] += 1
            fn(xs[it[0] % 2], ys[it[0] % 2])
        _sync(device)
        return (time.perf_counter() - t0) / n

    for fn in runners.values():
        one_round(fn, args.warmup)
    for _ in range(args.repeats):
        for k, fn in runners.items():
            rounds[k].append(one_round(fn, args.steps))
    ms = {k: 1e3 * statistics.median(v) for k, v in rounds.items()}
    base = "authors' way (DGL, NCHW fp32)"
    rows = [[k, f"{ms[k]:.1f}", f"{ms[base] / ms[k]:.2f}x", f"{args.batch / ms[k] * 1e3:.0f}"] for k in runners]
    what = (f"{args.model}" + (f" depth {args.depth} width {args.width}" if args.model == "aux-study" else "")
            + f", {args.aux} heads, batch {args.batch}, {args.in_channels}x{args.in_size}x{args.in_size}")
    lines = md_header(header, f"One training step: {what}",
                      f"Median of {args.repeats} interleaved rounds of {args.steps} steps after {args.warmup} warm-up "
                      "steps, one process; speed-up = the authors' way's time / this variant's time, same run. "
                      "dgl_fast's variants run the sequential engine (stage after stage, as the authors do).")
    lines += md_table(["variant", "ms / step", "speed-up vs the authors' way", "images / s"], rows)
    md = "\n".join(lines) + "\n"
    payload = {"header": header, "config": vars(args), "ms_per_step": ms, "rounds_s": rounds}
    tag = args.model.replace("-", "_")
    return publish(args, f"step_{tag}", device, payload, md)


if __name__ == "__main__":
    sys.exit(main())
