"""Held-out accuracy of the README's main command, with end-to-end backprop on the same data as
the baseline, in one run: benchmarks/results/accuracy_mnist5k-<device>.json and .md.

    python -m dgl_fast bench accuracy            # about 3 minutes on 2 CPU cores
    python -m dgl_fast bench accuracy --quick    # 1 epoch, a smaller net (smoke run)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from .. import cli
from .common import command_line, env_header, md_header, md_table, parser, publish


def run(mode: str, extra: list[str], device: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["train", "--mode", mode, "--device", device, "--out", out, "--no-progress", *extra]
        if cli.main(args) != 0:
            raise RuntimeError(f"training failed: {args}")
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = parser("accuracy", __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    config = (["--model", "aux-study", "--depth", "2", "--width", "8", "--epochs", "1"] if args.quick else
              ["--model", "aux-study", "--depth", "4", "--width", "64", "--epochs", "5", "--lr-step", "3"])
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    runs = {mode: run(mode, config, args.device) for mode in ("dgl", "backprop")}
    lines = md_header(header, "Held-out accuracy on mnist5k (1,000 test digits)",
                      f"Config: `python -m dgl_fast train {' '.join(config)}`, seed 0; backprop trains the same "
                      "network end to end through its last head.")
    lines += md_table(["mode", "test accuracy (last stage)", "per stage", "ensemble", "train time s"],
                      [[mode, f"{100 * r['test_acc']:.2f} %", " / ".join(f"{100 * a:.1f}" for a in r["test_acc_per_stage"]),
                        f"{100 * r['test_acc_ensemble']:.2f} %", f"{r['train_time_s']:.0f}"] for mode, r in runs.items()])
    md = "\n".join(lines) + "\n"
    return publish(args, "accuracy_mnist5k", device, {"header": header, "config": config, "runs": runs}, md)


if __name__ == "__main__":
    sys.exit(main())
