"""Auxiliary-head forward + backward: the fused ops against plain PyTorch, same GPU, same run.

    python -m dgl_fast bench aux_head            # full run on the GPU: benchmarks/results/aux_head-<gpu>.*
    python -m dgl_fast bench aux_head --quick    # tiny shapes, CPU-friendly smoke run

For each stage output of VGG-13 (K=4) and of the aux-study net, at batch 128 and 512, in float32
and under bfloat16 autocast: one training step of the head (forward, cross-entropy, backward to
the input and to every parameter; BatchNorm in training mode) run as
  - reference eager: ``head.to_reference()`` + ``F.cross_entropy``, the way plain PyTorch runs it;
  - reference in one CUDA graph;
  - reference under ``torch.compile``;
  - fused eager: ``AuxHead`` with dgl_fast's ops;
  - fused in one CUDA graph.
TF32 is off for both sides (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` are set False, and the results say so): otherwise the
reference head's 1x1 convolutions would run TF32 in cuDNN while the fused ops' products run full
fp32 in cuBLAS, and the fp32 rows would compare unequal arithmetic.
Microseconds are the median of CUDA-event timings after warm-up. Effective GB/s counts the
unavoidable traffic (read the input and write its gradient once, read the parameters and write
their gradients once) against the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.nn.functional as F

import dgl_fast

from .common import cell, command_line, copy_bandwidth_gbs, env_header, graph_of, md_header, md_table, parser, publish, time_us

STAGES = {"vgg13-k4": [(128, 16), (256, 8), (512, 2)], "aux-study": [(128, 32), (256, 16), (512, 8)]}


def make_step(head_fn, params, x, y, amp):
    """One head training step that returns gradients (no .grad accumulation, so graphs replay)."""
    leaves = [x] + params

    def step():
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = head_fn(x, y)
        return torch.autograd.grad(loss, leaves)

    return step


def bench_case(device, kind, C, s, B, amp, compile_ref, reps):
    torch.manual_seed(0)
    head = dgl_fast.AuxHead(C, s, 10, kind=kind, fused=True).to(device)
    ref_head = copy.deepcopy(head)
    ref = ref_head.to_reference()
    x = torch.randn(B, C, s, s, device=device, requires_grad=True)
    y = torch.randint(0, 10, (B,), device=device)
    params = list(head.parameters())
    ref_params = list(ref_head.parameters())
    n_params = sum(p.numel() for p in params)
    min_bytes = 2 * x.numel() * x.element_size() + 2 * n_params * 4

    def fused_loss(xx, yy):
        return head.loss(xx, yy)[0]

    def ref_loss(xx, yy):
        return F.cross_entropy(ref(xx), yy)

    res = {"kind": kind, "shape": [B, C, s, s], "dtype": "bf16-autocast" if amp else "fp32", "params": n_params,
           "min_mb": min_bytes / 1e6}
    ref_step = make_step(ref_loss, ref_params, x, y, amp)
    fused_step = make_step(fused_loss, params, x, y, amp)
    res["ref_eager_us"] = time_us(ref_step, device, reps=reps)
    res["fused_eager_us"] = time_us(fused_step, device, reps=reps)
    if device.type == "cuda":
        res["ref_graph_us"] = time_us(graph_of(ref_step, device), device, reps=reps)
        res["fused_graph_us"] = time_us(graph_of(fused_step, device), device, reps=reps)
    if compile_ref:
        try:
            torch._dynamo.reset()  # a fresh compile per case: past the recompile limit Dynamo falls back to eager
            compiled = torch.compile(ref_loss)
            res["ref_compile_us"] = time_us(make_step(compiled, ref_params, x, y, amp), device, reps=reps)
        except Exception as exc:  # record, do not hide, a compile failure
            res["ref_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    best = res.get("fused_graph_us", res["fused_eager_us"])
    res["fused_best_gbs"] = min_bytes / best / 1e3
    return res


TIMES = ("ref_eager_us", "ref_graph_us", "ref_compile_us", "fused_eager_us", "fused_graph_us")


def set_tf32(enabled: bool = False) -> dict:
    """Set both TF32 switches (cuBLAS products, cuDNN convolutions) and return them as the results state them."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}


def markdown(header, ceiling, rows, tf32=None) -> str:
    flags = ", ".join(f"torch.backends.{k} = {v}" for k, v in (tf32 or {}).items())
    lines = md_header(header, "Auxiliary-head forward + backward",
                      f"Device copy ceiling measured in this run: {ceiling:.0f} GB/s. Times in microseconds (median).",
                      f"TF32: {flags} (both sides run full fp32 products in the fp32 rows).")
    def row(r):
        best = r.get("fused_graph_us", r["fused_eager_us"])
        vs_graph = f"{r['ref_graph_us'] / best:.1f}x" if "ref_graph_us" in r else "-"
        gbs = r["fused_best_gbs"]
        return [r["kind"], r["shape"], r["dtype"], *(cell(r, k) for k in TIMES), vs_graph,
                f"{r['ref_eager_us'] / best:.1f}x", f"{gbs:.0f} ({100 * gbs / ceiling:.1f}%)"]

    lines += md_table(["kind", "input", "dtype", "ref eager", "ref graph", "ref compile", "fused eager", "fused graph",
                       "x vs ref graph", "x vs ref eager", "fused GB/s (% copy)"], map(row, rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = parser("aux_head", __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kinds", default="mlp-sr", help="comma-separated head kinds (mlp-sr, mlp, last)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-batches", default="128",
                   help="batches that also get the torch.compile baseline (each shape compiles anew)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated CxS stage outputs, e.g. 256x8 for [B, 256, 8, 8] (default: every stage of "
                        "VGG-13 K=4 and the aux-study net); checked, then replaced by 8x4, with --quick")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default 128,512); checked, then replaced by 4, with --quick")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated fp32, bf16 (bf16 autocast); default both on CUDA and with --quick, fp32 on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    header = env_header(device, command_line(p, argv))
    kinds = args.kinds.split(",")
    if args.quick:
        stages, batches, reps = {"tiny": [(8, 4)]}, [4], 3
    else:
        stages, batches, reps = STAGES, [128, 512], 30
    try:
        given_shapes = [tuple(int(v) for v in cs.lower().split("x")) for cs in (args.shapes or "").split(",") if cs]
        given_batches = [int(b) for b in (args.batches or "").split(",") if b]
    except ValueError:
        p.error(f"--shapes takes CxS,CxS,... and --batches B,B,...; got {args.shapes!r} and {args.batches!r}")
    if any(len(cs) != 2 for cs in given_shapes):
        p.error(f"--shapes takes CxS,CxS,... (e.g. 256x8); got {args.shapes!r}")
    if args.quick and (given_shapes or given_batches):
        print("--quick: --shapes / --batches checked, running the tiny shapes instead", flush=True)
    elif given_shapes or given_batches:
        stages = {"given": given_shapes} if given_shapes else stages
        batches = given_batches or batches
    amps = [False, True] if device.type == "cuda" or args.quick else [False]
    if args.dtypes:
        unknown = set(args.dtypes.split(",")) - {"fp32", "bf16"}
        if unknown:
            p.error(f"unknown --dtypes {sorted(unknown)}; expected fp32, bf16")
        amps = [d == "bf16" for d in args.dtypes.split(",")]
    tf32 = set_tf32(False)  # the reference's cuDNN convolutions and the fused ops' cuBLAS products alike
    compile_ref = not (args.quick or args.no_compile)
    ceiling = copy_bandwidth_gbs(device, 1 << 20 if args.quick else 1 << 28)
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    rows = [bench_case(device, kind, C, s, B, amp, compile_ref and B in compile_batches, reps)
            for kind in kinds for shapes in stages.values() for C, s in shapes for B in batches for amp in amps]
    return publish(args, "aux_head", device, {"header": header, "tf32": tf32, "copy_gbs": ceiling, "rows": rows},
                   markdown(header, ceiling, rows, tf32))


if __name__ == "__main__":
    sys.exit(main())
