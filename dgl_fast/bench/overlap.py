"""Stage overlap: DGL on the stage engine against end-to-end backprop and the authors' way.

    python -m dgl_fast bench overlap            # full run on the GPU: benchmarks/results/overlap-<gpu>.*
    python -m dgl_fast bench overlap --quick    # tiny model, CPU-friendly smoke run

For each model split (VGG-13 K=4, K=2, K=8; aux-study K=6), batch (32, 128, 512) and precision
(fp32 with TF32 allowed as PyTorch allows it, bf16 autocast + channels_last), in one run on one GPU:
  - backprop eager / backprop in one CUDA graph (end-to-end, last head's loss, one SGD);
  - DGL the authors' way (stage after stage, eager, a host sync per stage for its loss);
  - DGL with one CUDA graph per stage, all on one stream / on K streams (the pipelined engine);
  - async DGL (replay buffers, one stage at a time, eager; and on CUDA, every stage on its own
    stream replaying one CUDA graph per stage step);
images per second, ratios to each baseline, overlap efficiency (one-stream time / K-stream time),
each stage's graph time alone, and peak memory. Also a PNG timeline of a pipelined window and a
PNG of the speedup over backprop-in-a-graph per configuration.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

import dgl_fast
from dgl_fast.schedules import GraphSGD

from .common import cell, command_line, env_header, graph_of, md_header, md_table, parser, publish, time_us

CONFIGS = [("vgg13", dict(block_size=3), "vgg13-k4"), ("vgg13", dict(stages=2), "vgg13-k2"),
           ("vgg13", dict(stages=8), "vgg13-k8"), ("aux-study", dict(), "aux-study-k6")]


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_step, n_steps, device, finish=None) -> float:
    """Seconds for n_steps calls of run_step (synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        run_step()
    if finish is not None:
        finish()
    sync(device)
    return time.perf_counter() - t0


def peak_mib(device, fn) -> float | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_config(name, kw, tag, batch, precision, device, steps, warmup, quick):
    amp = "bf16" if precision == "bf16" else None
    cl = precision == "bf16"
    in_size = 8 if quick else 32
    torch.manual_seed(0)
    build = dict(num_classes=10, in_size=in_size, aux="mlp-sr", **kw)
    if quick and name == "aux-study":
        build.update(depth=3, width=8)
    base = dgl_fast.models.build(name, **build)
    K = base.num_stages
    xs = [torch.randn(batch, 3, in_size, in_size, device=device) for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(4)]
    it = {"i": 0}

    def batch_():
        it["i"] += 1
        return xs[it["i"] % 4], ys[it["i"] % 4]

    res = {"config": tag, "K": K, "batch": batch, "precision": precision}
    cuda = device.type == "cuda"

    def trainer(**tkw):
        return dgl_fast.Trainer(copy.deepcopy(base), optimizer=sgd, device=device, amp=amp, channels_last=cl, **tkw)

    # end-to-end backprop, eager
    def bp_eager():
        tr = trainer(mode="backprop", engine="sequential")
        for _ in range(warmup):
            tr.step(*batch_())
        res["backprop_eager"] = steps * batch / timed(lambda: tr.step(*batch_()), steps, device)

    res["mem_backprop_mib"] = peak_mib(device, bp_eager)

    # end-to-end backprop in one CUDA graph
    if cuda:
        tr = trainer(mode="backprop", engine="sequential")
        for _ in range(warmup):
            tr.step(*batch_())
        gs = GraphSGD(tr.optimizers[0])
        sx, sy = xs[0].clone(), ys[0].clone()
        if cl:
            sx = sx.contiguous(memory_format=torch.channels_last)

        def bp_body():
            tr.backprop_step.graph_body(sx, sy, gs)

        tr.optimizers[0].zero_grad(set_to_none=True)
        replay = graph_of(bp_body, device)
        res["backprop_graph"] = steps * batch / timed(replay, steps, device)
        del tr, gs, replay, bp_body, sx, sy  # not counted in the DGL memory below

    # DGL the authors' way: stage after stage, eager, loss.item() per stage
    def authors():
        tr = trainer(mode="dgl", engine="sequential")

        def step(stage_peaks=None):
            x, y = batch_()
            h = x
            for j in range(K):
                if stage_peaks is not None:
                    torch.cuda.reset_peak_memory_stats(device)
                h, loss, _ = tr.steps[j].step(h, y)
                loss.item()
                if stage_peaks is not None:
                    stage_peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)

        for _ in range(warmup):
            step()
        res["dgl_authors_way"] = steps * batch / timed(step, steps, device)
        return step

    step = None

    def dgl_run():
        nonlocal step
        step = authors()

    res["mem_dgl_mib"] = peak_mib(device, dgl_run)  # the whole DGL run's peak (all stages)
    if cuda:  # then each stage's own peak (all weights, optimizer state, its activations, the hand-off)
        res["stage_peak_mib"] = []
        step(res["stage_peak_mib"])
    del step

    if cuda:
        for label, one_stream in (("dgl_graphs_1stream", True), ("dgl_graphs_kstreams", False)):
            tr = trainer(mode="dgl", engine="streams", cuda_graphs=True)
            if one_stream:
                tr.schedule.streams = [tr.schedule.streams[0]] * K
            for _ in range(warmup + K + 4):  # eager warm-up ticks, capture, a few graph ticks
                tr.step(*batch_())
            res[label] = steps * batch / timed(lambda tr=tr: tr.step(*batch_()), steps, device, tr.flush)
            if not one_stream:
                eng = tr.schedule
                res["stage_graph_us"] = [time_us(eng.graph_state[j].graphs[0].replay, device, warmup=3, reps=20)
                                         for j in range(K)]
                res["timeline"] = timeline(tr, batch_, K)
        res["overlap_efficiency"] = res["dgl_graphs_kstreams"] / res["dgl_graphs_1stream"]
    else:  # the CPU twin of the pipeline, for the smoke run
        tr = trainer(mode="dgl", engine="pipeline")
        res["dgl_pipeline_cpu"] = steps * batch / timed(lambda: tr.step(*batch_()), steps, device, tr.flush)

    # async DGL on replay buffers (round robin: every stage trains once per fresh batch): one stage
    # step at a time, eager; and (CUDA) free-running stage streams replaying one graph per stage step
    variants = [("async_dgl", dict(engine="sequential"))]
    if device.type == "cuda" and amp != "fp16":
        variants.append(("async_dgl_graphs_kstreams", dict(engine="streams", cuda_graphs=True)))
    for name, kw in variants:
        tr = trainer(mode="async", buffer_capacity=4, schedule="round_robin", **kw)
        for _ in range(warmup):
            tr.step(*batch_())
        res[name] = steps * batch / timed(lambda tr=tr: tr.step(*batch_()), steps, device)
    best = res.get("dgl_graphs_kstreams", res.get("dgl_pipeline_cpu"))
    for base_name in ("backprop_eager", "backprop_graph", "dgl_authors_way"):
        if base_name in res:
            res[f"speedup_vs_{base_name}"] = best / res[base_name]
    return res


def timeline(tr, batch_, K, ticks=None):
    """Stage spans (ms from the window's start) of a few pipelined ticks on K streams."""
    eng = tr.schedule
    eng.trace = []
    for _ in range(ticks or 2 * K):
        tr.step(*batch_())
    torch.cuda.synchronize()
    t0 = min(eng.trace, key=lambda t: eng.trace[0][2].elapsed_time(t[2]))[2]  # the earliest start
    spans = [(j, b, t0.elapsed_time(s), t0.elapsed_time(e)) for j, b, s, e in eng.trace]
    eng.trace = None
    return spans


def plot(rows, header, base_path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    with_tl = [r for r in rows if r.get("timeline")]
    if with_tl:
        r = next((r for r in with_tl if r["config"] == "vgg13-k4" and r["batch"] == 128), with_tl[0])
        fig, ax = plt.subplots(figsize=(9, 0.6 * r["K"] + 1.5), dpi=120)
        colors = plt.get_cmap("tab10")
        for j, b, s, e in r["timeline"]:
            ax.broken_barh([(s, e - s)], (j - 0.4, 0.8), color=colors(b % 10))
            ax.text((s + e) / 2, j, str(b), ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks(range(r["K"]), [f"stage {j + 1} (stream {j + 1})" for j in range(r["K"])])
        ax.set_xlabel("ms (numbers: batch index)")
        ax.set_title(f"{r['config']} batch {r['batch']} {r['precision']}: one CUDA graph per stage, K streams\n"
                     f"{header['device']}", fontsize=9)
        fig.tight_layout()
        paths.append(base_path + "-timeline.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    key = "speedup_vs_backprop_graph" if any("speedup_vs_backprop_graph" in r for r in rows) else "speedup_vs_backprop_eager"
    fig, ax = plt.subplots(figsize=(10, 4), dpi=120)
    labels = [f"{r['config']}\nB={r['batch']} {r['precision']}" for r in rows]
    ax.bar(range(len(rows)), [r.get(key, 0) for r in rows], color=["C0" if r["precision"] == "fp32" else "C1" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"DGL, one CUDA graph per stage on K streams ({header['device']})", fontsize=9)
    fig.tight_layout()
    paths.append(base_path + "-speedup.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def markdown(header, rows) -> str:
    cols = ["backprop_eager", "backprop_graph", "dgl_authors_way", "dgl_graphs_1stream", "dgl_graphs_kstreams",
            "dgl_pipeline_cpu", "async_dgl", "async_dgl_graphs_kstreams"]
    present = [c for c in cols if any(c in r for r in rows)]
    lines = md_header(header, "Stage overlap",
                      "Images per second (higher is better); speedups of the best DGL engine over each baseline.")

    def row(r):
        mem = (f"{r['mem_dgl_mib']:.0f} / {r['mem_backprop_mib']:.0f}" if r.get("mem_dgl_mib") is not None else "-")
        ratios = ("speedup_vs_backprop_graph", "speedup_vs_dgl_authors_way", "overlap_efficiency")
        return [r["config"], r["K"], r["batch"], r["precision"], *(cell(r, c, ".0f") for c in present),
                *(f"{r.get(k, float('nan')):.2f}" for k in ratios), mem]

    lines += md_table(["config", "K", "batch", "precision", *present, "x backprop graph", "x authors' way",
                       "overlap eff.", "mem DGL / backprop MiB"], map(row, rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = parser("overlap", __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny aux-study model, batch 8, few steps (smoke run)")
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--configs", default=",".join(t for *_, t in CONFIGS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cases", default=None,
                   help="comma-separated CONFIG:BATCH:PRECISION runs (e.g. vgg13-k4:128:fp32) instead of every "
                        "combination of --configs, --batches and --precisions; checked, then replaced by the tiny "
                        "run, with --quick")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    by_tag = {c[2]: c for c in CONFIGS}
    runs = None
    if args.cases:
        runs = []
        for case in (c for c in args.cases.split(",") if c):
            parts = case.split(":")
            if len(parts) != 3 or parts[0] not in by_tag or parts[2] not in ("fp32", "bf16") or not parts[1].isdigit():
                p.error(f"bad --cases entry {case!r}: expected CONFIG:BATCH:PRECISION with CONFIG one of "
                        f"{', '.join(by_tag)} and PRECISION fp32 or bf16")
            runs.append((*by_tag[parts[0]], int(parts[1]), parts[2]))
    if args.quick:
        if runs:
            print(f"--quick: --cases checked ({len(runs)} runs), running the tiny configuration instead", flush=True)
        runs = [("aux-study", dict(), "aux-study-k3", 8, "fp32")]
        steps, warmup = 3, 1
    else:
        if runs is None:
            wanted = set(args.configs.split(","))
            runs = [(*c, int(b), prec) for c in CONFIGS if c[2] in wanted for b in args.batches.split(",")
                    for prec in args.precisions.split(",")]
        steps, warmup = args.steps, 3
    rows = []
    for name, kw, tag, batch, precision in runs:
        rows.append(bench_config(name, kw, tag, batch, precision, device, steps, warmup, args.quick))
        print({k: v for k, v in rows[-1].items() if k != "timeline"}, flush=True)
    return publish(args, "overlap", device, {"header": header, "rows": rows}, markdown(header, rows),
                   extra=lambda base: plot(rows, header, base))


if __name__ == "__main__":
    sys.exit(main())
