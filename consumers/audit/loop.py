"""The audit gate on the bus: replay, then a durable consumer and a one-second tick feeding the engine.

Restart safety comes from replay, not from the durable consumer's position. On start the
auditor replays the stream through ``handle`` without acting, and collects the audit events
already stored (their ids, and the last ``seq`` per run and attempt). Outputs of the replay whose
``event_id`` is not stored were missed (the auditor died before publishing them): they are
published now, with the next ``seq``. Then the durable consumer ``trainbus-audit`` delivers
what comes after; events at or below the replayed stream sequence are skipped. Each audit event
is published with ``runtime.publish.direct.publish_event`` (``Nats-Msg-Id`` = its ``event_id``), so a
duplicate is dropped by JetStream too.

Side effects come before the event that records them: a flag's ``pause``/``stop`` is sent and an
approved checkpoint written to the ``TRAINBUS_CHECKPOINTS`` bucket, then the event is published.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from consumers.audit.engine import AuditState, Output, Publish, Send, Tick, handle, new_state
from consumers.audit.rules import AuditConfig
from consumers.control_client import NoTrainer, build_command, send_command
from runtime.bus.consume import ConsumerStats, consume
from runtime.bus.stream import Delivered, NewerEvents, auto_replicas, ensure_bucket, ensure_stream, replay
from runtime.errors import BusUnavailable, TrainbusError
from runtime.logs import get_logger
from runtime.publish.direct import publish_event
from runtime.settings import Settings
from schemas import ALL_EVENTS, EVENTS_STREAM, AuditFlag, AuditVerdict, Event
from schemas.common import utc_now
from schemas.subjects import CHECKPOINTS_BUCKET

DURABLE = "trainbus-audit"
LABELS = {"pause": "pause_run", "stop": "stop_run", "eval": "evaluate"}
T = TypeVar("T")


@dataclass
class AuditStats:
    """What one auditor process did."""

    replayed: int = 0
    invalid: int = 0
    flags: int = 0
    verdicts: int = 0


def plain(value: Any) -> Any:
    """``value`` with non-finite floats as strings, so it is strict JSON (as events are)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN").replace("inf", "Infinity")
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


async def open_checkpoints(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """The ``TRAINBUS_CHECKPOINTS`` bucket, created with ``replicas`` when missing."""
    return await ensure_bucket(
        js, CHECKPOINTS_BUCKET, replicas, history=5, description="checkpoints the trainbus audit gate approved"
    )


class Auditor:
    """The engine's state plus what it takes to act on its outputs exactly once."""

    def __init__(self, nc: NATS, js: JetStreamContext, kv: KeyValue, config: AuditConfig, stop: asyncio.Event) -> None:
        self.nc, self.js, self.kv, self.config, self.stop = nc, js, kv, config, stop
        self.state: AuditState = new_state(config)
        self.published: set[str] = set()
        self.next_seq: dict[tuple[str, int], int] = {}
        self.last_seq = 0
        self.stats = AuditStats()
        self.lock = asyncio.Lock()
        self.log = get_logger(consumer="audit")
        self.newer = NewerEvents(self.log)
        """Runs whose events of a newer schema_version were skipped (said once per run)."""

    def feed(self, event: Event) -> list[Output]:
        """Stored audit events are remembered; every other event goes through the engine."""
        if isinstance(event, AuditFlag | AuditVerdict):
            self.published.add(event.event_id)
            key = (event.run_id, event.attempt)
            self.next_seq[key] = max(self.next_seq.get(key, 1), event.seq + 1)
            return []
        self.state, outputs = handle(event, self.state)
        return outputs

    async def recover(self, subject: str, stream: str = EVENTS_STREAM) -> int:
        """Rebuild the engine from the stream and publish what a previous auditor missed."""
        missed: list[Output] = []
        async for item in replay(self.js, subject, stream=stream):
            self.last_seq = item.stream_seq
            self.stats.replayed += 1
            if item.newer is not None:
                self.newer.skip(item)
                continue
            if item.event is None:
                self.stats.invalid += 1
                continue
            missed += self.feed(item.event)
        if self.stats.invalid:
            self.log.warning("invalid events in the stream skipped", count=self.stats.invalid)
        for output in missed:
            await self.execute(output, catching_up=True)
        for run in self.state.runs.values():
            if run.pending and not run.finished:
                await self.command("eval", run.run_id, "audit: checkpoints wait for an evaluation")
        return self.last_seq

    async def on_delivered(self, item: Delivered) -> None:
        """Handler of the durable consumer: events already replayed are skipped."""
        if item.event is None or item.stream_seq <= self.last_seq:
            return
        async with self.lock:
            self.last_seq = item.stream_seq
            for output in self.feed(item.event):
                await self.execute(output)

    async def tick(self, now: datetime) -> None:
        async with self.lock:
            self.state, outputs = handle(Tick(now), self.state)
            for output in outputs:
                await self.execute(output)

    async def execute(self, output: Output, *, catching_up: bool = False) -> None:
        """Send, record and publish one output, unless its event is already in the stream."""
        if isinstance(output, Send):
            if not catching_up:
                await self.command("eval", output.run_id, output.reason)
            return
        event = output.event
        if event.event_id in self.published:
            return
        taken = []
        for action in output.commands:
            if catching_up and self.state.runs[event.run_id].finished:
                taken.append(f"{LABELS[action]}: skipped (the run has finished)")
            else:
                reason = (
                    f"audit {event.rule} ({event.severity}): {event.message}" if isinstance(event, AuditFlag) else ""
                )
                taken.append(await self.command(action, event.run_id, reason))
        for key, value in output.records:
            data = json.dumps(plain(value)).encode()
            await self._retry(f"put {key}", partial(self.kv.put, key, data))
        await self.publish(output, taken)

    async def command(self, action: str, run_id: str, reason: str) -> str:
        """Send ``action`` to the run; what happened, as recorded in ``actions_taken``."""
        label = LABELS[action]
        cmd = build_command(action, run_id, issued_by="audit", reason=reason[:500])
        try:
            reply, _ = await send_command(self.nc, cmd, timeout=self.config.command_timeout)
        except NoTrainer:
            outcome = f"{label}: no trainer answered"
        except TrainbusError as exc:
            outcome = f"{label}: failed ({exc})"
        else:
            outcome = f"{label}: {reply.status}"
            if reply.status == "rejected":
                outcome += f" ({reply.code}: {reply.message})"
        self.log.info("command sent", run_id=run_id, command=action, outcome=outcome, reason=reason)
        return outcome

    async def publish(self, output: Publish, taken: list[str]) -> None:
        event = output.event
        key = (event.run_id, event.attempt)
        seq = self.next_seq.get(key, 1)
        update: dict[str, Any] = {"seq": seq, "time": utc_now()}
        if isinstance(event, AuditFlag):
            update["actions_taken"] = taken
        stamped = event.model_copy(update=update)
        ack = await self._retry(f"publish {event.event_id}", lambda: publish_event(self.js, stamped))
        if ack is None:
            return
        if not ack.duplicate:
            self.next_seq[key] = seq + 1
        self.published.add(event.event_id)
        if isinstance(event, AuditFlag):
            self.stats.flags += 1
            self.log.warning("flag", run_id=event.run_id, rule=event.rule, step=event.step, message=event.message)
        else:
            self.stats.verdicts += 1
            self.log.info("verdict", run_id=event.run_id, step=event.checkpoint_step, verdict=event.verdict)

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call`` until it succeeds (the bus may be away for a while) or the auditor stops."""
        while True:
            try:
                return await call()
            except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.Error) as exc:
                if self.stop.is_set():
                    self.log.error("gave up at shutdown", action=what, error=str(exc) or type(exc).__name__)
                    return None
                self.log.warning("bus not answering; retrying", action=what, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)


async def ensure_events_stream(js: JetStreamContext, settings: Settings) -> None:
    """The events stream exists (created when missing; an existing one is left as it is)."""
    try:
        await js.stream_info(EVENTS_STREAM)
    except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
        await ensure_stream(js, settings.stream)  # creates it, or says in one line that JetStream is off
    except (TimeoutError, nats.errors.TimeoutError):
        raise BusUnavailable(f"no answer from JetStream about {EVENTS_STREAM}: may this user use JetStream?") from None


async def _ensure_durable(js: JetStreamContext, durable: str, subject: str, after: int, stream: str) -> None:
    """Create the durable consumer on first start right after what the replay covered."""
    try:
        await js.consumer_info(stream, durable)
        return
    except nats.js.errors.NotFoundError:
        pass
    config = api.ConsumerConfig(
        name=durable,
        durable_name=durable,
        filter_subject=subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after + 1,
        ack_policy=api.AckPolicy.EXPLICIT,
        max_ack_pending=1024,
        ack_wait=30,
    )
    await js.add_consumer(stream, config=config)


async def _ticker(auditor: Auditor, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            await auditor.tick(datetime.now(UTC))


async def run_audit(
    nc: NATS,
    config: AuditConfig,
    settings: Settings,
    *,
    stop: asyncio.Event,
    subject: str = ALL_EVENTS,
    durable: str = DURABLE,
    on_ready: Callable[[], None] | None = None,
    stream: str = EVENTS_STREAM,
) -> tuple[AuditStats, ConsumerStats]:
    """Audit every event on ``subject`` of ``stream`` until ``stop`` is set; ``on_ready`` once it is caught up.

    ``stream`` is the events stream, or the audit partitions' (``consumers.audit.partitions``).
    """
    js = nc.jetstream()
    await ensure_events_stream(js, settings)
    kv = await open_checkpoints(js, auto_replicas(nc, settings.stream.replicas))
    auditor = Auditor(nc, js, kv, config, stop)
    after = await auditor.recover(subject, stream)
    await _ensure_durable(js, durable, subject, after, stream)
    if on_ready is not None:
        on_ready()
    ticker = asyncio.create_task(_ticker(auditor, stop))
    stats = ConsumerStats()
    try:
        await consume(
            js,
            auditor.on_delivered,
            durable=durable,
            stop=stop,
            filter_subject=subject,
            stats=stats,
            newer=auditor.newer,
            stream=stream,
        )
    finally:
        stop.set()
        await ticker
    auditor.stats.invalid += stats.invalid
    return auditor.stats, stats
