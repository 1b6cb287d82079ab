"""Memory of a training step, DGL against end-to-end backprop, on the paper's networks.

For VGG-13 (K = 4, ``mlp-sr`` heads) and the aux-study net (K = 6) at batch 32, 128 and 512, fp32
and bf16 autocast: :func:`dgl_fast.memory.memory_report` counts parameters, gradients, SGD
momentum, hand-offs and the activations autograd saves for the backward, per stage, and the
totals of the sequential DGL engine, the pipelined (streams) engine and backprop on the same
network, with the heads on dgl_fast's fused ops as on a GPU. Exact byte counts of the tensors
(device-independent up to the kernels' choice of what to save); workspaces and allocator overhead
are not included (``bench overlap`` measures GPU peaks).

    python -m dgl_fast bench memory            # writes benchmarks/results/memory-<device>.json and .md
    python -m dgl_fast bench memory --quick    # a small net, batch 8 (smoke run)
"""

from __future__ import annotations

import sys

import torch

import dgl_fast

from .common import command_line, env_header, md_header, md_table, parser, publish

CONFIGS = [("vgg13", dict(block_size=3)), ("aux-study", dict())]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def measure(name, kw, batch, precision, device, quick) -> dict:
    torch.manual_seed(0)
    in_size = 8 if quick else 32
    build = dict(num_classes=10, in_size=in_size, aux="mlp-sr", **kw)
    if quick:
        build.update(depth=3, width=8)
    model = dgl_fast.models.build(name, **build)
    for head in model.heads:  # the fused ops, as on a GPU (on the CPU heads default to plain modules)
        if isinstance(head, dgl_fast.AuxHead):
            head.fused = True
    trainer = dgl_fast.Trainer(model, optimizer=sgd, device=device, amp="bf16" if precision == "bf16" else None)
    x = torch.randn(batch, 3, in_size, in_size)
    y = torch.randint(0, 10, (batch,))
    r = trainer.memory_report(x, y)
    return {"config": f"{name}-k{model.num_stages}", "K": model.num_stages, "batch": batch, "precision": precision,
            **r.as_dict(), "head_params": sum(p.numel() * p.element_size() for h in model.heads[:-1] for p in h.parameters())}


def mib(n) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(header, rows) -> str:
    lines = md_header(header, "Memory of a training step: DGL against end-to-end backprop",
                      "MiB of parameters, gradients, SGD momentum, hand-offs and saved activations "
                      "(`dgl_fast.memory.memory_report`; no workspaces or allocator overhead).")

    def row(r):
        biggest = max(s["input"] + s["saved_stage"] + s["saved_head"] + s["output"] for s in r["stages"])
        return [r["config"], r["K"], r["batch"], r["precision"], mib(r["dgl_sequential"]), mib(r["dgl_pipelined"]),
                mib(r["backprop"]), f"{r['dgl_sequential'] / r['backprop']:.2f}", mib(r["head_params"]), mib(biggest)]

    lines += md_table(["config", "K", "batch", "precision", "DGL sequential", "DGL pipelined", "backprop",
                       "sequential / backprop", "aux-head params", "largest stage step"], map(row, rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = parser("memory", __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batches = [8] if args.quick else [int(b) for b in args.batches.split(",")]
    configs = CONFIGS[1:] if args.quick else CONFIGS
    rows = [measure(name, kw, b, prec, device, args.quick)
            for name, kw in configs for b in batches for prec in args.precisions.split(",")]
    header = env_header(device, command_line(p, argv))
    return publish(args, "memory", device, {"header": header, "rows": rows}, markdown(header, rows))


if __name__ == "__main__":
    sys.exit(main())
