"""Where events go: the small ``EventSink`` protocol and its offline implementations.

The trainer depends only on ``EventSink``; ``NatsPublisher`` (runtime.publisher) is the bus
implementation, ``MemorySink`` keeps events for tests, ``NullSink`` drops them for offline runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from schemas import Event


@dataclass
class PublisherStats:
    """What a sink did with the events it was given."""

    published: int = 0
    duplicates: int = 0
    retried: int = 0
    spilled: int = 0
    outbox_pending: int = 0
    invalid: int = 0
    dead_lettered: int = 0
    """Events the bus refuses for good, set aside in the dead-letter file beside the outbox."""
    trimmed: int = 0
    """Events published with their largest parts trimmed to fit the server's max_payload."""
    failure: str | None = None
    """Why the sink's background thread died, if it did."""

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


class Stamper:
    """Fills the envelope (event_id, seq, attempt, source) and hands events to a sink in seq order.

    Thread-safe: the training thread and the heartbeat thread share one stamper, and the lock
    makes sequence order and publish order the same. ``emit_last`` seals it: nothing is published
    after an attempt's ``run.finished`` (a late heartbeat or command reply is dropped instead).
    """

    def __init__(self, sink: EventSink, run_id: str, attempt: int = 1, source: str = "trainer") -> None:
        self.sink = sink
        self.run_id = run_id
        self.attempt = attempt
        self.source = source
        self.seq = 0
        self.sealed = False
        self._lock = threading.Lock()

    def emit(self, cls: type[Any], **fields: Any) -> Event:
        """Build an event of type ``cls`` with the next seq and publish it (unless sealed)."""
        with self._lock:
            return self._emit(cls, fields)

    def emit_last(self, cls: type[Any], **fields: Any) -> Event:
        """Publish the attempt's last event and seal the stamper."""
        with self._lock:
            event = self._emit(cls, fields)
            self.sealed = True
            return event

    def _emit(self, cls: type[Any], fields: dict[str, Any]) -> Event:
        seq = self.seq + 1
        prefix = (
            f"{self.run_id}.{self.attempt}"
            if self.source == "trainer"
            else f"{self.run_id}.{self.source}.{self.attempt}"
        )
        event: Event = cls(
            event_id=f"{prefix}.{seq}", run_id=self.run_id, attempt=self.attempt, seq=seq, source=self.source, **fields
        )
        if not self.sealed:
            self.seq = seq
            self.sink.publish(event)
        return event
