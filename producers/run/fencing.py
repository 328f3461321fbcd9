"""Fencing: a run started by a `trainbus agent` stops itself when it is no longer the attempt that
should train — so exactly one attempt of a run trains at any time.

The run's publisher process listens (it owns the bus connection; the training process gets no
thread for this) to two things:

- the run's ``run.started`` events: one of a later attempt means another agent resumed the run
  (this one's agent was given up for lost): stop at once;
- its agent's heartbeat in the agents bucket: when none has come for ``LEASE_SECONDS`` while the
  connection was up, the agent is gone (killed, its host lost) and the launch queue will hand the
  job to another agent shortly after (its acknowledgement deadline is longer): stop first.

Stopping is an ordinary ``stop`` without a save, through the run's own control channel: the
trainer stops at its next step boundary and publishes ``run.finished`` (stopped, "fenced: …").
No checkpoint is written, so none can shadow the one the next attempt resumes from.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping

from pydantic import ValidationError

from producers.run.control_inbox import ControlChannel
from runtime.launch.queue import LEASE_SECONDS
from runtime.logs import get_logger
from schemas import RunStarted, Stop, event_subject, parse_event
from schemas.jobs import LaunchTag
from schemas.subjects import AGENTS_BUCKET

FENCE_SECONDS = LEASE_SECONDS * 0.75
"""Silence of the agent after which its trainer stops: shorter than the queue's lease, so the
trainer has stopped before the job is handed to another agent."""
Listeners = dict[str, Callable[[bytes], None]]


class Fence:
    """Decides when a launched attempt must stop; ``stop`` is called at most once, with the reason."""

    def __init__(
        self, run_id: str, agent_id: str, attempt: Callable[[], int], stop: Callable[[str], None],
        connected: Callable[[], bool], *, seconds: float = FENCE_SECONDS,
    ) -> None:  # fmt: skip
        self.run_id, self.agent_id, self.attempt, self.stop, self.connected = run_id, agent_id, attempt, stop, connected
        self.seconds = seconds
        self.fenced: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.log = get_logger(component="fence", run_id=run_id, agent=agent_id)

    def listeners(self) -> Listeners:
        return {
            event_subject(self.run_id, "run.started"): self.on_started,
            f"$KV.{AGENTS_BUCKET}.{self.agent_id}": self.on_agent_beat,
        }

    def on_started(self, data: bytes) -> None:
        try:
            started = parse_event(data)
        except ValueError:  # not an event this trainbus reads (a newer schema): not a later attempt of ours
            return
        if not isinstance(started, RunStarted):
            return
        mine = self.attempt()
        if mine and started.attempt > mine:
            self._fence(f"attempt {started.attempt} of run {self.run_id} started on {started.host or 'another host'}")
        elif self._timer is None:  # its own start: from now on the agent's silence counts
            self._arm()

    def on_agent_beat(self, data: bytes) -> None:
        """The agent renewed its lease (any put; its deletion when it exits drained is no renewal)."""
        if not data:
            return
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._silent)

    def _silent(self) -> None:
        if not self.connected():  # the bus is away, not the agent: wait for it to come back
            self._arm()
            return
        self._fence(f"its agent {self.agent_id} has not renewed its lease for {self.seconds:.0f}s")

    def _fence(self, why: str) -> None:
        if self.fenced is not None:
            return
        self.fenced = why
        self.log.warning("this attempt stops: it is no longer the one that trains", why=why)
        self.stop(f"fenced: {why}")


def fence_stop(channel: ControlChannel, run_id: str) -> Callable[[str], None]:
    """Stop the run without a save through its control channel, as any ``stop`` would arrive."""

    def stop(reason: str) -> None:
        command = Stop(command_id=f"fence-{uuid.uuid4().hex[:12]}", run_id=run_id, issued_by="trainbus", reason=reason, save=False)  # fmt: skip
        channel.handle(command.model_dump_json().encode())

    return stop


def launched_by(environ: Mapping[str, str]) -> str | None:
    """The agent that started this run (``TRAINBUS_AGENT``, set by `trainbus agent`), if any."""
    return environ.get("TRAINBUS_AGENT") or None


def launch_tag(environ: Mapping[str, str]) -> LaunchTag | None:
    """What ``run.started`` says of how the run was launched; None when it was started by hand."""
    agent, job = launched_by(environ), environ.get("TRAINBUS_JOB")
    if agent is None or not job:
        return None
    try:
        return LaunchTag(job_id=job, agent=agent, devices=environ.get("CUDA_VISIBLE_DEVICES"))
    except ValidationError:
        return None
