"""Scaling the audit gate out by run, with NATS deterministic subject partitioning.

The audit gate keeps per-run state, so it splits by run. ``trainbus audit --partition K/N``
reads the stream ``TRAINBUS_AUDIT``, which sources ``TRAINBUS_EVENTS`` through a subject
transform the server applies to every event::

    trainbus.events.<run>.<type>  →  trainbus.audit.<p>.<run>.<type>,   p = {{partition(N,1)}}

``partition`` is NATS's own deterministic hash of the run id token, so every event of a run lands
in the same partition, whichever server stores it. Gate K replays and consumes only
``trainbus.audit.K.>`` with its own durable consumer (``trainbus-audit-pK-of-N``): each run's
events reach exactly one gate. A gate that dies leaves its partition's events waiting; when it
or a replacement with the same ``--partition`` starts, it replays the partition (judging its runs
again) and publishes only what is not in the stream yet (derived event ids, see
``consumers.audit.loop``). The stream is a derived copy with the events stream's limits: deleting
it (``--repartition``) re-sources everything, partitioned the new way.
"""

from __future__ import annotations

import re

import nats.js.errors
from nats.js import JetStreamContext, api

from runtime.bus.stream import auto_replicas
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import get_logger
from runtime.settings import StreamSettings
from schemas import EVENTS_STREAM
from schemas.subjects import EVENTS_PREFIX

PARTITIONED_STREAM = "TRAINBUS_AUDIT"
PREFIX = "trainbus.audit"
_SPEC = re.compile(r"^(\d+)/(\d+)$")


def parse_partition(text: str) -> tuple[int, int]:
    """``K/N`` → (K, N) with 0 <= K < N; a clear error otherwise."""
    match = _SPEC.match(text.strip())
    if not match:
        raise ConfigError(f"--partition {text!r}: expected K/N, e.g. 0/2 for the first of two gates")
    k, n = int(match[1]), int(match[2])
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"--partition {text!r}: K must be 0 to N-1 and N at least 1")
    return k, n


def partition_subject(k: int) -> str:
    """Every event of the runs in partition ``k``."""
    return f"{PREFIX}.{k}.>"


def durable_name(k: int, n: int) -> str:
    return f"trainbus-audit-p{k}-of-{n}"


def transform(n: int) -> api.SubjectTransform:
    return api.SubjectTransform(
        src=f"{EVENTS_PREFIX}.*.>", dest=f"{PREFIX}.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}.>"
    )


def partitioned_config(n: int, limits: StreamSettings, replicas: int) -> api.StreamConfig:
    """``TRAINBUS_AUDIT``: the events stream sourced through ``transform(n)``, with its limits."""
    return api.StreamConfig(
        name=PARTITIONED_STREAM,
        description=f"trainbus events partitioned {n} ways by run for the audit gate",
        sources=[api.StreamSource(name=EVENTS_STREAM, subject_transforms=[transform(n)])],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=limits.max_age_days * 86400,
        max_bytes=limits.max_bytes,
        num_replicas=replicas,
    )


def ways(config: api.StreamConfig) -> int | None:
    """How many partitions an existing ``TRAINBUS_AUDIT`` has (from its transform)."""
    for source in config.sources or []:
        for tr in source.subject_transforms or []:
            match = re.search(r"partition\((\d+),", tr.dest)
            if match:
                return int(match[1])
    return None


async def ensure_partitions(js: JetStreamContext, n: int, limits: StreamSettings, *, repartition: bool = False) -> str:
    """Create ``TRAINBUS_AUDIT`` for ``n`` partitions; returns ``created``, ``unchanged`` or ``repartitioned``.

    An existing one partitioned another way is refused (its gates would lose their partitions)
    unless ``repartition``: then it is deleted and created again, and re-sources every event.
    """
    want = partitioned_config(n, limits, auto_replicas(js._nc, limits.replicas))  # the context's connection
    try:
        info = await js.stream_info(PARTITIONED_STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config=want)
        get_logger(stream=PARTITIONED_STREAM).info("partitioned stream created", partitions=n)
        return "created"
    have = ways(info.config)
    if have == n:
        return "unchanged"
    if not repartition:
        raise TrainbusError(
            f"{PARTITIONED_STREAM} is partitioned {have} ways, not {n}: use --partition K/{have}, or stop every "
            f"partitioned gate and start one with --repartition to split the runs {n} ways"
        )
    await js.delete_stream(PARTITIONED_STREAM)
    await js.add_stream(config=want)
    get_logger(stream=PARTITIONED_STREAM).warning("partitioned stream re-created", partitions=n, was=have)
    return "repartitioned"
