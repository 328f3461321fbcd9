"""The launch queue as the dashboard sees it: job records and agent heartbeats, watched from
their buckets on the reader's loop, and the pure tables the Queue page draws from them.

``QueueWatch.run`` follows ``TRAINBUS_JOBS`` and ``TRAINBUS_AGENTS`` (both may appear later, when
the first job or agent does); pages read ``snapshot()``. An agent whose heartbeat is older than
the bucket's time to live is gone (its entry expires without a watch event, so the age decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
import pandas as pd
from nats.js import JetStreamContext
from pydantic import ValidationError

from runtime.cli.render import age
from runtime.launch.queue import AGENT_TTL_SECONDS, waiting_order
from runtime.logs import get_logger
from schemas.jobs import AgentStatus, JobRecord
from schemas.subjects import AGENTS_BUCKET, JOBS_BUCKET

RETRY_SECONDS = 5.0
RECENT_FINISHED = 50
"""Finished jobs the page lists below the waiting and running ones."""


@dataclass(frozen=True)
class QueueSnapshot:
    """Every job the bucket holds and every agent that beat recently."""

    jobs: tuple[JobRecord, ...] = ()
    agents: tuple[AgentStatus, ...] = ()
    available: bool = False
    """False until the queue's buckets exist (no job or agent yet)."""


class QueueWatch:
    """Keeps the latest job records and agent heartbeats; ``run`` on the reader's loop."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._agents: dict[str, AgentStatus] = {}
        self._available = False
        self._lock = threading.Lock()
        self.log = get_logger(component="dashboard-queue")

    def snapshot(self) -> QueueSnapshot:
        with self._lock:
            return QueueSnapshot(tuple(self._jobs.values()), tuple(self._agents.values()), self._available)

    async def run(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        await asyncio.gather(
            self._watch(js, stop, JOBS_BUCKET, self._on_job), self._watch(js, stop, AGENTS_BUCKET, self._on_agent)
        )

    async def _watch(self, js: JetStreamContext, stop: asyncio.Event, bucket: str, apply: object) -> None:
        while not stop.is_set():
            try:
                kv = await js.key_value(bucket)
                with self._lock:
                    self._available = True
                async for entry in await kv.watchall():
                    if entry is not None:
                        apply(entry.key, entry.value)  # type: ignore[operator]
            except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.debug("queue watch failed; retrying", bucket=bucket, error=str(exc) or type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)

    def _on_job(self, key: str, value: bytes | None) -> None:
        with self._lock:
            try:
                self._jobs[key] = JobRecord.model_validate_json(value or b"")
            except ValidationError:
                self._jobs.pop(key, None)

    def _on_agent(self, key: str, value: bytes | None) -> None:
        with self._lock:
            try:
                self._agents[key] = AgentStatus.model_validate_json(value or b"")
            except ValidationError:
                self._agents.pop(key, None)


def live_agents(agents: tuple[AgentStatus, ...], now: datetime) -> list[AgentStatus]:
    """The agents whose heartbeat has not expired, by id."""
    return sorted((a for a in agents if a.age(now) <= AGENT_TTL_SECONDS), key=lambda a: a.agent_id)


def jobs_table(jobs: tuple[JobRecord, ...], now: datetime) -> pd.DataFrame:
    """Running jobs, then waiting ones in the order agents take them, then the latest finished."""
    waiting = waiting_order(list(jobs))
    place = {r.spec.job_id: i for i, r in enumerate(waiting, start=1)}
    running = sorted((r for r in jobs if r.state in ("starting", "running")), key=lambda r: r.updated_at)
    finished = sorted((r for r in jobs if r.final), key=lambda r: r.updated_at, reverse=True)[:RECENT_FINISHED]
    rows = [_row(r, place.get(r.spec.job_id), now) for r in [*running, *waiting, *finished]]
    columns = ["job", "state", "run", "position", "priority", "slots", "agent", "updated", "reason"]
    return pd.DataFrame(rows, columns=columns)


def agents_table(agents: list[AgentStatus], now: datetime) -> pd.DataFrame:
    rows = [
        dict(agent=a.agent_id, host=a.host, slots=a.slots, free=a.free, jobs=", ".join(a.jobs),
             labels=", ".join(f"{k}={v}" for k, v in a.labels.items()), heartbeat=age(a.age(now)),
             draining="yes" if a.draining else "")
        for a in agents
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["agent", "host", "slots", "free", "jobs", "labels", "heartbeat", "draining"])


def _row(r: JobRecord, position: int | None, now: datetime) -> dict[str, object]:
    return dict(
        job=r.spec.job_id, state=r.state, run=f"run?run={r.spec.run_id}", position=position, priority=r.spec.priority,
        slots=r.spec.slots, agent=r.agent or "", updated=age((now - r.updated_at).total_seconds()), reason=r.reason,
    )  # fmt: skip
