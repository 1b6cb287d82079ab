"""Kernel profile of one fused auxiliary-head training step (torch.profiler).

    python benchmarks/gpu_profile.py                       # CUDA: benchmarks/results/profile_aux_head-<gpu>.md/.json
    python benchmarks/gpu_profile.py --out /tmp/prof.md    # somewhere else
    python benchmarks/gpu_profile.py --cpu-dry-run         # the same code on the CPU (CPU ops instead of kernels)

An ``mlp-sr`` AuxHead on dgl_fast's fused ops, input [128, 256, 8, 8] fp32 (VGG-13 K=4, stage 2,
the head of issue 10's target), as a DGL stage trains it: forward, fused softmax-cross-entropy,
backward to the input and every parameter, then a ``torch.optim.SGD`` step (momentum 0.9, weight
decay 5e-4). A few warm-up steps, then ``--steps`` steps under the profiler: every kernel (and
memcpy / memset) on the device with its count, total and mean time, kernels per step, the device
time per step against the wall time per step. On CUDA a second table profiles replays of the same
forward + loss + backward (no optimizer, as ``bench aux_head`` times it) captured in one CUDA graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import dgl_fast
from dgl_fast.bench.common import RESULTS, device_tag, env_header, graph_of, md_header, md_table


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_events(prof, device):
    """(name, microseconds) of every event on the device timeline; on the CPU, of every op's
    self time (the dry run exercises the same table code)."""
    out = []
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                out.append((ev.name, ev.time_range.elapsed_us()))
        elif ev.device_type == torch.autograd.DeviceType.CPU and not ev.name.startswith("step"):
            out.append((ev.name, ev.self_cpu_time_total))
    return out


def launch_calls(prof) -> int:
    """Host-side kernel launches (CUDA runtime/driver launch calls, graph launches)."""
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
    return sum(1 for ev in prof.events() if ev.name in names)


def table(events, steps: int, title: str, wall_us: float, launches: int, cuda: bool) -> tuple[list[str], dict]:
    agg = collections.OrderedDict()
    for name, us in events:
        n, t = agg.get(name, (0, 0.0))
        agg[name] = (n + 1, t + us)
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    total_us = sum(t for _, (_, t) in rows)
    count = sum(n for _, (n, _) in rows)
    what = "kernels" if cuda else "CPU ops (dry run: no device)"
    lines = [f"## {title}", "",
             f"{count / steps:.1f} {what} per step, device time {total_us / steps:.1f} us per step "
             f"(sum of {what}), wall {wall_us:.1f} us per step, {launches / steps:.1f} host launch calls per step.", ""]

    def short(name):
        return (name if len(name) <= 110 else name[:107] + "...").replace("|", "\\|")

    lines += md_table(["kernel", "per step", "total us", "mean us", "% of device time"],
                      [[f"`{short(name)}`", f"{n / steps:.2f}", f"{t:.1f}", f"{t / n:.2f}",
                        f"{100 * t / max(total_us, 1e-9):.1f}"] for name, (n, t) in rows])
    data = {"title": title, "steps": steps, "per_step": count / steps, "device_us_per_step": total_us / steps,
            "wall_us_per_step": wall_us, "launch_calls_per_step": launches / steps,
            "kernels": [{"name": name, "count": n, "total_us": t, "mean_us": t / n} for name, (n, t) in rows]}
    return lines + [""], data


def wall_us(fn, device, n: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cpu-dry-run", action="store_true", help="CPU, a small input, few steps")
    p.add_argument("--kind", default="mlp-sr")
    p.add_argument("--shape", default="128,256,8,8", help="B,C,H,W of the stage output the head reads")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--out", default=None, help="markdown output (a .json beside it); default benchmarks/results/")
    p.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled steps here")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.shape, args.warmup, args.steps = "cpu", "8,16,4,4", 1, 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B, C, H, W = (int(v) for v in args.shape.split(","))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    header = env_header(device)
    torch.manual_seed(0)
    head = dgl_fast.AuxHead(C, (H, W), 10, kind=args.kind, fused=True).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)  # a stage output: its gradient flows back
    y = torch.randint(0, 10, (B,), device=device)

    def train_step():
        loss, _ = head.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(args.warmup):
        train_step()
    wall = wall_us(train_step, device, max(args.steps, 10))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            with record_function(f"step{i}"):
                train_step()
        sync(device)
    title = (f"{args.kind} head, input [{B}, {C}, {H}, {W}] fp32: forward + loss + backward + SGD step, eager "
             f"(fused ops: {head.uses_fused_ops()})")
    lines, eager = table(device_events(prof, device), args.steps, title, wall, launch_calls(prof), cuda)
    result = {"header": header, "shape": [B, C, H, W], "kind": args.kind, "eager": eager}
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)

    if cuda:  # forward + loss + backward captured in one CUDA graph (what bench aux_head times)
        try:
            params = list(head.parameters())

            def fwd_bwd():
                loss, _ = head.loss(x, y)
                return torch.autograd.grad(loss, [x] + params)

            replay = graph_of(fwd_bwd, device)
            for _ in range(args.warmup):
                replay()
            gwall = wall_us(replay, device, 50)
            with profile(activities=activities) as gprof:
                for i in range(args.steps):
                    with record_function(f"step{i}"):
                        replay()
                sync(device)
            glines, graph = table(device_events(gprof, device), args.steps,
                                  "the same forward + loss + backward (no optimizer) in one CUDA graph, replayed",
                                  gwall, launch_calls(gprof), cuda)
            lines += glines
            result["graph"] = graph
        except Exception as exc:  # noqa: BLE001 - the eager table above still counts
            lines += ["## CUDA graph", "", f"capture or replay failed: {type(exc).__name__}: {exc}", ""]
            result["graph_error"] = f"{type(exc).__name__}: {exc}"

    md = "\n".join(md_header(header, "Kernel profile of one fused auxiliary-head training step",
                             "torch.profiler; times in microseconds; TF32 off.") + lines)
    print(md)
    if not args.no_write:
        out = args.out or os.path.join(RESULTS, f"profile_aux_head-{device_tag(device)}.md")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", out, os.path.splitext(out)[0] + ".json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
