"""The Python-level half of the capture-safety watch (:mod:`.capture_safety`): calls that never
reach torch's dispatcher (host copies, tensors from Python data, RNG state, CUDA events and
streams) are replaced by checking wrappers while a watched replay runs, for its thread only."""

from __future__ import annotations

import threading

import torch

__all__ = ["Refusal", "STREAM_TODO", "thread_state", "active", "install", "uninstall"]


class Refusal:
    def __init__(self, what: str, todo: str):
        self.what, self.todo = what, todo


thread_state = threading.local()


def active():
    return getattr(thread_state, "watch", None)


# ---------------------------------------------------------------- Python-level guards


def _guarded(original, what: str, todo: str, when=None):
    def guard(*args, **kwargs):
        watch = active()
        if watch is not None and (when is None or when(*args, **kwargs)):
            watch.refuse(what, todo)
        return original(*args, **kwargs)

    guard.__wrapped__ = original
    return guard


def _switches(ctx, *args, **kwargs) -> bool:
    return getattr(ctx, "stream", None) is not None


_EVENT = "move event records and waits out of the stage step (the schedule orders the graphs)"
STREAM_TODO = "run the whole stage step on the capture stream (the schedule orders the graphs)"
_RNG = "seed and save RNG states outside the stage step"
_HOST = "move it out of the stage step"


def _python_guards() -> list[tuple[object, str, str, str, object]]:
    """(owner, attribute, what, todo, condition) of every Python-level call the watch guards."""
    guards = [
        (torch.Tensor, "cpu", "Tensor.cpu() (a copy to the host, a host sync)", _HOST, None),
        (torch.Tensor, "numpy", "Tensor.numpy() (a copy to the host, a host sync)", _HOST, None),
        (torch.Tensor, "tolist", "Tensor.tolist() (a copy to the host, a host sync)", _HOST, None),
        (torch.Tensor, "__repr__", "printing a tensor (a copy to the host, a host sync)", _HOST, None),
        (torch.Tensor, "pin_memory", "Tensor.pin_memory() (a host allocation)", _HOST, None),
    ]
    for name in ("tensor", "as_tensor", "asarray", "from_numpy", "frombuffer"):
        guards.append((torch, name, f"torch.{name}(...) (a tensor from Python or host data)",
                       "make it once outside the stage step (a registered buffer) or use a Python number", None))
    for name in ("manual_seed", "seed", "get_rng_state", "set_rng_state"):
        guards.append((torch, name, f"torch.{name}() (the RNG state)", _RNG, None))
    cuda = torch.cuda
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all", "get_rng_state", "set_rng_state"):
        guards.append((cuda, name, f"torch.cuda.{name}() (the RNG state)", _RNG, None))
    guards.append((cuda, "synchronize", "torch.cuda.synchronize() (a host sync)", _HOST, None))
    guards.append((cuda, "set_stream", "torch.cuda.set_stream() (a stream switch)", STREAM_TODO, None))
    guards.append((cuda.StreamContext, "__enter__", "torch.cuda.stream(...) (a stream switch)", STREAM_TODO, _switches))
    for name in ("record", "wait", "synchronize", "query"):
        guards.append((cuda.Event, name, f"torch.cuda.Event.{name}()", _EVENT, None))
    for name in ("wait_event", "wait_stream", "record_event", "synchronize", "query"):
        guards.append((cuda.Stream, name, f"torch.cuda.Stream.{name}()", STREAM_TODO, None))
    acc = getattr(torch, "accelerator", None)
    for name in ("synchronize", "set_stream"):
        if acc is not None and hasattr(acc, name):
            guards.append((acc, name, f"torch.accelerator.{name}()", STREAM_TODO, None))
    return [g for g in guards if hasattr(g[0], g[1])]


_installed = {"count": 0, "saved": []}
_install_lock = threading.Lock()


def install() -> None:
    with _install_lock:
        if _installed["count"] == 0:
            saved = []
            for owner, attr, what, todo, when in _python_guards():
                own = not isinstance(owner, type) or attr in owner.__dict__
                saved.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) and own else getattr(owner, attr),
                              own))
                setattr(owner, attr, _guarded(getattr(owner, attr), what, todo, when))
            _installed["saved"] = saved
        _installed["count"] += 1


def uninstall() -> None:
    with _install_lock:
        _installed["count"] -= 1
        if _installed["count"] == 0:
            for owner, attr, original, own in reversed(_installed["saved"]):
                if own:
                    setattr(owner, attr, original)
                else:  # inherited (a C method of TensorBase): drop the guard, the base's shows again
                    delattr(owner, attr)
            _installed["saved"] = []
