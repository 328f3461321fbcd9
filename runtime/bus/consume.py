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
    newer = newer if newer is not None else NewerEvents(log)
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        max_ack_pending=max(1024, batch * 4),
        ack_wait=30,
        inactive_threshold=None if durable else 60,
    )
    sub = await js.pull_subscribe(filter_subject, durable=durable, stream=stream, config=config)
    leaderless: float | None = None  # since when the durable consumer has had no leader
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
                if durable is None:
                    raise  # an ephemeral consumer may have died with its server: the caller starts another
                # a cluster node died and the consumer elects a new leader; its replicas keep our place
                if leaderless is None:
                    leaderless = time.monotonic()
                    log.warning("consumer has no leader; waiting for the cluster to elect one")
                await asyncio.sleep(0.5)
                continue
            if leaderless is not None:
                log.info("consumer has a leader again", after_seconds=round(time.monotonic() - leaderless, 1))
                leaderless = None
            for msg in msgs:
                item = decode(msg, msg.metadata.sequence.stream)
                if item.newer is not None:
                    stats.newer += 1
                    newer.skip(item)
                    if on_newer is not None:
                        on_newer(item)
                elif item.event is None:
                    stats.invalid += 1
                    log.warning("invalid event skipped", subject=item.subject, error=item.error)
                    if on_invalid is not None:
                        on_invalid(item)
                else:
                    await handler(item)
                    stats.handled += 1
                await msg.ack()
    finally:
        if durable is None:
            await sub.unsubscribe()
    return stats
