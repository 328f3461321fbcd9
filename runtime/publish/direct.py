"""One event published straight to JetStream by a consumer: its subject and its de-duplication id.

The training run's events go through its publisher process (``runtime.publish.sink``); the few
events consumers make themselves (audit flags and verdicts, ``predictor.loaded``, ``run.tag`` and
``run.note``) are published one at a time with ``publish_event``, each acknowledged before the
consumer goes on. Their ids come from ``event_id``, ``<run_id>.<source>.<parts…>``, where the parts
name what the event is about (the rule and the judged event, the checkpoint, the instance and its
load number, a random token), so that a retried publish carries the same ``Nats-Msg-Id`` and
JetStream stores it once.
"""

from __future__ import annotations

from typing import Any

from schemas import Event, event_subject

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code when a conditional publish finds the subject moved on."""


def event_id(run_id: str, source: str, *parts: object) -> str:
    """The de-duplication id of an event ``source`` publishes about ``run_id``: ``<run_id>.<source>.<parts…>``."""
    return ".".join([run_id, source, *map(str, parts)])


async def publish_event(js: Any, event: Event, *, after: int | None = None) -> Any:
    """Publish ``event`` on its run's subject with ``Nats-Msg-Id`` = its ``event_id``; returns JetStream's ack.

    ``after``: only if the newest message stored on that subject has this stream sequence (0: none),
    else JetStream refuses with ``WRONG_LAST_SEQUENCE``, so that racing publishers number in turn.
    """
    headers = {"Nats-Msg-Id": event.event_id}
    if after is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(after)
    return await js.publish(event_subject(event.run_id, event.type), event.model_dump_json().encode(), headers=headers)
