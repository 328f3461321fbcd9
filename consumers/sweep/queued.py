"""Trials as jobs of the launch queue (`trainbus sweep --queue`): what the driver queues, and what
the job's ``job.state`` events tell it.

With ``--queue`` the driver starts no trainer: each trial is a job (``runtime.launch.queue``) carrying
the config's text, the sweep's ``--set`` items followed by the sampled values, and the trial's
``SweepTag``, so any `trainbus agent` with a free slot trains it and its ``run.started`` says which
trial it is, on every attempt. The driver follows the run's stream as for a trial it started
itself, and the job's states, published in that stream, say whether the trial waits for a slot,
whether its job ended without the run finishing, and whether its trainer refused its input. A
queued trial is judged by its job, not by its trainer's silence: a job whose agent is lost goes
back to the queue and is resumed by another agent, so the trial waits as long as its job does
(`trainbus cancel JOB` ends it).
"""

from __future__ import annotations

from pathlib import Path

from nats.js import JetStreamContext

from runtime.errors import TrainbusError
from runtime.launch.queue import cancel, new_job_id
from schemas.common import SweepTag
from schemas.jobs import FINAL_JOB_STATES, JobSpec, JobState

WAITING = frozenset({"queued", "requeued"})
"""Job states in which the trial waits for an agent's slot: no trainer of it runs."""
REFUSED = 2
"""The exit code of a trainer that refused its input (a bad key or value in the space or --set)."""


def trial_job(sweep: str, number: int, run_id: str, config: str, overrides: list[str]) -> JobSpec:
    """The job that trains trial ``number`` of ``sweep`` as run ``run_id``."""
    return JobSpec(
        job_id=new_job_id(),
        run_id=run_id,
        config_name=config,
        config_yaml=Path(config).read_text(),
        overrides=overrides,
        sweep=SweepTag(name=sweep, trial=number),
        submitted_by=f"sweep:{sweep}",
    )


async def withdraw(js: JetStreamContext, job_id: str) -> str:
    """Cancel a pruned trial's job without a checkpoint: a waiting one leaves the queue, a starting
    or running one is stopped by its agent. Returns what happened, in words."""
    try:
        record = await cancel(js, job_id, save=False)
    except TrainbusError as exc:  # it ended meanwhile (Conflict), or its record is gone (NotFound)
        return f"its job {job_id} was not cancelled: {exc}"
    if record.state == "cancelled":
        return f"its job {job_id} left the queue"
    return f"its job {job_id} is being stopped by agent {record.agent}"


def waiting(job: JobState | None) -> bool:
    """Whether the trial's job waits in the queue for an agent (no trainer to send ``stop`` to)."""
    return job is not None and job.state in WAITING


def job_gone(job: JobState | None) -> str | None:
    """Why the trial's run can no longer finish because its job is over (cancelled, failed, or
    ended without the run finishing), if it is."""
    if job is None or job.state not in FINAL_JOB_STATES:
        return None
    return f"its job {job.job_id} {job.state}" + (f": {job.reason}" if job.reason else "")


def refused(job: JobState | None, started: bool) -> str | None:
    """The trainer's one-line error when the trial's job failed because its trainer refused its
    input before the run started: every other trial would fail the same way."""
    if job is None or started or job.state != "failed" or job.exit_code != REFUSED:
        return None
    return job.reason or "the trainer refused its config"
