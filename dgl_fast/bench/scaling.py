"""Scaling of DGL beyond one device: measured where the devices exist, predicted from measured
stage times where they do not, against end-to-end backprop with data parallelism.

1. **Stage profile** (``--device``): each stage step's time and hand-off size
   (:func:`dgl_fast.balancing.balance`), the measured single-device throughput of DGL and of
   backprop, and for k = 1..K stage groups the throughput they predict: the batch over the
   slowest group (compute bound) and over the largest hand-off at each ``--link-gbs`` link
   bandwidth (link bound), next to backprop + DDP on k devices (each device a full batch; the
   all-reduce of every gradient, 2(k-1)/k x the parameter bytes, without and with overlap).
2. **Protocol overhead** (CPU, gloo): the model split over ``--world`` processes
   (:class:`dgl_fast.distributed.DistributedDGL`, one thread each) against the pipeline time
   the same processes' stage times predict (fill and drain included).
3. **Replicas** (CPU, gloo): one stage group x ``--replica-world`` replicas (each process trains
   the whole model on its share of every batch): the collectives a step starts (all-reduces of
   gradients, all-gathers of the rows' batch sizes), the gradient bytes they carry and the time a
   step takes. The replicas are averaged by DDP (bucketed all-reduces from its reducer, through
   :func:`dgl_fast.distributed.replicas.weighted_allreduce`); the hand-made averaging DDP replaced
   (one all-reduce per parameter, commit 865936d) was measured once on the same machine with the
   same section (``--replicas-only``) and is shown beside it from
   ``benchmarks/results/scaling_replicas_handmade-<device>.json`` where that file exists.
4. **Several GPUs** (where ``torch.cuda.device_count() >= 2``): ``Trainer(devices=[...])`` on
   k = 1..N GPUs against backprop with DDP (NCCL) on the same GPUs; otherwise reported as not
   measured.

    python -m dgl_fast bench scaling --device cuda           # writes benchmarks/results/scaling-<device>.*
    python -m dgl_fast bench scaling --quick                 # a small net (smoke run, CI)
    python -m dgl_fast bench scaling --replicas-only         # section 3 alone: scaling_replicas-<device>.*
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dgl_fast
from dgl_fast.balancing import balance, group_times, partition

from .common import command_line, env_header, md_header, md_table, parser, publish


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def build(name: str, quick: bool, seed: int = 0) -> dgl_fast.DecoupledModel:
    """``name``: ``vgg13`` (block size 3), ``vgg13@B`` (block size B) or ``aux-study``."""
    torch.manual_seed(seed)
    if quick:
        return dgl_fast.models.build("aux-study", num_classes=10, in_size=8, depth=4, width=8, aux="mlp")
    name, _, block = name.partition("@")
    kw = dict(block_size=int(block or 3)) if name.startswith("vgg") else {}
    return dgl_fast.models.build(name, num_classes=10, in_size=32, aux="mlp-sr", **kw)


def batch_of(model, B: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B, *model.input_shape), generator=g).to(device),
            torch.randint(0, 10, (B,), generator=g).to(device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_throughput(model, mode: str, device, B: int, steps: int, **kw) -> float:
    """Images per second of ``Trainer(mode=...)`` steps on one fixed batch (after warm-up)."""
    tr = dgl_fast.Trainer(model, optimizer=sgd, mode=mode, device=device, **kw)
    x, y = batch_of(model, B, tr.device)
    for _ in range(3):
        tr.step(x, y)
    tr.flush()
    _sync(tr.device)
    start = time.perf_counter()
    for _ in range(steps):
        tr.step(x, y)
    tr.flush()
    _sync(tr.device)
    return steps * B / (time.perf_counter() - start)


def predictions(prof, bp_ips: float, param_bytes: int, link_gbs: list[float], B: int) -> list[dict]:
    """Predicted images/s for k = 1..K groups (DGL) and k devices (backprop + DDP)."""
    rows, K = [], len(prof.stage_times_s)
    for k in range(1, K + 1):
        place = partition(prof.stage_times_s, k)
        slowest = max(group_times(prof.stage_times_s, place))
        cut = max([prof.handoff_bytes[j] for j in range(K - 1) if place[j] != place[j + 1]] or [0])
        row = {"k": k, "placement": place, "dgl_compute": B / slowest, "speedup": sum(prof.stage_times_s) / slowest}
        t_bp = B / bp_ips
        for gbs in link_gbs:
            link = cut * 2 / (gbs * 1e9)  # activations and, as large again at most, nothing back: one copy + headroom
            row[f"dgl_{gbs:g}"] = B / max(slowest, link)
            comm = 2 * (k - 1) / k * param_bytes / (gbs * 1e9)
            row[f"ddp_{gbs:g}"] = k * B / (t_bp + comm)
            row[f"ddp_overlap_{gbs:g}"] = k * B / max(t_bp, comm)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- gloo processes on the CPU

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, name, quick, B, batches, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model = build(name, quick)
        prof = balance(model, batch_of(model, B, "cpu"), 1, optimizer=sgd, repeats=3)  # 1 thread, this process
        times = [None] * world
        dist.all_gather_object(times, prof.stage_times_s)
        stage_times = [sum(t[j] for t in times) / world for j in range(model.num_stages)]
        placement = partition(stage_times, world)
        ddgl = dgl_fast.distributed.DistributedDGL(model, optimizer=sgd, placement=placement, timeout=300)
        data = [batch_of(model, B, "cpu", seed=i) for i in range(batches)] if ddgl.feeds else None
        ddgl.fit(data[:2] if data else None, epochs=1)  # warm-up epoch
        dist.barrier()
        start = time.perf_counter()
        ddgl.fit(data, epochs=2)
        wall = time.perf_counter() - start
        if rank == 0:
            groups = group_times(stage_times, placement)
            predicted = (batches - 1) * max(groups) + sum(groups)
            torch.save({"world": world, "placement": placement, "wall_s": wall, "predicted_s": predicted,
                        "ips": batches * B / wall, "predicted_ips": batches * B / predicted,
                        "single_ips": B / sum(stage_times)}, out)
    finally:
        dist.destroy_process_group()


def gloo_overhead(name, quick, B, world, batches, tmp) -> dict:
    out = os.path.join(tmp, f"gloo-{world}.pt")
    mp.spawn(_gloo_worker, args=(world, _free_port(), name, quick, B, batches, out), nprocs=world, join=True)
    return torch.load(out)


# ---------------------------------------------------------------------- replicas

def _replica_worker(rank, world, port, name, quick, B, steps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    counts = {"all_reduce": 0, "all_gather": 0, "bytes": 0}
    real = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def counting(kind):
        def call(*args, **kw):
            counts[kind] += 1
            if kind == "all_reduce":
                counts["bytes"] += args[0].numel() * args[0].element_size()
            return real[kind](*args, **kw)
        return call

    import dgl_fast.distributed.replicas as replicas  # noqa: PLC0415

    ddp = sharded = hasattr(replicas, "weighted_allreduce")  # the library this section runs against
    try:
        model = build(name, quick)
        ddgl = dgl_fast.distributed.DistributedDGL(model, optimizer=sgd, placement=[0] * model.num_stages,
                                                   replicas=world, timeout=300)
        data = [batch_of(model, B, "cpu", seed=i) for i in range(steps)]
        if sharded:  # this library's rows load their own share (the hand-made one kept 1/R of every batch)
            share = B // world
            data = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in data]
        ddgl.fit(data[:2], epochs=1)  # warm-up epoch (DDP's first steps build its buckets)
        dist.barrier()
        dist.all_reduce, dist.all_gather = counting("all_reduce"), counting("all_gather")
        start = time.perf_counter()
        ddgl.fit(data, epochs=2)  # epochs counts from the start: one more epoch
        wall = time.perf_counter() - start
        dist.all_reduce, dist.all_gather = real["all_reduce"], real["all_gather"]
        if rank == 0:
            params = sum(q.numel() for s in model.stages for q in s.parameters()) + sum(
                q.numel() for h in model.heads for q in h.parameters())
            torch.save({"averaging": "DDP, bucketed" if ddp else "hand-made, one all-reduce per parameter",
                        "world": world, "batch": B, "steps": steps, "parameters": params,
                        "tensors": sum(1 for s in (*model.stages, *model.heads) for _ in s.parameters()),
                        "all_reduce_per_step": counts["all_reduce"] / steps,
                        "all_gather_per_step": counts["all_gather"] / steps,
                        "mib_per_step": counts["bytes"] / steps / 2**20, "ms_per_step": 1e3 * wall / steps}, out)
    finally:
        dist.destroy_process_group()


def replica_traffic(name, quick, B, world, steps, tmp) -> dict:
    """Section 3, measured in ``world`` gloo processes (rank 0's counts; every replica starts the same)."""
    out = os.path.join(tmp, f"replicas-{world}.pt")
    mp.spawn(_replica_worker, args=(world, _free_port(), name, quick, B, steps, out), nprocs=world, join=True)
    return torch.load(out)


def handmade_baseline(out_dir: str, device, config: str, B: int, world: int) -> dict | None:
    """The hand-made averaging's figures measured with the same section at commit 865936d, where
    ``scaling_replicas_handmade-<device>.json`` exists for the same model, batch and replica count."""
    path = os.path.join(out_dir, f"scaling_replicas_handmade-{device.type}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    rep = saved.get("replicas", {})
    if saved.get("config") != config or rep.get("batch") != B or rep.get("world") != world:
        return None
    return {**rep, "header": saved["header"], "file": os.path.basename(path)}


def replica_lines(r) -> list[str]:
    rep, base = r["replicas"], r.get("replicas_baseline")
    lines = ["## Replicas on gloo (measured)", "",
             f"{rep['world']} processes, one stage group x {rep['world']} replicas, batch {rep['batch']} "
             f"(each replica {rep['batch'] // rep['world']} samples), {rep['steps']} steps; the model has "
             f"{rep['parameters']} parameters in {rep['tensors']} tensors. Collectives counted on rank 0 "
             "(``dist.all_reduce`` / ``dist.all_gather`` calls).", ""]
    rows = [[f"{rep['averaging']} (this run)", rep]]
    if base:
        h = base["header"]
        rows.append([f"{base['averaging']} (commit 865936d; {base['file']}, {h.get('date', '?')})", base])
    lines += md_table(["averaging", "all-reduces / step", "all-gathers / step", "gradient MiB / step", "ms / step"],
                      [[n, f"{x['all_reduce_per_step']:.1f}", f"{x['all_gather_per_step']:.1f}",
                        f"{x['mib_per_step']:.2f}", f"{x['ms_per_step']:.1f}"] for n, x in rows])
    if not base and "replicas_baseline" in r:
        lines += ["", "The hand-made averaging's figures for this configuration were not found beside the results."]
    return lines + [""]


# ---------------------------------------------------------------------- several GPUs

def _ddp_worker(rank, world, port, name, B, steps, out):
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        model = build(name, False).cuda()
        net = torch.nn.Sequential(*model.stages, model.heads[-1])
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rank])
        opt = sgd(ddp.parameters())
        x, y = batch_of(model, B, torch.device("cuda", rank))
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                dist.barrier()
                start = time.perf_counter()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if rank == 0:
            torch.save({"ips": world * B * steps / (time.perf_counter() - start)}, out)
    finally:
        dist.destroy_process_group()


def multi_gpu(name, B, steps, tmp) -> list[dict]:
    rows = []
    for k in range(1, torch.cuda.device_count() + 1):
        model = build(name, False)
        devices = [f"cuda:{i}" for i in range(k)]
        dgl_ips = trainer_throughput(model, "dgl", None, B, steps, devices=devices) if k > 1 else \
            trainer_throughput(model, "dgl", "cuda:0", B, steps)
        out = os.path.join(tmp, f"ddp-{k}.pt")
        mp.spawn(_ddp_worker, args=(k, _free_port(), name, B, steps, out), nprocs=k, join=True)
        rows.append({"k": k, "dgl_ips": dgl_ips, "ddp_ips": torch.load(out)["ips"]})
    return rows


# ---------------------------------------------------------------------- report

def markdown(header, r) -> str:
    gbs = r["link_gbs"]
    lines = md_header(header, f"Scaling beyond one device: {r['config']}",
                      f"Batch {r['batch']}. Stage profile on this device; k devices **predicted** from it unless "
                      "a table says measured. Link columns use the named bandwidth (GB/s) as a nominal figure.")
    lines += ["## Stage profile (measured)", ""]
    lines += md_table(["stage", "step ms", "hand-off KiB"],
                      [[j + 1, f"{1e3 * t:.3f}", f"{b / 1024:.1f}"] for j, (t, b) in
                       enumerate(zip(r["stage_times_s"], r["handoff_bytes"]))])
    lines += ["", f"Measured on one device: DGL {r['dgl_ips']:.1f} img/s, backprop {r['bp_ips']:.1f} img/s.", "",
              "## Predicted for k devices (img/s)", ""]
    heads = ["k", "placement", "DGL compute bound", "speedup (sum / slowest)", "efficiency"]
    heads += [f"DGL, link {g:g}" for g in gbs] + [f"backprop+DDP {g:g} (no overlap / overlap)" for g in gbs]
    rows = [[p["k"], p["placement"], f"{p['dgl_compute']:.1f}", f"{p['speedup']:.2f}x", f"{p['speedup'] / p['k']:.2f}"]
            + [f"{p[f'dgl_{g:g}']:.1f}" for g in gbs]
            + [f"{p[f'ddp_{g:g}']:.1f} / {p[f'ddp_overlap_{g:g}']:.1f}" for g in gbs] for p in r["predicted"]]
    lines += md_table(heads, rows)
    lines += ["", "## gloo processes on the CPU (measured, one thread each)", ""]
    lines += md_table(["processes", "placement", "img/s measured", "img/s predicted", "measured / predicted",
                       "one process (predicted from the same stage times)"],
                      [[g["world"], g["placement"], f"{g['ips']:.1f}", f"{g['predicted_ips']:.1f}",
                        f"{g['ips'] / g['predicted_ips']:.2f}", f"{g['single_ips']:.1f}"] for g in r["gloo"]])
    lines += [""] + (replica_lines(r) if r.get("replicas") else [])
    lines += ["## Several GPUs (measured)", ""]
    if r["multi_gpu"]:
        lines += md_table(["GPUs", "DGL img/s", "backprop+DDP img/s", "DGL / DDP"],
                          [[m["k"], f"{m['dgl_ips']:.1f}", f"{m['ddp_ips']:.1f}", f"{m['dgl_ips'] / m['ddp_ips']:.2f}"]
                           for m in r["multi_gpu"]])
    else:
        lines.append(f"Not measured: this machine has {torch.cuda.device_count()} GPU(s); the section needs two or more.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = parser("scaling", __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vgg13", help="vgg13 (K=4 at block size 3) or aux-study (K=6)")
    p.add_argument("--block-size", type=int, default=3, help="VGG layers per stage (3: K=4; 1: K=10); results of "
                   "another than 3 go to scaling_<model>_b<size>-<device>.*")
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 32 on the CPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--world", default="2,4", help="gloo process counts (CPU section; those above the core count "
                   "are left out)")
    p.add_argument("--gloo-batches", type=int, default=12)
    p.add_argument("--link-gbs", default="25,450", help="link bandwidths (GB/s) of the predictions: e.g. a 200 Gb/s "
                   "network, NVLink 4 per direction")
    p.add_argument("--replica-world", type=int, default=2, help="processes of the replicas section (section 3)")
    p.add_argument("--replicas-only", action="store_true", help="section 3 alone, to scaling_replicas-<device>.*")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    B = args.batch or (8 if args.quick else 128 if device.type == "cuda" else 32)
    steps = 3 if args.quick else args.steps
    link = [float(g) for g in args.link_gbs.split(",")]
    if args.block_size != 3 and not args.model.startswith("vgg"):
        p.error("--block-size applies to VGG models")
    spec = f"{args.model}@{args.block_size}" if args.model.startswith("vgg") else args.model
    if args.replica_world < 2:
        p.error(f"--replica-world must be 2 or more, got {args.replica_world}")
    config = "aux-study (quick, K=4)" if args.quick else f"{spec}, K={build(spec, True).num_stages}"
    rep_batch = 4 * args.replica_world if args.quick else (args.batch or 32)
    if args.replicas_only:
        import tempfile  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            r = {"config": config, "replicas": replica_traffic(spec, args.quick, rep_batch, args.replica_world,
                                                                steps, tmp)}
        header = env_header(device, command_line(p, argv))
        handmade = r["replicas"]["averaging"].startswith("hand-made")  # run against commit 865936d
        note = ("Run with this section's code against the library of commit 865936d (before DDP replaced its "
                "averaging), as the baseline of `bench scaling`'s replicas table." if handmade else "")
        md = "\n".join(md_header(header, f"Replicas on gloo: {config}", note) + replica_lines(r))
        return publish(args, "scaling_replicas_handmade" if handmade else "scaling_replicas", device,
                       {"header": header, **r}, md)
    model = build(spec, args.quick)
    prof = balance(model, batch_of(model, B, "cpu"), 1, optimizer=sgd, device=device, repeats=3 if args.quick else 7)
    param_bytes = sum(q.numel() * q.element_size() for s in model.stages for q in s.parameters())
    r = {"config": config, "batch": B,
         "link_gbs": link, "stage_times_s": prof.stage_times_s, "handoff_bytes": prof.handoff_bytes,
         "dgl_ips": trainer_throughput(build(spec, args.quick), "dgl", device, B, steps),
         "bp_ips": trainer_throughput(build(spec, args.quick), "backprop", device, B, steps)}
    r["predicted"] = predictions(prof, r["bp_ips"], param_bytes, link, B)
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        # at most one process per core: more would measure the oversubscription, not the protocol
        worlds = [int(w) for w in args.world.split(",") if int(w) <= min(model.num_stages, os.cpu_count() or 1)]
        gb = 3 if args.quick else args.gloo_batches
        r["gloo"] = [gloo_overhead(spec, args.quick, B if device.type == "cpu" else 32, w, gb, tmp) for w in worlds]
        r["replicas"] = replica_traffic(spec, args.quick, rep_batch, args.replica_world, steps, tmp)
        r["replicas_baseline"] = handmade_baseline(args.out_dir, torch.device("cpu"), config, rep_batch,
                                                   args.replica_world)
        r["multi_gpu"] = multi_gpu(spec, B, steps, tmp) if torch.cuda.device_count() >= 2 else []
    header = env_header(device, command_line(p, argv))
    name = "scaling" if args.block_size == 3 else f"scaling_{args.model}_b{args.block_size}"
    return publish(args, name, device, {"header": header, **r}, markdown(header, r))


if __name__ == "__main__":
    sys.exit(main())
