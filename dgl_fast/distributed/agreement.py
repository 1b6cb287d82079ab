"""Start-up agreement: every rank shows its configuration, and all refuse to start if they differ.

Ranks launched with different arguments used to fail late and badly (a wrong-sized receive, a
C++ abort, a hang, or silently different results). Before anything is sent, every rank
all-gathers a fingerprint of what must be identical (model structure and shapes, initial
weights, placement, data, seed, epochs, mode, dtype, ...) and compares it with rank 0's; on any
difference every rank raises the same :class:`ConfigMismatch`, naming each differing field and
the ranks that hold each value.
"""

from __future__ import annotations

import datetime
import hashlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .protocol import Layout, PeerError, describe_failure

__all__ = ["ConfigMismatch", "agree", "model_fingerprint", "roll_call", "tensor_digest"]


class ConfigMismatch(ValueError):
    """The ranks were launched with different configurations."""


def tensor_digest(tensors) -> str:
    """SHA-256 (16 hex digits) of the bytes, shapes and dtypes of ``tensors``."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict:
    """``structure`` (every tensor's name, shape and dtype and every module's type) and
    ``initial weights`` (a digest of their values: ranks seeded differently disagree here)."""
    state = model.state_dict()
    structure = hashlib.sha256()
    for name, t in state.items():
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for name, m in model.named_modules():
        structure.update(f"{name}:{type(m).__name__};".encode())
    return {"model structure": structure.hexdigest()[:16], "initial weights": tensor_digest(state.values())}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def agree(fields: dict, what: str = "configuration", group=None) -> None:
    """All-gather ``fields`` (a dict of picklable values; None means "not known here": the field is
    compared among the ranks that know it) and raise :class:`ConfigMismatch` on every rank if
    any rank's differ from rank 0's. A rank that never joins makes the others fail
    with :class:`PeerError` after the process group's timeout."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = [None] * world
    try:
        dist.all_gather_object(parts, fields, group=group)
    except RuntimeError as exc:
        raise PeerError(f"rank {rank}: the start-up agreement on the {what} failed: {describe_failure(exc)}") from None
    diffs = []
    for key in dict.fromkeys(k for p in parts for k in p):  # in the order rank 0 lists them
        values: dict[str, list[int]] = {}
        for r, p in enumerate(parts):
            if p.get(key, "<missing>") is not None:  # None: not known on that rank (e.g. the data, on ranks that receive)
                values.setdefault(_show(p.get(key, "<missing>")), []).append(r)
        if len(values) > 1:
            held = "; ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}" for v, rs in values.items())
            diffs.append(f"{key} ({held})")
    if diffs:
        raise ConfigMismatch(f"the {world} ranks were launched with different {what}s and refuse to start: "
                             f"they differ in {'; and in '.join(diffs)}")


def roll_call(layout: Layout, rank: int, marks, answers, timeout: float, doing: str) -> None:
    """Every rank checks in with rank 0, which answers each with the ranks that did not: run before
    a collective of every rank, so that a rank that stalled or died is named on every rank (a
    collective that fails says only that it failed, not who stopped answering). ``marks`` and
    ``answers`` are two process groups of every rank (gloo: a timeout closes every connection of
    its group, so the answers travel in another). Raises :class:`PeerError` ``"<doing> failed:
    <rank> did not answer: <why>"``; a rank 0 that does not answer is named by the others within
    twice ``timeout``."""
    def fail(missing: list[tuple[int, str]]):
        named = "; ".join(f"{layout.describe(r)} did not answer: {why}" for r, why in missing)
        return PeerError(f"{doing} failed: {named}")

    world = layout.world
    if world == 1:
        return
    deadline = time.monotonic() + timeout
    if rank == 0:
        got = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        works = [(r, dist.irecv(got[r], src=r, group=marks)) for r in range(1, world)]
        missing = []
        for r, work in works:  # posted together: each waits out what is left of the timeout, and at
            try:               # least a second (gloo completes a receive only in a round trip with its sender)
                work.wait(datetime.timedelta(seconds=max(min(1.0, timeout), deadline - time.monotonic())))
            except RuntimeError as exc:
                missing.append((r, describe_failure(exc)))
        verdict = torch.zeros(world, dtype=torch.int64)
        for r, _ in missing:
            verdict[r] = 1
        for r in range(1, world):
            if not verdict[r]:
                try:
                    dist.isend(verdict, dst=r, group=answers).wait(datetime.timedelta(seconds=timeout))
                except RuntimeError as exc:
                    missing.append((r, describe_failure(exc)))
        if missing:
            raise fail(sorted(missing))
        return
    verdict = torch.zeros(world, dtype=torch.int64)
    try:
        dist.isend(torch.ones(1, dtype=torch.int64), dst=0, group=marks).wait(datetime.timedelta(seconds=timeout))
        dist.irecv(verdict, src=0, group=answers).wait(datetime.timedelta(seconds=2 * timeout))
    except RuntimeError as exc:
        raise fail([(0, describe_failure(exc))]) from None
    if verdict.any():
        raise fail([(r, "it did not check in with rank 0 within the timeout") for r in verdict.nonzero().flatten().tolist()])
