"""Start-up agreement: every rank shows its configuration, and all refuse to start if they differ.

Ranks launched with different arguments used to fail late and badly (a wrong-sized receive, a
C++ abort, a hang, or silently different results). Before anything is sent, every rank
all-gathers a fingerprint of what must be identical (model structure and shapes, initial
weights, placement, data, seed, epochs, mode, dtype, ...) and compares it with rank 0's; on any
difference every rank raises the same :class:`ConfigMismatch`, naming each differing field and
the ranks that hold each value.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn

from .protocol import PeerError, describe_failure

__all__ = ["ConfigMismatch", "agree", "model_fingerprint", "tensor_digest"]


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
