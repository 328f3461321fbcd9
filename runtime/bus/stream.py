"""The ``TRAINBUS_EVENTS`` stream: idempotent provisioning, replay of a run, the list of runs.

Every reader decodes stored messages with ``decode``: unknown fields of an event are ignored,
an invalid message or an event of a newer ``schema_version`` comes back without an event
(``NewerEvents`` reports the latter once per run), never as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from pydantic import ValidationError

from runtime.bus.connect import BusTarget, connected
from runtime.errors import BusUnavailable
from runtime.lifecycle import STALL_AFTER_SECONDS, Lifecycle, fold, shown
from runtime.logs import get_logger
from runtime.settings import Settings, StreamSettings
from schemas import (
    ALL_EVENTS,
    EVENTS_STREAM,
    SCHEMA_VERSION,
    Evaluation,
    Event,
    NewerSchema,
    RunStarted,
    RunTag,
    TrainStep,
    parse_event,
)
from schemas.subjects import EVENTS_PREFIX, run_events, run_id_of

NS = 1_000_000_000
PROVISION = "`trainbus up` provisions its bus as admin, `trainbus provision` (as admin) a bus you run yourself"
"""Who creates what a user may not: said after a create that got no answer (the server drops a
request its user may not send)."""
NO_JETSTREAM = (
    "JetStream is not enabled on this NATS server: start nats-server with -js (or a jetstream {} block), "
    "or use `trainbus up`"
)


def cluster_size(nc: NATS) -> int:
    """How many servers the connected server's cluster has (1 for a server on its own), from its INFO."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}  # nats-py keeps INFO only privately
    if not info.get("cluster"):
        return 1
    # INFO at connect time lists the cluster's servers; ones that joined later are in the pool
    return max(1, len(info.get("connect_urls") or []), len(nc.servers))


def auto_replicas(nc: NATS, wanted: int | None) -> int:
    """``stream.replicas`` when set; else 3 on a cluster of at least three servers, 1 otherwise."""
    if wanted is not None:
        return wanted
    return 3 if cluster_size(nc) >= 3 else 1


def stream_config(limits: StreamSettings, replicas: int | None = None) -> api.StreamConfig:
    """The stream's desired configuration for ``limits`` (``replicas`` resolved by ``auto_replicas``).

    At ``max_bytes`` or ``max_age`` the oldest events go (discard old): a full stream never
    refuses a trainer's publish. The duplicate window cannot outlast ``max_age`` (JetStream
    refuses that), so a short age shortens it.
    """
    max_age = limits.max_age_days * 86400
    return api.StreamConfig(
        name=EVENTS_STREAM,
        subjects=[ALL_EVENTS],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=limits.max_bytes,
        duplicate_window=min(limits.duplicate_window_seconds, max_age),
        num_replicas=replicas if replicas is not None else (limits.replicas or 1),
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


def creation_refused(name: str, replicas: int, exc: nats.js.errors.APIError) -> BusUnavailable:
    """What to say when JetStream answered a create of ``name`` with an error."""
    hint = (
        f"; {replicas} replicas need {replicas} JetStream servers up (stream.replicas sets how many)"
        if replicas > 1
        else ""
    )
    return BusUnavailable(f"JetStream refused to create {name}: {exc.description}{hint}")


async def ensure_stream(js: JetStreamContext, limits: StreamSettings) -> str:
    """Create or update ``TRAINBUS_EVENTS``; returns ``created``, ``updated``, ``unchanged`` or ``kept``.

    A second start with other limits updates the stream; a change the server refuses (e.g. the
    storage type) is explained in a warning and the existing stream is kept. With
    ``stream.replicas`` unset, replicas are never lowered: a client that sees fewer servers
    (one is down) leaves an R3 stream as it is.
    """
    log = get_logger(stream=EVENTS_STREAM)
    replicas = auto_replicas(js._nc, limits.replicas)  # the JetStream context's own connection
    want = stream_config(limits, replicas)
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config=want)
        except nats.js.errors.APIError as exc:
            raise creation_refused(EVENTS_STREAM, replicas, exc) from None
        except (TimeoutError, nats.errors.TimeoutError):  # the server drops a create this user may not send
            raise BusUnavailable(
                f"{EVENTS_STREAM} does not exist and JetStream did not answer creating it: this user may not "
                f"create it; {PROVISION}"
            ) from None
        log.info("stream created", max_age_days=limits.max_age_days, max_bytes=limits.max_bytes, replicas=replicas)
        return "created"
    except nats.js.errors.ServiceUnavailableError:
        raise BusUnavailable(NO_JETSTREAM) from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise BusUnavailable(
            f"no answer from JetStream for stream {EVENTS_STREAM}: is JetStream enabled and may this user use it?"
        ) from None
    if limits.replicas is None and (info.config.num_replicas or 1) > replicas:
        want.num_replicas = info.config.num_replicas
    diff = _differences(info.config, want)
    if not diff:
        return "unchanged"
    try:
        await js.update_stream(config=want)
    except (nats.js.errors.APIError, TimeoutError, nats.errors.TimeoutError) as exc:
        # no answer: the server dropped an update this user may not send (only `up` provisions)
        said = exc.description if isinstance(exc, nats.js.errors.APIError) else "no answer (may this user update it?)"
        log.warning(
            "stream exists with other limits; keeping them",
            differences={k: {"have": v[0], "want": v[1]} for k, v in diff.items()},
            server_said=said,
        )
        return "kept"
    log.info("stream limits updated", changed=sorted(diff))
    return "updated"


async def ensure_bucket(js: JetStreamContext, name: str, replicas: int, *, history: int, description: str) -> KeyValue:
    """The key-value bucket ``name``, created with ``replicas`` when missing, scaled up when it has fewer."""
    try:
        kv = await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(bucket=name, history=history, replicas=replicas, description=description)
        except nats.js.errors.APIError as exc:
            raise creation_refused(f"the key-value bucket {name}", replicas, exc) from None
    except nats.js.errors.ServiceUnavailableError:
        raise BusUnavailable(NO_JETSTREAM) from None
    except (TimeoutError, nats.errors.TimeoutError):  # e.g. a restarted cluster still electing the bucket's leader
        raise BusUnavailable(f"no answer from JetStream for the key-value bucket {name}") from None
    stream = f"KV_{name}"
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) < replicas:
        info.config.num_replicas = replicas
        try:
            await js.update_stream(config=info.config)
        except nats.js.errors.APIError as exc:
            get_logger(bucket=name).warning(
                "bucket keeps its replicas", replicas=info.config.num_replicas, server_said=exc.description
            )
    return kv


@dataclass
class Delivered:
    """One stored message: its stream sequence, subject and the parsed event (or why there is none).

    ``event`` is None either for an invalid message (``error`` says why) or for an event a newer
    trainbus wrote (``newer`` is its ``schema_version``): readers skip both, and never crash.
    """

    stream_seq: int
    subject: str
    event: Event | None
    error: str | None
    data: bytes
    newer: int | None = None


def decode(msg: Msg | api.RawStreamMsg, stream_seq: int) -> Delivered:
    """Parse a stored message as a reader: unknown fields ignored, problems returned, never raised."""
    data = msg.data or b""
    subject = msg.subject or ""
    try:
        return Delivered(stream_seq, subject, parse_event(data), None, data)
    except NewerSchema as exc:
        return Delivered(stream_seq, subject, None, None, data, newer=exc.version)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return Delivered(stream_seq, subject, None, f"{where}: {first['msg']}", data)


class NewerEvents:
    """Counts events of a newer ``schema_version`` a reader skipped and says so once per run."""

    def __init__(self, log: Any | None = None) -> None:
        self.log = log if log is not None else get_logger()
        self.runs: set[str] = set()
        self.skipped = 0

    def skip(self, item: Delivered) -> None:
        """Record that ``item`` (with ``item.newer`` set) was skipped; log the first one of its run."""
        self.skipped += 1
        run_id = run_id_of(item.subject) or "?"
        if run_id not in self.runs:
            self.runs.add(run_id)
            self.log.warning(
                "events written by a newer trainbus are skipped; upgrade trainbus to read them",
                run_id=run_id,
                schema_version=item.newer,
                reads_up_to=SCHEMA_VERSION,
                subject=item.subject,
            )


async def count_stored(js: JetStreamContext, filter_subject: str, stream: str = EVENTS_STREAM) -> int:
    """How many stored messages match ``filter_subject``."""
    info = await js.stream_info(stream, subjects_filter=filter_subject)
    return sum((info.state.subjects or {}).values())


async def replay(
    js: JetStreamContext, filter_subject: str, *, follow: bool = False, idle: float = 1.0, stream: str = EVENTS_STREAM
) -> AsyncGenerator[Delivered, None]:
    """Every stored message matching ``filter_subject`` from the start; with ``follow``, live ones after.

    ``stream`` is the events stream unless a reader keeps a derived copy (the audit gate's partitions).
    """
    if not follow and await count_stored(js, filter_subject, stream) == 0:
        return
    sub = await js.subscribe(filter_subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
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
        with contextlib.suppress(nats.errors.ConnectionClosedError):  # closed first: nothing to unsubscribe
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


NEWEST_TYPES = ("run.started", "run.state", "run.finished", "train.step", "eval", "checkpoint", "heartbeat")
"""The trainer's event types a summary needs only the newest of; it reads every ``command.result``
(an applied ``set`` changes the live hyper-parameters, and a later command's result must not hide it)."""


async def _summary_events(js: JetStreamContext, run_id: str, newer: NewerEvents | None) -> list[Delivered]:
    """The newest stored event of each of ``NEWEST_TYPES`` and every ``command.result``, in stream order."""
    base = run_events(run_id)[:-1]
    newest = await asyncio.gather(*(last_event(js, base + name) for name in NEWEST_TYPES))
    commands = [item async for item in replay(js, base + "command.result")]
    found = {item.stream_seq: item for item in [*newest, *commands] if item is not None}
    for item in found.values():
        if item.newer is not None and newer is not None:
            newer.skip(item)
    return [found[seq] for seq in sorted(found)]


def summary_of(
    run_id: str, life: Lifecycle, latest: dict[str, Event], now: float, stall_after: float, *, config: bool = False
) -> dict[str, Any]:
    """What `trainbus runs` shows of one run: its lifecycle (``runtime.lifecycle``) plus the newest
    ``train.step`` (``loss`` at ``loss_step``, the ``learning_rate`` in use) and ``eval`` accuracy."""
    summary: dict[str, Any] = {"run_id": run_id, "state": shown(life, now, stall_after), "attempt": life.attempt}
    if life.step is not None:
        summary["step"] = life.step
    if life.trainer_time:
        summary["last_event"] = datetime.fromtimestamp(life.trainer_time, UTC).isoformat()
        summary["age_seconds"] = round(max(0.0, now - life.trainer_time), 3)
    if life.started is not None:
        summary.update(_started_fields(life.started, config=config))
    if life.hyperparameters:
        summary["hyperparameters"] = dict(life.hyperparameters)
    step = latest.get("train.step")
    if isinstance(step, TrainStep):
        summary.update(loss_step=step.step, loss=step.loss, learning_rate=step.learning_rate)
    evaluation = latest.get("eval")
    if isinstance(evaluation, Evaluation):
        summary["eval_accuracy"] = evaluation.accuracy
    return summary


def _started_fields(started: RunStarted, *, config: bool) -> dict[str, Any]:
    """What a run's ``run.started`` adds to its summary: model, length, sweep, group, parent (a fork)."""
    fields: dict[str, Any] = {"model": started.model, "max_steps": started.max_steps}
    optional = {
        "sweep": started.sweep.name if started.sweep else None,
        "group": started.group,
        "parent": f"{started.fork.parent}@{started.fork.step}" if started.fork else None,
        "config": started.config if config else None,
    }
    return fields | {key: value for key, value in optional.items() if value is not None}


async def run_summary(
    js: JetStreamContext,
    run_id: str,
    *,
    now: float | None = None,
    stall_after: float = STALL_AFTER_SECONDS,
    newer: NewerEvents | None = None,
    config: bool = False,
) -> dict[str, Any]:
    """Latest state of one run (``summary_of``), folded from the stored events it needs.

    ``state`` is the one to show (``stalled`` for a live state whose trainer went silent);
    ``last_event`` and ``age_seconds`` say when the run's trainer (its current attempt) last
    published: tags, notes, audit and predictor events do not count; ``step`` is the run's step now
    (heartbeats carry it between logged steps); ``hyperparameters`` are the live values, an applied
    ``set`` included.
    """
    life, latest = Lifecycle(), dict[str, Event]()
    for item in await _summary_events(js, run_id, newer):
        if item.event is not None and fold(life, item.event):
            latest[item.event.type] = item.event
    return summary_of(run_id, life, latest, time.time() if now is None else now, stall_after, config=config)


async def list_runs(
    nc: NATS, *, now: float | None = None, stall_after: float = STALL_AFTER_SECONDS, config: bool = False
) -> list[dict[str, Any]]:
    """Every run in the stream with its latest state (see ``run_summary``); ``config`` adds each
    run's config (from its ``run.started``)."""
    js = nc.jetstream()
    newer = NewerEvents()
    now = time.time() if now is None else now
    runs = [
        await run_summary(js, run_id, now=now, stall_after=stall_after, newer=newer, config=config)
        for run_id in await run_ids(js)
    ]
    tags = await run_tags(js)
    for run in runs:
        if run["run_id"] in tags:
            run["tags"] = tags[run["run_id"]]
    return runs


async def run_tags(js: JetStreamContext) -> dict[str, dict[str, str]]:
    """The tags of every run (``run.tag`` events in order; an empty value removes a key)."""
    found: dict[str, dict[str, str]] = {}
    async for item in replay(js, f"{EVENTS_PREFIX}.*.run.tag"):
        if isinstance(item.event, RunTag):
            tags = found.setdefault(item.event.run_id, {})
            for key, value in item.event.tags.items():
                if value:
                    tags[key] = value
                else:
                    tags.pop(key, None)
    return found


@asynccontextmanager
async def jetstream(target: BusTarget, settings: Settings, name: str) -> AsyncIterator[NATS]:
    """A connection whose JetStream trouble (none on the server, no answer) is one line and exit 3."""
    async with connected(target, settings, name=name) as nc:
        try:
            yield nc
        except nats.js.errors.ServiceUnavailableError:
            raise BusUnavailable(NO_JETSTREAM) from None
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise BusUnavailable(
                f"no answer from JetStream at {target.display}: is JetStream enabled, and may this user do this?"
            ) from None
