"""Shared pieces of the self-check: results, the comparisons every check uses, exact math."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["OK", "FAIL", "SKIPPED", "TOL64", "CheckFailed", "CheckResult", "close", "equal", "same_state", "gen", "sync",
           "exact_math"]

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
TOL64 = 1e-10  # float64 equivalence


class CheckFailed(AssertionError):
    """A comparison that did not hold; its message is the one-line reason shown in the table."""


@dataclass
class CheckResult:
    """One row of the report: ``status`` is ``"ok"``, ``"FAIL"`` or ``"skipped"``; ``detail`` says
    what was compared (ok), why it failed (FAIL) or why it did not run (skipped)."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


# --- comparison helpers -------------------------------------------------------------------------


def close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL64) -> float:
    """Max abs difference of ``got`` and ``want`` (compared on the CPU in float64); CheckFailed above ``tol``."""
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.dtype.is_floating_point or w.dtype.is_floating_point:
        g, w = g.double(), w.double()
        if not torch.isfinite(g).all():
            raise CheckFailed(f"{what}: non-finite values")
    err = (g - w).abs().max().item() if g.numel() else 0.0
    scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
    if err > tol * scale:
        raise CheckFailed(f"{what}: max |difference| {err:.3g}, allowed {tol * scale:.3g}")
    return err


def equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise CheckFailed(f"{what}: {list(got.shape)} {got.dtype}, expected {list(want.shape)} {want.dtype}")
    if not torch.equal(got.detach().cpu(), want.detach().cpu()):
        diff = (got.detach().cpu().double() - want.detach().cpu().double()).abs().max().item()
        raise CheckFailed(f"{what}: not bitwise equal (max |difference| {diff:.3g})")


def same_state(what: str, a: nn.Module, b: nn.Module, tol: float = 0.0) -> int:
    """Every parameter and buffer of ``a`` equals ``b``'s (bitwise for ``tol=0``); returns the count."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise CheckFailed(f"{what}: different state keys")
    for k in sa:
        if tol == 0:
            equal(f"{what}: {k}", sa[k], sb[k])
        else:
            close(f"{what}: {k}", sa[k], sb[k], tol)
    return len(sa)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_math():
    """TF32 off and deterministic cuDNN while the checks run (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved
