"""Replay buffer microbenchmarks and the asynchronous trainer against the authors' way.

    python -m dgl_fast bench replay_buffer             # full run on the GPU, writes benchmarks/results/replay_buffer-<gpu>.*
    python -m dgl_fast bench replay_buffer --quick     # tiny shapes (a smoke run; works on CPU)

Part 1, push and sample: for the buffers of VGG-13 (K=4) and the aux-study net (K=6) at batch 128
and 512, fp32 and bf16 storage: dgl_fast's ops eager and inside a CUDA graph, ``index_copy_`` /
``index_select`` on the same ring, and a host-memory ring like the authors' (pageable copies).
Microseconds (median of CUDA-event timings) and effective GB/s (bytes read + written) against
the device copy bandwidth measured in the same run.

Part 2, asynchronous DGL on the authors' configuration (6-layer aux-study net, ``mlp`` heads of
width 256, batch 128, buffer 30, noise 0.1 on stage 3): stage-steps per second of
``Trainer(mode="async")`` and of ``authors_async.AuthorsAsyncDGL``, same model, same GPU.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

import dgl_fast

from .authors_async import AuthorsAsyncDGL, HostReplayBuffer
from .common import cell, command_line, copy_bandwidth_gbs, env_header, graph_of, md_header, md_table, parser, publish, time_us

STAGE_SHAPES = {  # per-sample outputs of the stages that feed a buffer
    "vgg13-k4": [(128, 16, 16), (256, 8, 8), (512, 2, 2)],
    "aux-study-k6": [(128, 32, 32), (256, 16, 16), (512, 8, 8)],
}


def bench_case(device, net, batch_shape, sdt, capacity, ceiling, reps) -> dict:
    """One buffer shape and storage dtype: dgl_fast ops eager and in a graph, and the baselines."""
    B = batch_shape[0]
    x = torch.randn(batch_shape, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    buf = dgl_fast.ReplayBuffer(capacity, batch_shape, device=device, storage_dtype=sdt)
    for _ in range(capacity):
        buf.push(x, y)
    out = torch.empty(batch_shape, device=device)
    out_y = torch.empty(B, dtype=torch.long, device=device)
    info = torch.empty(2, dtype=torch.long, device=device)
    n = x.numel()
    push_bytes = n * (4 + sdt.itemsize) + B * 16  # read fp32 activations, write storage (+ labels)
    sample_bytes = n * (sdt.itemsize + 4) + B * 16

    def push():
        dgl_fast.ops.replay_push(buf.storage, buf.label_store, buf.state, buf.uses, buf.stamps, x, y)

    def sample():
        dgl_fast.ops.replay_sample(buf.state, buf.uses, buf.stamps, buf.storage, buf.label_store, out, out_y, info)

    slot = torch.tensor([1], device=device)
    xs = x.to(sdt).unsqueeze(0)
    res = {"net": net, "shape": list(batch_shape), "storage": str(sdt).replace("torch.", ""), "batch_mb": n * 4 / 1e6}
    res["push_us"] = time_us(push, device, reps=reps)
    res["sample_us"] = time_us(sample, device, reps=reps)
    res["index_copy_us"] = time_us(lambda: buf.storage.index_copy_(0, slot, xs), device, reps=reps)
    res["index_select_us"] = time_us(lambda: torch.index_select(buf.storage, 0, slot), device, reps=reps)
    if device.type == "cuda":
        res["push_graph_us"] = time_us(graph_of(push, device), device, reps=reps)
        res["sample_graph_us"] = time_us(graph_of(sample, device), device, reps=reps)
        host = HostReplayBuffer(capacity)
        host.push(x, y)
        res["host_push_us"] = time_us(lambda: host.push(x, y), device, reps=max(5, reps // 5))
        res["host_sample_us"] = time_us(lambda: host.sample(device), device, reps=max(5, reps // 5))
    res["push_gbs"] = push_bytes / res["push_us"] / 1e3
    res["sample_gbs"] = sample_bytes / res["sample_us"] / 1e3
    res["push_frac_of_copy"] = res["push_gbs"] / ceiling
    res["sample_frac_of_copy"] = res["sample_gbs"] / ceiling
    return res


def bench_ops(device, shapes_by_net, batches, dtypes, capacity, ceiling, reps):
    return [bench_case(device, net, (B, *shape), sdt, capacity, ceiling, reps)
            for net, shapes in shapes_by_net.items() for shape in shapes for B in batches for sdt in dtypes]


def bench_async(device, batch, capacity, steps, width, quick):
    torch.manual_seed(0)
    size = 8 if quick else 32
    model = dgl_fast.models.build("aux-study", num_classes=10, depth=6, width=width, aux="mlp", hidden=256, in_size=size)

    def opt(p):
        return torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4)

    data = [(torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(8)]
    slowdown = {3: 0.1}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stage_steps_per_s(**kw):
        trainer = dgl_fast.Trainer(copy.deepcopy(model), optimizer=opt, mode="async", device=device,
                                   buffer_capacity=capacity, slowdown=slowdown, **kw)
        i = 0

        def warm():  # buffers filled, every stage past its eager steps (and captured), then steady steps
            graphs = trainer.schedule.graphs
            return (trainer.schedule.warm == model.num_stages - 1 and min(trainer.stage_steps) >= 3
                    and (graphs is None or all(st is not None for st in graphs.stages)))

        while not warm() or i < 5:
            trainer.step(*data[i % len(data)])
            i += 1
            if i > 100 * capacity * model.num_stages:
                raise RuntimeError("async warm-up did not reach every stage")
        sync()
        before = sum(trainer.stage_steps)
        t0 = time.perf_counter()
        while sum(trainer.stage_steps) - before < steps:
            trainer.step(*data[i % len(data)])
            i += 1
        sync()
        return (sum(trainer.stage_steps) - before) / (time.perf_counter() - t0)

    # dgl_fast: the default engine (CPU: stage steps in turn); on CUDA, free-running stage streams,
    # eager and with one CUDA graph per stage step
    variants = {"default": {}}
    if device.type == "cuda":
        variants = {"streams_eager": dict(engine="streams", cuda_graphs=False),
                    "streams_graphs": dict(engine="streams", cuda_graphs=True)}
    ours_by = {name: stage_steps_per_s(**kw) for name, kw in variants.items()}
    ours = max(ours_by.values())

    # the authors' way
    base = AuthorsAsyncDGL(copy.deepcopy(model), opt, capacity, slowdown, device)
    k = iter(range(10**9))

    def fresh():
        return data[next(k) % len(data)]

    base.warm_up(data[i % len(data)] for i in range(10**9))
    while min(base.stage_steps) < 3:  # the last stage too: no cold start inside the timed window
        base.tick(fresh)
    sync()
    before = sum(base.stage_steps)
    t0 = time.perf_counter()
    while sum(base.stage_steps) - before < max(steps // 4, 20):
        base.tick(fresh)
    sync()
    theirs = (sum(base.stage_steps) - before) / (time.perf_counter() - t0)
    return {"config": {"model": "aux-study depth 6", "width": width, "heads": "mlp hidden 256", "batch": batch,
                       "buffer": capacity, "slowdown": slowdown, "in_size": size},
            "dgl_fast_stage_steps_per_s": ours, "dgl_fast_by_engine": ours_by,
            "authors_way_stage_steps_per_s": theirs, "speedup": ours / theirs}


def markdown(header, ceiling, rows, asy) -> str:
    lines = md_header(header, "Replay buffer benchmark",
                      f"Device copy ceiling measured in this run: {ceiling:.0f} GB/s (read + write).")
    baselines = ("push_graph_us", "sample_graph_us", "index_copy_us", "index_select_us", "host_push_us", "host_sample_us")
    lines += md_table(["net", "batch shape", "storage", "push us", "sample us", "push GB/s (% copy)",
                       "sample GB/s (% copy)", "push graph us", "sample graph us", "index_copy_ us", "index_select us",
                       "host push us", "host sample us"],
                      [[r["net"], r["shape"], r["storage"], f"{r['push_us']:.1f}", f"{r['sample_us']:.1f}",
                        f"{r['push_gbs']:.0f} ({100 * r['push_frac_of_copy']:.0f}%)",
                        f"{r['sample_gbs']:.0f} ({100 * r['sample_frac_of_copy']:.0f}%)",
                        *(cell(r, k) for k in baselines)] for r in rows])
    theirs = asy["authors_way_stage_steps_per_s"]
    lines += ["", "## Asynchronous DGL, authors' configuration", "", f"config: {asy['config']}", ""]
    lines += md_table(["dgl_fast Trainer(mode='async')", "stage-steps/s",
                       "the authors' way (host buffer, eager, sync per step)", "speedup"],
                      [[name, f"{rate:.1f}", f"{theirs:.1f}", f"{rate / theirs:.1f}x"]
                       for name, rate in asy["dgl_fast_by_engine"].items()])
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser("replay_buffer", __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (smoke run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    shapes = {"tiny": [(8, 4, 4)]} if args.quick else STAGE_SHAPES
    if args.quick:
        batches, reps, capacity, steps, width = [4], 3, 2, 30, 4
    else:
        batches, reps, capacity, steps, width = [128, 512], 50, 4, 600, 128
    ceiling = copy_bandwidth_gbs(device, 1 << 20 if args.quick else 1 << 28)
    rows = bench_ops(device, shapes, batches, [torch.float32, torch.bfloat16], capacity, ceiling, reps)
    asy = bench_async(device, 4 if args.quick else 128, 3 if args.quick else 30, steps, width, args.quick)
    return publish(args, "replay_buffer", device, {"header": header, "copy_gbs": ceiling, "ops": rows, "async": asy},
                   markdown(header, ceiling, rows, asy))


if __name__ == "__main__":
    sys.exit(main())
