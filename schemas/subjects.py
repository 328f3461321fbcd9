"""NATS subject and stream names. Every subject trainbus uses is built here."""

from __future__ import annotations

import re

from schemas.common import RUN_ID_PATTERN

EVENTS_STREAM = "TRAINBUS_EVENTS"
EVENTS_PREFIX = "trainbus.events"
CONTROL_PREFIX = "trainbus.control"
ALL_EVENTS = f"{EVENTS_PREFIX}.>"
CHECKPOINTS_BUCKET = "TRAINBUS_CHECKPOINTS"
CHECKPOINT_FILES_BUCKET = "TRAINBUS_CHECKPOINT_FILES"
"""The object store holding checkpoint folders (``runtime.bus.objects``)."""
PREDICT_PREFIX = "trainbus.predict"
QUEUE_STREAM = "TRAINBUS_QUEUE"
"""The launch queue: one message per queued job, removed when an agent finishes it (work-queue retention)."""
QUEUE_PREFIX = "trainbus.jobs.queue"
JOBS_BUCKET = "TRAINBUS_JOBS"
"""Each job's record (``schemas.jobs.JobRecord``), key: job id."""
AGENTS_BUCKET = "TRAINBUS_AGENTS"
"""Each live agent's heartbeat (``schemas.jobs.AgentStatus``), key: agent id."""
AGENT_PREFIX = "trainbus.agents"

_RUN_ID = re.compile(RUN_ID_PATTERN)


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a valid run id, else raise ``ValueError`` naming it."""
    if not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use 1-64 characters of A-Z a-z 0-9 _ -")
    return run_id


def event_subject(run_id: str, event_type: str) -> str:
    """``trainbus.events.<run_id>.<type>``, e.g. ``trainbus.events.r1.train.step``."""
    return f"{EVENTS_PREFIX}.{check_run_id(run_id)}.{event_type}"


def run_events(run_id: str) -> str:
    """Filter subject matching every event of one run."""
    return f"{EVENTS_PREFIX}.{check_run_id(run_id)}.>"


def control_subject(run_id: str) -> str:
    """``trainbus.control.<run_id>``: where a run's trainer answers commands."""
    return f"{CONTROL_PREFIX}.{check_run_id(run_id)}"


def predict_subject(alias: str) -> str:
    """``trainbus.predict.<alias>``: where the predictor serving ``alias`` answers (a queue group)."""
    if not _RUN_ID.match(alias):
        raise ValueError(f"invalid alias {alias!r}: use 1-64 characters of A-Z a-z 0-9 _ -")
    return f"{PREDICT_PREFIX}.{alias}"


def run_id_of(subject: str) -> str | None:
    """The run id token of an event or control subject, or None for other subjects."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[0] == "trainbus" and parts[1] in ("events", "control"):
        return parts[2]
    return None


def queue_subject(priority: str) -> str:
    """``trainbus.jobs.queue.<priority>``: where jobs of one priority wait for an agent."""
    return f"{QUEUE_PREFIX}.{priority}"


def dispatch_consumer(priority: str) -> str:
    """The durable consumer every agent pulls jobs of ``priority`` from."""
    return f"dispatch-{priority}"


def agent_subject(agent_id: str) -> str:
    """``trainbus.agents.<agent_id>``: where an agent answers requests (drain)."""
    return f"{AGENT_PREFIX}.{agent_id}"
