"""The launch queue's contract: a job (a `trainbus train` run someone queued), its record as it
moves through its states, the ``job.state`` event each move publishes, and an agent's heartbeat.

A job is queued by `trainbus submit` (or the dashboard's New run page) and started by a
`trainbus agent` with free slots. The job's record lives in the ``TRAINBUS_JOBS`` key-value bucket
(key: the job id) and every change of state is also an event in the run's own stream
(``trainbus.events.<run_id>.job.state``), so every reader of a run sees how it was launched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from schemas.common import Envelope, Model, RunId, ShortText, SweepTag, utc_now

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
"""In the order agents take them."""
JobStateName = Literal["queued", "starting", "running", "completed", "failed", "stopped", "cancelled", "requeued"]
FINAL_JOB_STATES: frozenset[str] = frozenset({"completed", "failed", "stopped", "cancelled"})
"""States a job never leaves."""
JOB_ID_PATTERN = r"^j-[a-z0-9]{4,32}$"
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
"""A job id: ``j-`` and 4-32 of ``[a-z0-9]``, one subject token and one bucket key."""
AGENT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
Slots = Annotated[int, Field(ge=1, le=64)]


class JobSpec(Model):
    """What was asked for: train this config, with these overrides, on this many slots."""

    job_id: JobId
    run_id: RunId
    config_name: str
    """The config as the user named it (``configs/tiny.yaml``), for display."""
    config_yaml: Annotated[str, StringConstraints(max_length=512 * 1024)]
    """The config file's text: an agent on another machine needs no copy of it."""
    overrides: list[str] = Field(default_factory=list)
    """``--set`` items, applied on top of the config as `trainbus train` does."""
    slots: Slots = 1
    """Processes (GPUs) the run needs; more than one runs under torchrun."""
    priority: Priority = "normal"
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    """How many times the job is resumed elsewhere after its agent was lost, before it fails."""
    requires: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    """Agent labels the job needs (``--on gpu=a100``); an agent without them leaves it to others."""
    fork: str | None = None
    """``RUN[@STEP|@best]``: start the run from another run's checkpoint (`trainbus train --fork`)."""
    force: bool = False
    """With ``fork``: fork a checkpoint the audit gate rejected."""
    group: str | None = None
    """The group of runs submitted together with ``--seeds N`` (the first one's run id)."""
    sweep: SweepTag | None = None
    """The sweep trial this run is (`trainbus sweep --queue`): its ``run.started`` says so, every attempt."""
    submitted_by: str = ""
    submitted_at: AwareDatetime = Field(default_factory=utc_now)


class JobRecord(Model):
    """A job's current state, as kept in the ``TRAINBUS_JOBS`` bucket; changed only by compare-and-set."""

    spec: JobSpec
    state: JobStateName = "queued"
    agent: str | None = None
    """The agent running it (starting, running), or that ran it last."""
    gpus: list[int] = Field(default_factory=list)
    """The GPUs the agent gave it (its ``CUDA_VISIBLE_DEVICES``); empty on CPU slots."""
    attempt: Annotated[int, Field(ge=0)] = 0
    """The run attempt the job started last (0 until it starts)."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Times its agent was lost and another took it over."""
    reason: ShortText = ""
    exit_code: int | None = None
    """How its last trainer exited (negative: killed by that signal; 2: it refused its config)."""
    queue_seq: int | None = None
    """The dispatch message's sequence in the queue stream (``trainbus cancel`` deletes it)."""
    cancel: Literal["save", "no-save"] | None = None
    """A cancel was asked for while it ran: stop it (saving first, or not)."""
    transitions: Annotated[int, Field(ge=0)] = 0
    """State changes so far: the ``seq`` of the job's ``job.state`` events."""
    updated_at: AwareDatetime = Field(default_factory=utc_now)

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES


class JobState(Envelope):
    """A job changed state. ``source`` is ``launch``; ``seq`` numbers the job's changes from 1
    (whoever made them: submit, an agent, cancel); ``attempt`` is the run attempt it is on (1 before
    it starts); ``event_id`` is ``<run_id>.launch.<job_id>.<seq>``."""

    type: Literal["job.state"] = "job.state"
    job_id: JobId
    state: JobStateName
    agent: str | None = None
    gpus: list[int] = Field(default_factory=list)
    slots: Slots = 1
    priority: Priority = "normal"
    restarts: Annotated[int, Field(ge=0)] = 0
    reason: ShortText = ""
    exit_code: int | None = None
    """How the job's last trainer exited, in a final state an agent recorded (2: it refused its config)."""


class LaunchTag(Model):
    """How a run was launched by a `trainbus agent` (in its ``run.started``)."""

    job_id: JobId
    agent: AgentId
    devices: str | None = None
    """``CUDA_VISIBLE_DEVICES`` as the trainer saw it: the GPUs the agent gave the job."""


class AgentStatus(Model):
    """An agent's heartbeat, kept in the ``TRAINBUS_AGENTS`` bucket (key: agent id) while it lives."""

    agent_id: AgentId
    host: str
    pid: int
    slots: Slots
    free: Annotated[int, Field(ge=0)]
    jobs: list[str] = Field(default_factory=list)
    """Ids of the jobs it runs."""
    gpus: list[int] = Field(default_factory=list)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    draining: bool = False
    started_at: AwareDatetime = Field(default_factory=utc_now)
    heartbeat_at: AwareDatetime = Field(default_factory=utc_now)

    def age(self, now: datetime) -> float:
        """Seconds since its last heartbeat."""
        return (now - self.heartbeat_at).total_seconds()
