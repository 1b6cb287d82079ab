"""Checkpoints of a distributed run: one file per rank and one manifest.

Each rank writes its stages' trainer state with :func:`dgl_fast.checkpoint.save` (checksummed,
atomic, durable) to ``rank-NNNNN-epoch-EEEEE.pt``; once every rank has written, rank 0 replaces
``manifest.json`` (atomically too) with the grid (world size, placement, replicas), the epoch
and every file's name and SHA-256, and only then does each rank remove its files of other
epochs. So a crash at any moment leaves the last complete set and a manifest naming it. A resume
reads the manifest, refuses another grid or mode, and checks its own file's digest before
loading. Across machines the folder must be shared (the manifest names every rank's file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets

from .. import checkpoint
from .protocol import Layout

__all__ = ["save_rank", "write_manifest", "write_json", "sha256", "remove_others", "load_rank", "read_manifest", "check_grid",
           "MANIFEST"]

MANIFEST = "manifest.json"
_FORMAT = "dgl_fast distributed checkpoint 1"


def _rank_file(rank: int, epoch: int) -> str:
    return f"rank-{rank:05d}-epoch-{epoch:05d}.pt"


def sha256(path: str) -> str:
    """The SHA-256 (hex) of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_rank(trainer, directory: str, rank: int, epoch: int) -> str:
    """Write ``trainer``'s state as this rank's file of ``epoch``; returns its SHA-256."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _rank_file(rank, epoch))
    trainer.save(path)
    return sha256(path)


def write_manifest(directory: str, layout: Layout, epoch: int, digests: list[str], mode: str) -> None:
    manifest = {"format": _FORMAT, "mode": mode, "world_size": layout.world, "replicas": layout.replicas,
                "placement": list(layout.placement), "epoch": epoch,
                "files": [{"rank": r, "file": _rank_file(r, epoch), "sha256": d} for r, d in enumerate(digests)]}
    write_json(directory, MANIFEST, manifest)


def write_json(directory: str, name: str, manifest: dict) -> None:
    """Replace ``directory/name`` with ``manifest`` as JSON, atomically and durably."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for the rank files
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_others(directory: str, rank: int, epoch: int) -> None:
    """Remove this rank's files of epochs other than ``epoch`` (after the manifest names it)."""
    keep = _rank_file(rank, epoch)
    prefix = f"rank-{rank:05d}-epoch-"
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".pt") and name != keep:
            os.remove(os.path.join(directory, name))


def read_manifest(directory: str) -> dict:
    """The manifest of the checkpoint set in ``directory`` (CheckpointError if it is not one)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a complete distributed checkpoint")
    with open(path) as f:
        try:
            manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise checkpoint.CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a dgl_fast distributed checkpoint manifest")
    epoch, files = manifest.get("epoch"), manifest.get("files")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or not isinstance(files, list) or not all(
            isinstance(e, dict) and isinstance(e.get("rank"), int) and e.get("file") == _rank_file(e["rank"], epoch)
            for e in files):
        raise checkpoint.CheckpointError(f"{path} names epoch {epoch!r} and files that do not all belong to it: "
                                         "an edited or damaged manifest")
    return manifest


def check_grid(manifest: dict, directory: str, world: int, replicas: int, placement=None) -> None:
    """Refuse (ValueError) a launch on another grid than the one ``manifest`` was saved on."""
    saved = manifest.get("placement")
    ok = isinstance(saved, list) and saved and all(isinstance(g, int) for g in saved)
    groups = max(saved) + 1 if ok else "?"
    same = ok and manifest.get("world_size") == world and manifest.get("replicas") == replicas and (
        groups * replicas == world) and (placement is None or list(placement) == saved)
    if not same:
        mine = f"{world // replicas} stage groups x {replicas} replicas ({world} ranks" + (
            f", placement {list(placement)})" if placement is not None else ")")
        raise ValueError(f"the checkpoint set in {directory} was made on {groups} stage groups x "
                         f"{manifest.get('replicas')} replicas ({manifest.get('world_size')} ranks, placement {saved}), "
                         f"this launch has {mine}; resume it on the grid it was made on (resharding a checkpoint set "
                         "is not supported)")


def load_rank(directory: str, layout: Layout, rank: int, mode: str) -> dict:
    """This rank's verified state from ``directory`` (raises ValueError naming what is wrong)."""
    manifest = read_manifest(directory)
    path = os.path.join(directory, MANIFEST)
    if manifest.get("mode") != mode:
        raise ValueError(f"the checkpoint was saved with mode {manifest.get('mode')}, this run has {mode}")
    check_grid(manifest, directory, layout.world, layout.replicas, layout.placement)
    entries = [e for e in manifest["files"] if e.get("rank") == rank]
    if len(entries) != 1:
        raise checkpoint.CheckpointError(f"{path} lists no file (or several) for rank {rank}")
    entry = entries[0]
    file = os.path.join(directory, entry["file"])
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing")
    if sha256(file) != entry["sha256"]:
        raise checkpoint.CheckpointError(f"{file} does not match the manifest's SHA-256: it was written by "
                                         "another save than the manifest (a save interrupted on some rank?)")
    state = checkpoint.load(file)
    if not isinstance(state, dict) or state.get("epoch") != manifest["epoch"]:
        got = state.get("epoch") if isinstance(state, dict) else None
        raise checkpoint.CheckpointError(f"{file} holds the state of epoch {got}, the manifest {path} names epoch "
                                         f"{manifest['epoch']}")
    return state
