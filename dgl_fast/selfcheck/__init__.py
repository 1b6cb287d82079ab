"""``python -m dgl_fast check``: does this build work on this device? One command, about a minute.

Each check runs on the chosen device and compares against a plain-PyTorch reference computed in
the same process:

- ``env``: ``dgl_fast.build_config()``, torch, CUDA, the device; the device's kernels are compiled.
- ``op:<name>``: every op of :mod:`dgl_fast.ops` against :mod:`dgl_fast.reference`
  (``bn_update_stats``: against ``nn.BatchNorm1d``'s own update) in float64, odd sizes, random
  inputs, non-contiguous views; forward and backward to 1e-10; the replay ops bitwise, their slot
  choices against ``reference.ReplayRing``.
- ``graph``: a DGL trainer whose stage steps replay CUDA graphs against the same stage steps run
  eagerly through the graph code path (bitwise, float32, TF32 off); on the CPU the emulated graph
  path (``cuda_graphs="emulate"``) against the sequential engine.
- ``streams``: the streams engine (one CUDA stream per stage) against the sequential engine,
  bitwise; on the CPU the pipeline engine.
- ``async_buffer``: a replay buffer between two stages on two streams, each slowed in turn: every
  pushed batch's content encodes its number, every sample must equal one pushed batch exactly
  (nothing torn) and the ring must hold the last pushes (nothing lost); on the CPU on
  :class:`~dgl_fast.streams.RecordedStreams`, whose recorded order must chain every buffer operation.
- ``async_trainer``: async DGL on free-running streams (two stages, one slowed) against async DGL
  in turn, float64 (bitwise on the CPU; 1e-10 on a GPU, where the stage steps replay CUDA graphs).
- ``bench``: timings, not a pass/fail criterion: the fused auxiliary head's forward + backward
  against the reference head, one DGL step against one backprop step (``--bench-seconds``,
  ``--no-bench``).

A check that raises reports FAIL with a one-line reason and the others still run. The process
exits 0 when nothing failed, 1 otherwise (2: a bad option). ``--json PATH`` writes the report
(environment, each check's status, seconds, reason and figures); nothing is written otherwise.

From Python: ``results = run_checks(device)`` returns :class:`CheckResult` objects;
``main(argv)`` is the command. The checks call the ops through :mod:`dgl_fast.ops` at call time,
so a test can replace one there and see the check fail.
"""


from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from .checks_engines import bench, check_async_buffer, check_async_trainer, check_graph, check_streams
from .checks_ops import (
    check_aux_pool,
    check_bn_update_stats,
    check_env,
    check_linear_bn_relu,
    check_replay_push,
    check_replay_sample,
    check_softmax_xent,
    environment,
)
from .common import FAIL, OK, SKIPPED, CheckFailed, CheckResult, exact_math, sync

__all__ = ["CheckResult", "CheckFailed", "CHECKS", "run_checks", "format_table", "report", "main", "add_arguments",
           "run_cli"]

# --- running ----------------------------------------------------------------------------------------

#: name -> function(device) returning the detail line (or (detail, data)); the order of the table
CHECKS: dict[str, Callable] = {
    "env": check_env,
    "op:softmax_xent": check_softmax_xent,
    "op:replay_push": check_replay_push,
    "op:replay_sample": check_replay_sample,
    "op:aux_pool": check_aux_pool,
    "op:linear_bn_relu": check_linear_bn_relu,
    "op:bn_update_stats": check_bn_update_stats,
    "graph": check_graph,
    "streams": check_streams,
    "async_buffer": check_async_buffer,
    "async_trainer": check_async_trainer,
}


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    if not isinstance(exc, CheckFailed):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        msg = f"{type(exc).__name__}{where}: {msg}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _run_one(name: str, fn: Callable, device: torch.device, on_result) -> CheckResult:
    t0 = time.perf_counter()
    try:
        with exact_math():
            out = fn(device)
            sync(device)  # a kernel's asynchronous error belongs to this check
        detail, data = out if isinstance(out, tuple) else (out, {})
        res = CheckResult(name, OK, time.perf_counter() - t0, detail, data)
    except Exception as exc:  # every check reports; none stops the others
        res = CheckResult(name, FAIL, time.perf_counter() - t0, _one_line(exc))
    if on_result is not None:
        on_result(res)
    return res


def _check_only(only: Sequence[str] | None) -> None:
    names = [*CHECKS, "bench"]
    unknown = [o for o in only or () if not any(n == o or n.split(":")[0] == o for n in names)]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; expected names or prefixes of {', '.join(names)}")


def run_checks(device, only: Sequence[str] | None = None, bench_seconds: float | None = 10.0,
               on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run every check (or those named in ``only``: full names or prefixes such as ``op``) on
    ``device``; ``bench_seconds=None`` skips the benchmark. ``on_result`` sees each result as it
    comes. Returns one :class:`CheckResult` per check, in table order."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    names = [*CHECKS, "bench"]
    _check_only(only)
    results = []
    no_device = device.type == "cuda" and not torch.cuda.is_available()
    for name in names:
        if only and not any(name == o or name.split(":")[0] == o for o in only):
            res = CheckResult(name, SKIPPED, detail="not selected (--only)")
        elif no_device and name != "env":
            res = CheckResult(name, SKIPPED, detail=f"no CUDA device visible (torch {torch.__version__})")
        elif no_device:
            res = CheckResult(name, FAIL, detail=f"--device {device}: torch.cuda.is_available() is False "
                              f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        elif name == "bench" and bench_seconds is None:
            res = CheckResult(name, SKIPPED, detail="--no-bench")
        elif name == "bench":
            res = _run_one(name, lambda d: bench(d, bench_seconds), device, None)
        else:
            res = _run_one(name, CHECKS[name], device, None)
        if on_result is not None:
            on_result(res)
        results.append(res)
    return results


def _row(r: CheckResult, width: int) -> str:
    secs = f"{r.seconds:6.2f}s" if r.status != SKIPPED else "      -"
    return f"{r.name:<{width}}  {r.status:<7}  {secs}  {r.detail}"


def format_table(results: Sequence[CheckResult]) -> str:
    """The report as a fixed-width table, one line per check, and a last line of counts."""
    width = max(len("check"), *(len(r.name) for r in results))
    lines = [f"{'check':<{width}}  {'status':<7}  {'time':>7}  detail", "-" * (width + 28)]
    lines += [_row(r, width) for r in results]
    n = {s: sum(r.status == s for r in results) for s in (OK, FAIL, SKIPPED)}
    lines.append(f"{n[OK]} ok, {n[FAIL]} FAIL, {n[SKIPPED]} skipped")
    return "\n".join(lines)


def report(results: Sequence[CheckResult], device, argv: Sequence[str] | None = None) -> dict:
    """The JSON report: environment, command, each check, the counts and the exit status."""
    device = torch.device(device)
    try:
        env = environment(device) if device.type != "cuda" or torch.cuda.is_available() else {"device": str(device)}
    except Exception as exc:  # the report is still written
        env = {"device": str(device), "error": _one_line(exc)}
    failed = sum(r.status == FAIL for r in results)
    return {"command": " ".join(["python -m dgl_fast check", *(argv or [])]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": env,
            "checks": [asdict(r) for r in results],
            "counts": {s: sum(r.status == s for r in results) for s in (OK, FAIL, SKIPPED)},
            "exit_status": 1 if failed else 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m dgl_fast check``."""
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to PATH (nothing is "
                   "written without it)")
    p.add_argument("--bench-seconds", type=float, default=10.0, help="seconds of the benchmark (head and step timings)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated checks (or prefixes, e.g. op) to "
                   f"run; the others are reported skipped. Checks: {', '.join([*CHECKS, 'bench'])}")


def run_cli(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the checks of parsed ``args``, print the table (rows as they finish), write ``--json``;
    returns 0 when nothing failed, 1 otherwise, 2 for a bad option."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        print(f"error: argument --device: expected cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: argument --device: expected cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if not args.no_bench and not (args.bench_seconds > 0):
        print(f"error: argument --bench-seconds: expected a number > 0 (or --no-bench), got {args.bench_seconds}",
              file=sys.stderr)
        return 2
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    try:
        _check_only(only)
    except ValueError as exc:
        print(f"error: argument --only: {exc}", file=sys.stderr)
        return 2
    width = max(len(n) for n in [*CHECKS, "bench"])
    print(f"dgl_fast self-check on {device} (torch {torch.__version__}); TF32 off, deterministic cuDNN", flush=True)
    print(f"{'check':<{width}}  {'status':<7}  {'time':>7}  detail", flush=True)
    results = run_checks(device, only, None if args.no_bench else args.bench_seconds,
                         on_result=lambda r: print(_row(r, width), flush=True))
    counts = format_table(results).splitlines()[-1]
    print("-" * (width + 28))
    print(counts)
    rep = report(results, device, argv)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1)
        except OSError as exc:
            print(f"error: argument --json: cannot write {args.json} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    failed = [r.name for r in results if r.status == FAIL]
    print(f"self-check {'FAILED: ' + ', '.join(failed) if failed else 'passed'}")
    return rep["exit_status"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dgl_fast check [options]`` as a function (also ``python -m dgl_fast.selfcheck``)."""
    p = argparse.ArgumentParser(prog="python -m dgl_fast check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(p.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
