"""ReplayBuffer: a ring of mini-batches (activations and labels) between two DGL stages.

Asynchronous DGL (PAPER.md section 5) lets stage j train on activations stage j-1 produced
earlier: stage j-1 pushes, stage j samples. The ring lives on the buffer's device and its state
(head, fill count, use counts, the chosen slot) in device tensors, so push and sample never
synchronise the host and can be captured in a CUDA graph (``torch.ops.dgl_fast.replay_push`` /
``replay_sample``).

Policies (``policy=``):

- ``"priority_lifo"`` (the authors'): among filled slots, those sampled the fewest times; among
  them, the most recently written.
- ``"fifo"``: the fewest uses, then the oldest (with ``max_reuse=1``, a queue).
- ``"uniform"``: a random available slot, drawn on the device from a counter-based hash of
  ``seed`` and the number of samples taken (reproducible, identical on CPU and CUDA).

``max_reuse=R``: a slot can be sampled R times; when every slot is used up, :meth:`sample`
reports nothing available (``sample.valid`` is False, a device tensor). Two quirks of the
authors' code are *not* copied: there a fresh slot starts with use count 1 (so their R allows
R-1 uses) and, once the ring is full, their tie-break ranks the oldest slot as the freshest.

Cross-stream use: every push and sample first makes the current stream wait for the buffer's
previous operation (a CUDA event the buffer owns) and then records a new one, so a producer on
one stream and a consumer on another never see a half-written slot (the calls go through
:mod:`dgl_fast.streams`, whose CPU stand-in lets tests check that order). The tensors returned by
:meth:`sample` are fresh and owned by the caller. Inside a CUDA graph capture the events are
skipped (the graph orders its own work); capture the raw ops (:func:`dgl_fast.ops.replay_push`,
:func:`dgl_fast.ops.replay_sample`) with static outputs to replay them, and note that the host-side
``pushes`` count only counts eager pushes.

The input image (``image_shape=``, for a rule whose loss reconstructs it, InfoPro): each slot also
keeps the image of the batch whose activations it holds, in its own dtype. The native ops know
only activations and labels, so the image goes into a parallel store indexed by the same slot:
a push writes it at the ring's head (the slot ``replay_push`` then fills), a sample reads the
slot ``replay_sample`` chose (its ``info``), both device-side (no host sync), on the same stream
and under the same events as the ring.
"""

from __future__ import annotations

import math
import os

import torch

from . import ops
from .streams import CudaStreams
from .utils import resolve_device

__all__ = ["ReplayBuffer", "Sample"]


class Sample(tuple):
    """``(h, y)`` from :meth:`ReplayBuffer.sample`, plus ``valid`` (bool device tensor: a slot was
    available), ``slot`` (int64 device tensor, -1 when none) and ``image`` (the slot's input image
    in a buffer with ``image_shape``, else None). Unpacks as ``h, y = sample``.
    ``valid`` is made when first read (one small kernel), not on every sample."""

    slot: torch.Tensor
    image: torch.Tensor | None

    def __new__(cls, h: torch.Tensor, y: torch.Tensor, info: torch.Tensor, image: torch.Tensor | None = None):
        self = super().__new__(cls, (h, y))
        self.slot, self.image = info[0], image
        self._info = info
        return self

    @property
    def valid(self) -> torch.Tensor:
        """Whether a slot was available (bool device tensor; no host sync)."""
        return self._info[1].bool()


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class ReplayBuffer:
    """A GPU- (or CPU-) resident ring of ``capacity`` mini-batches and their labels.

    Args:
        capacity: M, the number of mini-batches held.
        batch_shape: shape of one pushed mini-batch of activations, batch first (``(B, C, H, W)``).
        dtype: dtype of pushed and sampled activations.
        device: where the ring lives.
        policy: ``"priority_lifo"``, ``"fifo"`` or ``"uniform"`` (see the module docstring).
        max_reuse: times a slot may be sampled (None: unlimited).
        storage_dtype: dtype the ring stores (e.g. ``torch.bfloat16`` halves memory); default ``dtype``.
        seed: seed of the ``uniform`` policy's draws.
        streams: what orders push and sample across streams: by default real CUDA streams on a CUDA
            device and nothing on the CPU (operations run in program order);
            :class:`dgl_fast.streams.RecordedStreams` records that order on the CPU (tests).
        image_shape: shape of the input image pushed with each mini-batch (batch first; None: no
            image); ``image_dtype``: its dtype (default ``dtype``), stored as is.

    The memory it needs (:attr:`nbytes`) is checked against what the device has free before
    anything is allocated.
    """

    def __init__(self, capacity: int, batch_shape, dtype: torch.dtype = torch.float32, device="cpu",
                 policy: str = "priority_lifo", max_reuse: int | None = None, storage_dtype: torch.dtype | None = None,
                 seed: int = 0, streams=None, image_shape=None, image_dtype: torch.dtype | None = None):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be an int >= 1, got {capacity!r}")
        batch_shape = tuple(batch_shape)
        if len(batch_shape) < 1 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in batch_shape):
            raise ValueError(f"batch_shape must be positive ints, batch first, got {batch_shape!r}")
        storage_dtype = storage_dtype or dtype
        for name, dt in (("dtype", dtype), ("storage_dtype", storage_dtype)):
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ValueError(f"ReplayBuffer {name} must be a floating-point torch.dtype, got {dt!r}")
        if policy not in ops.REPLAY_POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}; expected one of {', '.join(ops.REPLAY_POLICIES)}")
        if max_reuse is not None and (not isinstance(max_reuse, int) or isinstance(max_reuse, bool) or max_reuse < 1):
            raise ValueError(f"max_reuse must be None or an int >= 1, got {max_reuse!r}")
        self.device = resolve_device(device)
        self.capacity, self.batch_shape, self.dtype = capacity, batch_shape, dtype
        self.storage_dtype, self.policy, self.max_reuse, self.seed = storage_dtype, policy, max_reuse, int(seed)
        B = batch_shape[0]
        item = storage_dtype.itemsize
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.image_dtype = image_dtype or dtype
        if self.image_shape is not None and (len(self.image_shape) < 1 or self.image_shape[0] != B or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.image_shape)):
            raise ValueError(f"image_shape must be positive ints, batch ({B}) first, got {image_shape!r}")
        self.nbytes = capacity * (math.prod(batch_shape) * item + B * 8) + 2 * capacity * 8 + 4 * 8
        if self.image_shape is not None:
            self.nbytes += capacity * math.prod(self.image_shape) * self.image_dtype.itemsize
        free = _free_bytes(self.device)
        if free is not None and self.nbytes > free:
            raise MemoryError(f"ReplayBuffer of {capacity} x {list(batch_shape)} {storage_dtype} needs "
                              f"{_mib(self.nbytes)} but only {_mib(free)} is free on {self.device}")
        kw = dict(device=self.device)
        self.storage = torch.empty((capacity, *batch_shape), dtype=storage_dtype, **kw)
        self.label_store = torch.empty((capacity, B), dtype=torch.long, **kw)
        self.state = torch.zeros(4, dtype=torch.long, **kw)  # head, count, pushes, samples
        self.uses = torch.zeros(capacity, dtype=torch.long, **kw)
        self.stamps = torch.zeros(capacity, dtype=torch.long, **kw)
        #: the image of each slot's batch (``image_shape`` given), else None
        self.image_store = (None if self.image_shape is None else
                            torch.empty((capacity, *self.image_shape), dtype=self.image_dtype, **kw))
        self.pushes = 0  # host-side count of pushes made through this object
        self.streams = streams if streams is not None else (CudaStreams(self.device) if self.device.type == "cuda" else None)
        self._event = None
        self._event_stream = None
        self._streams_seen: set = set()

    def __len__(self) -> int:
        """Filled slots (known on the host: every push fills one)."""
        return min(self.pushes, self.capacity)

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity}, batch_shape={self.batch_shape}, dtype={self.dtype}, "
                f"storage_dtype={self.storage_dtype}, device={self.device}, policy={self.policy!r}, "
                f"max_reuse={self.max_reuse}, nbytes={self.nbytes})")

    # cross-stream ordering -------------------------------------------------------------------
    def _ordered(self) -> bool:
        # Inside a CUDA graph capture the ops are recorded on the capturing stream; events recorded
        # outside the capture cannot be waited on there, so ordering is left to the graph.
        return self.streams is not None and not self.streams.capturing()

    def _enter(self) -> None:
        if not self._ordered():
            return
        st = self.streams
        stream = st.current()
        if self._event is not None and self._event_stream != stream:
            st.wait_event(stream, self._event)
        if stream not in self._streams_seen:
            self._streams_seen.add(stream)
            for t in self._tensors():
                st.keep_alive(getattr(self, t), stream)

    def _leave(self, what: str) -> None:
        if not self._ordered():
            return
        st = self.streams
        stream = st.current()
        st.mark((self, what))
        if self._event is None:
            self._event = st.new_event()
        st.record(self._event, stream)
        self._event_stream = stream

    def _tensors(self) -> tuple[str, ...]:
        names = ("storage", "label_store", "state", "uses", "stamps")
        return names if self.image_store is None else (*names, "image_store")

    # checkpoints ---------------------------------------------------------------------------
    def config(self) -> dict:
        """What a checkpoint's ring must match to be loaded into this one."""
        out = {"capacity": self.capacity, "batch_shape": list(self.batch_shape), "dtype": str(self.dtype),
               "storage_dtype": str(self.storage_dtype), "policy": self.policy, "max_reuse": self.max_reuse}
        if self.image_shape is not None:
            out.update(image_shape=list(self.image_shape), image_dtype=str(self.image_dtype))
        return out

    def state_dict(self) -> dict:
        """The ring's contents and state (device tensors, copied to the CPU), for exact resume."""
        self._enter()  # after the ring's last operation, on the current stream
        out = {"config": self.config(), "pushes": self.pushes,
               **{k: getattr(self, k).cpu() for k in self._tensors()}}
        self._leave("read")
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match (checked first)."""
        if state.get("config") != self.config():
            raise ValueError(f"replay buffer checkpoint holds {state.get('config')}, this buffer is {self.config()}")
        self._enter()
        for k in self._tensors():
            getattr(self, k).copy_(state[k])
        self._leave("load")
        self.pushes = int(state["pushes"])

    # ops -----------------------------------------------------------------------------------
    def push(self, h: torch.Tensor, y: torch.Tensor, image: torch.Tensor | None = None) -> None:
        """Store mini-batch ``h`` (shape ``batch_shape``, any floating dtype: it is converted to the
        storage dtype on the way in) and its labels ``y`` at the ring's head; ``image``: its input
        image (exactly when the buffer has ``image_shape``)."""
        if not isinstance(h, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"ReplayBuffer.push expects tensors, got {type(h).__name__} and {type(y).__name__}")
        if tuple(h.shape) != self.batch_shape:
            raise ValueError(f"ReplayBuffer.push: expected activations of shape {list(self.batch_shape)}, got {list(h.shape)}")
        if not h.dtype.is_floating_point:
            raise ValueError(f"ReplayBuffer.push: expected floating-point activations (stored as {self.storage_dtype}), "
                             f"got {h.dtype}")
        if h.device != self.device:
            raise ValueError(f"ReplayBuffer.push: expected activations on {self.device}, got {h.device}")
        if tuple(y.shape) != (self.batch_shape[0],):
            raise ValueError(f"ReplayBuffer.push: expected labels of shape [{self.batch_shape[0]}], got {list(y.shape)}")
        if y.dtype != torch.long:
            raise ValueError(f"ReplayBuffer.push: expected int64 labels, got {y.dtype}")
        if y.device != self.device:
            raise ValueError(f"ReplayBuffer.push: expected labels on {self.device}, got {y.device}")
        if y.device.type == "cpu" and y.numel() and int(y.min()) < 0:
            # free on the host; on a GPU the loss kernel flags a negative label (NaN loss) instead
            raise ValueError(f"ReplayBuffer.push: expected class labels >= 0, got {int(y.min())}")
        self._check_image(image, "ReplayBuffer.push", "image")
        self._enter()
        if image is not None:  # at the head: the slot the push below fills
            self.image_store.index_copy_(0, self.state[:1], image.detach().unsqueeze(0))
        ops.replay_push(self.storage, self.label_store, self.state, self.uses, self.stamps, h.detach(), y)
        self._leave("push")
        self.pushes += 1

    def sample(self) -> Sample:
        """One stored mini-batch chosen by the policy, as fresh tensors ``(h, y)``.

        Raises a ValueError on a buffer nothing was pushed to. With ``max_reuse``, when every slot
        is used up the result has ``valid`` False (a device tensor: no host synchronisation) and
        its tensors hold unspecified values.
        """
        out = torch.empty(self.batch_shape, dtype=self.dtype, device=self.device)
        out_labels = torch.empty(self.batch_shape[0], dtype=torch.long, device=self.device)
        info = torch.empty(2, dtype=torch.long, device=self.device)
        image = None if self.image_store is None else torch.empty(self.image_shape, dtype=self.image_dtype,
                                                                  device=self.device)
        return self.sample_into(out, out_labels, info, image)

    def sample_into(self, out: torch.Tensor, out_labels: torch.Tensor, info: torch.Tensor,
                    out_image: torch.Tensor | None = None) -> Sample:
        """:meth:`sample` into tensors the caller owns (a CUDA graph's static inputs, say): ``out``
        of ``batch_shape`` and ``dtype``, ``out_labels`` int64 ``[B]``, ``info`` int64 ``[2]``
        (slot, valid), ``out_image`` of ``image_shape`` and ``image_dtype`` (exactly when the
        buffer keeps images), all on the buffer's device. They are written on the current
        stream, after the buffer's previous operation."""
        if self.pushes == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty; push a mini-batch first")
        if tuple(out.shape) != self.batch_shape or out.dtype != self.dtype:
            raise ValueError(f"ReplayBuffer.sample_into: expected out of shape {list(self.batch_shape)} and dtype "
                             f"{self.dtype}, got {list(out.shape)} {out.dtype}")
        if tuple(info.shape) != (2,) or info.dtype != torch.long:
            raise ValueError(f"ReplayBuffer.sample_into: expected an int64 info tensor of shape [2], got "
                             f"{list(info.shape)} {info.dtype}")
        self._check_image(out_image, "ReplayBuffer.sample_into", "out_image")
        self._enter()
        ops.replay_sample(self.state, self.uses, self.stamps, self.storage, self.label_store, out, out_labels, info,
                          self.policy, self.max_reuse, self.seed)
        if out_image is not None:  # the slot just chosen (none: slot 0, unspecified like the rest)
            out_image.copy_(self.image_store.index_select(0, info[:1].clamp(min=0)).squeeze(0))
        self._leave("sample")
        return Sample(out, out_labels, info, out_image)

    def _check_image(self, image, what: str, name: str) -> None:
        if self.image_store is None:
            if image is not None:
                raise ValueError(f"{what}: this buffer keeps no images (image_shape=None), got an {name}")
            return
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"{what}: this buffer keeps the input image of each batch: expected an {name} of shape "
                             f"{list(self.image_shape)}, got {type(image).__name__}")
        if tuple(image.shape) != self.image_shape or image.dtype != self.image_dtype or image.device != self.device:
            raise ValueError(f"{what}: expected an {name} of shape {list(self.image_shape)}, {self.image_dtype} on "
                             f"{self.device}, got {list(image.shape)} {image.dtype} on {image.device}")
