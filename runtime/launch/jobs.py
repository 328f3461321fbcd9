"""Job records in the ``TRAINBUS_JOBS`` bucket, changed only by compare-and-set, each change also
published as a ``job.state`` event in the run's stream.

Several writers change one job (`trainbus submit`, the agents, `trainbus cancel`); a change is a
function from the record to the new record, applied to the revision it read. When another writer
got there first, the change is applied again to what that writer left, or refused (``Conflict``)
when it no longer makes sense — e.g. two agents claiming the same requeued job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from runtime.errors import NotFound, TrainbusError
from runtime.publish.direct import event_id, publish_event
from schemas import EVENTS_STREAM, event_subject
from schemas.common import utc_now
from schemas.jobs import JobRecord, JobSpec, JobState, JobStateName
from schemas.subjects import JOBS_BUCKET

Change = Callable[[JobRecord], JobRecord]


class Conflict(TrainbusError):
    """The job is no longer in a state this change applies to."""


@dataclass(frozen=True)
class Stored:
    """A record as read, with the revision a compare-and-set must name."""

    record: JobRecord
    revision: int


def decode(data: bytes | None) -> JobRecord | None:
    """A record from the bucket, or None for a deleted or unreadable entry."""
    if not data:
        return None
    try:
        return JobRecord.model_validate_json(data)
    except ValidationError:
        return None


def state_event(record: JobRecord) -> JobState:
    """The ``job.state`` event announcing ``record``'s current state (numbered by its transitions)."""
    spec = record.spec
    return JobState(
        event_id=event_id(spec.run_id, "launch", spec.job_id, record.transitions), run_id=spec.run_id,
        attempt=max(1, record.attempt), seq=record.transitions, source="launch", job_id=spec.job_id,
        state=record.state, agent=record.agent, gpus=record.gpus, slots=spec.slots, priority=spec.priority,
        restarts=record.restarts, reason=record.reason, exit_code=record.exit_code,
    )  # fmt: skip


def moved(record: JobRecord, state: JobStateName, **fields: object) -> JobRecord:
    """``record`` in ``state`` (one more transition), with ``fields`` changed."""
    return record.model_copy(
        update={"state": state, "transitions": record.transitions + 1, "updated_at": utc_now(), **fields}
    )


class JobStore:
    """Reads and changes job records; every state change goes out as a ``job.state`` event."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> JobStore:
        return cls(js, await js.key_value(JOBS_BUCKET))

    async def get(self, job_id: str) -> Stored:
        try:
            entry = await self.kv.get(job_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise NotFound(f"no job {job_id!r} (see `trainbus queue`)") from None
        record = decode(entry.value)
        if record is None:
            raise NotFound(f"job {job_id!r} has an unreadable record")
        return Stored(record, entry.revision or 0)

    async def all(self) -> list[JobRecord]:
        """Every job the bucket holds, in no particular order."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        records = []
        for key in keys:
            try:
                records.append((await self.get(key)).record)
            except NotFound:
                continue
        return records

    async def create(self, spec: JobSpec, *, queue_seq: int | None = None) -> JobRecord:
        """The job's first record (state queued); refuses a job id that exists."""
        record = JobRecord(spec=spec, transitions=1, queue_seq=queue_seq)
        try:
            await self.kv.create(spec.job_id, record.model_dump_json().encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"job {spec.job_id} exists already") from None
        await self.announce(record)
        return record

    async def change(self, job_id: str, change: Change, *, tries: int = 5) -> JobRecord:
        """Apply ``change`` by compare-and-set, again on a newer record if another writer was first.

        ``change`` raises ``Conflict`` when the record it is given no longer allows it. A change
        that keeps the state (e.g. noting a queue sequence) publishes no event.
        """
        for _ in range(tries):
            stored = await self.get(job_id)
            new = change(stored.record)
            try:
                await self.kv.update(job_id, new.model_dump_json().encode(), last=stored.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            if new.transitions != stored.record.transitions:
                await self._repair(stored.record)
                await self.announce(new)
            return new
        raise Conflict(f"job {job_id} kept changing under us; try again")

    async def _repair(self, previous: JobRecord) -> None:
        """Publish the previous state's event if its writer died between its change and its event."""
        subject = event_subject(previous.spec.run_id, "job.state")
        try:
            last = JobState.model_validate_json((await self.js.get_last_msg(EVENTS_STREAM, subject)).data or b"")
        except (nats.js.errors.NotFoundError, ValidationError):
            last = None
        if last is None or last.job_id != previous.spec.job_id or last.seq < previous.transitions:
            await self.announce(previous)

    async def announce(self, record: JobRecord) -> None:
        """Publish the ``job.state`` event of ``record``'s current state (idempotent by event id)."""
        await publish_event(self.js, state_event(record))
