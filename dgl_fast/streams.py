"""How stage steps order their work across CUDA streams, behind one small interface.

The free-running schedules (asynchronous DGL on streams) and the replay buffers order their work
only through these calls, so the same code runs on real CUDA streams (:class:`CudaStreams`) or,
on the CPU, on :class:`RecordedStreams`: a stand-in that runs every operation at once and keeps
a vector clock per stream, so that a test can ask whether one operation is ordered after
another (``happens_before``) exactly as the device would order them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

__all__ = ["CudaStreams", "RecordedStreams", "Mark"]


class CudaStreams:
    """Real CUDA streams and events on ``device``."""

    recorded = False

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        """Context in which ``stream`` is the current stream."""
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def record(self, event, stream=None) -> None:
        event.record(stream if stream is not None else self.current())

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream, other) -> None:
        stream.wait_stream(other)

    def keep_alive(self, tensor: torch.Tensor, stream) -> None:
        """``tensor`` (allocated on another stream) is used on ``stream``: the caching allocator
        must not reuse its memory before ``stream``'s work on it is done."""
        tensor.record_stream(stream)

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def mark(self, what) -> None:
        """A named point in the current stream's work (recorded streams only; free here)."""


@dataclass
class _FakeStream:
    name: str
    clock: dict = field(default_factory=dict)  # stream name -> operations of that stream ordered before now

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@dataclass
class _FakeEvent:
    clock: dict | None = None


@dataclass(frozen=True)
class Mark:
    """One recorded operation: what it was, the stream it ran on, and its vector clock."""

    what: object
    stream: str
    clock: tuple

    def seq(self) -> int:
        return dict(self.clock)[self.stream]


class RecordedStreams:
    """CPU stand-in for :class:`CudaStreams` that records the order the device would enforce.

    Work runs immediately on the CPU. Each stream carries a vector clock: :meth:`mark` advances
    the current stream's own entry and records a :class:`Mark`; :meth:`record` copies a stream's
    clock into an event and :meth:`wait_event` / :meth:`wait_stream` merge it into the waiting
    stream's clock. Operation ``a`` is ordered before ``b`` on a device exactly when ``b``'s clock
    has seen ``a`` (:meth:`happens_before`).
    """

    recorded = True

    def __init__(self):
        self.caller = _FakeStream("caller")
        self._current = self.caller
        self._n = 0
        self.marks: list[Mark] = []

    def new_stream(self) -> _FakeStream:
        self._n += 1
        return _FakeStream(f"s{self._n}")

    def current(self) -> _FakeStream:
        return self._current

    @contextlib.contextmanager
    def use(self, stream: _FakeStream):
        prev, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = prev

    def new_event(self) -> _FakeEvent:
        return _FakeEvent()

    def record(self, event: _FakeEvent, stream: _FakeStream | None = None) -> None:
        event.clock = dict((stream or self._current).clock)

    @staticmethod
    def _merge(stream: _FakeStream, clock: dict) -> None:
        for k, v in clock.items():
            if stream.clock.get(k, 0) < v:
                stream.clock[k] = v

    def wait_event(self, stream: _FakeStream, event: _FakeEvent) -> None:
        if event.clock is not None:  # like CUDA: waiting on a never-recorded event is a no-op
            self._merge(stream, event.clock)

    def wait_stream(self, stream: _FakeStream, other: _FakeStream) -> None:
        self._merge(stream, other.clock)

    def keep_alive(self, tensor: torch.Tensor, stream) -> None:
        pass

    def capturing(self) -> bool:
        return False

    def mark(self, what) -> None:
        s = self._current
        s.clock[s.name] = s.clock.get(s.name, 0) + 1
        self.marks.append(Mark(what, s.name, tuple(sorted(s.clock.items()))))

    @staticmethod
    def happens_before(a: Mark, b: Mark) -> bool:
        """Whether the device would finish ``a`` before it starts ``b``."""
        return dict(b.clock).get(a.stream, 0) >= a.seq()
