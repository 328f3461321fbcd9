"""``Sender``: sends an outbox to JetStream in order, pipelined, exactly once; owns the connection and the retries.

It runs in a training run's publisher process (``runtime.publish.process``), where its outbox is the
journal the training process appends to, and in ``trainbus outbox flush`` (``runtime.publish.replay``),
where it sends an outbox a run left behind. It connects (or, with ``offline_ok``, keeps trying in
the background), loads what the outbox holds when its ``Window`` says it is time (``runtime.publish.window``:
at once, or after a short window that gathers the events that may wait), publishes it as one
pipelined batch with ``Nats-Msg-Id`` = the event id, waits for every ack, and commits how far
JetStream acknowledged. An unacknowledged batch is re-sent with the same ids (JetStream drops the
duplicates); see ``runtime.publish.delivery`` for what each refusal means. What is not acknowledged
when it stops stays in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, Credentials, connect, listener, responder, round_trip
from runtime.bus.stream import ensure_stream
from runtime.errors import BusUnavailable
from runtime.publish.delivery import Acks, Backoff, BatchAcks, denied_subject
from runtime.publish.outbox import Outbox, Record
from runtime.publish.oversize import fit, room
from runtime.publish.sinks import PublisherStats
from runtime.publish.window import Window
from runtime.settings import Settings
from schemas import EVENTS_STREAM

Item = tuple[Record, int]  # the record, and its end offset in the outbox


class Sender:
    """Connection, batches and retries of one outbox (see the module docstring)."""

    def __init__(
        self,
        target: BusTarget,
        settings: Settings,
        window: Window,
        stats: PublisherStats,
        log: Any,
        *,
        outbox: Outbox,
        batch_size: int = 1024,
        name: str,
        credentials: Credentials | None = None,
        provision_stream: bool = True,
        responders: dict[str, Callable[[bytes], bytes]] | None = None,
        listeners: dict[str, Callable[[bytes], None]] | None = None,
        offline_ok: bool = False,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.target, self.settings, self.window, self.stats, self.log = target, settings, window, stats, log
        self.outbox = outbox
        self.batch_size = batch_size
        self.name = name
        self.credentials = credentials
        self.provision_stream = provision_stream
        self.responders = dict(responders or {})
        self.listeners = dict(listeners or {})
        """Subjects the process only reads (e.g. a launched run's fence); subscribed on every connection."""
        self.offline_ok = offline_ok
        self.on_ready = on_ready
        self.pending: deque[Item] = deque()
        self._set_aside: dict[str, str] = {}  # msg_id → why the next pass sets it aside
        self._acks: Acks | None = None
        self._backoff = Backoff()
        self._episode: float | None = None  # since when publishing has been refused
        self._nc: NATS | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (what a listener that times silence needs to know)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path

    async def run(self) -> None:
        """Until the window closes: connect, then publish; whatever is unsent stays in the outbox."""
        nc: NATS | None = None
        try:
            if self.outbox.has_new():
                self.log.info("events waiting in the outbox will be sent first", pending=len(self.outbox))
            nc = await self._connect()
            while nc is not None and await self._pump(nc, nc.jetstream(timeout=self.settings.bus.ack_timeout)):
                # the folder's bus moved (``_wait_connected``): the old address will not come back
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)
                self._acks = None
                nc = await self._connect(offline=True)
        finally:
            self._finish()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)

    # ---- connecting ------------------------------------------------------------------------

    async def _open(self) -> NATS:
        nc = await connect(
            self.target, self.settings, name=self.name, credentials=self.credentials, log=self.log,
            on_permission_error=self._on_denied,
        )  # fmt: skip
        self._nc = nc
        try:
            if self.provision_stream:
                try:
                    await ensure_stream(nc.jetstream(timeout=self.settings.bus.ack_timeout), self.settings.stream)
                except BusUnavailable as exc:
                    raise BusUnavailable(f"the bus at {self.target.display} ({self.target.origin}): {exc}") from None
            for subject, handler in self.responders.items():
                await nc.subscribe(subject, cb=responder(handler, self.log))
            for subject, hear in self.listeners.items():
                await nc.subscribe(subject, cb=listener(hear, self.log))
            if self.responders or self.listeners:
                await round_trip(nc)  # subscribed at the server before anyone is told the run is up
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        return nc

    async def _connect(self, *, offline: bool = False) -> NATS | None:
        """The first connection; with ``offline_ok`` (or ``offline``), retried in the background until it
        works, or close() is called and one last try fails (then everything stays in the outbox)."""
        backoff = Backoff(first=0.5, cap=10.0)
        offline_since: float | None = None
        while True:
            self.target = self.target.moved() or self.target  # the folder's bus may have moved meanwhile
            try:
                nc = await self._open()
            except BusUnavailable as exc:
                if not (self.offline_ok or offline):
                    raise
                if offline_since is None:
                    offline_since = time.monotonic()
                    self.log.warning(
                        "bus unreachable; continuing offline, connecting in the background",
                        error=str(exc), outbox=str(self.outbox_path),
                    )  # fmt: skip
                    self.on_ready()
                if self.window.closing:
                    return None  # the last try, made when closing began, failed too
                await self.window.pause(backoff.next(), until_close=True)
                continue
            if offline_since is not None:
                self.log.info(
                    "connected to the bus; sending what waited offline",
                    server=self.target.display, offline_seconds=round(time.monotonic() - offline_since, 1),
                    in_outbox=len(self.outbox),
                )  # fmt: skip
            self.on_ready()
            return nc

    def _on_denied(self, text: str) -> None:
        subject = denied_subject(text)
        if subject is not None and self._acks is not None and self._acks.current is not None:
            who = self.credentials.identity() if self.credentials else None
            self._acks.current.deny(subject, f"permission denied: the server does not let {who or 'this user'} publish to {subject}")  # fmt: skip

    # ---- the outbox ------------------------------------------------------------------------

    def _next_batch(self) -> list[Item]:
        if not self.pending:
            self.pending.extend(self.outbox.load(self.batch_size))
        return [self.pending[i] for i in range(min(self.batch_size, len(self.pending)))]

    def _finish(self) -> None:
        """Loaded but unacknowledged events are loaded again by the next sender."""
        self.outbox.rewind()
        self.pending.clear()
        self.stats.outbox_pending = len(self.outbox)
        self.outbox.close()

    # ---- publishing ------------------------------------------------------------------------

    async def _pump(self, nc: NATS, js: Any) -> bool:
        """Publish until closing and sent (False), or until the folder's bus moves while disconnected (True)."""
        window = self.window
        while True:
            if not self.pending:
                await window.ready(self.outbox.has_new)
            batch = self._next_batch()
            if not batch:
                if window.closing:
                    return False
                continue
            state = await self._send(nc, batch)
            settled = self._commit(batch, state)
            if settled == len(batch):
                self._recovered()
                continue
            if window.closing and time.monotonic() >= window.deadline:
                return False
            self.stats.retried += len(batch) - settled
            if await self._after_refusal(nc, js, batch, state):
                return True

    async def _after_refusal(self, nc: NATS, js: Any, batch: list[Item], state: BatchAcks) -> bool:
        """Wait before the re-send: for the connection, a re-created stream or a backoff; True: the bus moved."""
        if not nc.is_connected:
            return await self._wait_connected(nc)
        if not (state.no_stream and await self._stream_missing(js, batch, state)):
            self._refused(state.error or f"no ack within {self.settings.bus.ack_timeout:g}s")
            await self.window.pause(self._backoff.next())
        return False

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
            if self.window.closing:
                timeout = max(0.05, min(timeout, self.window.deadline - time.monotonic()))
            timer = asyncio.get_running_loop().call_later(timeout, state.give_up)
            try:
                await state.done
            finally:
                timer.cancel()
        self.stats.duplicates += state.duplicates
        return state

    def _shrink(self, batch: list[Item], i: int, limit: int, max_payload: int) -> bytes | None:
        """Trim the oversized event at ``batch[i]`` in place (the original goes to the dead-letter file)."""
        record, end = batch[i]
        fitted = fit(record[2], limit)
        if fitted is None:
            return None
        self.outbox.dead.add(record, f"trimmed to fit the server's max_payload ({max_payload} bytes); published with a marker")  # fmt: skip
        self.stats.trimmed += 1
        self.log.warning(
            "event trimmed to fit the server's max_payload",
            event_id=record[1], bytes=len(record[2]), max_payload=max_payload, original_in=str(self.outbox.dead.path),
        )  # fmt: skip
        batch[i] = self.pending[i] = ((record[0], record[1], fitted), end)
        return fitted

    def _commit(self, batch: list[Item], state: BatchAcks) -> int:
        """Drop the settled prefix of ``batch`` from memory and the outbox, poison set aside; returns its length."""
        n = state.settled_prefix()
        for i in range(n):
            record, _ = self.pending.popleft()
            reason = state.poison.get(i)
            if reason is not None:
                self._set_aside_for_good(record, reason)
        if n:
            self.outbox.commit(batch[n - 1][1], n)
        self.stats.published += n - sum(1 for i in state.poison if i < n)
        return n

    def _set_aside_for_good(self, record: Record, reason: str) -> None:
        self.outbox.dead.add(record, reason)
        self._set_aside.pop(record[1], None)
        self.stats.dead_lettered += 1
        self.log.warning("event set aside", event_id=record[1], reason=reason, set_aside_in=str(self.outbox.dead.path))  # fmt: skip

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
            self._episode = time.monotonic()
            self.log.warning("publish refused or not acknowledged; retrying with backoff", reason=reason, max_delay_seconds=self._backoff.cap)  # fmt: skip

    def _recovered(self) -> None:
        if self._episode is not None:
            self.log.info("publishing again", after_seconds=round(time.monotonic() - self._episode, 1), retries=self._backoff.attempts)  # fmt: skip
            self._episode = None
        self._backoff.reset()

    async def _wait_connected(self, nc: NATS) -> bool:
        """Until ``nc`` reconnects (False) or the folder's bus is found elsewhere (True), looking once a second."""
        look = time.monotonic() + 1.0
        while not nc.is_connected:
            if self.window.closing and time.monotonic() >= self.window.deadline:
                return False
            if time.monotonic() >= look:
                look += 1.0
                moved = self.target.moved()
                if moved is not None:
                    self.log.warning("the bus moved; following it", was=self.target.display, now=moved.display)
                    self.target = moved
                    return True
            await asyncio.sleep(0.05)
        return False
