"""The dashboard's one bus reader: a background thread that replays the stream, then follows it.

One ``BusReader`` serves every browser session of a dashboard server process (the app keeps it
in ``st.cache_resource``). Its thread owns an asyncio loop and the only NATS connection: it
replays ``TRAINBUS_EVENTS`` from the start with an ordered consumer, then follows live events,
folding each into ``DashboardState`` under a lock; it also watches the audit gate's ``best``
pointers and the launch queue's buckets (``dashboards.app.queue``). Pages call ``overview()`` / ``run()`` for immutable snapshots and never wait on the
network. A lost bus is retried forever (``bus_status`` says so for the banner); after a
reconnect the consumer resumes from the last stream sequence it applied. JetStream delivers
nothing when a run is purged (`trainbus runs rm`), so the reader looks at the stream's message
count every few seconds and drops the runs whose events are gone.

Requests the pages make (a command to a trainer, a prediction, predictor discovery) run on this
loop too, through ``submit``: the caller gets a future and polls it, so a page never waits on
the network and no session opens a connection of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from dashboards.app.denials import Denials
from dashboards.app.queue import QueueSnapshot, QueueWatch
from dashboards.app.snapshot import RunSnapshot, RunSummary, snapshot_run, summarise
from dashboards.app.state import DashboardState, count_invalid, count_newer, forget, handle
from runtime.bus.connect import BusTarget, Credentials, connect
from runtime.bus.stream import decode
from runtime.errors import BusUnavailable, TrainbusError
from runtime.logs import get_logger
from runtime.settings import Settings
from schemas import ALL_EVENTS, EVENTS_STREAM
from schemas.subjects import CHECKPOINTS_BUCKET, EVENTS_PREFIX, run_id_of

T = TypeVar("T")

RETRY_SECONDS = 1.0
"""Pause between attempts to reach a lost bus or a missing stream."""
CONNECTING = "connecting"
"""``BusStatus.detail`` before the first connection attempt has ended."""
PURGE_CHECK_SECONDS = 2.0
"""How often the reader looks whether runs were purged from the stream."""


@dataclass(frozen=True)
class BusStatus:
    """What the banner says about the bus."""

    url: str
    connected: bool
    since: float
    """Unix time of the last change."""
    detail: str = ""
    caught_up: bool = False
    """True once the stream's backlog at connect time has been replayed."""
    replayed: int = 0
    """Events read so far (replay included)."""
    replay_seconds: float | None = None


@dataclass(frozen=True)
class Overview:
    """What every page needs first: the bus, the runs, the invalid-event count."""

    bus: BusStatus
    runs: tuple[RunSummary, ...]
    invalid_events: int
    invalid_recent: tuple[str, ...]
    newer_events: int = 0
    """Events skipped because a newer trainbus wrote them (upgrade to read them)."""
    best_runs: tuple[str, ...] = ()
    """Runs the audit gate named a best approved checkpoint for (what `trainbus serve` serves)."""
    removed: tuple[str, ...] = ()
    """Runs purged from the stream while the dashboard ran (`trainbus runs rm`)."""


class BusReader:
    """See the module docstring. ``start()`` it once; ``close()`` stops the thread."""

    def __init__(
        self,
        target: BusTarget,
        settings: Settings,
        *,
        credentials: Credentials | None = None,
        name: str = "trainbus-dashboard",
    ) -> None:
        self.target = target
        self.settings = settings
        self.credentials = credentials
        self.name = name
        self.log = get_logger(component="dashboard-reader")
        self._state = DashboardState()
        self._lock = threading.Lock()
        self._snapshots: dict[str, RunSnapshot] = {}
        self._bus = BusStatus(url=target.display, connected=False, since=time.time(), detail=CONNECTING)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: NATS | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._denials = Denials()
        self._backlog_end = 0
        self._replay_started = 0.0
        self._stored = (0, 0)
        """(last stream sequence, messages) at the last look: messages gone missing mean a purge."""
        self._queue = QueueWatch()

    # ---- page side (any thread) ---------------------------------------------------------

    def start(self) -> BusReader:
        """Start the reader thread (returns at once; the replay runs in the background)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop following the stream and close the connection (again: nothing to do)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def overview(self, *, runs: bool = True) -> Overview:
        """The bus status and (unless ``runs`` is False) one summary per run, first seen first."""
        with self._lock:
            return Overview(
                bus=self._bus,
                runs=tuple(summarise(run) for run in self._state.runs.values()) if runs else (),
                invalid_events=self._state.invalid_events,
                invalid_recent=tuple(self._state.invalid_recent),
                newer_events=self._state.newer_events,
                best_runs=tuple(self._state.best) if runs else (),
                removed=tuple(self._state.removed) if runs else (),
            )

    def run(self, run_id: str) -> RunSnapshot | None:
        """An immutable snapshot of one run, shared by every session until the run changes."""
        with self._lock:
            view = self._state.runs.get(run_id)
            if view is None:
                return None
            cached = self._snapshots.get(run_id)
            best = self._state.best.get(run_id)
            if cached is not None and cached.version == view.version and cached.best_verdict == best:
                return cached
            snap = self._snapshots[run_id] = snapshot_run(view, best)
            return snap

    def queue(self) -> QueueSnapshot:
        """The launch queue's jobs and agents as last seen."""
        return self._queue.snapshot()

    def bus_status(self) -> BusStatus:
        with self._lock:
            return self._bus

    def submit(
        self, work: Callable[[NATS], Awaitable[T]], *, publishes: Iterable[str] = ()
    ) -> concurrent.futures.Future[T]:
        """Run ``work(nc)`` on the reader's loop and connection; the future holds its result.

        It raises ``Denied`` as soon as the server refuses this user publishing to one of the
        subjects in ``publishes`` (instead of waiting for a reply that cannot come), and
        ``BusUnavailable`` while the bus is not connected.
        """
        loop, nc = self._loop, self._nc
        if loop is None or nc is None or not nc.is_connected:
            failed: concurrent.futures.Future[T] = concurrent.futures.Future()
            failed.set_exception(BusUnavailable(f"not connected to the bus at {self.target.display}"))
            return failed
        user = (self.credentials or Credentials.from_env()).identity() or "this user"
        return asyncio.run_coroutine_threadsafe(self._denials.guard(work(nc), tuple(publishes), user), loop)

    # ---- reader thread --------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        ready.set()
        try:
            self._loop.run_until_complete(self._main(self._stop))
        finally:
            # nats-py leaves its ordered-consumer helpers running after close: end them quietly
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _set_bus(self, connected: bool, detail: str = "", **extra: Any) -> None:
        with self._lock:
            changed = connected != self._bus.connected or detail != self._bus.detail
            values = {**self._bus.__dict__, "connected": connected, "detail": detail, **extra}
            if changed:
                values["since"] = time.time()
            self._bus = BusStatus(**values)

    async def _main(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                nc = await connect(
                    self.target,
                    self.settings,
                    name=self.name,
                    credentials=self.credentials,
                    log=self.log,
                    on_permission_error=self._denials.on_error,
                )
            except TrainbusError as exc:
                self._set_bus(False, str(exc))
                await _sleep(stop, RETRY_SECONDS)
                continue
            self._nc = nc
            try:
                await self._follow(nc, stop)
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.warning("dashboard reader failed; reconnecting", error=str(exc) or type(exc).__name__)
                self._set_bus(False, str(exc) or type(exc).__name__)
            finally:
                self._nc = None
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _follow(self, nc: NATS, stop: asyncio.Event) -> None:
        """Subscribe from the last applied sequence; resubscribe after every reconnect."""
        js = nc.jetstream()
        watchers = [
            asyncio.ensure_future(self._watch_best(js, stop)),
            asyncio.ensure_future(self._watch_purges(js, stop)),
            asyncio.ensure_future(self._queue.run(js, stop)),
        ]
        sub = None
        try:
            was_connected = False
            while not stop.is_set():
                if nc.is_connected and not was_connected:
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    sub = await self._subscribe(js, stop)
                    if sub is None:
                        return
                was_connected = nc.is_connected
                if not nc.is_connected:
                    self._set_bus(False, "connection lost; reconnecting")
                await _sleep(stop, 0.25)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if sub is not None and nc.is_connected:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _subscribe(self, js: JetStreamContext, stop: asyncio.Event) -> Any:
        while not stop.is_set():
            try:
                info = await js.stream_info(EVENTS_STREAM)
                break
            except nats.js.errors.NotFoundError:
                self._set_bus(True, f"waiting for the stream {EVENTS_STREAM}: nothing has been published yet")
                await _sleep(stop, RETRY_SECONDS)
        else:
            return None
        last_seq = int(info.state.last_seq or 0)
        with self._lock:
            if last_seq < self._state.last_stream_seq:  # the stream was deleted and made again
                self._state = DashboardState()
                self._snapshots.clear()
            start = self._state.last_stream_seq + 1
        self._backlog_end = last_seq if info.state.messages else 0
        self._stored = (last_seq, int(info.state.messages or 0))
        self._replay_started = time.monotonic()
        caught_up = self._backlog_end < start
        self._set_bus(True, "", caught_up=caught_up)
        if not caught_up:
            self.log.info("replaying the stream", from_seq=start, to_seq=self._backlog_end)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start > 1 else api.DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
        )
        return await js.subscribe(
            ALL_EVENTS, stream=EVENTS_STREAM, cb=self._on_msg, ordered_consumer=True, config=config
        )

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        item = decode(msg, seq)  # parsing stays outside the lock
        # runtime.bus.stream marks an event of a higher schema_version as ``newer`` (skipped, not invalid)
        newer = getattr(item, "newer", None)
        with self._lock:
            if newer is not None:
                if count_newer(self._state, run_id_of(item.subject) or "?", seq):
                    self.log.warning(
                        "events written by a newer trainbus are skipped; upgrade trainbus to read them",
                        subject=item.subject,
                        schema_version=newer,
                    )
            elif item.event is None:
                count_invalid(self._state, item.subject, item.error, seq)
            else:
                handle(item.event, self._state, seq)
            if not self._bus.caught_up and (seq >= self._backlog_end or meta.num_pending == 0):
                seconds = time.monotonic() - self._replay_started
                self._bus = BusStatus(
                    **{
                        **self._bus.__dict__,
                        "caught_up": True,
                        "replay_seconds": seconds,
                        "replayed": self._state.events,
                    }
                )
                self.log.info(
                    "replayed the stream; following live events", events=self._state.events, seconds=round(seconds, 3)
                )
            elif self._state.events % 1000 == 0:
                self._bus = BusStatus(**{**self._bus.__dict__, "replayed": self._state.events})

    async def _watch_best(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Follow the audit gate's ``<run>.best`` pointers; the bucket may appear later."""
        while not stop.is_set():
            try:
                kv = await js.key_value(CHECKPOINTS_BUCKET)
                watcher = await kv.watch("*.best")
                async for entry in watcher:
                    if entry is None:
                        continue
                    run_id = entry.key.rsplit(".", 1)[0]
                    if not entry.value:  # deleted or purged (`trainbus runs rm`)
                        with self._lock:
                            self._state.best.pop(run_id, None)
                        continue
                    with contextlib.suppress(ValueError, AttributeError):
                        verdict_id = json.loads(entry.value).get("verdict_event_id")
                        if verdict_id:
                            with self._lock:
                                self._state.best[run_id] = str(verdict_id)
            except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.debug("best-pointer watch failed; retrying", error=str(exc) or type(exc).__name__)
            await _sleep(stop, 5 * RETRY_SECONDS)

    async def _watch_purges(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Drop runs purged from the stream. A purge delivers nothing, so compare the stream's
        message count with the last look: when messages went missing (a purge, or the stream's
        limits dropping old events), list the runs still stored and forget the others."""
        while not stop.is_set():
            await _sleep(stop, PURGE_CHECK_SECONDS)
            try:
                info = await js.stream_info(EVENTS_STREAM)
                last, messages = int(info.state.last_seq or 0), int(info.state.messages or 0)
                before_last, before_messages = self._stored
                self._stored = (last, messages)
                if messages >= before_messages + (last - before_last):
                    continue
                stored = await js.stream_info(EVENTS_STREAM, subjects_filter=f"{EVENTS_PREFIX}.>")
            except nats.js.errors.NotFoundError:
                continue  # the stream is gone: the follow loop waits for it and starts again
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.debug("purge check failed; retrying", error=str(exc) or type(exc).__name__)
                continue
            present = {run_id_of(subject) for subject in stored.state.subjects or {}}
            upto = int(stored.state.last_seq or 0)
            with self._lock:
                # a run first seen after that listing may simply be newer than it
                gone = [r.run_id for r in self._state.runs.values() if r.run_id not in present and r.first_seq <= upto]
                for run_id in gone:
                    forget(self._state, run_id, upto)
                    self._snapshots.pop(run_id, None)
            if gone:
                self.log.info("runs purged from the stream are dropped", runs=gone)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
