"""Shared benchmark helpers: environment header, timing (CUDA events, median), copy ceiling, output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def env_header(device: torch.device) -> dict:
    """GPU (or CPU), versions, command and date: every results file starts with this."""
    import dgl_fast  # noqa: PLC0415

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dgl_fast": dgl_fast.__version__,
        "build": dgl_fast.build_config(),
        "python": platform.python_version(),
        "command": " ".join(["python", os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0],
                             *sys.argv[1:]]),
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


def cell(row: dict, key: str, fmt: str = ".1f") -> str:
    """A table cell: ``row[key]`` formatted, or "-" when this run did not measure it."""
    return format(row[key], fmt) if key in row else "-"


def write_results(name: str, device: torch.device, payload: dict, markdown: str) -> tuple[str, str]:
    """Write ``<name>-<gpu>.json`` and ``.md`` under benchmarks/results/."""
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"{name}-{device_tag(device)}")
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    return base + ".json", base + ".md"
