"""The launch queue on JetStream: the work-queue stream jobs wait in, the consumers agents pull
from, and the buckets holding job records and agent heartbeats.

``TRAINBUS_QUEUE`` has work-queue retention: a job's message stays until the agent that runs it
acknowledges it at the end. An agent holds the message while the run trains and renews it with a
progress acknowledgement every few seconds; when the agent dies the acknowledgement deadline
(``LEASE_SECONDS``) passes and JetStream hands the job to another agent. One durable pull consumer
per priority (``dispatch-high``, ``-normal``, ``-low``) is shared by every agent.

`trainbus up` (or `trainbus provision`) creates all of it, as admin; on a bus with roles every
other user only looks (``ensure_queue``) and uses what its role allows (configs/nats/roles.conf).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from runtime.bus.stream import NO_JETSTREAM, PROVISION, auto_replicas, creation_refused, ensure_stream
from runtime.errors import BusUnavailable
from runtime.launch.jobs import Conflict, JobStore, moved
from runtime.settings import StreamSettings
from schemas.jobs import PRIORITIES, JobRecord, JobSpec
from schemas.subjects import AGENTS_BUCKET, JOBS_BUCKET, QUEUE_PREFIX, QUEUE_STREAM, dispatch_consumer, queue_subject

LEASE_SECONDS = 20.0
"""How long a job stays with an agent that stopped renewing it before another agent gets it."""
RENEW_SECONDS = 4.0
"""How often an agent renews its jobs and its heartbeat."""
AGENT_TTL_SECONDS = 30.0
"""An agent whose heartbeat is older than this is gone from the agents bucket."""


def queue_config(replicas: int) -> api.StreamConfig:
    """The queue stream: file storage, work-queue retention, one job per message id for 10 minutes."""
    return api.StreamConfig(
        name=QUEUE_STREAM,
        subjects=[f"{QUEUE_PREFIX}.*"],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.WORK_QUEUE,
        duplicate_window=600.0,
        num_replicas=replicas,
    )


def dispatch_config(priority: str) -> api.ConsumerConfig:
    """The consumer agents pull ``priority`` jobs from; the ack deadline is the agent's lease."""
    return api.ConsumerConfig(
        durable_name=dispatch_consumer(priority),
        filter_subject=queue_subject(priority),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=LEASE_SECONDS,
        max_deliver=-1,
        max_ack_pending=-1,
        deliver_policy=api.DeliverPolicy.ALL,
    )


@dataclass(frozen=True)
class Part:
    """One piece of the launch queue: how to see that it exists, and how to create it."""

    name: str
    look: Callable[[JetStreamContext], Awaitable[object]]
    make: Callable[[JetStreamContext, int], Awaitable[object]]


def queue_parts() -> list[Part]:
    """What the launch queue is made of, in the order it is created (the stream before its consumers)."""

    def consumer(priority: str) -> Part:
        name = dispatch_consumer(priority)
        return Part(
            f"consumer {name}",
            lambda js: js.consumer_info(QUEUE_STREAM, name),
            lambda js, _: js.add_consumer(QUEUE_STREAM, config=dispatch_config(priority)),
        )

    return [
        Part(f"stream {QUEUE_STREAM}", lambda js: js.stream_info(QUEUE_STREAM),
             lambda js, n: js.add_stream(config=queue_config(n))),
        *(consumer(priority) for priority in PRIORITIES),
        Part(f"bucket {JOBS_BUCKET}", lambda js: js.key_value(JOBS_BUCKET),
             lambda js, n: js.create_key_value(bucket=JOBS_BUCKET, history=16, replicas=n,
                                               description="trainbus jobs: one record per job")),
        Part(f"bucket {AGENTS_BUCKET}", lambda js: js.key_value(AGENTS_BUCKET),
             lambda js, n: js.create_key_value(bucket=AGENTS_BUCKET, history=1, ttl=AGENT_TTL_SECONDS, replicas=n,
                                               description="trainbus agents: one heartbeat per live agent")),
    ]  # fmt: skip


async def ensure_queue(js: JetStreamContext, limits: StreamSettings) -> None:
    """The launch queue (stream, consumers, both buckets) and the events stream its ``job.state``
    events go to, created where missing (idempotent).

    When everything exists it only looks (stream and consumer info), which every role that uses
    the queue may do. Creating is for whoever provisions the bus (`trainbus up` or `trainbus
    provision`, as admin): a user the server does not let create them is told in one line what is
    missing.
    """
    await ensure_stream(js, limits)
    missing = await _missing(js)
    if not missing:
        return
    replicas = auto_replicas(js._nc, limits.replicas)  # the JetStream context's own connection
    for part in missing:
        try:
            await part.make(js, replicas)
        except (TimeoutError, nats.errors.TimeoutError):
            # a create this user may not send is dropped by the server: no answer comes
            raise BusUnavailable(
                f"the launch queue is not provisioned ({', '.join(p.name for p in missing)} missing) and JetStream "
                f"did not answer creating the {part.name}: this user may not create it; {PROVISION}"
            ) from None
        except nats.js.errors.APIError as exc:
            raise creation_refused(part.name, replicas, exc) from None


async def _missing(js: JetStreamContext) -> list[Part]:
    """The parts of the queue that do not exist (a consumer of a missing stream is missing too)."""
    missing = []
    for part in queue_parts():
        try:
            await part.look(js)
        except nats.js.errors.NotFoundError:
            missing.append(part)
        except nats.js.errors.ServiceUnavailableError:
            raise BusUnavailable(NO_JETSTREAM) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise BusUnavailable(
                f"no answer from JetStream for the launch queue's {part.name}: may this user read the queue?"
            ) from None
    return missing


async def agents_bucket(js: JetStreamContext) -> KeyValue:
    """The agents' heartbeats (``ensure_queue`` creates it); an entry older than ``AGENT_TTL_SECONDS`` expires."""
    return await js.key_value(AGENTS_BUCKET)


def new_job_id() -> str:
    """A fresh job id (``j-`` and ten hex digits)."""
    return f"j-{uuid.uuid4().hex[:10]}"


async def enqueue(js: JetStreamContext, spec: JobSpec) -> JobRecord:
    """Queue ``spec``: its message first (the job exists once it is in the queue), then its record.

    The message carries the whole spec, so an agent that gets it before the record exists (or
    after a submitter died between the two) writes the record itself.
    """
    ack = await js.publish(
        queue_subject(spec.priority), spec.model_dump_json().encode(), stream=QUEUE_STREAM,
        headers={"Nats-Msg-Id": spec.job_id},
    )  # fmt: skip
    store = await JobStore.open(js)
    try:
        return await store.create(spec, queue_seq=ack.seq)
    except Conflict:  # an agent was quicker, or this is a retry of the same submit
        return (await store.get(spec.job_id)).record


async def cancel(js: JetStreamContext, job_id: str, *, save: bool) -> JobRecord:
    """Cancel a job: a waiting one leaves the queue; a running one is stopped by its agent."""
    store = await JobStore.open(js)
    record = (await store.get(job_id)).record
    if record.final:
        raise Conflict(f"job {job_id} is {record.state} already")
    if record.state in ("queued", "requeued"):
        try:
            cancelled = await store.change(job_id, _cancel_waiting)
        except Conflict:
            pass  # an agent took it meanwhile: cancel it as a running job
        else:
            await _drop_message(js, cancelled.queue_seq)
            return cancelled
    return await store.change(job_id, lambda r: _ask_cancel(r, "save" if save else "no-save"))


async def _drop_message(js: JetStreamContext, seq: int | None) -> None:
    """Take a cancelled job's message out of the queue (an agent holding it meanwhile finds the
    record cancelled and acknowledges it instead)."""
    if seq is None:
        return
    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.APIError):
        await js.delete_msg(QUEUE_STREAM, seq)


def _cancel_waiting(record: JobRecord) -> JobRecord:
    if record.state not in ("queued", "requeued"):
        raise Conflict(f"job {record.spec.job_id} is {record.state} now")
    return moved(record, "cancelled", reason="cancelled while waiting")


def _ask_cancel(record: JobRecord, how: Literal["save", "no-save"]) -> JobRecord:
    if record.final:
        raise Conflict(f"job {record.spec.job_id} is {record.state} already")
    return record.model_copy(update={"cancel": how})


def priority_rank(record: JobRecord) -> tuple[int, int]:
    """Where a waiting job stands: priority first, then submission order (its queue sequence)."""
    return PRIORITIES.index(record.spec.priority), record.queue_seq or 0


def waiting_order(records: list[JobRecord]) -> list[JobRecord]:
    """The jobs waiting for an agent (queued or requeued), in the order agents take them."""
    return sorted((r for r in records if r.state in ("queued", "requeued")), key=priority_rank)
