"""The ``predictor.loaded`` event: which checkpoint now serves under which alias, and since when.

Replicas of one alias publish on the same subject, so the envelope's ``seq`` (no gaps per run and
source) is taken from the last stored event on that subject and the publish is conditional on it
(``Nats-Expected-Last-Subject-Sequence``): when two replicas race, the loser reads again and
takes the next number. It goes out with ``runtime.publish.direct.publish_event``, ``Nats-Msg-Id`` =
the event id, so a retried publish is stored once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from consumers.predict.checkpoints import Chosen
from runtime.logs import get_logger
from runtime.publish.direct import WRONG_LAST_SEQUENCE, event_id, publish_event
from schemas import EVENTS_STREAM, event_subject, parse_event
from schemas.predict import PredictorLoaded

ATTEMPTS = 10


async def _last_on(js: JetStreamContext, subject: str) -> tuple[int, int]:
    """(stream sequence, envelope seq) of the newest event stored on ``subject``; (0, 0) for none."""
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, subject)
    except nats.js.errors.NotFoundError:
        return 0, 0
    try:
        return msg.seq or 0, parse_event(msg.data or b"").seq
    except ValueError:  # not an event we can read: the numbering restarts after it
        return msg.seq or 0, 0


async def announce(
    js: JetStreamContext, chosen: Chosen, *, instance: str, number: int, **fields: Any
) -> PredictorLoaded | None:
    """Publish that this instance now serves ``chosen`` (its ``number``-th load); None if the bus refuses."""
    subject = event_subject(chosen.run_id, "predictor.loaded")
    log = get_logger(consumer="predict", run_id=chosen.run_id)
    for _ in range(ATTEMPTS):
        stream_seq, seq = await _last_on(js, subject)
        event = PredictorLoaded(
            event_id=event_id(chosen.run_id, "predictor", instance, number),  # the same on a retry: stored once
            run_id=chosen.run_id,
            attempt=chosen.attempt,
            seq=seq + 1,
            source="predictor",
            step=chosen.step,
            checkpoint_path=str(chosen.path),
            sha256=chosen.sha256,
            checkpoint_event_id=chosen.event_id,
            verdict=chosen.verdict,
            forced=chosen.forced,
            instance=instance,
            trigger="start" if fields.get("previous_step") is None else "hot_swap",
            **fields,
        )
        try:
            await publish_event(js, event, after=stream_seq)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                continue  # another replica announced first: number ours after it
            log.error("predictor.loaded not published", error=str(exc))
            return None
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            log.error("predictor.loaded not published: no answer from JetStream", error=type(exc).__name__)
            await asyncio.sleep(0.5)
            continue
        return event
    log.error("predictor.loaded not published", subject=subject, attempts=ATTEMPTS)
    return None
