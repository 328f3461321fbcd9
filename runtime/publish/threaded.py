"""``NatsPublisher``: the trainer's event sink on JetStream that never blocks the caller.

``publish`` puts the event on an in-memory queue and returns. A background thread (the
``Sender`` of ``runtime.publish.sender``) owns the NATS connection and its event loop: it publishes in
pipelined batches with ``Nats-Msg-Id`` = event_id, waits for every ack with a timeout and
re-sends an unacknowledged batch with the same ids (JetStream drops duplicates). Beyond
``memory_limit`` pending events, and from then on until it is drained, events spill to an outbox
file that is sent, in order, after reconnect.

What the bus refuses is handled by kind (see ``runtime.publish.delivery``): an event that can never be
stored is set aside in the dead-letter file beside the outbox (an oversized one is first trimmed
to fit, see ``runtime.publish.oversize``) so the events after it flow; a refusal that may pass is retried
with a bounded, jittered backoff, a missing stream is re-created when ``provision_stream``
allows, and the log says so once per episode. With ``offline_ok`` an unreachable bus at start is
not an error: events wait in memory and the outbox while the thread keeps trying to connect.
Should the thread die anyway, it says so, and every event published later is written straight
to the outbox; ``flush`` returns False and ``close`` reports the failure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.bus.connect import BusTarget, Credentials
from runtime.logs import get_logger
from runtime.publish.handoff import Handoff
from runtime.publish.outbox import Outbox, record_of
from runtime.publish.sender import Sender
from runtime.publish.sinks import PublisherStats
from runtime.settings import Settings
from schemas import Event


@contextmanager
def owned_server(target: BusTarget, owns: bool) -> Iterator[None]:
    """On the way out, stop the embedded server in ``target`` if the sink owns it (its store keeps the events)."""
    try:
        yield
    finally:
        if owns and target.server is not None:
            target.server.stop()


class NatsPublisher:
    """Event sink on JetStream with an outbox; see the module docstring."""

    def __init__(
        self,
        target: BusTarget,
        settings: Settings,
        *,
        outbox_path: Path,
        memory_limit: int = 10_000,
        batch_size: int = 1024,
        name: str = "trainbus-publisher",
        credentials: Credentials | None = None,
        provision_stream: bool = True,
        responders: dict[str, Callable[[bytes], bytes]] | None = None,
        owns_server: bool = False,
        offline_ok: bool = False,
    ) -> None:
        self.target = target
        self.owns_server = owns_server
        self.settings = settings
        self.name = name
        self.stats = PublisherStats()
        self.failure: str | None = None
        """Why the background thread died, if it did (then events go straight to the outbox)."""
        self.log = get_logger(component="publisher")
        self._outbox_path = outbox_path
        self._handoff = Handoff()
        self._ready = threading.Event()
        self._sender = Sender(
            target, settings, self._handoff, self.stats, self.log,
            outbox_path=outbox_path, memory_limit=memory_limit, batch_size=batch_size, name=name,
            credentials=credentials, provision_stream=provision_stream, responders=dict(responders or {}),
            offline_ok=offline_ok, on_ready=self._ready.set,
        )  # fmt: skip
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._fallback: Outbox | None = None
        self._fallback_lock = threading.Lock()
        self._told_failure = False

    # ---- caller side (training thread) -------------------------------------------------

    def start(self) -> NatsPublisher:
        """Start the background thread; raises ``BusUnavailable`` if the first connection fails
        (unless ``offline_ok``: then it returns at once and keeps connecting in the background)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        return self

    def publish(self, event: Event) -> None:
        """Queue ``event``; returns at once, never touches the network."""
        h = self._handoff  # Handoff.put inlined: this runs once per event on the training thread
        h.enqueued += 1
        h.queue.put(event)
        if h.sleeping:
            h.nudge()
        if self.failure is not None:  # checked after the put: a failure in between still salvages it
            self._salvage()
            if not self._told_failure:
                self._told_failure = True
                self.log.warning("events now go straight to the outbox", outbox=str(self._outbox_path))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far is acked or in the outbox; False if not, or if the sender died."""
        h = self._handoff
        target = h.enqueued
        h.nudge()
        with h.settled_cv:
            done = h.settled_cv.wait_for(lambda: h.settled >= target or self.failure is not None, timeout)
        if self.failure is not None:
            self._salvage()
            return False
        return done

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Send what is pending for up to ``timeout`` s; the rest stays in the outbox.

        With ``owns_server`` the embedded server in ``target`` stops too, once the events are in its store.
        """
        with owned_server(self.target, self.owns_server):
            return self._close(timeout)

    def _close(self, timeout: float) -> PublisherStats:
        if self._thread is None:
            return self.stats
        self._handoff.deadline = time.monotonic() + timeout
        self._handoff.closing = True
        self._handoff.put(None)
        self._thread.join(timeout + 5)
        if self.failure is not None:
            self._salvage()
            with self._fallback_lock:
                if self._fallback is not None:
                    self.stats.outbox_pending = len(self._fallback)
                    self._fallback.close()
                    self._fallback = None
        if self.stats.outbox_pending:
            self.log.warning(
                "events left in the outbox", pending=self.stats.outbox_pending, path=str(self._outbox_path)
            )
        return self.stats

    # ---- the thread, and what happens when it dies ----------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._sender.run())
        except BaseException as exc:  # surfaced to start(), or reported: never silently lost
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failure = self.stats.failure = f"{type(exc).__name__}: {exc}"
        self.log.error("publisher thread failed", error=self.failure, outbox=str(self._outbox_path))
        self._salvage()
        with self._handoff.settled_cv:
            self._handoff.settled_cv.notify_all()

    def _salvage(self) -> None:
        """Write whatever the dead thread left in memory, then every queued event, to the outbox."""
        with self._fallback_lock:
            head, tail = self._sender.leftovers()
            while not self._handoff.queue.empty():
                event = self._handoff.queue.get_nowait()
                if event is not None:
                    tail.append(record_of(event))
            if not head and not tail:
                return
            try:
                if self._fallback is None:
                    self._fallback = Outbox(self._outbox_path)
                if head:
                    self._fallback.rewrite(head)
                if tail:
                    self._fallback.append(tail)
            except OSError as exc:
                self._sender.backlog = [*head, *tail]
                self.log.error("cannot write the outbox; events stay in memory", error=str(exc), events=len(head) + len(tail))  # fmt: skip
                return
            self.stats.spilled += len(head) + len(tail)
            self._handoff.settle(len(head) + len(tail))
