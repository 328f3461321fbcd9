"""The background half of ``NatsPublisher``: it owns the NATS connection, the outbox and the retries.

The ``Handoff`` (``runtime.publish.handoff``) is all the training thread and the sender share. ``Sender``
runs on the publisher's thread, in its own event loop: it connects (or, with ``offline_ok``,
keeps trying in the background), takes events from the handoff into memory or the outbox, and
publishes them in pipelined batches (see ``runtime.publish.delivery`` for what each refusal means).
Kept apart from the caller side so that it also runs in a training run's publisher process
(``runtime.publish.process``), where its outbox is the journal the training process appends to.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, Credentials, connect, responder
from runtime.bus.stream import ensure_stream
from runtime.errors import BusUnavailable
from runtime.publish.delivery import Acks, Backoff, BatchAcks, denied_subject
from runtime.publish.handoff import Handoff
from runtime.publish.outbox import Outbox, Record, record_of
from runtime.publish.oversize import fit, room
from runtime.publish.sinks import PublisherStats
from runtime.settings import Settings
from schemas import EVENTS_STREAM

Item = tuple[Record, int | None]  # the record, and its outbox end offset when it came from there


class Sender:
    """Connection, memory, outbox and retries of one publisher (see the module docstring)."""

    def __init__(
        self,
        target: BusTarget,
        settings: Settings,
        handoff: Handoff,
        stats: PublisherStats,
        log: Any,
        *,
        outbox_path: Path,
        memory_limit: int,
        batch_size: int,
        name: str,
        credentials: Credentials | None,
        provision_stream: bool,
        responders: dict[str, Callable[[bytes], bytes]],
        offline_ok: bool,
        on_ready: Callable[[], None],
        open_outbox: Callable[[Path], Outbox] = Outbox,
    ) -> None:
        self.target, self.settings, self.handoff, self.stats, self.log = target, settings, handoff, stats, log
        self.outbox_path = outbox_path
        self.memory_limit = memory_limit
        self.batch_size = batch_size
        self.name = name
        self.credentials = credentials
        self.provision_stream = provision_stream
        self.responders = responders
        self.offline_ok = offline_ok
        self.on_ready = on_ready
        self.open_outbox = open_outbox  # a sidecar's is the journal another process appends to
        self.pending: deque[Item] = deque()
        self.backlog: list[Record] = []  # bound for the outbox, not written yet (the disk was full)
        self._set_aside: dict[str, str] = {}  # msg_id → why the next pass sets it aside
        self._outbox: Outbox | None = None
        self._acks: Acks | None = None
        self._backoff = Backoff()
        self._episode: float | None = None  # since when publishing has been refused

    async def run(self) -> None:
        """Until close: connect, then publish; whatever is unsent ends in the outbox."""
        self.handoff.loop = asyncio.get_running_loop()
        self._outbox = self.open_outbox(self.outbox_path)
        nc: NATS | None = None
        try:
            if len(self._outbox):
                self.log.info("events waiting in the outbox will be sent first", pending=len(self._outbox))
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

    def leftovers(self) -> tuple[list[Record], list[Record]]:
        """(after the thread died) What memory still holds: older than the outbox, and newer; forgotten here."""
        head = [rec for rec, end in self.pending if end is None]
        self.pending.clear()
        newer, self.backlog = self.backlog, []
        return head, newer

    # ---- connecting ------------------------------------------------------------------------

    async def _open(self) -> NATS:
        nc = await connect(
            self.target, self.settings, name=self.name, credentials=self.credentials, log=self.log,
            on_permission_error=self._on_denied,
        )  # fmt: skip
        try:
            if self.provision_stream:
                try:
                    await ensure_stream(nc.jetstream(timeout=self.settings.bus.ack_timeout), self.settings.stream)
                except BusUnavailable as exc:
                    raise BusUnavailable(f"the bus at {self.target.display} ({self.target.origin}): {exc}") from None
            for subject, handler in self.responders.items():
                await nc.subscribe(subject, cb=responder(handler, self.log))
            if self.responders:
                await nc.flush()
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
                if self.handoff.closing:
                    return None  # the last try, made when close() was called, failed too
                await self._idle(backoff.next(), stop_on_close=True)
                continue
            if offline_since is not None:
                self.log.info(
                    "connected to the bus; sending what waited offline",
                    server=self.target.display, offline_seconds=round(time.monotonic() - offline_since, 1),
                    in_memory=len(self.pending), in_outbox=len(self._outbox) if self._outbox else 0,
                )  # fmt: skip
            self.on_ready()
            return nc

    def _on_denied(self, text: str) -> None:
        subject = denied_subject(text)
        if subject is not None and self._acks is not None and self._acks.current is not None:
            who = self.credentials.identity() if self.credentials else None
            self._acks.current.deny(subject, f"permission denied: the server does not let {who or 'this user'} publish to {subject}")  # fmt: skip

    # ---- memory and outbox -----------------------------------------------------------------

    async def _idle(self, seconds: float, *, stop_on_close: bool = False) -> None:
        """Take in events for ``seconds`` (no longer than the close deadline, or until close())."""
        h = self.handoff
        until = time.monotonic() + seconds
        while True:
            if self._intake():
                h.closing = True
            if stop_on_close and h.closing:
                return
            left = min(until, h.deadline) - time.monotonic()
            if left <= 0:
                return
            h.sleeping = not h.closing
            if h.closing or h.queue.empty():
                await h.doze(left)
            h.sleeping = False

    def _intake(self) -> bool:
        """Move queued events into memory (or the outbox); True when close() was requested."""
        assert self._outbox is not None
        spill: list[Record] = []
        stop = False
        while True:
            try:
                event = self.handoff.queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                stop = True
                continue
            record = record_of(event)
            if len(self._outbox) or self.backlog or spill or len(self.pending) >= self.memory_limit:
                spill.append(record)
            else:
                self.pending.append((record, None))
        if spill or self.backlog:
            self._spill([*self.backlog, *spill])
        return stop

    def _spill(self, records: list[Record]) -> None:
        assert self._outbox is not None
        try:
            self._outbox.append(records)
        except OSError as exc:  # a full disk: keep them in memory, in order, and try again later
            if not self.backlog:
                self.log.error("cannot write the outbox; events wait in memory", error=str(exc), path=str(self.outbox_path))  # fmt: skip
            self.backlog = records
            return
        self.backlog = []
        self.stats.spilled += len(records)
        self.handoff.settle(len(records))

    def _next_batch(self) -> list[Item]:
        assert self._outbox is not None
        if not self.pending and len(self._outbox):
            room_left = max(self.batch_size, self.memory_limit // 2)
            self.pending.extend((rec, end) for rec, end in self._outbox.load(room_left))
        return [self.pending[i] for i in range(min(self.batch_size, len(self.pending)))]

    def _finish(self) -> None:
        """Whatever is still in memory goes to the front of the outbox, in order."""
        if self._outbox is None:
            return
        self._intake()
        head = [rec for rec, end in self.pending if end is None]
        if head:
            self._outbox.rewrite(head)
            self.stats.spilled += len(head)
            self.handoff.settle(len(head))
        else:
            self._outbox.rewind()
        self.pending.clear()
        if self.backlog:
            self._spill(self.backlog)
        self.stats.outbox_pending = len(self._outbox)
        self._outbox.close()

    # ---- publishing ------------------------------------------------------------------------

    async def _pump(self, nc: NATS, js: Any) -> bool:
        """Publish until close (False), or until the folder's bus moves while disconnected (True)."""
        h = self.handoff
        stop_requested = False
        while True:
            stop_requested |= self._intake()
            batch = self._next_batch()
            if not batch:
                if stop_requested or h.closing:
                    return False
                h.sleeping = True
                if h.queue.empty():
                    await h.doze(1.0)
                h.sleeping = False
                continue
            state = await self._send(nc, batch)
            settled = self._commit(batch, state)
            if settled == len(batch):
                self._recovered()
                continue
            if h.closing and time.monotonic() >= h.deadline:
                return False
            self.stats.retried += len(batch) - settled
            if not nc.is_connected:
                if await self._wait_connected(nc):
                    return True
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
            if self.handoff.closing:
                timeout = max(0.05, min(timeout, self.handoff.deadline - time.monotonic()))
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
        batch[i] = self.pending[i] = ((record[0], record[1], fitted), end)
        return fitted

    def _commit(self, batch: list[Item], state: BatchAcks) -> int:
        """Drop the settled prefix of ``batch`` from memory and the outbox, poison set aside; returns its length."""
        assert self._outbox is not None
        n = state.settled_prefix()
        from_memory = n_outbox = 0
        last_end: int | None = None
        for i in range(n):
            record, end = self.pending.popleft()
            reason = state.poison.get(i)
            if reason is not None:
                self._outbox.dead.add(record, reason)
                self._set_aside.pop(record[1], None)
                self.stats.dead_lettered += 1
                self.log.warning("event set aside", event_id=record[1], reason=reason, set_aside_in=str(self._outbox.dead.path))  # fmt: skip
            if end is None:
                from_memory += 1
            else:
                last_end, n_outbox = end, n_outbox + 1
        if last_end is not None:
            self._outbox.commit(last_end, n_outbox)
        self.stats.published += n - sum(1 for i in state.poison if i < n)
        if from_memory:
            self.handoff.settle(from_memory)
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
            if self._intake():
                self.handoff.closing = True
            if self.handoff.closing and time.monotonic() >= self.handoff.deadline:
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
