"""The thin loop every consumer shares: JetStream messages in, a handler called, acks out.

A message that fails validation is counted, logged with its subject and acked, so it can never
wedge a consumer; an event a newer trainbus wrote (higher ``schema_version``) is counted,
reported once per run and acked the same way. Unknown fields of an event are ignored (see
``runtime.bus.stream.decode``). Handlers should be idempotent by ``event_id``: delivery is at least once.
On a cluster, a durable consumer whose leader died waits for the new one (it keeps its place).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from runtime.bus.stream import Delivered, NewerEvents, decode
from runtime.logs import get_logger
from schemas import ALL_EVENTS, EVENTS_STREAM

Handler = Callable[[Delivered], Awaitable[None]]


@dataclass
class ConsumerStats:
    """What a consumer loop saw."""

    handled: int = 0
    invalid: int = 0
    newer: int = 0
    """Events of a newer schema_version, skipped."""


async def consume(
    js: JetStreamContext,
    handler: Handler,
    *,
    durable: str | None,
    stop: asyncio.Event,
    filter_subject: str = ALL_EVENTS,
    batch: int = 256,
    on_invalid: Callable[[Delivered], None] | None = None,
    on_newer: Callable[[Delivered], None] | None = None,
    stats: ConsumerStats | None = None,
    newer: NewerEvents | None = None,
    stream: str = EVENTS_STREAM,
) -> ConsumerStats:
    """Feed every event matching ``filter_subject`` to ``handler`` until ``stop`` is set.

    With ``durable`` the consumer resumes where it last acked (its name is the durable name);
    without, it replays the stream from the start (state rebuilt on every start). ``newer``
    carries the runs already reported for newer events over from an earlier read (a replay);
    ``stream`` is the events stream unless the consumer reads a derived copy (audit partitions).
    """
    log = get_logger(consumer=durable or "ephemeral")
    stats = stats or ConsumerStats()
    deliver = _Deliver(handler, stats, newer if newer is not None else NewerEvents(log), log, on_invalid, on_newer)
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        max_ack_pending=max(1024, batch * 4),
        ack_wait=30,
        inactive_threshold=None if durable else 60,
    )
    sub = await js.pull_subscribe(filter_subject, durable=durable, stream=stream, config=config)
    leader = _Leader(log, durable)
    try:
        while not stop.is_set():
            for msg in await leader.fetch(sub, batch):
                await deliver(msg)
    finally:
        if durable is None:
            await sub.unsubscribe()
    return stats


@dataclass
class _Leader:
    """Fetches for a consumer, and whether it has a leader: said once when it loses one, once when it is back."""

    log: Any
    durable: str | None
    since: float | None = None
    """Since when the durable consumer has had no leader."""

    async def fetch(self, sub: Any, batch: int) -> list[Any]:
        try:
            msgs: list[Any] = await sub.fetch(batch, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            if self.durable is None:
                raise  # an ephemeral consumer may have died with its server: the caller starts another
            self._lost()  # a cluster node died and the consumer elects a new leader; its replicas keep our place
            await asyncio.sleep(0.5)
            return []
        if self.since is not None:
            self.log.info("consumer has a leader again", after_seconds=round(time.monotonic() - self.since, 1))
            self.since = None
        return msgs

    def _lost(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("consumer has no leader; waiting for the cluster to elect one")


@dataclass
class _Deliver:
    """One message to the handler, or counted and reported when it is invalid or newer; acked either way."""

    handler: Handler
    stats: ConsumerStats
    newer: NewerEvents
    log: Any
    on_invalid: Callable[[Delivered], None] | None
    on_newer: Callable[[Delivered], None] | None

    async def __call__(self, msg: Any) -> None:
        item = decode(msg, msg.metadata.sequence.stream)
        if item.newer is not None:
            self.stats.newer += 1
            self.newer.skip(item)
            _tell(self.on_newer, item)
        elif item.event is None:
            self.stats.invalid += 1
            self.log.warning("invalid event skipped", subject=item.subject, error=item.error)
            _tell(self.on_invalid, item)
        else:
            await self.handler(item)
            self.stats.handled += 1
        await msg.ack()


def _tell(callback: Callable[[Delivered], None] | None, item: Delivered) -> None:
    if callback is not None:
        callback(item)
