"""``NatsPublisher``: the trainer's event sink on JetStream that never blocks the caller.

``publish`` puts the event on an in-memory queue and returns. A background thread owns the NATS
connection and its event loop: it publishes in pipelined batches with ``Nats-Msg-Id`` =
event_id, waits for every ack with a timeout and re-sends an unacknowledged batch with the same
ids (JetStream drops duplicates). Beyond ``memory_limit`` pending events, and from then on until
it is drained, events spill to an outbox file that is sent, in order, after reconnect.

What the bus refuses is handled by kind (see ``runtime.delivery``): an event that can never be
stored is set aside in the dead-letter file beside the outbox (an oversized one is first trimmed
to fit, see ``runtime.oversize``) so the events after it flow; a refusal that may pass is retried
with a bounded, jittered backoff, a missing stream is re-created when ``provision_stream``
allows, and the log says so once per episode. With ``offline_ok`` an unreachable bus at start is
not an error: events wait in memory and the outbox while the thread keeps trying to connect.
Should the thread die anyway, it says so, and every event published later is written straight
to the outbox; ``flush`` returns False and ``close`` reports the failure.
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
from runtime.delivery import Acks, Backoff, BatchAcks, denied_subject
from runtime.errors import BusUnavailable
from runtime.logs import get_logger
from runtime.outbox import Outbox, Record
from runtime.oversize import fit, room
from runtime.settings import Settings
from runtime.sinks import PublisherStats
from runtime.stream import ensure_stream
from schemas import EVENTS_STREAM, Event
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
        offline_ok: bool = False,
    ) -> None:
        self.target = target
        self.owns_server = owns_server
        self.settings = settings
        self.memory_limit = memory_limit
        self.batch_size = batch_size
        self.name = name
        self.credentials = credentials
        self.provision_stream = provision_stream
        self.offline_ok = offline_ok
        self.responders = dict(responders or {})
        self.stats = PublisherStats()
        self.failure: str | None = None
        """Why the background thread died, if it did (then events go straight to the outbox)."""
        self.log = get_logger(component="publisher")
        self._outbox_path = outbox_path
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._pending: deque[Item] = deque()
        self._backlog: list[Record] = []  # bound for the outbox, not written yet (the disk was full)
        self._set_aside: dict[str, str] = {}  # msg_id → why the next pass sets it aside
        self._outbox: Outbox | None = None
        self._fallback: Outbox | None = None
        self._fallback_lock = threading.Lock()
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
        self._acks: Acks | None = None
        self._backoff = Backoff()
        self._episode: tuple[float, str] | None = None  # since when, and why, publishing is refused
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
        self._enqueued += 1
        self._queue.put(event)
        if self.failure is not None:  # checked after the put: a failure in between still salvages it
            self._salvage()
            if not self._told_failure:
                self._told_failure = True
                self.log.warning("events now go straight to the outbox", outbox=str(self._outbox_path))
        elif self._sleeping and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_up)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far is acked or in the outbox; False if not, or if the sender died."""
        target = self._enqueued
        if self._loop is not None and self.failure is None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake_up)
        with self._settled_cv:
            done = self._settled_cv.wait_for(lambda: self._settled >= target or self.failure is not None, timeout)
        if self.failure is not None:
            self._salvage()
            return False
        return done

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

    # ---- when the thread died -------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.failure = self.stats.failure = f"{type(exc).__name__}: {exc}"
        self.log.error("publisher thread failed", error=self.failure, outbox=str(self._outbox_path))
        self._salvage()
        with self._settled_cv:
            self._settled_cv.notify_all()

    def _salvage(self) -> None:
        """Write whatever the dead thread left in memory, and every queued event, to the outbox."""
        with self._fallback_lock:
            head = [rec for rec, end in self._pending if end is None]
            self._pending.clear()
            tail, self._backlog = self._backlog, []
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is not None:
                    tail.append(_record(event))
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
                self._backlog = [*head, *tail]
                self.log.error("cannot write the outbox; events stay in memory", error=str(exc), events=len(head) + len(tail))  # fmt: skip
                return
            self.stats.spilled += len(head) + len(tail)
            self._settle(len(head) + len(tail))

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

    async def _idle(self, seconds: float) -> None:
        """Take in events for ``seconds`` (no longer than the close deadline)."""
        until = time.monotonic() + seconds
        while True:
            if self._intake():
                self._closing = True
            left = min(until, self._deadline) - time.monotonic()
            if left <= 0:
                return
            self._sleeping = not self._closing
            if self._closing or self._queue.empty():
                await self._doze(left)
            self._sleeping = False

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start(), or reported: never silently lost
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                self._fail(exc)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = Outbox(self._outbox_path)
        nc: NATS | None = None
        try:
            if len(self._outbox):
                self.log.info("outbox from an earlier attempt will be sent first", pending=len(self._outbox))
            nc = await self._connect()
            if nc is not None:
                await self._pump(nc, nc.jetstream(timeout=self.settings.bus.ack_timeout))
        finally:
            self._finish()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)

    async def _open(self) -> NATS:
        nc = await connect(
            self.target, self.settings, name=self.name, credentials=self.credentials, log=self.log,
            on_permission_error=self._on_denied,
        )  # fmt: skip
        try:
            if self.provision_stream:
                await ensure_stream(nc.jetstream(timeout=self.settings.bus.ack_timeout), self.settings.stream)
            for subject, handler in self.responders.items():
                await nc.subscribe(subject, cb=_responder(handler, self.log))
            if self.responders:
                await nc.flush()
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        return nc

    async def _connect(self) -> NATS | None:
        """The first connection; with ``offline_ok``, retried in the background until it works or close()."""
        backoff = Backoff(first=0.5, cap=10.0)
        offline_since: float | None = None
        while True:
            try:
                nc = await self._open()
            except BusUnavailable as exc:
                if not self.offline_ok:
                    raise
                if offline_since is None:
                    offline_since = time.monotonic()
                    self.log.warning(
                        "bus unreachable; continuing offline, connecting in the background",
                        error=str(exc), outbox=str(self._outbox_path),
                    )  # fmt: skip
                    self._ready.set()
                await self._idle(backoff.next())
                if self._closing:
                    return None
                continue
            if offline_since is not None:
                self.log.info(
                    "connected to the bus; sending what waited offline",
                    server=self.target.display, offline_seconds=round(time.monotonic() - offline_since, 1),
                    in_memory=len(self._pending), in_outbox=len(self._outbox) if self._outbox else 0,
                )  # fmt: skip
            self._ready.set()
            return nc

    def _on_denied(self, text: str) -> None:
        subject = denied_subject(text)
        if subject is not None and self._acks is not None and self._acks.current is not None:
            who = self.credentials.identity() if self.credentials else None
            self._acks.current.deny(subject, f"permission denied: the server does not let {who or 'this user'} publish to {subject}")  # fmt: skip

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
            record = _record(event)
            if len(self._outbox) or self._backlog or spill or len(self._pending) >= self.memory_limit:
                spill.append(record)
            else:
                self._pending.append((record, None))
        if spill or self._backlog:
            self._spill([*self._backlog, *spill])
        return stop

    def _spill(self, records: list[Record]) -> None:
        assert self._outbox is not None
        try:
            self._outbox.append(records)
        except OSError as exc:  # a full disk: keep them in memory, in order, and try again later
            if not self._backlog:
                self.log.error("cannot write the outbox; events wait in memory", error=str(exc), path=str(self._outbox_path))  # fmt: skip
            self._backlog = records
            return
        self._backlog = []
        self.stats.spilled += len(records)
        self._settle(len(records))

    def _settle(self, n: int) -> None:
        with self._settled_cv:
            self._settled += n
            self._settled_cv.notify_all()

    def _next_batch(self) -> list[Item]:
        assert self._outbox is not None
        if not self._pending and len(self._outbox):
            room_left = max(self.batch_size, self.memory_limit // 2)
            self._pending.extend((rec, end) for rec, end in self._outbox.load(room_left))
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
            state = await self._send(nc, batch)
            settled = self._commit(batch, state)
            if settled == len(batch):
                self._recovered()
                continue
            if self._closing and time.monotonic() >= self._deadline:
                return
            self.stats.retried += len(batch) - settled
            if not nc.is_connected:
                await self._wait_connected(nc)
            elif not (state.no_stream and await self._stream_missing(js, batch, state)):
                self._refused(state.error or f"no ack within {self.settings.bus.ack_timeout:g}s")
                await self._idle(self._backoff.next())

    async def _send(self, nc: NATS, batch: list[Item]) -> BatchAcks:
        """Publish ``batch`` pipelined and wait for the acks (or the timeout)."""
        if self._acks is None:
            self._acks = Acks(nc.new_inbox())
            await nc.subscribe(self._acks.inbox + ".*.*", cb=self._acks.on_ack)
        state = self._acks.begin([subject for (subject, _, _), _ in batch])
        prefix = f"{self._acks.inbox}.{state.number}."
        try:
            for i, ((subject, msg_id, data), _end) in enumerate(batch):
                if msg_id in self._set_aside:
                    state.poison[i] = self._set_aside[msg_id]
                    continue
                limit = room(nc.max_payload, msg_id)
                if len(data) > limit:
                    fitted = self._shrink(batch, i, limit, nc.max_payload)
                    if fitted is None:
                        state.poison[i] = f"{len(data)} bytes: over the server's max_payload ({nc.max_payload} bytes) and nothing in it can be trimmed"  # fmt: skip
                        continue
                    data = fitted
                await nc.publish(subject, data, reply=prefix + str(i), headers={"Nats-Msg-Id": msg_id})
                state.published += 1
        except (nats.errors.Error, OSError) as exc:
            self.log.debug("publish failed", error=repr(exc))
        if state.published:
            state.expect(state.published)
            timeout = self.settings.bus.ack_timeout
            if self._closing:
                timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
            timer = asyncio.get_running_loop().call_later(timeout, state.give_up)
            try:
                await state.done
            finally:
                timer.cancel()
        self.stats.duplicates += state.duplicates
        return state

    def _shrink(self, batch: list[Item], i: int, limit: int, max_payload: int) -> bytes | None:
        """Trim the oversized event at ``batch[i]`` in place (the original goes to the dead-letter file)."""
        assert self._outbox is not None
        record, end = batch[i]
        fitted = fit(record[2], limit)
        if fitted is None:
            return None
        self._outbox.dead.add(record, f"trimmed to fit the server's max_payload ({max_payload} bytes); published with a marker")  # fmt: skip
        self.stats.trimmed += 1
        self.log.warning(
            "event trimmed to fit the server's max_payload",
            event_id=record[1], bytes=len(record[2]), max_payload=max_payload, original_in=str(self._outbox.dead.path),
        )  # fmt: skip
        batch[i] = self._pending[i] = ((record[0], record[1], fitted), end)
        return fitted

    def _commit(self, batch: list[Item], state: BatchAcks) -> int:
        """Drop the settled prefix of ``batch`` from memory and the outbox; set poison aside. Returns its length."""
        assert self._outbox is not None
        n = state.settled_prefix()
        from_memory = 0
        last_end: int | None = None
        n_outbox = 0
        for i in range(n):
            record, end = self._pending.popleft()
            reason = state.poison.get(i)
            if reason is not None:
                self._outbox.dead.add(record, reason)
                self._set_aside.pop(record[1], None)
                self.stats.dead_lettered += 1
                self.log.warning("event set aside", event_id=record[1], reason=reason, set_aside_in=str(self._outbox.dead.path))  # fmt: skip
            if end is None:
                from_memory += 1
            else:
                last_end = end
                n_outbox += 1
        if last_end is not None:
            self._outbox.commit(last_end, n_outbox)
        self.stats.published += n - len([i for i in state.poison if i < n])
        if from_memory:
            self._settle(from_memory)
        return n

    async def _stream_missing(self, js: Any, batch: list[Item], state: BatchAcks) -> bool:
        """After a "no stream" answer: True when the stream was re-created or the events are to be set aside."""
        try:
            await js.stream_info(EVENTS_STREAM)
            return False  # it exists: a passing refusal (e.g. a leader election)
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, TimeoutError):
            return False  # JetStream is not answering: back off
        if not self.provision_stream:
            for i in state.no_stream:
                subject, msg_id, _ = batch[i][0]
                self._set_aside[msg_id] = f"no stream {EVENTS_STREAM} stores {subject}, and this publisher does not create it (provision_stream is off)"  # fmt: skip
            return True
        try:
            await ensure_stream(js, self.settings.stream)
        except (nats.errors.Error, TimeoutError, BusUnavailable) as exc:
            state.error = f"the stream {EVENTS_STREAM} is missing and could not be re-created: {exc}"
            return False
        self.log.warning("stream was missing; re-created", stream=EVENTS_STREAM)
        return True

    def _refused(self, reason: str) -> None:
        if self._episode is None:
            self._episode = (time.monotonic(), reason)
            self.log.warning("publish refused or not acknowledged; retrying with backoff", reason=reason, max_delay_seconds=self._backoff.cap)  # fmt: skip

    def _recovered(self) -> None:
        if self._episode is not None:
            since, _ = self._episode
            self.log.info("publishing again", after_seconds=round(time.monotonic() - since, 1), retries=self._backoff.attempts)  # fmt: skip
            self._episode = None
        self._backoff.reset()

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
        if self._backlog:
            self._spill(self._backlog)
        self.stats.outbox_pending = len(self._outbox)
        self._outbox.close()


def _record(event: Event) -> Record:
    return event_subject(event.run_id, event.type), event.event_id, event.model_dump_json().encode()


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
