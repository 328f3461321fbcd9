"""``NatsPublisher``: the trainer's event sink on JetStream that never blocks the caller.

``publish`` puts the event on an in-memory queue and returns. A background thread owns the NATS
connection and its event loop: it publishes in pipelined batches with ``Nats-Msg-Id`` =
event_id, waits for every ack with a timeout and re-sends an unacknowledged batch with the same
ids (JetStream drops duplicates). Beyond ``memory_limit`` pending events, and from then on until
it is drained, events spill to an outbox file that is sent, in order, after reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from runtime.bus import BusTarget, Credentials, connect
from runtime.logs import get_logger
from runtime.outbox import Outbox, Record
from runtime.settings import Settings
from runtime.sinks import PublisherStats
from runtime.stream import ensure_stream
from schemas import Event
from schemas.subjects import event_subject

Item = tuple[Record, int | None]  # the record, and its outbox end offset when it came from there


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
    ) -> None:
        self.target = target
        self.owns_server = owns_server
        self.settings = settings
        self.memory_limit = memory_limit
        self.batch_size = batch_size
        self.name = name
        self.credentials = credentials
        self.provision_stream = provision_stream
        self.responders = dict(responders or {})
        self.stats = PublisherStats()
        self.log = get_logger(component="publisher")
        self._outbox_path = outbox_path
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._pending: deque[Item] = deque()
        self._outbox: Outbox | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sleeping = False
        self._closing = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._enqueued = 0
        self._settled = 0
        self._settled_cv = threading.Condition()
        self._acks: _Acks | None = None

    # ---- caller side (training thread) -------------------------------------------------

    def start(self) -> NatsPublisher:
        """Start the background thread; raises ``BusUnavailable`` if the first connection fails."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        return self

    def publish(self, event: Event) -> None:
        """Queue ``event``; returns at once, never touches the network."""
        self._enqueued += 1
        self._queue.put(event)
        if self._sleeping and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_up)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far is acked or in the outbox."""
        target = self._enqueued
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_up)
        with self._settled_cv:
            return self._settled_cv.wait_for(lambda: self._settled >= target, timeout)

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Send what is pending for up to ``timeout`` s; the rest stays in the outbox.

        With ``owns_server`` the embedded server in ``target`` stops too, once the events are in its store.
        """
        try:
            return self._close(timeout)
        finally:
            if self.owns_server and self.target.server is not None:
                self.target.server.stop()

    def _close(self, timeout: float) -> PublisherStats:
        if self._thread is None:
            return self.stats
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._queue.put(None)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake_up)
        self._thread.join(timeout + 5)
        if self.stats.outbox_pending:
            self.log.warning(
                "events left in the outbox", pending=self.stats.outbox_pending, path=str(self._outbox_path)
            )
        return self.stats

    # ---- background thread ---------------------------------------------------------------

    def _wake_up(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _doze(self, timeout: float) -> None:
        """Sleep until ``_wake_up`` or ``timeout``; a bare future and timer, as this runs once per event."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake_up)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start(), or logged: never silently lost
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                self.log.error("publisher thread failed", error=repr(exc))

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = Outbox(self._outbox_path)
        if len(self._outbox):
            self.log.info("outbox from an earlier attempt will be sent first", pending=len(self._outbox))
        nc = await connect(self.target, self.settings, name=self.name, credentials=self.credentials, log=self.log)
        try:
            js = nc.jetstream(timeout=self.settings.bus.ack_timeout)
            if self.provision_stream:
                await ensure_stream(js, self.settings.stream)
            for subject, handler in self.responders.items():
                await nc.subscribe(subject, cb=_responder(handler, self.log))
            if self.responders:
                await nc.flush()
            self._ready.set()
            await self._pump(nc, js)
        finally:
            self._finish()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)

    def _intake(self) -> bool:
        """Move queued events into memory (or the outbox); True when close() was requested."""
        assert self._outbox is not None
        spill: list[Record] = []
        stop = False
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                stop = True
                continue
            record = (event_subject(event.run_id, event.type), event.event_id, event.model_dump_json().encode())
            if len(self._outbox) or spill or len(self._pending) >= self.memory_limit:
                spill.append(record)
            else:
                self._pending.append((record, None))
        if spill:
            self._outbox.append(spill)
            self.stats.spilled += len(spill)
            self._settle(len(spill))
        return stop

    def _settle(self, n: int) -> None:
        with self._settled_cv:
            self._settled += n
            self._settled_cv.notify_all()

    def _next_batch(self) -> list[Item]:
        assert self._outbox is not None
        if not self._pending and len(self._outbox):
            room = max(self.batch_size, self.memory_limit // 2)
            self._pending.extend((rec, end) for rec, end in self._outbox.load(room))
        return [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]

    async def _pump(self, nc: NATS, js: Any) -> None:
        stop_requested = False
        while True:
            stop_requested |= self._intake()
            batch = self._next_batch()
            if not batch:
                if stop_requested or self._closing:
                    return
                self._sleeping = True
                if self._queue.empty():
                    await self._doze(1.0)
                self._sleeping = False
                continue
            acked = await self._send(nc, js, batch)
            self._commit(batch[:acked])
            if acked < len(batch):
                if self._closing and time.monotonic() >= self._deadline:
                    return
                self.stats.retried += len(batch) - acked
                await self._wait_connected(nc)

    async def _send(self, nc: NATS, js: Any, batch: list[Item]) -> int:
        """Publish ``batch`` pipelined; returns how many from its start were acked."""
        if self._acks is None:
            self._acks = _Acks(nc.new_inbox())
            await nc.subscribe(self._acks.inbox + ".*.*", cb=self._acks.on_ack)
        state = self._acks.begin(len(batch))
        prefix = f"{self._acks.inbox}.{state.number}."
        try:
            for i, ((subject, msg_id, data), _) in enumerate(batch):
                await nc.publish(subject, data, reply=prefix + str(i), headers={"Nats-Msg-Id": msg_id})
                state.sent += 1
        except (nats.errors.Error, OSError) as exc:
            self.log.debug("publish failed", error=repr(exc))
        if state.sent == 0:
            return 0
        state.expect(state.sent)
        timeout = self.settings.bus.ack_timeout
        if self._closing:
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        timer = asyncio.get_running_loop().call_later(timeout, state.give_up)
        try:
            await state.done
        finally:
            timer.cancel()
        acked = state.acked_prefix()
        self.stats.duplicates += state.duplicates
        if acked < len(batch):
            self.log.warning(
                "publish not acknowledged; will retry with the same ids",
                error=state.error or "ack timeout",
                unacked=len(batch) - acked,
            )
        return acked

    def _commit(self, items: list[Item]) -> None:
        assert self._outbox is not None
        if not items:
            return
        from_memory = 0
        last_end: int | None = None
        n_outbox = 0
        for _ in items:
            _, end = self._pending.popleft()
            if end is None:
                from_memory += 1
            else:
                last_end = end
                n_outbox += 1
        if last_end is not None:
            self._outbox.commit(last_end, n_outbox)
        self.stats.published += len(items)
        if from_memory:
            self._settle(from_memory)

    async def _wait_connected(self, nc: NATS) -> None:
        while not nc.is_connected:
            if self._intake():
                self._closing = True
            if self._closing and time.monotonic() >= self._deadline:
                return
            await asyncio.sleep(0.05)

    def _finish(self) -> None:
        """Whatever is still in memory goes to the front of the outbox, in order."""
        if self._outbox is None:
            return
        self._intake()
        head = [rec for rec, end in self._pending if end is None]
        if head:
            self._outbox.rewrite(head)
            self.stats.spilled += len(head)
            self._settle(len(head))
        else:
            self._outbox.rewind()
        self._pending.clear()
        self.stats.outbox_pending = len(self._outbox)
        self._outbox.close()


class _BatchAcks:
    """Acks of one pipelined batch, counted as they arrive (no future per message)."""

    def __init__(self, number: int, size: int) -> None:
        self.number = number
        self.ok = bytearray(size)
        self.sent = 0
        self.received = 0
        self.expected = size
        self.duplicates = 0
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expect(self, n: int) -> None:
        self.expected = n
        self._check()

    def give_up(self) -> None:
        """The ack timeout: stop waiting; whatever is unacked gets re-sent."""
        if not self.done.done():
            self.done.set_result(None)

    def _check(self) -> None:
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def acked_prefix(self) -> int:
        idx = self.ok.find(0)
        return len(self.ok) if idx < 0 else idx


class _Acks:
    """One wildcard inbox subscription that routes JetStream acks to the current batch."""

    def __init__(self, inbox: str) -> None:
        self.inbox = inbox
        self.number = 0
        self.current: _BatchAcks | None = None

    def begin(self, size: int) -> _BatchAcks:
        self.number += 1
        self.current = _BatchAcks(self.number, size)
        return self.current

    async def on_ack(self, msg: Any) -> None:
        state = self.current
        number, _, index = msg.subject.rpartition(".")
        if state is None or not number.endswith(f".{state.number}"):
            return  # a late ack of an earlier batch: that batch was already re-sent
        data: bytes = msg.data
        i = int(index)
        state.received += 1
        status = msg.headers.get("Status") if msg.headers else None
        if status or not data or b'"error"' in data:
            state.error = state.error or (data.decode(errors="replace") if data else f"status {status}: no stream")
        elif not state.ok[i]:
            state.ok[i] = 1
            if b'"duplicate"' in data:  # the server writes `"duplicate": true`, only when true
                state.duplicates += 1
        state._check()


def _responder(handler: Callable[[bytes], bytes], log: Any) -> Callable[[Any], Awaitable[None]]:
    """A request/reply subscription callback: answer at once with ``handler``'s bytes."""

    async def respond(msg: Any) -> None:
        try:
            answer = handler(msg.data)
        except Exception as exc:  # a handler bug must not kill the bus thread
            log.error("request handler failed", subject=msg.subject, error=repr(exc))
            return
        if msg.reply:
            await msg.respond(answer)

    return respond
