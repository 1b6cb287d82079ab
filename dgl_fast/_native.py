"""Loads the native library that registers ``torch.ops.dgl_fast.*``."""

from __future__ import annotations

import json
import os

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the operators)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "dgl_fast's native library `dgl_fast._C` is missing or does not load "
        f"({exc}). Build it from the repository root with "
        "`pip install --no-build-isolation -e .` against the torch you use."
    ) from exc


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.dgl_fast.<op>`` has a kernel for ``device_type`` ("cpu"/"cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dgl_fast::{op}", key)


def build_config() -> dict:
    """What was compiled: CUDA kernels or not, GPU architectures, and the torch/CUDA versions.

    ``cuda`` is read from the dispatcher (the CUDA kernels really are registered), the rest from
    the record the build wrote beside the package.
    """
    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    recorded = {}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    return {
        "cuda": has_kernel("softmax_xent", "cuda"),
        "arch_list": recorded.get("arch_list"),
        "built_with_torch": recorded.get("built_with_torch"),
        "built_with_cuda": recorded.get("built_with_cuda"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "debug": recorded.get("debug", False),
        "cxx_standard": recorded.get("cxx_standard"),
    }
