"""Held-out accuracy of the README's main command, with end-to-end backprop on the same data as
the baseline, and the same DGL job in other layouts and precisions, in one run (same seed, same
batches): benchmarks/results/accuracy_mnist5k-<device>.json and .md.

    python -m dgl_fast bench accuracy            # about 6 minutes on 2 CPU cores
    python -m dgl_fast bench accuracy --quick    # 1 epoch, a smaller net (smoke run)
    python -m dgl_fast bench accuracy --variants dgl,backprop

Variants: ``dgl`` (the README's command as it runs by default: channels_last where it is faster),
``dgl-nchw`` (``--no-channels-last``: the layout of the authors' code, float32), ``dgl-bf16``
(``--amp bf16``, channels_last by default) and ``backprop`` (``--mode backprop``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from .. import cli
from ..utils import cpu_features
from .common import command_line, env_header, md_header, md_table, parser, publish

VARIANTS = {
    "dgl": ["--mode", "dgl"],
    "dgl-nchw": ["--mode", "dgl", "--no-channels-last"],
    "dgl-bf16": ["--mode", "dgl", "--amp", "bf16"],
    "backprop": ["--mode", "backprop"],
}


def run(flags: list[str], extra: list[str], device: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["train", *flags, "--device", device, "--out", out, "--no-progress", *extra]
        if cli.main(args) != 0:
            raise RuntimeError(f"training failed: {args}")
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = parser("accuracy", __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"argument --variants: expected some of {list(VARIANTS)}, got {args.variants!r}")
    config = (["--model", "aux-study", "--depth", "2", "--width", "8", "--epochs", "1"] if args.quick else
              ["--model", "aux-study", "--depth", "4", "--width", "64", "--epochs", "5", "--lr-step", "3"])
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    if device.type == "cpu":
        header["cpu_features"] = cpu_features()
    runs = {name: run(VARIANTS[name], config, args.device) for name in names}
    lines = md_header(header, "Held-out accuracy on mnist5k (1,000 test digits)",
                      f"Config: `python -m dgl_fast train {' '.join(config)}` plus each variant's flags, seed 0, "
                      "the same batches; backprop trains the same network end to end through its last head.")
    lines += md_table(["variant", "flags", "layout", "test accuracy (last stage)", "per stage", "ensemble", "train time s"],
                      [[name, " ".join(VARIANTS[name]), "channels_last" if r.get("channels_last") else "NCHW",
                        f"{100 * r['test_acc']:.2f} %", " / ".join(f"{100 * a:.1f}" for a in r["test_acc_per_stage"]),
                        f"{100 * r['test_acc_ensemble']:.2f} %", f"{r['train_time_s']:.0f}"] for name, r in runs.items()])
    md = "\n".join(lines) + "\n"
    return publish(args, "accuracy_mnist5k", device, {"header": header, "config": config, "runs": runs}, md)


if __name__ == "__main__":
    sys.exit(main())
