"""`predictor.loaded` announcements on a real nats-server: replicas that load at the same moment
each get their own place in the run's numbering, a retry is stored once, and an unreadable last
message does not stop the next announcement."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.aio.client import Client as NATS

from consumers.predict.announce import announce
from consumers.predict.checkpoints import Chosen
from producers.config import RunConfig
from runtime.bus.stream import EVENTS_STREAM
from schemas import event_subject, parse_event
from schemas.subjects import predict_subject

ALIAS = "risk"


def chosen(run_id: str, step: int = 20) -> Chosen:
    return Chosen(
        run_id=run_id, step=step, path=Path(f"/runs/{run_id}/checkpoint-{step}"), sha256="ab" * 32,
        verdict="approved", forced=False, config=RunConfig(), event_id=f"{run_id}.1.{step}",
    )  # fmt: skip


def where() -> dict[str, str]:
    return {"alias": ALIAS, "subject": predict_subject(ALIAS)}


async def stored(nc: NATS, run_id: str) -> list[bytes]:
    js = nc.jetstream()
    sub = await js.subscribe(event_subject(run_id, "predictor.loaded"), ordered_consumer=True)
    out: list[bytes] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=1)
        except TimeoutError:
            break
        out.append(msg.data)
    await sub.unsubscribe()
    return out


async def test_replicas_loading_together_are_numbered_one_after_the_other(nc: NATS) -> None:
    run_id = f"announce-{time.monotonic_ns()}"
    js = nc.jetstream()
    loaded = await asyncio.gather(
        *(announce(js, chosen(run_id), instance=f"replica-{i}", number=1, **where()) for i in range(4))
    )
    assert all(event is not None for event in loaded)
    assert sorted(e.seq for e in loaded if e is not None) == [1, 2, 3, 4]
    events = [parse_event(data) for data in await stored(nc, run_id)]
    assert [e.seq for e in events] == [1, 2, 3, 4]  # in the stream in the order they were numbered
    assert {e.instance for e in events} == {f"replica-{i}" for i in range(4)}

    again = await announce(js, chosen(run_id), instance="replica-0", number=1, **where())  # the same load, retried
    assert again is not None and loaded[0] is not None and again.event_id == loaded[0].event_id
    assert len(await stored(nc, run_id)) == 4  # deduplicated by its event id: stored once

    swap = await announce(js, chosen(run_id, step=40), instance="replica-0", number=2, previous_step=20, **where())
    assert swap is not None and swap.trigger == "hot_swap" and swap.seq == 5 and swap.step == 40


async def test_an_unreadable_last_message_restarts_the_numbering_after_it(nc: NATS) -> None:
    run_id = f"announce-{time.monotonic_ns()}"
    js = nc.jetstream()
    await js.publish(event_subject(run_id, "predictor.loaded"), b"not an event", stream=EVENTS_STREAM)
    event = await announce(js, chosen(run_id), instance="replica-0", number=1, **where())
    assert event is not None and event.seq == 1 and event.trigger == "start"
    assert [parse_event(d).seq for d in (await stored(nc, run_id))[1:]] == [1]
