"""Where events go: the small ``EventSink`` protocol and its offline implementations.

The trainer depends only on ``EventSink``; ``PublisherSink`` (``runtime.publish.sink``, the run's
publisher process) is the bus implementation, ``MemorySink`` keeps events for tests, ``NullSink``
drops them for offline runs.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from runtime.publish.direct import event_id
from schemas import Event


@dataclass
class PublisherStats:
    """What a sink did with the events it was given."""

    published: int = 0
    duplicates: int = 0
    retried: int = 0
    outbox_pending: int = 0
    invalid: int = 0
    dead_lettered: int = 0
    """Events the bus refuses for good, set aside in the dead-letter file beside the outbox."""
    trimmed: int = 0
    """Events published with their largest parts trimmed to fit the server's max_payload."""
    failure: str | None = None
    """Why the sink stopped publishing, if it did (its publisher process kept dying)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class EventSink(Protocol):
    """Accepts events without blocking the caller; ``close`` flushes and reports."""

    def publish(self, event: Event) -> None: ...

    def close(self, timeout: float = 10.0) -> PublisherStats: ...


class NullSink:
    """Drops every event (offline training, or a rank that does not own the bus)."""

    def publish(self, event: Event) -> None:
        return None

    def close(self, timeout: float = 10.0) -> PublisherStats:
        return PublisherStats()


class MemorySink:
    """Keeps every event in a list; for tests and for embedding trainbus in notebooks."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of_type(self, event_type: str) -> list[Any]:
        """Events whose ``type`` is ``event_type``, in publish order."""
        with self._lock:
            return [e for e in self.events if e.type == event_type]

    def close(self, timeout: float = 10.0) -> PublisherStats:
        return PublisherStats(published=len(self.events))


class Counter(Protocol):
    """Where a stamper's numbers live: the last seq given out, the attempt, whether it is sealed.

    ``held`` serialises numbering and publishing. ``LocalCounter`` keeps them in this process; a
    sink whose numbering another process shares (``runtime.publish.sink``) brings its own as ``counter``.
    """

    value: int
    attempt: int
    sealed: bool

    def held(self) -> AbstractContextManager[object]: ...


class LocalCounter:
    """A counter for one process: a lock and three fields."""

    def __init__(self) -> None:
        self.value = 0
        self.attempt = 0
        self.sealed = False
        self._lock = threading.Lock()

    def held(self) -> AbstractContextManager[object]:
        return self._lock


class Stamper:
    """Fills the envelope (event_id, seq, attempt, source) and hands events to a sink in seq order.

    Thread-safe: the training thread and the heartbeat thread share one stamper, and the counter's
    lock makes sequence order and publish order the same (across processes, when the sink shares
    its numbering with its publisher process). ``emit_last`` seals it: nothing is published after an
    attempt's ``run.finished`` (a late heartbeat or command reply is dropped instead).
    ``attempt=None`` keeps the attempt the counter has (the publisher process numbers for the
    trainer's attempt).
    """

    def __init__(
        self,
        sink: EventSink,
        run_id: str,
        attempt: int | None = 1,
        source: str = "trainer",
        counter: Counter | None = None,
    ) -> None:
        self.sink = sink
        self.run_id = run_id
        self.source = source
        self.counter: Counter = counter or getattr(sink, "counter", None) or LocalCounter()
        if attempt is not None:
            with self.counter.held():
                self.counter.attempt = attempt

    @property
    def attempt(self) -> int:
        return self.counter.attempt

    @property
    def seq(self) -> int:
        """The last seq given out."""
        return self.counter.value

    @seq.setter
    def seq(self, value: int) -> None:
        self.counter.value = value

    @property
    def sealed(self) -> bool:
        return self.counter.sealed

    def emit(self, cls: type[Any], **fields: Any) -> Event:
        """Build an event of type ``cls`` with the next seq and publish it (unless sealed)."""
        return self._emit(cls, fields, last=False)

    def emit_last(self, cls: type[Any], **fields: Any) -> Event:
        """Publish the attempt's last event and seal the stamper."""
        return self._emit(cls, fields, last=True)

    def _emit(self, cls: type[Any], fields: dict[str, Any], last: bool) -> Event:
        c = self.counter
        with c.held():
            seq, attempt = c.value + 1, c.attempt
            msg_id = (
                f"{self.run_id}.{attempt}.{seq}"
                if self.source == "trainer"
                else event_id(self.run_id, self.source, attempt, seq)
            )
            event: Event = cls(
                event_id=msg_id, run_id=self.run_id, attempt=attempt, seq=seq, source=self.source, **fields
            )
            if not c.sealed:
                c.value = seq
                self.sink.publish(event)
                c.sealed = last
            return event
