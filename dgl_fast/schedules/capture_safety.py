"""The capture-safety watch: what emulated CUDA graphs (``cuda_graphs="emulate"``) check.

An emulated graph runs the stage-step function again at every replay, so everything it does
"works" on any device, even what a real capture would refuse (a host synchronisation) or record
wrongly (a value read once, at capture, or an address that later holds other data). While an
emulated graph replays, :class:`CaptureWatch` watches every op the step runs (a
``TorchDispatchMode``, also inside autograd's backward) and the few Python calls that never reach
the dispatcher, and raises :class:`CaptureUnsafeError`, naming the op, the stage (1-based) and what
to do, on:

- host synchronisations: ``.item()``, ``float()``/``int()``/``bool()`` of a tensor
  (``aten._local_scalar_dense``, ``aten.is_nonzero``), ``torch.equal``, ops whose output size
  depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing,
  ``repeat_interleave`` without ``output_size``, ``bincount``), linalg error checks; copies to the
  host: ``.cpu()``, ``.numpy()``, ``.tolist()``, printing a tensor, ``pin_memory()``;
- tensors made from Python data inside the step (``torch.tensor``, ``torch.as_tensor``,
  ``torch.asarray``, ``torch.from_numpy``, ``torch.frombuffer``; any non-scalar ``aten.lift_fresh``);
- ``copy_`` from a tensor the step does not own: neither a parameter, buffer or optimizer state of
  the stage, nor a static tensor of the graph, nor made inside the step (see below);
- copies across devices and tensors of another device than the graph's (``copy_``, ``.to()``,
  and on a CUDA graph any CPU tensor an op reads, even a 0-dim one whose value a capture bakes in);
- random numbers from an explicit ``generator=``: a capture registers only the default CUDA
  generator of its device (it advances per replay); reseeding or reading/writing RNG states;
- event records, waits and queries (``torch.cuda.Event``), stream switches, waits and
  synchronisations (``torch.cuda.stream``, ``set_stream``, ``Stream.wait_*``, ``synchronize``),
  ``Tensor.record_stream`` (``aten.record_stream``);
- a parameter, buffer, optimizer state tensor or static input/output whose storage (data pointer,
  shape, dtype) differs from capture time, checked before every replay: a real graph
  would still read and write the old memory (``p.data = ...`` or a new momentum buffer after
  capture).

What can be decided without a GPU. A real graph always runs on a CUDA device while CI emulates
on the CPU, where "device" and "host" are one device. So the rules are stated by what the region
would do in a real run: ``.cpu()``/``.numpy()``/``.tolist()`` always reach the host; a tensor made
from Python data inside the step is host data (a host-to-device copy, not capturable from pageable
memory, stale from pinned memory); a ``copy_`` source the step does not own is, in a real run,
host memory or a device tensor whose address the graph keeps forever (register it as a buffer,
which ``.to(device)`` moves with the model). Not decidable on the CPU, hence not refused there:
``.to("cpu")`` and ``.to(device)`` (the graph's own device on the CPU is a no-op that never reaches
the dispatcher, and in a real run it may be the device), 0-dim CPU tensors read by ops (a real
CUDA graph refuses them), ``torch.Stream``/``torch.Event`` (the device-generic classes cannot be
guarded), and Python-side state a real graph runs once at capture (counters, branches on Python
values).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .capture_guards import STREAM_TODO, active, install, thread_state, uninstall

__all__ = ["CaptureUnsafeError", "CaptureWatch"]


class CaptureUnsafeError(RuntimeError):
    """A stage step does something a real CUDA graph capture would refuse or replay wrongly."""


_FALLBACK = "or use cuda_graphs=False"

_aten = torch.ops.aten

# op packet -> (what it is, what to do)
_SYNC_RULES = {
    "_local_scalar_dense": (".item() / float() / int() / bool() of a tensor (a host sync)",
                            "move .item() out of the stage step"),
    "is_nonzero": ("bool() of a tensor, e.g. `if tensor:` (a host sync)", "branch on host values only"),
    "equal": ("torch.equal (a host sync)", "compare outside the stage step"),
    "nonzero": ("nonzero / torch.where(cond) / argwhere (an output size read back by the host)",
                "use nonzero_static or a mask multiply"),
    "masked_select": ("masked_select (an output size read back by the host)", "use torch.where with a mask"),
    "_unique": ("unique (an output size read back by the host)", "move it out of the stage step"),
    "_unique2": ("unique (an output size read back by the host)", "move it out of the stage step"),
    "unique_dim": ("unique (an output size read back by the host)", "move it out of the stage step"),
    "unique_consecutive": ("unique_consecutive (an output size read back by the host)", "move it out of the stage step"),
    "unique_dim_consecutive": ("unique_consecutive (an output size read back by the host)",
                               "move it out of the stage step"),
    "bincount": ("bincount (an output size read back by the host)", "use scatter_add_ into a fixed size"),
    "_linalg_check_errors": ("a linalg error check (a host sync)", "use the *_ex variant of the linalg op"),
}


def _packets(names) -> list:
    """The aten op packets of ``names`` this torch has."""
    out = []
    for n in names:
        try:
            out.append(getattr(_aten, n))
        except (AttributeError, RuntimeError):
            pass
    return out


# op packet -> (what it is, what to do)
_SYNC = {p: _SYNC_RULES[p.__name__] for p in _packets(_SYNC_RULES)}
_REPEAT = {_aten.repeat_interleave}
_INDEX = set(_packets(("index", "index_put_", "index_put", "_index_put_impl_")))
_BOOL = (torch.bool, torch.uint8)


def _op(func) -> str:
    return f"aten.{func.overloadpacket.__name__}"


# ---------------------------------------------------------------- the dispatcher watch


_PLAIN, _RULE, _INDEXING, _REPEATING, _LIFT, _COPY, _TO_COPY, _RECORD = range(8)


def _kind(func) -> tuple[int, bool]:
    """What the watch checks of ``func``: its kind, and whether it draws random numbers."""
    packet = func.overloadpacket
    kind = (_RULE if packet in _SYNC else _INDEXING if packet in _INDEX else
            _REPEATING if packet in _REPEAT and func is not _aten.repeat_interleave.self_int else
            _LIFT if packet is _aten.lift_fresh or packet is _aten.lift_fresh_copy else
            _COPY if packet is _aten.copy_ else _TO_COPY if packet is _aten._to_copy else
            _RECORD if packet is _aten.record_stream else _PLAIN)
    return kind, torch.Tag.nondeterministic_seeded in func.tags


_KINDS: dict = {}  # op overload -> _kind(op), filled as ops are first seen


class _Mode(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch (2.14) wraps a mode's __torch_dispatch__ in a dynamo-disabling frame, several
        # microseconds per op; nothing is compiled inside a stage step's replay
        return False

    def __init__(self, watch: CaptureWatch):
        super().__init__()
        self.watch = watch
        self.made: set[int] = set()  # data pointers of tensors made inside the step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        k = _KINDS.get(func)
        if k is None:
            k = _KINDS[func] = _kind(func)
        kind, random = k
        if kind or random or self.watch.cuda:
            self.check(func, kind, random, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.made.add(out.data_ptr())
        elif isinstance(out, (tuple, list)):
            made = self.made
            for t in out:
                if isinstance(t, torch.Tensor):
                    made.add(t.data_ptr())
                elif isinstance(t, (tuple, list)):
                    made.update(u.data_ptr() for u in t if isinstance(u, torch.Tensor))
        return out

    def check(self, func, kind: int, random: bool, args, kwargs) -> None:
        watch = self.watch
        if kind == _RULE:
            what, todo = _SYNC[func.overloadpacket]
            watch.refuse(f"{_op(func)}: {what}", todo)
        elif kind == _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in _BOOL for i in indices or ()):
                watch.refuse(f"{_op(func)} with a boolean mask (an output size read back by the host)",
                             "multiply by the mask or use torch.where")
        elif kind == _REPEATING and kwargs.get("output_size") is None:
            watch.refuse(f"{_op(func)} without output_size (a host sync)", "pass output_size")
        elif kind == _LIFT and args[0].dim() > 0:
            watch.refuse(f"{_op(func)}: a tensor made from Python or host data",
                         "make it once outside the stage step (a registered buffer)")
        elif kind == _COPY:
            watch.check_copy(func, args[0], args[1], self.made)
        elif kind == _TO_COPY:
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev) != args[0].device:
                watch.refuse(f"{_op(func)} from {args[0].device} to {dev} (a copy across devices)",
                             "hand tensors over between stages, outside the stage step")
        elif kind == _RECORD:
            watch.refuse(f"{_op(func)}: Tensor.record_stream() (a stream-ordered lifetime)", STREAM_TODO)
        if random:
            gen = kwargs.get("generator")
            if gen is None:
                gen = next((a for a in args if isinstance(a, torch.Generator)), None)
            if gen is not None:
                watch.refuse(f"{_op(func)} with an explicit generator= ({gen.device}): a capture registers only "
                             "the default CUDA generator", "drop generator= (use the default generator)")
        if watch.cuda:
            watch.check_devices(func, args, kwargs)


class CaptureWatch:
    """Watches one stage step as a graph of it replays (see the module docstring).

    Args:
        stage: the stage's 0-based index (messages name it 1-based); None: an unnamed step.
        device: the graph's device.
        modules: the modules whose parameters and buffers the step trains ({prefix: module}).
        optimizer: the step's optimizer (its state tensors are checked).
        statics: the graph's static tensors ({name: tensor}), or a callable returning them.

    :meth:`snapshot` records every watched tensor's storage (at capture); :meth:`region` is the
    context a replay runs in; :meth:`verify` compares the storage with the snapshot."""

    def __init__(self, stage: int | None, device: torch.device, modules: dict | None = None,
                 optimizer: torch.optim.Optimizer | None = None, statics=None):
        self.stage, self.device = stage, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.modules = dict(modules or {})
        self.optimizer = optimizer
        self.statics = statics
        self._snapshot: dict | None = None
        self._fast: list = []
        self._owned: set[int] = set()

    # ------------------------------------------------------------ messages

    def where(self) -> str:
        return f"stage {self.stage + 1}'s CUDA graph step" if self.stage is not None else "a CUDA graph step"

    def refuse(self, what: str, todo: str):
        """Raise the one-line :class:`CaptureUnsafeError` for ``what`` (the op and why)."""
        raise CaptureUnsafeError(f"{self.where()} is not capture-safe: {what}; {todo}, {_FALLBACK}")

    # ------------------------------------------------------------ op checks

    def check_copy(self, func, dst: torch.Tensor, src, made: set[int]) -> None:
        if not isinstance(src, torch.Tensor):
            return
        if src.device != dst.device:
            self.refuse(f"{_op(func)} from {src.device} to {dst.device} (a copy across devices)",
                        "hand tensors over between stages, outside the stage step")
        if src.numel() == 0 or src.data_ptr() in made or src.untyped_storage().data_ptr() in self._owned:
            return
        self.refuse(f"{_op(func)} from a tensor the step does not own (not a parameter, buffer, optimizer state or "
                    "static tensor of the graph, nor made in the step: host memory or a fixed address in a real "
                    "graph)", "register it as a buffer of the stage or head, or make it inside the step")

    def check_devices(self, func, args, kwargs) -> None:
        """On a CUDA graph: every tensor an op reads is on the graph's device."""
        for a in (*args, *kwargs.values()):
            ts = a if isinstance(a, (tuple, list)) else (a,)
            for t in ts:
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    self.refuse(f"{_op(func)} reads a tensor on {t.device} (the graph runs on {self.device}; a CPU "
                                "scalar's value is baked in at capture)", "keep the step's tensors on its device")

    # ------------------------------------------------------------ storage

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every watched tensor by name: parameters, buffers, optimizer state, statics."""
        out: dict[str, torch.Tensor] = {}
        names = {}
        for prefix, module in self.modules.items():
            for n, p in module.named_parameters():
                out[f"parameter {prefix}.{n}"] = p
                names[id(p)] = f"{prefix}.{n}"
            for n, b in module.named_buffers():
                out[f"buffer {prefix}.{n}"] = b
        if self.optimizer is not None:
            for i, g in enumerate(self.optimizer.param_groups):
                for k, p in enumerate(g["params"]):
                    for key, v in self.optimizer.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor):
                            out[f"optimizer state {key!r} of {names.get(id(p), f'group {i} param {k}')}"] = v
        statics = self.statics() if callable(self.statics) else (self.statics or {})
        for n, t in statics.items():
            if t is not None:
                out[f"static {n}"] = t
        return out

    @staticmethod
    def _key(t: torch.Tensor):
        return t.data_ptr(), tuple(t.shape), t.dtype

    def _keys(self) -> list:
        """The storage keys of :meth:`tensors`, in its order, without building names (per replay)."""
        ts = []
        for module in self.modules.values():
            ts += module.parameters()
            ts += module.buffers()
        if self.optimizer is not None:
            state = self.optimizer.state
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    st = state.get(p)
                    if st:
                        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
        statics = self.statics() if callable(self.statics) else (self.statics or {})
        ts += [t for t in statics.values() if t is not None]
        return [(t.data_ptr(), t.shape, t.dtype) for t in ts]

    def snapshot(self) -> None:
        """Record every watched tensor's storage (call at capture)."""
        ts = self.tensors()
        self._snapshot = {n: self._key(t) for n, t in ts.items()}
        self._fast = self._keys()
        self._owned = {t.untyped_storage().data_ptr() for t in ts.values()}

    def verify(self, when: str) -> None:
        """Refuse when a watched tensor's storage changed since :meth:`snapshot`."""
        if self._snapshot is None or self._keys() == self._fast:
            return
        now = {n: self._key(t) for n, t in self.tensors().items()}
        if now == self._snapshot:
            return
        for n, key in self._snapshot.items():
            cur = now.get(n)
            if cur != key:
                change = "is gone" if cur is None else (
                    "moved to other memory" if cur[1:] == key[1:] else f"changed from {list(key[1])} {key[2]} to "
                    f"{list(cur[1])} {cur[2]}")
                self.refuse(f"{n} {change} {when} (the graph keeps the captured memory)",
                            "update it in place (.copy_()) or make the engine capture again (Trainer.load_state_dict "
                            "resets it)")
        extra = next(n for n in now if n not in self._snapshot)
        self.refuse(f"{extra} appeared {when} (the graph does not see it)",
                    "make the engine capture again (Trainer.load_state_dict resets it)")

    # ------------------------------------------------------------ the region

    def region(self):
        """The context one emulated replay runs in."""
        return _Region(self)


class _Region:
    def __init__(self, watch: CaptureWatch):
        self.watch = watch

    def __enter__(self):
        if active() is not None:
            raise RuntimeError("capture-safety regions do not nest")
        self.mode = _Mode(self.watch)
        install()
        thread_state.watch = self.watch
        try:
            self.mode.__enter__()
        except BaseException:
            thread_state.watch = None
            uninstall()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.mode.__exit__(*exc)
        finally:
            thread_state.watch = None
            uninstall()
        return False
