"""Shared benchmark helpers: the options every benchmark takes, environment header, timing (CUDA
events, median), copy ceiling, markdown tables and the results files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch

# Where results go unless --out-dir says otherwise: relative to the current directory, so that a
# run from the repository root writes the checkout's benchmarks/results/.
RESULTS = os.path.join("benchmarks", "results")


def _out_dir(path: str) -> str:
    """``--out-dir``: checked before the benchmark runs (an existing file cannot become the folder)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"expected a folder (created when missing), got the existing file {path}")
    return path


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m dgl_fast bench NAME``: the module's docstring as help, and the
    output options every benchmark shares (``--no-write``, ``--out-dir``)."""
    p = argparse.ArgumentParser(prog=f"python -m dgl_fast bench {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="print the report, write no results files")
    p.add_argument("--out-dir", default=RESULTS, type=_out_dir,
                   help="folder for <name>-<device>.json and .md (relative to the current directory)")
    return p


def command_line(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, for the results header."""
    return " ".join([p.prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_header(device: torch.device, command: str | None = None) -> dict:
    """GPU (or CPU), versions, command and date: every results file starts with this. ``command``
    defaults to this process's command line."""
    import dgl_fast  # noqa: PLC0415

    if command is None:
        command = " ".join(["python", os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0],
                            *sys.argv[1:]])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": gpu or f"CPU ({cpu_model()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dgl_fast": dgl_fast.__version__,
        "build": dgl_fast.build_config(),
        "python": platform.python_version(),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h100", "h200", "a100", "l40", "b200"):
        if key in name:
            return key
    return name.replace(" ", "-")


def time_us(fn, device: torch.device, warmup: int = 10, reps: int = 50) -> float:
    """Median microseconds of ``fn()``: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device copy ceiling measured now: bytes read + written per second by ``dst.copy_(src)``."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, warmup=5, reps=20)
    return 2 * nbytes / (us * 1e-6) / 1e9


def graph_of(fn, device: torch.device):
    """Capture ``fn`` in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def md_header(header: dict, title: str, *notes: str) -> list[str]:
    """First lines of a results .md: title with the device, versions, date and command, then notes."""
    lines = [f"# {title} ({header['device']})", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, {header['date']}, `{header['command']}`", ""]
    for note in notes:
        lines += [note, ""]
    return lines


def md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table: the header row, the separator, then one line per row (cells through ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines


def cell(row: dict, key: str, fmt: str = ".1f") -> str:
    """A table cell: ``row[key]`` formatted, or "-" when this run did not measure it."""
    return format(row[key], fmt) if key in row else "-"


def write_results(name: str, device: torch.device, payload: dict, markdown: str,
                  out_dir: str = RESULTS) -> tuple[str, str]:
    """Write ``<name>-<device>.json`` and ``.md`` under ``out_dir`` (created when missing)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{name}-{device_tag(device)}")
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    return base + ".json", base + ".md"


def publish(args: argparse.Namespace, name: str, device: torch.device, payload: dict, markdown: str,
            extra: Callable[[str], Iterable[str]] | None = None) -> int:
    """Print the report and, unless ``--no-write``, write it under ``--out-dir`` (``extra(base)``
    writes further files beside it, e.g. plots, and returns their paths). Returns exit status 0."""
    print(markdown)
    if not args.no_write:
        paths = write_results(name, device, payload, markdown, args.out_dir)
        if extra is not None:
            paths += tuple(extra(os.path.splitext(paths[0])[0]))
        print("wrote", *paths)
    return 0
