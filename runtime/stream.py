"""The ``TRAINBUS_EVENTS`` stream: idempotent provisioning, replay of a run, the list of runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from pydantic import ValidationError

from runtime.errors import BusUnavailable
from runtime.logs import get_logger
from runtime.settings import StreamSettings
from schemas import ALL_EVENTS, EVENTS_STREAM, Event, parse_event
from schemas.subjects import EVENTS_PREFIX, run_events

NS = 1_000_000_000
NO_JETSTREAM = (
    "JetStream is not enabled on this NATS server: start nats-server with -js (or a jetstream {} block), "
    "or use `trainbus up`"
)


def stream_config(limits: StreamSettings) -> api.StreamConfig:
    """The stream's desired configuration for ``limits``."""
    return api.StreamConfig(
        name=EVENTS_STREAM,
        subjects=[ALL_EVENTS],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        max_age=limits.max_age_days * 86400,
        max_bytes=limits.max_bytes,
        duplicate_window=limits.duplicate_window_seconds,
        num_replicas=limits.replicas,
        allow_direct=True,
    )


def _differences(have: api.StreamConfig, want: api.StreamConfig) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for name in ("subjects", "max_age", "max_bytes", "duplicate_window", "num_replicas", "storage"):
        a, b = getattr(have, name), getattr(want, name)
        if isinstance(a, float) or isinstance(b, float):
            if a is None or b is None or abs(float(a) - float(b)) > 1e-3:
                out[name] = (a, b)
        elif a != b:
            out[name] = (a, b)
    return out


async def ensure_stream(js: JetStreamContext, limits: StreamSettings) -> str:
    """Create or update ``TRAINBUS_EVENTS``; returns ``created``, ``updated``, ``unchanged`` or ``kept``.

    A second start with other limits updates the stream; a change the server refuses (e.g. the
    storage type) is explained in a warning and the existing stream is kept.
    """
    log = get_logger(stream=EVENTS_STREAM)
    want = stream_config(limits)
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config=want)
        log.info("stream created", max_age_days=limits.max_age_days, max_bytes=limits.max_bytes)
        return "created"
    except nats.js.errors.ServiceUnavailableError:
        raise BusUnavailable(NO_JETSTREAM) from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise BusUnavailable(
            f"no answer from JetStream for stream {EVENTS_STREAM}: is JetStream enabled and may this user use it?"
        ) from None
    diff = _differences(info.config, want)
    if not diff:
        return "unchanged"
    try:
        await js.update_stream(config=want)
    except nats.js.errors.APIError as exc:
        log.warning(
            "stream exists with other limits; keeping them",
            differences={k: {"have": v[0], "want": v[1]} for k, v in diff.items()},
            server_said=exc.description,
        )
        return "kept"
    log.info("stream limits updated", changed=sorted(diff))
    return "updated"


@dataclass
class Delivered:
    """One stored message: its stream sequence, subject and the parsed event (or the error)."""

    stream_seq: int
    subject: str
    event: Event | None
    error: str | None
    data: bytes


def decode(msg: Msg | api.RawStreamMsg, stream_seq: int) -> Delivered:
    """Parse a stored message; an invalid one is returned with its error, never raised."""
    data = msg.data or b""
    subject = msg.subject or ""
    try:
        return Delivered(stream_seq, subject, parse_event(data), None, data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return Delivered(stream_seq, subject, None, f"{where}: {first['msg']}", data)


async def count_stored(js: JetStreamContext, filter_subject: str) -> int:
    """How many stored messages match ``filter_subject``."""
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=filter_subject)
    return sum((info.state.subjects or {}).values())


async def replay(
    js: JetStreamContext, filter_subject: str, *, follow: bool = False, idle: float = 1.0
) -> AsyncIterator[Delivered]:
    """Every stored message matching ``filter_subject`` from the start; with ``follow``, live ones after."""
    if not follow and await count_stored(js, filter_subject) == 0:
        return
    sub = await js.subscribe(
        filter_subject, stream=EVENTS_STREAM, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except (TimeoutError, nats.errors.TimeoutError):
                if follow:
                    continue
                return
            meta = msg.metadata
            yield decode(msg, meta.sequence.stream)
            if not follow and meta.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def last_event(js: JetStreamContext, subject: str) -> Delivered | None:
    """The newest stored event on ``subject`` (exact), or None."""
    try:
        raw = await js.get_last_msg(EVENTS_STREAM, subject, direct=True)
    except nats.js.errors.NotFoundError:
        return None
    return decode(raw, raw.seq or 0)


async def run_ids(js: JetStreamContext) -> list[str]:
    """Run ids with at least one stored ``run.*`` event."""
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=f"{EVENTS_PREFIX}.*.run.>")
    return sorted({s.split(".")[2] for s in (info.state.subjects or {})})


async def run_summary(js: JetStreamContext, run_id: str) -> dict[str, Any]:
    """Latest state of one run: from its newest ``run.*`` event and its newest ``train.step``."""
    base = run_events(run_id)[:-1]
    found = {
        name: await last_event(js, base + name)
        for name in ("run.started", "run.state", "run.finished", "train.step", "eval", "checkpoint")
    }
    lifecycle = [d for n, d in found.items() if n.startswith("run.") and d is not None and d.event is not None]
    latest = max(lifecycle, key=lambda d: d.stream_seq, default=None)
    summary: dict[str, Any] = {"run_id": run_id, "state": "unknown"}
    if latest is not None and latest.event is not None:
        ev = latest.event
        summary["state"] = getattr(ev, "status", None) or getattr(ev, "state", None) or "running"
        summary["attempt"] = ev.attempt
        summary["updated"] = ev.time.isoformat()
    started = found["run.started"]
    if started is not None and started.event is not None:
        summary["model"] = getattr(started.event, "model", "")
        summary["max_steps"] = getattr(started.event, "max_steps", None)
        hp = getattr(started.event, "hyperparameters", None)
        summary["hyperparameters"] = hp.model_dump() if hp is not None else {}
    step = found["train.step"]
    if step is not None and step.event is not None:
        summary["step"] = getattr(step.event, "step", None)
        summary["loss"] = getattr(step.event, "loss", None)
        summary["learning_rate"] = getattr(step.event, "learning_rate", None)
        hp = getattr(step.event, "hyperparameters", None)
        if hp is not None:
            summary["hyperparameters"] = hp.model_dump()
    ev_eval = found["eval"]
    if ev_eval is not None and ev_eval.event is not None:
        summary["eval_accuracy"] = getattr(ev_eval.event, "accuracy", None)
    return summary


async def list_runs(nc: NATS) -> list[dict[str, Any]]:
    """Every run in the stream with its latest state."""
    js = nc.jetstream()
    return [await run_summary(js, run_id) for run_id in await run_ids(js)]
