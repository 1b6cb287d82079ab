"""Messages between ranks: the grid layout, checked headers, timeouts and one-line faults.

A DGL stage only ever needs its predecessor's activations and labels, so the only point-to-point
traffic is *forward*: rank (replica r, group g) sends to (r, g + 1). Every message is a fixed-size
int64 header (magic, kind, sequence number, the full batch size, dtype, shape) followed, for data,
by the activations and the labels. The receiver checks the header against the shape and dtype it
expects before it receives a byte of payload, so a rank launched with another model can never
receive into a wrong-sized buffer.

A link towards a stage whose loss needs the network's input (InfoPro's reconstruction) carries
the input image too (``Link(image=...)`` at both ends; kind ``DATA_IMAGE``): each data message
is then followed by its batch's (share of the) image, received into a buffer of the expected
shape, so the image a rank trains on is always the one of the activations it came with.

Every blocking exchange waits at most ``timeout`` seconds. A peer that stalled (SIGSTOP, a hung
GPU, a link gone down) or died (the connection closes) raises :class:`PeerError`, one line that
names this rank, its stages, the peer and its stages; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Layout", "Link", "make_link_groups", "PeerError", "Receiver", "DATA", "END", "DATA_IMAGE", "describe_failure",
           "stage_range"]

MAGIC = 0x44474C46  # "DGLF"
DATA, END, DATA_IMAGE = 1, 2, 3  # DATA_IMAGE: data followed by the batch's input image
_MAX_DIMS = 6
_HEADER = 6 + _MAX_DIMS  # magic, kind, seq, batch_total, dtype, ndim, dims...
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]


class PeerError(RuntimeError):
    """Another rank stalled, died, or sent something this rank did not expect."""


def stage_range(stages: list[int]) -> str:
    """``"stage 3"`` / ``"stages 3-5"`` (numbered from 1) of a contiguous list of 0-based stages."""
    return f"stage {stages[0] + 1}" if len(stages) == 1 else f"stages {stages[0] + 1}-{stages[-1] + 1}"


@dataclass(frozen=True)
class Layout:
    """The grid of ranks: ``groups`` stage groups x ``replicas`` replica rows.

    Rank ``replica * groups + group`` trains stage group ``group`` of replica row ``replica``: with
    ``torchrun --nproc-per-node G`` on R machines, a pipeline stays inside one machine (activations
    over the fast local links) and only gradients of replicas cross machines.
    """

    placement: tuple[int, ...]  # stage group of each stage
    replicas: int

    @property
    def groups(self) -> int:
        return self.placement[-1] + 1

    @property
    def world(self) -> int:
        return self.groups * self.replicas

    def coords(self, rank: int) -> tuple[int, int]:
        """``(replica, group)`` of ``rank``."""
        return divmod(rank, self.groups)

    def rank(self, replica: int, group: int) -> int:
        return replica * self.groups + group

    def stages(self, group: int) -> list[int]:
        return [j for j, g in enumerate(self.placement) if g == group]

    def describe(self, rank: int) -> str:
        """``"rank 3 (replica 2, stages 4-6)"``."""
        replica, group = self.coords(rank)
        row = f"replica {replica + 1}, " if self.replicas > 1 else ""
        return f"rank {rank} ({row}{stage_range(self.stages(group))})"


def describe_failure(exc: BaseException) -> str:
    """What a gloo / NCCL error means, in a few words."""
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low or "timing out" in low:
        return "no answer within the timeout: it stalled, or the link to it is down"
    if "closed" in low or "reset" in low or "broken pipe" in low:
        return "the connection closed: it exited or crashed"
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def _encode(kind: int, seq: int, total: int, t: torch.Tensor | None) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.long)
    header[:4] = torch.tensor([MAGIC, kind, seq, total])
    if t is not None:
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"activations with {t.dim()} dimensions cannot be sent (at most {_MAX_DIMS})")
        header[4] = _DTYPES.index(t.dtype)
        header[5] = t.dim()
        header[6:6 + t.dim()] = torch.tensor(t.shape)
    return header


def make_link_groups(layout: Layout, timeout: float) -> dict:
    """One process group per forward link ``(r, g) -> (r, g + 1)``, keyed by ``(sender, receiver)``
    rank, made in the same order on every rank (every rank must call this): a rank's sends (main
    thread) and its receives (async mode: the receiver's thread) then never share a communicator,
    which NCCL does not promise is safe across threads. The groups' own timeout is a backstop
    (1.5 x ``timeout`` + 30 s); every exchange waits at most ``timeout`` (:class:`Link`)."""
    backstop = datetime.timedelta(seconds=1.5 * float(timeout) + 30)
    groups = {}
    for r in range(layout.replicas):
        for g in range(layout.groups - 1):
            a, b = layout.rank(r, g), layout.rank(r, g + 1)
            groups[a, b] = dist.new_group([a, b], timeout=backstop)
    return groups


class Link:
    """This rank's end of the forward link to one neighbour (``peer``), with ``timeout`` seconds
    for each blocking wait. ``expect`` is the per-sample shape and dtype of the activations the
    peer sends (receiving end only). ``group``: the process group of this link alone (both ends
    in it; None: the default group), so that the two directions of a rank never share one.
    ``image``: the per-sample shape and dtype of the input image the link carries with each batch
    (both ends; None: no image)."""

    def __init__(self, layout: Layout, rank: int, peer: int, device: torch.device, timeout: float,
                 expect: tuple[tuple[int, ...], torch.dtype] | None = None, max_in_flight: int = 2, group=None,
                 image: tuple[tuple[int, ...], torch.dtype] | None = None):
        self.layout, self.rank, self.peer, self.device = layout, rank, peer, device
        self.image = image
        self.group = group
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.expect = expect
        self.max_in_flight = max(1, int(max_in_flight))
        self._sends: list = []
        self.seq = 0  # messages sent / received so far

    def _fail(self, doing: str, exc: BaseException, started: float) -> PeerError:
        me, peer = self.layout.describe(self.rank), self.layout.describe(self.peer)
        return PeerError(f"{me}: {doing} {peer} failed after {time.monotonic() - started:.1f} s "
                         f"(timeout {self.timeout.total_seconds():g} s): {describe_failure(exc)}")

    def _wait(self, post, doing: str, started: float) -> None:
        """``post()`` an exchange and wait for it; a failure of either becomes a PeerError."""
        try:
            post().wait(self.timeout)
        except RuntimeError as exc:
            raise self._fail(doing, exc, started) from None

    # ------------------------------------------------------------------ sending

    def send(self, h: torch.Tensor | None, y: torch.Tensor | None = None, total: int = 0, kind: int = DATA,
             image: torch.Tensor | None = None) -> None:
        """Send ``(h, y)`` (``kind=DATA``; ``total`` is the batch size before the replicas split
        it; ``image``: the batch's input image, sent when the link carries images) or an ``END``
        marker. Returns once at most ``max_in_flight`` messages are in flight."""
        started = time.monotonic()
        msgs = [h, y]
        if kind == DATA and self.image is not None:
            shape = (h.shape[0], *self.image[0])
            if image is None or tuple(image.shape) != shape or image.dtype != self.image[1]:
                got = "none" if image is None else f"{list(image.shape)} {image.dtype}"
                raise ValueError(f"this link carries the input image of each batch: expected {list(shape)} "
                                 f"{self.image[1]}, got {got}")
            kind, msgs = DATA_IMAGE, [h, y, image]
        header = _encode(kind, self.seq, total, h).to(self.device)
        msgs = [header] if kind == END else [header, *(t.contiguous() for t in msgs)]
        try:
            for t in msgs:
                self._sends.append((dist.isend(t, self.peer, group=self.group), t))
        except RuntimeError as exc:
            raise self._fail("sending to", exc, started) from None
        self.seq += 1
        while len(self._sends) > 3 * self.max_in_flight:
            work, _ = self._sends.pop(0)
            self._wait(lambda work=work: work, "sending to", started)

    def drain(self) -> None:
        """Wait until every message sent has been delivered."""
        started = time.monotonic()
        while self._sends:
            work, _ = self._sends.pop(0)
            self._wait(lambda work=work: work, "sending to", started)

    # ------------------------------------------------------------------ receiving

    def recv(self):
        """The next message: ``(h, y, total, image)`` for data (``image`` None unless the link
        carries images), None for ``END``. The header is checked (magic, sequence, dtype,
        per-sample shape, the image's presence) before the payload is received."""
        started = time.monotonic()
        header = torch.empty(_HEADER, dtype=torch.long, device=self.device)
        self._wait(lambda: dist.irecv(header, self.peer, group=self.group), "waiting for", started)
        magic, kind, seq, total, code, ndim, *dims = header.tolist()
        peer = self.layout.describe(self.peer)
        me = self.layout.describe(self.rank)
        if magic != MAGIC or kind not in (DATA, END, DATA_IMAGE) or seq != self.seq:
            raise PeerError(f"{me}: message {self.seq} from {peer} is not a dgl_fast message header "
                            f"(magic {magic:#x}, kind {kind}, sequence {seq}): the ranks run different code")
        self.seq += 1
        if kind == END:
            return None
        if (kind == DATA_IMAGE) != (self.image is not None):
            raise PeerError(f"{me}: {peer} sent {'an' if kind == DATA_IMAGE else 'no'} input image with its activations, "
                            f"expected {'one' if self.image is not None else 'none'}: the ranks hold different models")
        shape = tuple(dims[:ndim])
        dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else None
        want_shape, want_dtype = self.expect
        if dtype != want_dtype or shape[1:] != tuple(want_shape) or not shape or shape[0] < 1:
            raise PeerError(f"{me}: {peer} sent activations of shape {list(shape)} {dtype}, expected "
                            f"[B, {', '.join(map(str, want_shape))}] {want_dtype}: the ranks hold different models")
        h = torch.empty(shape, dtype=dtype, device=self.device)
        y = torch.empty(shape[0], dtype=torch.long, device=self.device)
        self._wait(lambda: dist.irecv(h, self.peer, group=self.group), "waiting for", started)
        self._wait(lambda: dist.irecv(y, self.peer, group=self.group), "waiting for", started)
        image = None
        if self.image is not None:
            image = torch.empty((shape[0], *self.image[0]), dtype=self.image[1], device=self.device)
            self._wait(lambda: dist.irecv(image, self.peer, group=self.group), "waiting for", started)
        return h, y, total, image


class Receiver:
    """Asynchronous DGL's receiving side: a thread receives every message of ``link`` as soon as
    it arrives (so the sender never waits for this rank's compute) and keeps the newest
    ``capacity`` in a queue; older ones not yet taken are dropped, as a ring buffer overwrites.
    :meth:`take` returns what arrived (``(h, y, image)``, ``image`` None on a link without images)
    and whether ``END`` came; an error of the thread (a :class:`PeerError`) is raised there."""

    def __init__(self, link: Link, capacity: int):
        self.link, self.capacity = link, max(1, int(capacity))
        self._q: queue.Queue = queue.Queue()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"dgl_fast-recv-{link.rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.link.device.type == "cuda":  # a new thread starts on device 0
                torch.cuda.set_device(self.link.device)
            while True:
                msg = self.link.recv()
                self._q.put(msg)
                if msg is None:
                    return
                while self._q.qsize() > self.capacity:  # the oldest data goes, as a ring overwrites
                    try:
                        old = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(old, tuple):  # never END or an error (those come last)
                        self._q.put(old)
                        break
                    self.dropped += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._q.put(exc)

    def _item(self, block: bool):
        item = self._q.get(timeout=self.link.timeout.total_seconds() + 5) if block else self._q.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item

    def take(self, block: bool) -> tuple[list, bool]:
        """Messages arrived since the last call (at least one if ``block``), newest ``capacity``."""
        got, ended = [], False
        try:
            while True:
                item = self._item(block and not got and not ended)
                if item is None:
                    ended = True
                    break
                got.append((item[0], item[1], item[3]))
        except queue.Empty:
            if block and not got and not ended:
                raise PeerError(f"{self.link.layout.describe(self.link.rank)}: nothing from "
                                f"{self.link.layout.describe(self.link.peer)} within the timeout") from None
        if len(got) > self.capacity:
            self.dropped += len(got) - self.capacity
            got = got[-self.capacity:]
        return got, ended

    def join(self) -> None:
        self._thread.join(timeout=self.link.timeout.total_seconds())
