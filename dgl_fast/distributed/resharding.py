"""Checkpoints of synchronous runs through ``torch.distributed.checkpoint`` (DCP): any grid loads them.

Every tensor is saved under a grid-free name: ``stages.<j>.<...>`` / ``heads.<j>.<...>`` (stage j
of the whole model) and ``optim.<j>.<param>.<state>`` (stage j's optimizer). Replica row 1's
ranks contribute them (the replicas hold the same weights and optimizer state, bitwise; BatchNorm
statistics are row 1's, as in ``full_state_dict``), so a set saved on G stage groups x R replicas
loads on any other grid of the same model: each rank reads only the tensors of its own stages.
What is not a tensor (epoch, history, learning-rate plan, run options, the optimizers' parameter
groups, steps per stage) is ``meta.json``. Random-number states are not kept (synchronous DGL
draws none; a loader's order comes from its seed and the epoch).

Layout of ``DIR``: ``epoch-EEEEE/`` (DCP's files and ``meta.json``) and ``manifest.json``, which
rank 0 replaces atomically once DCP has written everything, naming the epoch's folder and every
file's SHA-256; only then are older epochs' folders removed. So a crash leaves the last complete
epoch; a resume checks every digest (a damaged, missing or foreign file is refused by name) and
the model's tensors against its own before any state changes (:meth:`DistributedDGL.load`).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp

from .. import checkpoint
from . import files

__all__ = ["FORMAT", "is_dcp", "flat_tensors", "write_meta", "finish", "verify", "template", "local_state", "raise_first",
           "save_set", "load_set"]

FORMAT = "dgl_fast distributed checkpoint (DCP) 1"
META = "meta.json"


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:05d}"


def is_dcp(directory: str) -> bool:
    """Whether ``directory``'s manifest names a DCP checkpoint (else: per-rank files, or none)."""
    try:
        with open(os.path.join(directory, files.MANIFEST)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _global(key: str, stages: list[int]) -> str:
    kind, i, rest = key.split(".", 2)  # "stages.<i>.<...>" / "heads.<i>.<...>"
    return f"{kind}.{stages[int(i)]}.{rest}"


def flat_tensors(state: dict, stages: list[int]) -> tuple[dict, dict]:
    """A rank's trainer ``state`` as DCP's tensors (CPU, grid-free names) and its stages' meta."""
    flat = {_global(k, stages): v.detach().cpu() for k, v in state["model"].items()}
    meta = {}
    for j, opt, steps, kind in zip(stages, state["optimizers"], state["stage_steps"], state["optimizer_types"]):
        scalars = {}
        for i, st in opt["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim.{j}.{i}.{name}"] = v.detach().cpu()
                else:
                    scalars.setdefault(str(i), {})[name] = v
        meta[str(j)] = {"param_groups": opt["param_groups"], "scalars": scalars, "stage_steps": steps, "type": kind}
    return flat, meta


def save_tensors(flat: dict, directory: str, epoch: int, group) -> str:
    """DCP's collective save of every rank's ``flat`` into ``directory/epoch-EEEEE`` (returned)."""
    path = os.path.join(directory, _epoch_dir(epoch))
    dcp.save(flat, checkpoint_id=path, process_group=group)
    return path


def write_meta(path: str, state: dict, stage_meta: dict, layout) -> None:
    """Rank 0: ``meta.json`` of the epoch (``state``: rank 0's trainer state; ``stage_meta``: every stage's)."""
    meta = {"format": FORMAT, "version": state["version"], "mode": state["mode"], "epoch": state["epoch"],
            "global_step": state["global_step"], "active_stage": state["active_stage"],
            "fit_epochs": state["fit_epochs"], "lr_factors": state["lr_factors"], "run_options": state["run_options"],
            "history": state["history"], "stages": stage_meta, "saved_on": {
                "placement": list(layout.placement), "replicas": layout.replicas, "world_size": layout.world}}
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def finish(directory: str, epoch: int, mode: str) -> None:
    """Rank 0, after every rank's write: the manifest naming the epoch's files and digests, then
    the removal of other epochs' folders."""
    name = _epoch_dir(epoch)
    path = os.path.join(directory, name)
    digests = {f: files.sha256(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    files.write_json(directory, files.MANIFEST, {"format": FORMAT, "mode": mode, "epoch": epoch, "folder": name,
                                                 "files": digests})
    for other in os.listdir(directory):
        if other.startswith("epoch-") and other != name:
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)


def verify(directory: str, mode: str) -> tuple[str, dict]:
    """The epoch folder the manifest names and its meta, every file's digest checked
    (CheckpointError / FileNotFoundError / ValueError naming what is wrong)."""
    manifest = os.path.join(directory, files.MANIFEST)
    try:
        with open(manifest) as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise checkpoint.CheckpointError(f"{manifest} is not valid JSON: {exc}") from None
    epoch = man.get("epoch") if isinstance(man, dict) else None
    if not isinstance(epoch, int) or man.get("format") != FORMAT or not isinstance(man.get("files"), dict) or (
            man.get("folder") != _epoch_dir(epoch)):
        raise checkpoint.CheckpointError(f"{manifest} is not a dgl_fast DCP checkpoint manifest (or was edited)")
    if man.get("mode") != mode:
        raise ValueError(f"the checkpoint was saved with mode {man.get('mode')}, this run has {mode}")
    path = os.path.join(directory, man["folder"])
    for name, digest in man["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing")
        if files.sha256(file) != digest:
            raise checkpoint.CheckpointError(f"{file} does not match the manifest's SHA-256: damaged, or written by "
                                             "another save than the manifest")
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if meta.get("epoch") != man["epoch"]:
        raise checkpoint.CheckpointError(f"{path}/{META} holds epoch {meta.get('epoch')}, the manifest {man['epoch']}")
    return path, meta


def template(path: str, current: dict, stages: list[int], meta: dict) -> dict:
    """The tensors this rank reads (empty, CPU): its stages' model tensors as ``current`` (its
    trainer's state) has them, checked against the saved ones, and their saved optimizer state."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    want = {}
    for k, v in current["model"].items():
        g = _global(k, stages)
        s = saved.get(g)
        if s is None or not hasattr(s, "size"):
            raise ValueError(f"the checkpoint in {path} has no tensor {g!r} (stage {g.split('.')[1]} of this model): "
                             "another model")
        if tuple(s.size) != tuple(v.shape) or s.properties.dtype != v.dtype:
            raise ValueError(f"the checkpoint's {g!r} is {list(s.size)} {s.properties.dtype}, this model has "
                             f"{list(v.shape)} {v.dtype}")
        want[g] = torch.empty(tuple(v.shape), dtype=v.dtype)
    for j in stages:
        if str(j) not in meta["stages"]:
            raise ValueError(f"the checkpoint in {path} has no stage {j + 1}: another model")
    prefixes = tuple(f"optim.{j}." for j in stages)
    for g, s in saved.items():
        if g.startswith(prefixes):
            want[g] = torch.empty(tuple(s.size), dtype=s.properties.dtype)
    return want


def load_tensors(want: dict, path: str, group) -> dict:
    dcp.load(want, checkpoint_id=path, process_group=group)
    return want


def local_state(loaded: dict, meta: dict, stages: list[int], current: dict) -> dict:
    """The trainer state of this rank's stages, assembled from the tensors read and the meta."""
    model = {k: loaded[_global(k, stages)] for k in current["model"]}
    optimizers, steps, types = [], [], []
    for j in stages:
        m = meta["stages"][str(j)]
        state: dict = {}
        for key, v in loaded.items():
            if key.startswith(f"optim.{j}."):
                _, _, i, name = key.split(".", 3)
                state.setdefault(int(i), {})[name] = v
        for i, names in m["scalars"].items():
            state.setdefault(int(i), {}).update(names)
        optimizers.append({"state": state, "param_groups": m["param_groups"]})
        steps.append(m["stage_steps"])
        types.append(m["type"])
    return {"version": meta["version"], "mode": meta["mode"], "num_stages": len(stages), "optimizer_types": types,
            "model": model, "optimizers": optimizers, "epoch": meta["epoch"], "global_step": meta["global_step"],
            "active_stage": meta["active_stage"], "fit_epochs": meta["fit_epochs"], "lr_factors": meta["lr_factors"],
            "run_options": meta["run_options"], "history": meta["history"], "rng": current["rng"],
            "stage_steps": steps, "schedule": current["schedule"]}


def raise_first(errors: list, what: str) -> None:
    """Raise CheckpointError with the first of ``errors`` (those of every rank; None: no error)."""
    errors = [e for e in errors if e]
    if errors:
        more = f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
        raise checkpoint.CheckpointError(f"{what} failed: {errors[0]}{more}")


def save_set(run, directory: str, gather, group) -> None:
    """:meth:`DistributedDGL.save` of a synchronous run (``run``; ``gather(obj, what)``: its
    all-gather over ``group``, the runner's gloo group): DCP's collective save, then
    rank 0's meta, manifest and removal of older epochs; an error on any rank raises on all."""
    error, state, flat, meta = None, None, {}, None
    try:
        state = run.trainer.state_dict()
        flat, meta = flat_tensors(state, run.stages)
        stale = os.path.join(directory, _epoch_dir(run.epoch))
        if run.rank == 0 and os.path.isdir(stale):  # a save of this epoch interrupted before its manifest
            shutil.rmtree(stale)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not wait for a stall
        error = f"{run.name}: {type(exc).__name__}: {exc}"
    raise_first(gather(error, "the checkpoint's preparation"), f"saving the checkpoint in {directory}")
    try:
        path = save_tensors(flat if run.replica == 0 else {}, directory, run.epoch, group)
    except Exception as exc:  # noqa: BLE001 - DCP raises on every rank
        raise checkpoint.CheckpointError(f"saving the checkpoint in {directory} failed: {run.name}: "
                                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    metas = gather(meta if run.replica == 0 else None, "the checkpoint's meta")
    error = None
    if run.rank == 0:
        try:
            write_meta(path, state, {k: v for m in metas if m for k, v in m.items()}, run.layout)
            finish(directory, run.epoch, run.mode)
        except Exception as exc:  # noqa: BLE001
            error = f"{run.name}: writing the manifest: {type(exc).__name__}: {exc}"
    raise_first(gather(error, "the manifest"), f"saving in {directory}")


def load_set(run, directory: str, gather, group) -> dict:
    """The verified trainer state of ``run``'s stages from a DCP set saved on any grid; a problem
    on any rank raises on all (naming it) before any state changes."""
    problem, path, meta, want, current = None, None, None, None, None
    try:
        path, meta = verify(directory, run.mode)
        current = run.trainer.state_dict()
        want = template(path, current, run.stages, meta)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not wait for a stall
        problem = f"{run.name}: {exc}"
    raise_first(gather(problem, "the checkpoint checks"), f"resuming from {directory}")
    try:
        load_tensors(want, path, group)
        state = local_state(want, meta, run.stages, current)
        run.trainer.check_state(state)
    except Exception as exc:  # noqa: BLE001
        problem = f"{run.name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    raise_first(gather(problem, "the checkpoint's tensors"), f"resuming from {directory}")
    return state
