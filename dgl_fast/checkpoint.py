"""Checkpoint files and RNG state: written atomically and durably, verified before anything loads.

File layout: an 8-byte magic ``DGLFAST\\x01``, the SHA-256 of the payload (32 bytes), then the
payload, a ``torch.save`` archive read back with ``weights_only=True`` (no code runs on load). A
truncated, corrupted or foreign file is refused with a message that says which.

:func:`save` writes a temporary file beside the target, fsyncs it, renames it over the target and
fsyncs the directory: a crash or SIGKILL at any moment leaves either the old checkpoint or the new
one, never a mix. A temporary file left by a killed writer (``.<name>.<pid>.<random>.tmp``) is
removed by the next save to the same path once its process is gone. Files get the usual
permissions (0666 minus the umask), like any file the user writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import secrets

import numpy as np
import torch

__all__ = ["save", "load", "CheckpointError", "rng_state", "set_rng_state"]

MAGIC = b"DGLFAST\x01"
_HEADER = len(MAGIC) + 32


class CheckpointError(ValueError):
    """A file that is not a complete, intact dgl_fast checkpoint."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temporaries(directory: str, name: str) -> None:
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        parts = entry[len(prefix):-len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, entry))


def save(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` (a state dict) to ``path`` with a checksum, atomically and durably. An empty
    path is refused (ValueError) and an OSError names ``path``, not the temporary file."""
    path = os.fspath(path)
    if not path:
        raise ValueError("cannot save a checkpoint to an empty path: expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temporaries(directory, name)
        _write(path, directory, name, payload)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write the checkpoint {path}: {exc.strerror or exc}") from exc


def _write(path: str, directory: str, name: str, payload) -> None:
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike):
    """Read a file written by :func:`save`; a :class:`CheckpointError` names what is wrong with it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path} is a directory, not a dgl_fast checkpoint file") from exc
    if len(data) < _HEADER or data[:len(MAGIC)] != MAGIC:
        what = "empty" if not data else f"{len(data)} bytes without the dgl_fast checkpoint header"
        raise CheckpointError(f"{path} is not a dgl_fast checkpoint ({what}); expected a file written by "
                              "Trainer.save")
    digest, payload = data[len(MAGIC):_HEADER], memoryview(data)[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is damaged: its SHA-256 does not match the one stored when it was written "
                              f"({len(payload)} payload bytes; truncated or corrupted)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # intact bytes that torch cannot read: another version's format
        raise CheckpointError(f"{path} has a valid checksum but its payload cannot be read safely: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def rng_state(device: torch.device) -> dict:
    """The global RNG states (torch, Python, NumPy; CUDA on a CUDA device) as tensors and tuples."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate(tuple(py[:1]) + (tuple(py[1]),) + tuple(py[2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_tensors(what: str, saved, current: dict) -> None:
    """Refuse (ValueError) unless ``saved`` has exactly ``current``'s keys, each a tensor of the
    same shape and dtype; the message names the first key that differs."""
    if not isinstance(saved, dict):
        raise ValueError(f"the checkpoint's {what} is a {type(saved).__name__}, expected a state dict")
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has extra {_names(unexpected)}"] if unexpected else [])
        raise ValueError(f"the checkpoint's {what} does not match this trainer's: it {' and '.join(parts)}")
    for k, v in current.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"the checkpoint's {what} holds a {type(s).__name__} at {k!r}, expected a tensor")
        if s.shape != v.shape or s.dtype != v.dtype:
            raise ValueError(f"the checkpoint's {what} differs at {k!r}: saved {list(s.shape)} {s.dtype}, "
                             f"this trainer has {list(v.shape)} {v.dtype}")


def check_optimizer(what: str, saved, opt: torch.optim.Optimizer) -> None:
    """Refuse unless ``saved`` (an optimizer state dict) fits ``opt``: the same parameter groups
    and sizes, per-parameter state only for its parameters, shaped like them, with the keys ``opt``
    itself keeps (when it already has state)."""
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise ValueError(f"the checkpoint's {what} is not an optimizer state dict")
    cur = opt.state_dict()
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    want = [len(g["params"]) for g in cur["param_groups"]]
    if sizes != want:
        raise ValueError(f"the checkpoint's {what} has parameter groups of {sizes} parameters, this trainer's {want}")
    params = {i: p for g, cg in zip(opt.param_groups, cur["param_groups"]) for i, p in zip(cg["params"], g["params"])}
    for i, st in saved["state"].items():
        if i not in params:
            raise ValueError(f"the checkpoint's {what} has state for parameter {i}, which this optimizer does not have")
        mine = cur["state"].get(i)
        if mine is not None and set(mine) != set(st):
            raise ValueError(f"the checkpoint's {what} keeps {sorted(st)} for parameter {i}, this optimizer keeps "
                             f"{sorted(mine)}")
        for name, t in st.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != params[i].shape:
                raise ValueError(f"the checkpoint's {what} has {name!r} of shape {list(t.shape)} for parameter {i}, "
                                 f"whose shape is {list(params[i].shape)}")
